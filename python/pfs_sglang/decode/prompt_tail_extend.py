"""The decode module computes the prompt's tail and every output token (invariant 2).

Stock SGLang PD appends the first output token sampled by the *prefill* server and
never runs a forward on the decode server until the next token. Under PrefillShare
that token would come from the frozen base. Here the prefill server sends the KV of
``prompt[:k]`` only (``k`` from :mod:`pfs_sglang.decode.prompt_split`; ``len - 1``
unless input logprobs are asked for), and the decode server runs ``prompt[k:]`` as an
ordinary EXTEND batch over that KV, so the decode module samples the first token and
returns the input logprobs. Seven hooks:

1. ``commit_transfer_without_prefill_token`` (AROUND ``_commit_transfer_to_req``): the
   prefill's token, its logprob rows and its sampling-mask row are taken back out
   (and it never reaches the reasoning-token count: hook 2), and the request is
   marked for the tail extend.
2. ``reasoning_tokens_without_prefill_token`` (AROUND
   ``_maybe_update_reasoning_tokens``): skipped while hook 1 commits.
3. ``resume_retracted_with_tail_extend`` (AROUND ``resume_retracted_reqs``): SGLang's
   retraction backup (``cpu_tensor`` or ``host_pool``) restores the request's exact KV,
   base KV for the prompt and decode-module KV for what the decode module computed
   (invariant 1 holds: nothing is recomputed by the prefill module). A request
   retracted before its first token was processed (overlap scheduling) has no output
   yet: it is marked for the tail extend again instead of SGLang's prebuilt path.
4. ``next_decode_batch_with_tail_extend`` (AROUND
   ``get_next_disagg_decode_batch_to_run``): marked requests in the waiting queue run
   as one EXTEND batch; SGLang's run and result paths treat it as a prefill batch
   (first token sampled, grammar advanced, logprobs recorded).
5. ``stream_input_logprobs_from_decode`` (AROUND the output accumulator's
   ``__post_init__``): SGLang's decode servers never send input logprobs (in stock PD
   the prefill server computed them); here the decode module computed them in the
   tail extend, so the decode server sends them, as a non-PD server does. Requests
   that asked for none have none to send, so nothing else changes.
6. ``reserve_for_tail_extend_batch`` (AROUND ``_allocatable_token_budgets``): between
   its run and its merge, a tail-extend batch's requests are in no queue, so their
   decode reserve is counted here, as SGLang counts a prebuilt batch's; admission
   control never over-admits behind an extend.
7. ``lora_budget_counts_tail_extend_batch`` (AROUND ``Scheduler.can_schedule_lora_req``):
   likewise for adapters: a LoRA decode server admits a request only if its adapter,
   those running, those queued *and* those of an unmerged tail-extend batch fit its
   ``--max-loras-per-batch``; otherwise the merge could make a batch of more adapters
   than the pool holds (SGLang's ``fetch_new_loras`` asserts, and the server dies).

How each scheduling mode holds:

* **Overlap scheduling**: the extend batch becomes ``scheduler.last_batch`` like any
  batch, and the next call merges it into the running batch exactly as SGLang's own
  ``get_next_batch_to_run`` merges a prefill batch; every batch is ``last_batch`` for
  one call only, so it merges once, and SGLang's loop processes its result once, in
  order (in the overlap loop one step later, after the first decode step was launched
  from the future map, as for stock prefills).
* **Decode-side prefix cache** (``--disaggregation-decode-enable-radix-cache`` with the
  ``pfs`` tree, ``cache/prefill_module_cache.py``): a hit of ``P`` tokens is the row's
  first ``P`` slots, ``P <= floor_page(k)``; the prefill sent the pages after it; the
  extend still computes ``prompt[k:]`` and its checkpoint inserts at most
  ``floor_page(k)`` tokens, so the decode module's KV never enters the tree (invariant 1).
* **Paged KV**: the decode server preallocated whole pages for ``prompt[:len]``. The
  pages past the one holding token ``k - 1`` are given back, then the extend allocates
  ``prompt[k:]`` from SGLang's allocator (continuing inside the kept partial page), so
  no page is lost or freed twice for any ``len`` or ``k`` modulo the page size. The
  extend never needs more memory than it gave back, so it cannot run out.
* **DP attention**: the extend batch goes through ``maybe_prepare_mlp_sync_batch`` like
  every batch the decode loop runs, so ranks stay in step.
* **Grammar**: requests whose grammar became ready are queued before the batch is
  built, as SGLang's prebuilt path does.
"""

from __future__ import annotations

import torch

from pfs_sglang.decode.prompt_split import prefill_module_len

_NEEDS_TAIL_EXTEND = "pfs_needs_tail_extend"
_COMMITTING = "pfs_committing_transfer"
_TAIL_EXTEND_BATCH = "pfs_tail_extend_batch"
# The prefix this decode server held in its prefix cache when the request's KV arrived
# (SGLang's decode_prefix_len; reported in its reply by transfer/transfer_report.py).
DECODE_PREFIX_LEN = "pfs_decode_prefix_len"


