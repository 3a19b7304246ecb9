"""Concurrent requests for one decode server hold their shared prompt prefix once.

With the decode-side prefix cache (``cache/prefill_module_cache.py`` on a PD decode
server), a request's prompt KV enters the decode server's tree only once its tail extend
has run (``prompt_tail_extend``: the checkpoint inserts ``prompt[:k]``, page-floored).
Requests that arrive together over one context (``n > 1``, a fan-out of agents over the
same history, a burst of sessions over one document) would each be preallocated before
any of them is in the tree: each would hold its own copy of the context in the decode
pool and each would have the prefill send it again, and a pool that holds one copy
would admit them one at a time.

One hook, AROUND ``DecodePreallocQueue.pop_preallocated``: before SGLang preallocates,
a waiting request whose ``prompt[:k]`` shares at least ``MIN_SHARED_TOKENS`` more with
a request *in flight* than the tree holds of it waits (it is left out of that call's
``rids_to_check``). In flight: preallocated and not yet in the tree (in the transfer
queue, waiting for its tail extend, or in the tail-extend batch not yet merged), or
ahead of it in the same queue and not waiting itself. Once the earlier request's KV is
in the tree, the waiting one matches it (SGLang's decode admission then needs only its
own remainder, and promises the prefill that prefix), so N requests over one context
hold it once and move it once. This is SGLang's own in-batch prefix caching (its
prefill scheduler holds back waiting requests that share a prefix not yet cached, with
the same threshold of 32 tokens) applied to the decode pool.

It changes when a request is preallocated, never what KV it holds (invariant-neutral;
invariant 1 is the tree's). It never stalls a request: a request waits only on one that
is further along and not finished (in flight, or ahead of it in the FIFO queue), an
aborted or rebootstrapped request never waits, and no request waits longer than
``MAX_WAIT_S`` in all (a prefix that never reaches the tree, e.g. evicted at once from a
full pool, costs that much once, not a stall). Only the plain case is touched: one
scheduler (no pipeline parallelism) and no ``rids_to_check`` from the caller (DP
attention, which the launcher refuses with the decode cache).
"""

from __future__ import annotations

import time

import numpy as np

from pfs_sglang.decode.admission import floor_page
from pfs_sglang.decode.prompt_split import prefill_module_len
from pfs_sglang.decode.prompt_tail_extend import in_flight_tail_extends

MIN_SHARED_TOKENS = 32  # SGLang's IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD
MAX_WAIT_S = 2.0  # the longest a request is held back for another's prefix
_PROMPT_HEAD = "pfs_prompt_head"  # the request's prompt[:floor_page(k)] as an array, computed once
_WAITING_SINCE = "pfs_shared_prefix_waiting_since"  # monotonic time it was first held back


def _prompt_head(req, page_size: int) -> np.ndarray:
    """The prompt tokens whose KV the request will insert into the decode tree."""
    head = getattr(req, _PROMPT_HEAD, None)
    if head is None:
        head = np.asarray(req.origin_input_ids[:floor_page(prefill_module_len(req), page_size)], dtype=np.int64)
        setattr(req, _PROMPT_HEAD, head)
    return head


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two prompts share."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _tree_hit(tree, req) -> int:
    """How much of the request's prompt the decode tree holds now (matched without a lock)."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(req.origin_input_ids, req.extra_key, cache_salt=req.cache_salt)
    return tree.match_prefix(MatchPrefixParams(key=key, req=req)).device_prefix_len


def _in_flight(prealloc_queue) -> list:
    """Requests preallocated on this decode server whose prompt KV is not in its tree yet."""
    transferring = [decode_req.req for decode_req in prealloc_queue.transfer_queue.queue
                    if not decode_req.req.finished()]
    return transferring + in_flight_tail_extends(prealloc_queue.scheduler)


def _may_still_wait(req) -> bool:
    """Whether the request has been held back for less than ``MAX_WAIT_S`` (the clock starts now if not yet)."""
    since = getattr(req, _WAITING_SINCE, None)
    if since is None:
        setattr(req, _WAITING_SINCE, time.monotonic())
        return True
    return time.monotonic() - since < MAX_WAIT_S


def _is_aborted(req) -> bool:
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    return isinstance(req.finished_reason, FINISH_ABORT)


def waiting_on_shared_prefix(prealloc_queue) -> set[str]:
    """The rids in the prealloc queue that wait for an earlier request's prefix to reach the tree."""
    page_size = prealloc_queue.token_to_kv_pool_allocator.page_size
    ahead = [_prompt_head(req, page_size) for req in _in_flight(prealloc_queue)]
    waiting: set[str] = set()
    for decode_req in prealloc_queue.queue:
        req = decode_req.req
        if decode_req.is_rebootstrap or _is_aborted(req):
            continue
        head = _prompt_head(req, page_size)
        shared = floor_page(max((common_prefix_len(head, other) for other in ahead), default=0), page_size)
        if (shared >= MIN_SHARED_TOKENS and shared - _tree_hit(prealloc_queue.tree_cache, req) >= MIN_SHARED_TOKENS
                and _may_still_wait(req)):
            waiting.add(req.rid)
        else:
            ahead.append(head)
    return waiting


def preallocate_after_shared_prefixes(original, prealloc_queue, rids_to_check=None, *args, **kwargs):
    """AROUND ``pop_preallocated``: requests waiting on a shared prefix are left out of this call."""
    from sglang.srt.runtime_context import get_disagg

    if (rids_to_check is not None or args or kwargs.get("pp_good_rids") is not None or prealloc_queue.pp_size > 1
            or not get_disagg().disaggregation_decode_enable_radix_cache or not prealloc_queue.queue):
        return original(prealloc_queue, rids_to_check, *args, **kwargs)
    waiting = waiting_on_shared_prefix(prealloc_queue)
    if not waiting:
        return original(prealloc_queue, rids_to_check, *args, **kwargs)
    rids = {decode_req.req.rid for decode_req in prealloc_queue.queue} - waiting
    return original(prealloc_queue, rids, *args, **kwargs)


def register_shared_prefix_wait_hook() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.disaggregation.decode.DecodePreallocQueue.pop_preallocated",
                          preallocate_after_shared_prefixes, HookType.AROUND)
