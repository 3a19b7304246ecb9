"""Exact-match evaluation through a running deployment: the held-out set sent to the router.

Owns the served path of ``python -m pfs_sglang.train eval DATA --url URL --served-model
NAME``: it reads the held-out JSONL with the offline evaluation's own reader
(``data.load_examples``, the base's tokenizer), sends every prompt to the deployment's
SGLang-shaped ``/generate`` as ``input_ids`` (exactly the token ids the offline
evaluation feeds its models), greedy (``temperature`` 0), with the same
``max_new_tokens`` and the offline stop rule (the tokenizer's end-of-turn token, and the
answer cut there), decodes each answer as the offline path does (special tokens
dropped) and scores them with ``evaluate.score_answers``. Requests run concurrently,
at most ``concurrency`` in flight. A deployment serving the decode module the offline
evaluation loads (base KV of ``prompt[:-1]``, the decode module from ``prompt[-1]``:
invariant 2) must therefore give the same answers, example by example (invariant 5:
greedy, float32).

Errors a user can act on are ``ServedEvalError`` with the reason: the deployment is
unreachable, refuses the key, does not serve the model, or refuses a request (its
status and message). The tokenizer is ``tokenizer_dir`` when given, else the one the
model's decode server loaded (``/models/NAME/get_model_info``), when that path exists on
this machine.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm
from transformers import AutoTokenizer

from pfs_sglang.train.data import Example, load_examples
from pfs_sglang.train.evaluate import EvalResult, score_answers

REQUEST_TIMEOUT_S = 300.0  # one generation, queued behind the others on a busy deployment


class ServedEvalError(RuntimeError):
    """The deployment could not be used for the evaluation (why is in the message)."""


@dataclass(frozen=True)
class ServedModel:
    """A decode model of a running deployment: the router's URL and the model's name there."""

    url: str
    model: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class GreedyRequest:
    """What one held-out example asks of the deployment."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop_token_id: int

    def body(self, model: str) -> dict[str, Any]:
        return {"model": model, "input_ids": self.prompt_ids, "sampling_params": {
            "max_new_tokens": self.max_new_tokens, "temperature": 0, "stop_token_ids": [self.stop_token_id]}}

    def answer_ids(self, output_ids: list[int]) -> list[int]:
        """The generated ids up to the first stop token (kept: decoding drops it), as the offline path stops."""
        if self.stop_token_id in output_ids:
            return output_ids[:output_ids.index(self.stop_token_id) + 1]
        return output_ids


def _error_message(reply: httpx.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.text[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return reply.text[:500]


def _get(client: httpx.Client, target: ServedModel, path: str) -> httpx.Response:
    try:
        reply = client.get(target.url + path, headers=target.headers)
    except httpx.HTTPError as error:
        raise ServedEvalError(f"cannot reach the deployment at {target.url}: {error}") from error
    if reply.status_code == 401:
        raise ServedEvalError(f"{target.url} refused the API key ({_error_message(reply)}); pass --api-key")
    return reply


def check_served(client: httpx.Client, target: ServedModel) -> None:
    """The deployment answers and serves ``target.model``; else ``ServedEvalError`` saying why."""
    reply = _get(client, target, f"/v1/models/{target.model}")
    if reply.status_code == 200:
        return
    if reply.status_code == 404:
        models = _get(client, target, "/v1/models")
        served = [card.get("id") for card in models.json().get("data", [])] if models.status_code == 200 else []
        raise ServedEvalError(f"{target.url} does not serve {target.model!r}; it serves {served}")
    raise ServedEvalError(f"{target.url}/v1/models/{target.model}: HTTP {reply.status_code}: {_error_message(reply)}")


def served_tokenizer_dir(client: httpx.Client, target: ServedModel) -> Path:
    """The tokenizer the model's decode server loaded, if its path exists on this machine."""
    reply = _get(client, target, f"/models/{target.model}/get_model_info")
    if reply.status_code != 200:
        raise ServedEvalError(f"{target.url} did not say which tokenizer {target.model!r} uses (HTTP "
                              f"{reply.status_code}: {_error_message(reply)}); pass --tokenizer")
    path = Path(str(reply.json().get("tokenizer_path", "")))
    if not path.is_dir():
        raise ServedEvalError(f"{target.model!r} is served with the tokenizer at {path}, which is not a directory "
                              "on this machine; pass --tokenizer (the base's tokenizer)")
    return path


def generate(client: httpx.Client, target: ServedModel, request: GreedyRequest) -> list[int]:
    """One greedy generation through the router's ``/generate``: the answer's token ids."""
    try:
        reply = client.post(target.url + "/generate", json=request.body(target.model), headers=target.headers)
    except httpx.HTTPError as error:
        raise ServedEvalError(f"{target.url}/generate failed: {error!r}") from error
    if reply.status_code != 200:
        raise ServedEvalError(f"{target.url}/generate refused a prompt of {len(request.prompt_ids)} tokens: "
                              f"HTTP {reply.status_code}: {_error_message(reply)}")
    output_ids = reply.json().get("output_ids")
    if not isinstance(output_ids, list):
        raise ServedEvalError(f"{target.url}/generate replied without 'output_ids': {reply.text[:300]}")
    return request.answer_ids(output_ids)


def served_greedy_answers(client: httpx.Client, target: ServedModel, tokenizer, examples: list[Example],
                          max_new_tokens: int = 16, concurrency: int = 8) -> list[str]:
    """Every example's greedy answer from the deployment (decoded, special tokens dropped), in order."""
    requests = [GreedyRequest(example.prompt_ids, max_new_tokens, tokenizer.eos_token_id) for example in examples]
    answer_ids: list[list[int] | None] = [None] * len(requests)
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(requests), desc=f"served eval {target.model}", leave=False) as progress:
        futures = {pool.submit(generate, client, target, request): index for index, request in enumerate(requests)}
        try:
            for future in concurrent.futures.as_completed(futures):
                answer_ids[futures[future]] = future.result()
                progress.update()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return tokenizer.batch_decode(answer_ids, skip_special_tokens=True)


def served_exact_match(target: ServedModel, data: str | Path, tokenizer_dir: str | Path | None = None,
                       max_new_tokens: int = 16, concurrency: int = 8) -> EvalResult:
    """Accuracy of the deployment's ``target.model`` on ``data``: ``evaluate.exact_match``'s, through the server."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout, limits=limits) as client:
        check_served(client, target)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or served_tokenizer_dir(client, target))
        examples = load_examples(data, tokenizer)
        answers = served_greedy_answers(client, target, tokenizer, examples, max_new_tokens, concurrency)
    return score_answers(examples, answers, tokenizer, model=target.model, prefill=f"the deployment at {target.url}")