def _drop_last_appended(values: list | None) -> None:
    if values:
        values.pop()


def commit_transfer_without_prefill_token(original, transfer_queue, decode_req) -> None:
    req = decode_req.req
    fresh = not req.output_ids and not decode_req.is_rebootstrap
    if fresh:  # admission set it to the decode cache's hit; the tail extend's checkpoint moves it on
        setattr(req, DECODE_PREFIX_LEN, req.kv.cache_protected_len)
    setattr(req, _COMMITTING, True)
    try:
        original(transfer_queue, decode_req)
    finally:
        setattr(req, _COMMITTING, False)
    if not fresh or len(req.output_ids) != 1 or req.finished() or req.to_finish is not None:
        return
    req.output_ids.pop()
    if req.return_logprob:
        logprob = req.logprob
        for rows in (
            logprob.output_token_logprobs_val,
            logprob.output_token_logprobs_idx,
            logprob.output_top_logprobs_val,
            logprob.output_top_logprobs_idx,
        ):
            _drop_last_appended(rows)
        if logprob.token_ids_logprob is not None:
            _drop_last_appended(logprob.output_token_ids_logprobs_val)
            _drop_last_appended(logprob.output_token_ids_logprobs_idx)
    if req.return_sampling_mask and req.sampling_mask_rows is not None:
        req.sampling_mask_rows.take()  # a fresh request's only queued row is the prefill's
    setattr(req, _NEEDS_TAIL_EXTEND, True)


def reasoning_tokens_without_prefill_token(original, processor, req, next_token_id):
    if getattr(req, _COMMITTING, False):
        return None  # the prefill's token is dropped; the decode module's is counted
    return original(processor, req, next_token_id)


def resume_retracted_with_tail_extend(original, prealloc_queue, *args, **kwargs):
    resumed = original(prealloc_queue, *args, **kwargs)
    for req in resumed:
        if not req.output_ids:
            setattr(req, _NEEDS_TAIL_EXTEND, True)
    return resumed


def stream_input_logprobs_from_decode(original, accumulator, *args, **kwargs):
    from sglang.srt.disaggregation.utils import DisaggregationMode

    original(accumulator, *args, **kwargs)
    if accumulator.disaggregation_mode == DisaggregationMode.DECODE:
        # Its one use: "decode servers send no input logprobs". Ours computed them.
        accumulator.disaggregation_mode = DisaggregationMode.NULL


def _is_unmerged_tail_extend(batch) -> bool:
    return batch is not None and getattr(batch, _TAIL_EXTEND_BATCH, False) and batch.forward_mode.is_extend()


def in_flight_tail_extends(scheduler) -> list:
    """Requests whose prompt KV arrived but may not be in the decode tree yet: queued for
    their tail extend, or in the tail-extend batch that ran last (under overlap scheduling
    its result, and with it the checkpoint, comes one step later). A finished request is
    not among them: whatever it inserts, it has."""
    queued = [req for req in scheduler.waiting_queue if getattr(req, _NEEDS_TAIL_EXTEND, False)]
    last_batch = scheduler.last_batch
    last = [req for req in last_batch.reqs if not req.finished()] if _is_unmerged_tail_extend(last_batch) else []
    return [req for req in queued if not req.finished()] + last


def reserve_for_tail_extend_batch(original, prealloc_queue, *args, **kwargs):
    allocatable = original(prealloc_queue, *args, **kwargs)
    last_batch = prealloc_queue.scheduler.last_batch
    if _is_unmerged_tail_extend(last_batch):
        allocatable -= prealloc_queue.num_reserved_decode_tokens * len(last_batch.reqs)
    return allocatable


def lora_budget_counts_tail_extend_batch(original, scheduler, req, running_loras, *args, **kwargs):
    last_batch = scheduler.last_batch
    if _is_unmerged_tail_extend(last_batch):
        running_loras = set(running_loras) | {extended.lora_id for extended in last_batch.reqs}
    return original(scheduler, req, running_loras, *args, **kwargs)


