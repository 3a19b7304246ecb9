"""Batches and parallel sampling: one PD hand-off per prompt and sample, one answer.

A PD hand-off carries one prompt and one sample (one bootstrap room, one KV transfer),
so a request with a list of prompts (``text`` or ``input_ids`` lists on ``/generate``, a
``prompt`` list on ``/v1/completions``) or with ``n > 1`` (OpenAI ``n``,
``sampling_params.n``) is split into ``prompts x n`` single requests with ``n = 1``.
Each is its own hand-off, so the decode module computes the last prompt token and the
first output token of every sample (invariant 2), and the samples of one prompt meet
the same prefill replica and the same nodes of its prefix tree (invariant 3).

The answer has the shape stock SGLang 0.5.23 gives the same request (read from
``tokenizer_manager._handle_batch_request``, ``GenerateReqInput`` and
``serving_completions``/``serving_chat``/``UsageProcessor``):

- order: sub-request ``k`` is prompt ``k // n``, sample ``k % n`` (each prompt's samples
  together);
- ``/generate``: a JSON list of the single replies; streamed, every event gets
  ``"index": k``;
- OpenAI: one response whose ``choices`` are indexed ``k``, the first reply's ``id``,
  and ``usage`` with the prompt (and cached) tokens of each prompt counted once and the
  completion tokens of every sample summed; streamed, each choice's ``index`` is
  rewritten and the per-sample usage events become one usage event at the end.

Per-prompt fields of a ``/generate`` batch (a list with one entry per prompt, e.g.
``sampling_params``, ``return_logprob``, ``logprob_start_len``) go to that prompt's
sub-requests; any other value goes to all. A client ``rid`` becomes ``{rid}_{k}`` (SGLang's
naming for batches; a list ``rid`` names each prompt, whose samples become
``{rid[p]}_{s}``); each sub-request keeps the rid its client names it by
(``client_rid``), so an abort by that rid reaches it and no other request's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pfs_sglang.router.request_body import CHAT, COMPLETIONS, GENERATE, RequestRejected, prompt_text

# /generate fields that a batch may give per prompt (GenerateReqInput.__getitem__).
_PER_PROMPT_FIELDS = (
    "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num", "return_sampling_mask",
    "sampling_logprobs_mode", "return_hidden_states", "custom_logit_processor", "lora_path", "extra_key",
    "cache_salt", "kv_hints", "watermark", "image_data", "video_data", "audio_data", "modalities",
    "mm_hashes", "mm_content_hashes", "token_indices_to_pool", "multi_item_delimiter_indices",
)
# token_ids_logprob is per prompt only as a list of lists (a flat list applies to all).
_NESTED_PER_PROMPT_FIELDS = ("token_ids_logprob",)


@dataclass(frozen=True)
class SubRequest:
    """One prompt and one sample: the body of one PD hand-off."""

    index: int  # place in the combined answer: prompt * n + sample
    prompt: int
    sample: int
    body: dict[str, Any]
    prompt_text: str
    client_rid: str | None = None  # the client's name for it: the request's rid, or its prompt's entry of a list


# Generations (prompts x samples) one request may ask for: each is a hand-off of its own,
# and a client's n = 10**9 must not make the router build a billion of them.
MAX_SUB_REQUESTS = 1024


@dataclass(frozen=True)
class FanOut:
    endpoint: str
    n: int
    subs: list[SubRequest]


class RunningSubRequests:
    """The rids of running sub-requests, by the rid their client names them by (``client_rid``).

    A client's abort of ``rid`` reaches exactly the sub-requests made for its requests
    named ``rid``, never those of another request whose rid only begins the same way.
    Used from the router's event loop only.
    """

    def __init__(self) -> None:
        self._by_client_rid: dict[str, list[str]] = {}

    def add(self, subs: Iterable[SubRequest]) -> None:
        for sub in subs:
            if sub.client_rid is not None and "rid" in sub.body:
                self._by_client_rid.setdefault(sub.client_rid, []).append(sub.body["rid"])

    def remove(self, subs: Iterable[SubRequest]) -> None:
        for sub in subs:
            rids = self._by_client_rid.get(sub.client_rid) if sub.client_rid is not None else None
            if rids is not None and sub.body.get("rid") in rids:
                rids.remove(sub.body["rid"])
                if not rids:
                    del self._by_client_rid[sub.client_rid]

    def of(self, client_rid: str) -> list[str]:
        """The rids of the running sub-requests the client names ``client_rid``."""
        return sorted(set(self._by_client_rid.get(client_rid, ())))


def _is_prompt_list(value: Any) -> bool:
    """A list of prompts (texts or token lists), not one prompt given as token ids."""
    return isinstance(value, list) and bool(value) and not isinstance(value[0], int)


def _sample_count(endpoint: str, body: dict[str, Any]) -> int:
    if endpoint == GENERATE:
        params = body.get("sampling_params")
        if isinstance(params, list):
            counts = {(p or {}).get("n", 1) if isinstance(p, dict) else None for p in params}
            if len(counts) != 1:
                raise RequestRejected(400, "every entry of 'sampling_params' must have the same 'n'",
                                      param="sampling_params")
            n = counts.pop()
        else:
            n = (params or {}).get("n", 1) if isinstance(params, dict) else None
        param = "sampling_params.n"
    else:
        n, param = body.get("n", 1), "n"
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestRejected(400, f"'{param}' must be an integer >= 1", param=param)
    return n


def _prompt_field(endpoint: str, body: dict[str, Any]) -> str:
    if endpoint == GENERATE:
        return "text" if body.get("text") is not None else "input_ids"
    return "prompt" if endpoint == COMPLETIONS else "messages"


def plan_fan_out(endpoint: str, body: dict[str, Any]) -> FanOut | None:
    """The sub-requests of a batched or ``n > 1`` request; None for one prompt and one sample."""
    n = _sample_count(endpoint, body)
    field = _prompt_field(endpoint, body)
    batched = endpoint != CHAT and _is_prompt_list(body.get(field))
    if not batched and n == 1:
        if isinstance(body.get("rid"), list):  # SGLang fails such a request with a 500
            raise RequestRejected(400, "'rid' is a list, but the request has one prompt", param="rid")
        return None
    prompts = body[field] if batched else [body[field]]
    if len(prompts) * n > MAX_SUB_REQUESTS:
        raise RequestRejected(400, f"{len(prompts)} prompts x n={n} is more than the {MAX_SUB_REQUESTS} generations "
                                   "one request may ask for", param="n")
    subs = []
    for prompt_index, prompt in enumerate(prompts):
        shared = _prompt_body(endpoint, body, field, prompt_index, prompt, len(prompts) if batched else None)
        for sample in range(n):
            index = prompt_index * n + sample
            sub_body = {**shared}
            rid = _sub_rid(body.get("rid"), prompt_index, sample, index, n)
            if rid is not None:
                sub_body["rid"] = rid
            subs.append(SubRequest(index, prompt_index, sample, sub_body, prompt_text(sub_body),
                                   _client_rid(body.get("rid"), prompt_index)))
    return FanOut(endpoint, n, subs)


def _prompt_body(endpoint: str, body: dict[str, Any], field: str, index: int, prompt: Any,
                 batch_size: int | None) -> dict[str, Any]:
    """The body of one prompt's sub-requests, with ``n`` taken out."""
    sub = {**body, field: prompt}
    if endpoint == GENERATE:
        if batch_size is not None:
            for name in _PER_PROMPT_FIELDS + _NESTED_PER_PROMPT_FIELDS:
                if name in body:
                    sub[name] = _for_prompt(name, body[name], index, batch_size)
        params = sub.get("sampling_params")
        if isinstance(params, dict):
            sub["sampling_params"] = {key: value for key, value in params.items() if key != "n"}
    else:
        sub.pop("n", None)
    return sub


