"""What a PD decode pool can take in: the longest request it can ever admit, and the cap
that keeps every request a decode server accepts admissible (no request waits forever).

Invariant-neutral: which requests a decode server takes, not what it computes.

SGLang 0.5.23's decode admission (``disaggregation/decode.py``,
``DecodePreallocQueue.pop_preallocated``) pre-allocates a request's prompt only when the
free pool holds its pages *plus* ``num_reserved_decode_tokens`` (``--num-reserved-decode-tokens``,
512 by default) for its decode steps, and takes its queue in order, stopping at the
first request that does not fit. Its only size check (``_check_if_req_exceed_kv_capacity``)
refuses a prompt longer than the whole pool, not one longer than the pool less the
reserve; and a retracted request is resumed only under the same condition, while no new
request is admitted until every retracted one has been. So on a decode pool of P tokens a
prompt of more than P - reserve tokens (or a request that grows past it and is retracted)
is never admitted and blocks every request queued behind it: the prefill server's
bootstrap times out, the decode server's own health check fails (it waits in the same
queue), and each client waits for its deadline.

The fix is SGLang's own rule for a pool smaller than the context (``TpModelWorker.get_worker_info``:
``max_req_len = min(context_len - 1, kv_capacity - 1)``, ``max_req_input_len = max_req_len - 5``),
with the pool's capacity taken as what its admission can ever give one request:

    admissible = floor_page(floor_page(P) - reserve)

(page-floored: the allocator hands out whole pages). A decode server's context length is
then ``min(the model's, admissible)`` (:class:`DecodePoolLimit`). With it SGLang refuses a
longer prompt with 400 at once (its tokenizer: "The input (N tokens) is longer than the
model's context length (C tokens)"; its scheduler: "Input length (N tokens) exceeds the
maximum allowed length (M tokens)") and caps ``max_new_tokens`` so a request never grows
past what a retraction could restore; every request it accepts fits the pool alone, so
the queue always moves.

Three places use it: the launcher passes ``--context-length`` to a decode server whose
pool it sizes (``launch/decode_limits.py``, printed by ``--dry-run``); the router
advertises each model's limit and refuses token-id prompts over it before any hand-off
(``router/decode_limits.py``); and on every decode server, whatever sized its pool (a
GPU's memory fraction), :func:`cap_request_length_to_decode_pool` lowers the scheduler's
``max_req_len`` / ``max_req_input_len`` to the pool's limit once the pool is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SGLANG_RESERVED_DECODE_TOKENS = 512  # SGLang 0.5.23's default --num-reserved-decode-tokens
# SGLang's scheduler: max_req_len = context - 1, max_req_input_len = max_req_len - 5, and a
# prompt must be shorter than max_req_input_len; max_new_tokens is capped at max_req_len - prompt - 1.
SGLANG_INPUT_MARGIN = 5


def floor_page(tokens: int, page_size: int) -> int:
    return tokens // page_size * page_size


@dataclass(frozen=True)
class DecodePoolLimit:
    """A decode server's KV pool (``pool_tokens``, SGLang's ``max_total_num_tokens``), the
    tokens SGLang reserves per request for decoding, its page size, and the model's own
    context length (``None``: not known, the pool alone decides)."""

    pool_tokens: int
    reserved_decode_tokens: int = SGLANG_RESERVED_DECODE_TOKENS
    page_size: int = 1
    model_context: int | None = None

    @property
    def admissible_tokens(self) -> int:
        """The most KV one request can ever be admitted with on this pool (0: none)."""
        return max(0, floor_page(floor_page(self.pool_tokens, self.page_size) - self.reserved_decode_tokens,
                                 self.page_size))

    @property
    def context_length(self) -> int:
        """What the server serves as its context length: prompt + completion at most this."""
        admissible = self.admissible_tokens
        return admissible if self.model_context is None else min(self.model_context, admissible)

    @property
    def pool_bound(self) -> bool:
        """The pool, not the model, sets the context length."""
        return self.model_context is None or self.admissible_tokens < self.model_context

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt SGLang's scheduler takes with this context length (0: none)."""
        return max(0, self.context_length - 2 - SGLANG_INPUT_MARGIN)

    def max_new_tokens_for(self, prompt_tokens: int) -> int:
        """The most tokens SGLang lets a prompt of ``prompt_tokens`` generate (it caps ``max_new_tokens`` there)."""
        return max(0, self.context_length - 2 - prompt_tokens)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """SGLang serves this request whole: the prompt is taken and ``max_new_tokens`` not capped."""
        return prompt_tokens <= self.max_prompt_tokens and max_new_tokens <= self.max_new_tokens_for(prompt_tokens)

    def describe(self) -> str:
        own = "" if self.model_context is None else f"; the model's own: {self.model_context}"
        if self.admissible_tokens == 0:
            return (f"KV pool of {self.pool_tokens} tokens admits no request: SGLang's decode admission reserves "
                    f"{self.reserved_decode_tokens} tokens per request on top of its prompt")
        return (f"context length {self.context_length} tokens (prompts up to {self.max_prompt_tokens}): KV pool "
                f"{self.pool_tokens} tokens, {self.reserved_decode_tokens} reserved per request by SGLang's decode "
                f"admission{f', page size {self.page_size}' if self.page_size > 1 else ''}{own}")


def pool_tokens_for(context_tokens: int, reserved_decode_tokens: int = SGLANG_RESERVED_DECODE_TOKENS,
                    page_size: int = 1) -> int:
    """The smallest decode pool whose context length is at least ``context_tokens``."""
    pages = -(-context_tokens // page_size) + -(-reserved_decode_tokens // page_size)
    return pages * page_size


def context_needed(prompt_tokens: int, max_new_tokens: int) -> int:
    """The context length that serves this request whole (SGLang's margins included)."""
    return max(prompt_tokens + 2 + SGLANG_INPUT_MARGIN, prompt_tokens + max_new_tokens + 2)


# ----- on the decode server (the plugin registers it in every SGLang process) -----

def cap_request_length_to_decode_pool(original, scheduler, *args, **kwargs):
    """After SGLang's scheduler sets up disaggregation: on a decode server, lower
    ``max_req_len`` and ``max_req_input_len`` to the pool's :class:`DecodePoolLimit`, so a
    request its admission could never take is refused at once (and none grows past it)."""
    result = original(scheduler, *args, **kwargs)
    mode = scheduler.disaggregation_mode  # SGLang's DisaggregationMode
    if getattr(mode, "value", mode) != "decode":
        return result
    limit = DecodePoolLimit(pool_tokens=scheduler.max_total_num_tokens,
                            reserved_decode_tokens=scheduler.disagg_decode_prealloc_queue.num_reserved_decode_tokens,
                            page_size=scheduler.page_size)
    capped = limit.context_length - 1
    if capped < scheduler.max_req_len:
        lowered = scheduler.max_req_len - capped
        scheduler.max_req_len = capped
        scheduler.max_req_input_len -= lowered
        log = logger.error if limit.admissible_tokens == 0 else logger.warning
        log("pfs_sglang: decode %s; requests limited to %d tokens (max_req_len %d, max_req_input_len %d): "
            "a longer one could never be admitted", limit.describe(), limit.context_length, scheduler.max_req_len,
            scheduler.max_req_input_len)
    return result


def register_decode_admission_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.init_disaggregation",
                          cap_request_length_to_decode_pool, HookType.AROUND)
