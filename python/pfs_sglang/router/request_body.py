"""What the router reads from a client's request body, and the checks that answer 4xx.

A request names a decode model (``model``; ``/generate`` may leave it out and get the
default model, as SGLang frontend programs do), carries a prompt (or a batch of them,
and ``n`` samples each: ``fanout.py`` splits those into one hand-off per prompt and
sample), and may stream. The prompt text is only used for prefix locality. Token-id
prompts are checked against the vocabulary: SGLang does not check them, and one id
past the embedding table kills the scheduler that runs it (and every request on it).
A field that no SGLang request type of the endpoint has (a misspelling such as
``max_token``) is refused with 400 and the nearest known name, where SGLang and
pydantic would drop it silently (OpenAI's API refuses it too).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pfs_sglang.router.sglang_fields import fields_of

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATE = "/generate"

_PROMPT_FIELDS = {CHAT: ("messages",), COMPLETIONS: ("prompt",), GENERATE: ("text", "input_ids")}
# SGLang's request type per endpoint (``sglang_fields.py`` reads their fields), and the
# fields the router itself reads beyond them.
_REQUEST_TYPE = {CHAT: "ChatCompletionRequest", COMPLETIONS: "CompletionRequest", GENERATE: "GenerateReqInput"}
_ROUTER_FIELDS = {GENERATE: {"model"}}


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


INT64 = (-(2 ** 63), 2 ** 63 - 1)
# Sampling fields SGLang does arithmetic on before checking their type (a wrong type is a 500 there).
_NUMERIC_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                            "repetition_penalty", "max_new_tokens", "min_new_tokens", "n")


def _check_fields_sglang_reads_unchecked(endpoint: str, body: dict[str, Any]) -> None:
    """Refuse (400) the wrong types SGLang 0.5.23 answers with a 500, found by fuzzing:
    a ``rid`` that is not a string or a list of strings, a ``response_format`` that is not an object (its validator calls ``.get`` on it), and
    ``/generate`` sampling parameters that are not objects or hold a non-number where a
    number belongs (``SamplingParams`` compares them before checking)."""
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str) and not (
            isinstance(rid, list) and rid and all(isinstance(r, str) for r in rid)):
        raise RequestRejected(400, "'rid' must be a string (or a list of strings, one per prompt)", param="rid")
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise RequestRejected(400, "'response_format' must be an object", param="response_format")
    if endpoint != GENERATE or body.get("sampling_params") is None:
        return
    params = body["sampling_params"]
    for entry in params if isinstance(params, list) else [params]:
        if not isinstance(entry, dict):
            raise RequestRejected(400, "'sampling_params' must be an object (or a list of objects, one per prompt)",
                                  param="sampling_params")
        for name in _NUMERIC_SAMPLING_FIELDS:
            value = entry.get(name)
            if value is None and name == "max_new_tokens":
                continue  # SGLang's "no limit"
            if name in entry and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RequestRejected(400, f"'sampling_params.{name}' must be a number", param=f"sampling_params.{name}")


def _check_known_fields(endpoint: str, body: dict[str, Any]) -> None:
    """Every field is one SGLang's request type for ``endpoint`` has (and every
    ``/generate`` sampling parameter one of ``SamplingParams``); else 400 naming it."""
    known = fields_of(_REQUEST_TYPE[endpoint]) | _ROUTER_FIELDS.get(endpoint, set())
    _refuse_unknown(body, known, "")
    params = body.get("sampling_params") if endpoint == GENERATE else None
    for entry in params if isinstance(params, list) else [params]:
        if isinstance(entry, dict):
            _refuse_unknown(entry, fields_of("SamplingParams"), "sampling_params.")


def _refuse_unknown(fields: dict[str, Any], known: Collection[str], prefix: str) -> None:
    for name in fields:
        if name not in known:
            nearest = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f"; did you mean '{prefix}{nearest[0]}'?" if nearest else ""
            raise RequestRejected(400, f"Unrecognized request argument supplied: '{prefix}{name}'{hint}",
                                  param=f"{prefix}{name}", code="unknown_parameter")


def _integer_out_of_range(value: Any, path: str = "") -> str | None:
    """Where ``value`` holds an integer no 64-bit field takes (SGLang answers such a
    number with a 500: e.g. ``"temperature": 10**30`` overflows its sampling tensors)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return path if not INT64[0] <= value <= INT64[1] else None
    if isinstance(value, list) and value and all(type(item) is int for item in value):  # token ids: one pass
        if INT64[0] <= min(value) and max(value) <= INT64[1]:
            return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _integer_out_of_range(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def parse_request(endpoint: str, raw: bytes, served_models: Collection[str], default_model: str,
                  vocab_size: int | None = None, path_model: str | None = None) -> RoutedRequest:
    """Read and check a request body; raise ``RequestRejected`` (400/404) when it cannot be routed.

    ``path_model`` (from a ``/models/{model}/`` path) is the model of a body that names
    none, on every endpoint; a body naming another model is refused."""
    try:
        body = json.loads(raw)
        out_of_range = _integer_out_of_range(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestRejected(400, f"request body is not valid JSON: {error}") from error
    except RecursionError as error:
        raise RequestRejected(400, "request body is nested too deeply") from error
    if not isinstance(body, dict):
        raise RequestRejected(400, "request body must be a JSON object")
    if out_of_range is not None:
        raise RequestRejected(400, f"'{out_of_range}' holds an integer outside the 64-bit range", param=out_of_range)

    model = body.get("model")
    if path_model is not None and model is not None and model != path_model:
        raise RequestRejected(400, f"the path names the model '{path_model}' but the body names {model!r}",
                              param="model")
    if model is None and path_model is not None:
        model, body["model"] = path_model, path_model
    if model is None and endpoint == GENERATE:
        model = default_model
    if not isinstance(model, str) or not model:
        raise RequestRejected(400, "the 'model' field is required (a model name from /v1/models)", param="model")
    if model not in served_models:
        raise RequestRejected(404, f"The model '{model}' does not exist. Served models: {sorted(served_models)}",
                              param="model", code="model_not_found")

    if body.get("lora_path") is not None:  # the router names a model's adapter, to its decode server only
        raise RequestRejected(400, "'lora_path' is not taken here: a LoRA decode module is chosen by its model name "
                              "(the router passes its adapter to the decode server only)", param="lora_path")
    fields = _PROMPT_FIELDS[endpoint]
    if not any(body.get(name) for name in fields):
        raise RequestRejected(400, f"the request needs a non-empty {' or '.join(repr(f) for f in fields)} field",
                              param=fields[0])
    if endpoint == CHAT and not (isinstance(body["messages"], list)
                                 and all(isinstance(message, dict) for message in body["messages"])):
        raise RequestRejected(400, "'messages' must be a list of message objects", param="messages")
    _check_known_fields(endpoint, body)
    _check_fields_sglang_reads_unchecked(endpoint, body)
    if vocab_size is not None:
        _check_token_ids(body, "input_ids" if endpoint == GENERATE else "prompt", vocab_size)
    return RoutedRequest(endpoint=endpoint, model=model, body=body, stream=bool(body.get("stream")),
                         prompt_text=prompt_text(body))