def _for_prompt(name: str, value: Any, index: int, batch_size: int) -> Any:
    per_prompt = isinstance(value, list) and (name not in _NESTED_PER_PROMPT_FIELDS
                                              or (bool(value) and isinstance(value[0], list)))
    if not per_prompt:
        return value
    if len(value) != batch_size:
        raise RequestRejected(400, f"'{name}' has {len(value)} entries for {batch_size} prompts", param=name)
    return value[index]


def _client_rid(rid: str | list[str] | None, prompt: int) -> str | None:
    """The rid the client names prompt ``prompt``'s sub-requests by (its abort names it)."""
    return rid[prompt] if isinstance(rid, list) else rid


def _sub_rid(rid: str | list[str] | None, prompt: int, sample: int, index: int, n: int) -> str | None:
    """The sub-request's rid; ``rid``'s type was checked by ``request_body.parse_request``."""
    if rid is None:
        return None
    if isinstance(rid, str):
        return f"{rid}_{index}"
    if prompt >= len(rid):
        raise RequestRejected(400, "'rid' needs one entry per prompt", param="rid")
    return rid[prompt] if n == 1 else f"{rid[prompt]}_{sample}"


# ----- combining the replies -----

def combine(plan: FanOut, replies: list[dict[str, Any]]) -> Any:
    """The answer to the client: replies[k] is the reply to ``plan.subs[k]``."""
    if plan.endpoint == GENERATE:
        return replies
    first = replies[0]
    choices = [{**choice, "index": sub.index} for sub, reply in zip(plan.subs, replies)
               for choice in reply.get("choices") or []]
    combined = {**first, "choices": choices}
    usages = [reply.get("usage") for reply in replies]
    if all(isinstance(usage, dict) for usage in usages):
        combined["usage"] = merge_usage(plan, dict(zip((sub.index for sub in plan.subs), usages)))
    return combined


