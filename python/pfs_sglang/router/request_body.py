"""What the router reads from a client's request body, and the checks that answer 4xx.

A request names a decode model (``model``; ``/generate`` may leave it out and get the
default model, as SGLang frontend programs do), carries a prompt (or a batch of them,
and ``n`` samples each: ``fanout.py`` splits those into one hand-off per prompt and
sample), and may stream. The prompt text is only used for prefix locality. Token-id
prompts are checked against the vocabulary: SGLang does not check them, and one id
past the embedding table kills the scheduler that runs it (and every request on it).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATE = "/generate"

_PROMPT_FIELDS = {CHAT: ("messages",), COMPLETIONS: ("prompt",), GENERATE: ("text", "input_ids")}


class RequestRejected(Exception):
    """A request the router answers itself with an OpenAI-style error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class RoutedRequest:
    endpoint: str
    model: str
    body: dict[str, Any]
    stream: bool
    prompt_text: str


def prompt_text(body: dict[str, Any]) -> str:
    """The request's prompt as text, for prefix locality (the exact tokens do not matter)."""
    if "messages" in body:
        return "".join(f"{message.get('role', '')}:{_content_text(message.get('content'))}\n"
                       for message in body["messages"])
    value = body.get("prompt", body.get("text", body.get("input_ids", "")))
    return value if isinstance(value, str) else json.dumps(value)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _check_token_ids(body: dict[str, Any], field: str, vocab_size: int) -> None:
    """Every token id of a token-id prompt (one list, or a batch of them) is in ``[0, vocab_size)``."""
    value = body.get(field)
    if not isinstance(value, list) or not value:
        return
    if isinstance(value[0], str):
        return  # a batch of texts (completions): no token ids to check
    for prompt in value if isinstance(value[0], list) else [value]:
        for token in prompt if isinstance(prompt, list) else [prompt]:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise RequestRejected(400, f"token id {token!r} in '{field}' is not in the vocabulary "
                                           f"[0, {vocab_size})", param=field)


def parse_request(endpoint: str, raw: bytes, served_models: Collection[str], default_model: str,
                  vocab_size: int | None = None) -> RoutedRequest:
    """Read and check a request body; raise ``RequestRejected`` (400/404) when it cannot be routed."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestRejected(400, f"request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise RequestRejected(400, "request body must be a JSON object")

    model = body.get("model")
    if model is None and endpoint == GENERATE:
        model = default_model
    if not isinstance(model, str) or not model:
        raise RequestRejected(400, "the 'model' field is required (a model name from /v1/models)", param="model")
    if model not in served_models:
        raise RequestRejected(404, f"The model '{model}' does not exist. Served models: {sorted(served_models)}",
                              param="model", code="model_not_found")

    fields = _PROMPT_FIELDS[endpoint]
    if not any(body.get(name) for name in fields):
        raise RequestRejected(400, f"the request needs a non-empty {' or '.join(repr(f) for f in fields)} field",
                              param=fields[0])
    if endpoint == CHAT and not (isinstance(body["messages"], list)
                                 and all(isinstance(message, dict) for message in body["messages"])):
        raise RequestRejected(400, "'messages' must be a list of message objects", param="messages")
    if vocab_size is not None:
        _check_token_ids(body, "input_ids" if endpoint == GENERATE else "prompt", vocab_size)
    return RoutedRequest(endpoint=endpoint, model=model, body=body, stream=bool(body.get("stream")),
                         prompt_text=prompt_text(body))