def _prepare_tail_extend(scheduler, req) -> None:
    """Point the request at ``prompt[k:]`` over the base KV of ``prompt[:k]`` in its own row.

    With the decode-side prefix cache, ``row[:P]`` are the tree's slots (a hit of ``P <=
    floor_page(k)`` tokens, locked since admission) and the rest of ``prompt[:k]`` came from
    the prefill; the extend is the same. A resumed request (retracted, its row restored
    from the backup) starts at the tree's root, as SGLang's prebuilt path starts it.
    """
    from sglang.srt.disaggregation.decode import _bind_root_prefix
    from sglang.srt.runtime_context import get_disagg

    prompt_len = len(req.origin_input_ids)
    k = prefill_module_len(req)
    allocator = scheduler.token_to_kv_pool_allocator
    page_size = allocator.page_size
    if get_disagg().disaggregation_decode_enable_radix_cache and req.last_node is None:
        _bind_root_prefix(req, scheduler.tree_cache)
    # The tree holds base KV only (invariant 1): never a slot of prompt[k:] or of the page holding k.
    assert req.kv.cache_protected_len <= k // page_size * page_size, (req.rid, req.kv.cache_protected_len, k)
    kept = -(-k // page_size) * page_size  # the pages holding prompt[:k]
    if kept < prompt_len:
        row = scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        allocator.free(row[kept:prompt_len].to(torch.int64))
    if k == 0:  # no prefix: a held row must carry KV, so give it back; the extend takes a fresh one
        scheduler.req_to_token_pool.free(req)
    req.init_next_round_input(None)
    req.prefix_len = k
    req.extend_end = prompt_len
    req.kv.kv_allocated_len = k
    req.kv.kv_committed_len = k
    # Prefill-side cache hits are already in cached_tokens: the received prefix is
    # not a decode-side hit.
    req.already_computed = k
    req._cache_breakdown_computed = True


def _queue_ready_grammar_requests(scheduler) -> None:
    grammar_manager = scheduler.grammar_manager
    if grammar_manager.has_waiting_grammars():
        for req in grammar_manager.get_ready_grammar_requests():
            scheduler._add_request_to_queue(req)


def _build_tail_extend_batch(scheduler, running_batch):
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    capacity = min(scheduler.req_to_token_pool.size, scheduler.max_running_requests)
    room = capacity - running_batch.batch_size()
    ready, waiting = [], []
    for req in scheduler.waiting_queue:
        if getattr(req, _NEEDS_TAIL_EXTEND, False) and len(ready) < room:
            ready.append(req)
        else:
            waiting.append(req)
    if not ready:
        return None
    scheduler.waiting_queue = waiting
    for req in ready:
        setattr(req, _NEEDS_TAIL_EXTEND, False)
        _prepare_tail_extend(scheduler, req)
    batch = ScheduleBatch.init_new(
        ready,
        scheduler.req_to_token_pool,
        scheduler.token_to_kv_pool_allocator,
        scheduler.tree_cache,
        scheduler.model_config,
        scheduler.enable_overlap,
        scheduler.spec_algorithm,
    )
    batch.prepare_for_extend()
    setattr(batch, _TAIL_EXTEND_BATCH, True)
    return batch


def _merge_last_tail_extend(scheduler, running_batch):
    """Merge the tail-extend batch that ran last into the running batch (SGLang's prefill merge)."""
    last_batch = scheduler.last_batch
    if not _is_unmerged_tail_extend(last_batch):
        return running_batch
    # A prefill-only request (max_new_tokens 0: frontend prefix caching and ``select``)
    # ends with the extend's own result; it never decodes (SGLang's non-PD scheduler
    # skips decoding such batches).
    last_batch.filter_batch(reqs_to_exclude=[req for req in last_batch.reqs if req.is_prefill_only])
    if last_batch.is_empty() or last_batch is running_batch:
        return running_batch
    if running_batch.is_empty():
        return last_batch
    running_batch.merge_batch(last_batch)
    return running_batch


def next_decode_batch_with_tail_extend(original, scheduler, running_batch):
    from sglang.srt.managers.schedule_batch import NextBatchPlan
    from sglang.srt.observability.req_time_stats import set_schedule_time_batch

    running_batch = _merge_last_tail_extend(scheduler, running_batch)
    _queue_ready_grammar_requests(scheduler)
    extend_batch = _build_tail_extend_batch(scheduler, running_batch)
    if extend_batch is None:
        return original(scheduler, running_batch)
    extend_batch = scheduler.dp_attn_adapter.maybe_prepare_mlp_sync_batch(extend_batch)
    set_schedule_time_batch(extend_batch)
    return NextBatchPlan(batch_to_run=extend_batch, running_batch=running_batch)


def register_prompt_tail_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    decode = "sglang.srt.disaggregation.decode"
    HookRegistry.register(
        f"{decode}.DecodeTransferQueue._commit_transfer_to_req",
        commit_transfer_without_prefill_token,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.batch_result_processor."
        "SchedulerBatchResultProcessor._maybe_update_reasoning_tokens",
        reasoning_tokens_without_prefill_token,
        HookType.AROUND,
    )
    HookRegistry.register(
        f"{decode}.DecodePreallocQueue.resume_retracted_reqs",
        resume_retracted_with_tail_extend,
        HookType.AROUND,
    )
    HookRegistry.register(
        f"{decode}.SchedulerDisaggregationDecodeMixin.get_next_disagg_decode_batch_to_run",
        next_decode_batch_with_tail_extend,
        HookType.AROUND,
    )
    HookRegistry.register(
        f"{decode}.DecodePreallocQueue._allocatable_token_budgets",
        reserve_for_tail_extend_batch,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.can_schedule_lora_req",
        lora_budget_counts_tail_extend_batch,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.output_streamer._GenerationStreamAccumulator.__post_init__",
        stream_input_logprobs_from_decode,
        HookType.AROUND,
    )