def merge_usage(plan: FanOut, usages: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """SGLang's ``UsageProcessor``: prompt and cached tokens once per prompt, completion tokens of all."""
    first_samples = [usage for index, usage in sorted(usages.items()) if index % plan.n == 0]
    base = dict(next(iter(usages.values())))
    prompt_tokens = sum(usage.get("prompt_tokens") or 0 for usage in first_samples)
    completion_tokens = sum(usage.get("completion_tokens") or 0 for usage in usages.values())
    cached = sum(((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0) for usage in first_samples)
    base.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
                prompt_tokens_details={**(base.get("prompt_tokens_details") or {}), "cached_tokens": cached})
    reasoning = sum(usage.get("reasoning_tokens") or 0 for usage in usages.values())
    if "reasoning_tokens" in base:
        base["reasoning_tokens"] = reasoning
    if isinstance(base.get("completion_tokens_details"), dict):
        base["completion_tokens_details"] = {**base["completion_tokens_details"], "reasoning_tokens": reasoning}
    return base


class StreamMerger:
    """Rewrites the SSE events of the sub-streams into the one stream SGLang would send."""

    def __init__(self, plan: FanOut):
        self.plan = plan
        self._usage_events: dict[int, dict[str, Any]] = {}

    def event(self, sub: SubRequest, event: dict[str, Any]) -> dict[str, Any] | None:
        """The event to send for one sub-stream event, or None to hold it back (usage, sent at the end)."""
        if self.plan.endpoint == GENERATE:
            return {**event, "index": sub.index}
        choices = event.get("choices")
        if not choices and isinstance(event.get("usage"), dict):
            self._usage_events[sub.index] = event
            return None
        if choices:
            event = {**event, "choices": [{**choice, "index": sub.index} for choice in choices]}
        return event

    def final_events(self) -> Iterable[dict[str, Any]]:
        """The merged usage event, once every sub-stream sent its own."""
        if self._usage_events and len(self._usage_events) == len(self.plan.subs):
            last = self._usage_events[max(self._usage_events)]
            usage = merge_usage(self.plan, {k: e["usage"] for k, e in self._usage_events.items()})
            yield {**last, "usage": usage}


def sse(event: dict[str, Any] | str) -> bytes:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
