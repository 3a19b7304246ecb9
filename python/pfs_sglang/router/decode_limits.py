"""What each model's decode pool takes in, as its decode servers say: advertised, and
enforced before any hand-off where the router can count the prompt's tokens.

Invariant-neutral: which requests are served, not how. A PD decode server admits a
request only with its prompt plus SGLang's ``num_reserved_decode_tokens`` free in its KV
pool, so a pool can only ever take requests up to a limit (``pfs_sglang.decode.admission``);
the launcher and the decode server itself make SGLang refuse longer ones with a 400.
The router learns each decode server's limit once (``/server_info``: its pool
``max_total_num_tokens``, ``num_reserved_decode_tokens``, ``page_size`` and the
scheduler's ``max_req_input_len``; ``/v1/models``: the ``max_model_len`` its tokenizer
enforces), in the background, retrying a server that did not answer. With every server
of a model's pool known it

- advertises the model's context length as ``max_model_len`` in ``/v1/models`` (the
  smallest of its servers': a request may go to any);
- refuses a token-id prompt (``/generate`` ``input_ids``, ``/v1/completions`` token
  lists) that its decode servers would refuse, with a 400 naming the limit
  (``context_length_exceeded``), before any server sees it. Text prompts and chat
  messages are tokenized by the servers, which refuse them at once with SGLang's own 400.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from pfs_sglang.decode.admission import SGLANG_INPUT_MARGIN, SGLANG_RESERVED_DECODE_TOKENS, DecodePoolLimit
from pfs_sglang.router.pools import DecodePool, Worker
from pfs_sglang.router.request_body import COMPLETIONS, GENERATE, RequestRejected

logger = logging.getLogger(__name__)

RETRY_S = 10.0  # a decode server that did not tell its limit is asked again after this long


@dataclass(frozen=True)
class ServedLimit:
    """What one decode server (or, combined, a model's pool) takes: prompts of at most
    ``max_prompt_tokens`` and prompt + ``max_new_tokens`` at most ``context_length`` (the
    context it advertises)."""

    context_length: int
    max_prompt_tokens: int
    pool: DecodePoolLimit

    @classmethod
    def of_server(cls, server_info: dict[str, Any], max_model_len: int | None) -> "ServedLimit":
        pool = DecodePoolLimit(
            pool_tokens=int(server_info["max_total_num_tokens"]),
            reserved_decode_tokens=int(server_info.get("num_reserved_decode_tokens") or SGLANG_RESERVED_DECODE_TOKENS),
            page_size=int(server_info.get("page_size") or 1),
            model_context=max_model_len or server_info.get("context_length"))
        tokenizer_context = max_model_len or server_info.get("context_length") or pool.context_length
        scheduler_input = server_info.get("max_req_input_len")  # SGLang refuses a prompt of this many tokens or more
        max_prompt = min(pool.max_prompt_tokens, tokenizer_context - 1,
                         *([int(scheduler_input) - 1] if scheduler_input is not None else []))
        context = min(pool.context_length, *([int(scheduler_input) + SGLANG_INPUT_MARGIN + 1]
                                             if scheduler_input is not None else []))
        return cls(context_length=max(0, context), max_prompt_tokens=max(0, max_prompt), pool=pool)

    def tightest(self, other: "ServedLimit") -> "ServedLimit":
        return min(self, other, key=lambda limit: (limit.max_prompt_tokens, limit.context_length))

    def refusal(self, model: str, prompt_tokens: int, max_new_tokens: int | None, param: str) -> RequestRejected | None:
        """The 400 this request gets (None: it fits)."""
        why = (f"model '{model}': it serves a context of {self.context_length} tokens (prompts of at most "
               f"{self.max_prompt_tokens} tokens); its decode pool holds {self.pool.pool_tokens} KV tokens and "
               f"SGLang's decode admission reserves {self.pool.reserved_decode_tokens} of them per request")
        if prompt_tokens > self.max_prompt_tokens:
            return RequestRejected(400, f"The input ({prompt_tokens} tokens) is too long for {why}", param=param,
                                   code="context_length_exceeded")
        if max_new_tokens is not None and prompt_tokens + max_new_tokens > self.context_length:
            return RequestRejected(400, f"Requested token count ({prompt_tokens} input + {max_new_tokens} new) is too "
                                        f"long for {why}", param=param, code="context_length_exceeded")
        return None


async def fetch_limit(client: httpx.AsyncClient, worker: Worker, timeout_s: float) -> ServedLimit:
    """A decode server's limit, from its ``/server_info`` and ``/v1/models``."""
    info, models = await asyncio.gather(client.get(worker.url + "/server_info", timeout=timeout_s),
                                        client.get(worker.url + "/v1/models", timeout=timeout_s))
    info.raise_for_status()
    models.raise_for_status()
    lengths = [card.get("max_model_len") for card in models.json().get("data", []) if isinstance(card, dict)]
    return ServedLimit.of_server(info.json(), next((length for length in lengths if length), None))


class DecodeLimits:
    """Each decode server's limit, learned in the background; a model's once all its servers are known."""

    def __init__(self, pools: dict[str, DecodePool], client: httpx.AsyncClient, timeout_s: float = 10.0):
        self.pools = pools
        self.client = client
        self.timeout_s = timeout_s
        self._known: dict[str, ServedLimit] = {}  # by server URL
        self._asked_at: dict[str, float] = {}
        self._learning: asyncio.Task | None = None

    def _unknown(self, due_only: bool) -> list[Worker]:
        now = time.monotonic()
        workers = {w.url: w for pool in self.pools.values() for w in pool.workers if w.url not in self._known}
        return [w for url, w in workers.items() if not due_only or now - self._asked_at.get(url, -RETRY_S) >= RETRY_S]

    async def learn(self) -> None:
        """Ask every server not yet known (at most once per ``RETRY_S`` each)."""
        workers = self._unknown(due_only=True)
        for worker in workers:
            self._asked_at[worker.url] = time.monotonic()
        results = await asyncio.gather(*(fetch_limit(self.client, w, self.timeout_s) for w in workers),
                                       return_exceptions=True)
        for worker, result in zip(workers, results):
            if isinstance(result, ServedLimit):
                self._known[worker.url] = result
            else:
                logger.debug("pfs router: %s did not tell its limit: %r", worker.url, result)

    def learn_soon(self) -> None:
        """Start ``learn`` in the background when a server is unknown and due (no request waits for it)."""
        if (self._learning is None or self._learning.done()) and self._unknown(due_only=True):
            self._learning = asyncio.ensure_future(self.learn())

    async def learned(self) -> None:
        """Ask the servers still unknown, and wait for them (``/v1/models``)."""
        if self._learning is not None and not self._learning.done():
            await asyncio.gather(self._learning, return_exceptions=True)
        if self._unknown(due_only=True):
            await self.learn()

    def of_model(self, model: str) -> ServedLimit | None:
        """The tightest limit of the model's decode servers; None until every one is known."""
        limits = [self._known.get(worker.url) for worker in self.pools[model].workers]
        if not limits or any(limit is None for limit in limits):
            return None
        tightest = limits[0]
        for limit in limits[1:]:
            tightest = tightest.tightest(limit)
        return tightest

    def check(self, model: str, endpoint: str, body: dict[str, Any]) -> None:
        """Raise the 400 (``RequestRejected``) a token-id prompt over the model's limit gets."""
        self.learn_soon()
        limit = self.of_model(model)
        if limit is None:
            return
        for tokens, max_new, param in token_prompts(endpoint, body):
            refused = limit.refusal(model, tokens, max_new, param)
            if refused is not None:
                raise refused


def token_prompts(endpoint: str, body: dict[str, Any]) -> list[tuple[int, int | None, str]]:
    """Each token-id prompt's length, its explicit ``max_new_tokens`` (None: not given) and field."""
    field = {GENERATE: "input_ids", COMPLETIONS: "prompt"}.get(endpoint)
    value = body.get(field) if field else None
    if not isinstance(value, list) or not value or isinstance(value[0], str):
        return []
    prompts = value if isinstance(value[0], list) else [value]
    if endpoint == GENERATE:
        params = body.get("sampling_params")
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        max_new = [entry.get("max_new_tokens") if isinstance(entry, dict) else None for entry in per_prompt]
    else:
        max_new = [body.get("max_tokens")] * len(prompts)
    return [(len(prompt), new if isinstance(new, int) and not isinstance(new, bool) else None, field)
            for prompt, new in zip(prompts, max_new + [None] * (len(prompts) - len(max_new)))
            if isinstance(prompt, list)]
