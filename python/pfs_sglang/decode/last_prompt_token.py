"""The decode module computes the last prompt token itself (invariant 2).

Stock SGLang PD appends the first output token sampled by the *prefill* server and
never runs a forward on the decode server until the next token. Under PrefillShare
that token would come from the frozen base, not from the task model. Here:

1. ``commit_transfer_without_prefill_token`` (AROUND ``_commit_transfer_to_req``):
   after SGLang commits a transferred request, the prefill's token (and its logprob
   rows) is taken back out and the request is marked for a last-token extend.
2. ``next_decode_batch_with_last_token_extend`` (AROUND
   ``get_next_disagg_decode_batch_to_run``): marked requests are run as an ordinary
   1-token EXTEND batch over ``prompt[-1]``, attending to the base KV of
   ``prompt[:-1]`` that arrived in their own ``req_to_token`` row; SGLang's normal
   prefill result path samples their first token with the decode module; the next
   call merges the batch into the running decode batch exactly as SGLang's own
   scheduler merges a finished prefill batch.

The prefill side sends only ``prompt[:-1]`` (see ``transfer.zmq_backend``). With
``page_size == 1`` the decode side's preallocated slot for the last token is handed
back before the extend allocates its slot, so nothing leaks; with larger pages the
extend continues inside the already-allocated last page.
"""

from __future__ import annotations

import torch

_NEEDS_EXTEND = "pfs_needs_last_token_extend"


def _drop_last_appended(values: list | None) -> None:
    if values:
        values.pop()


def commit_transfer_without_prefill_token(original, transfer_queue, decode_req) -> None:
    req = decode_req.req
    fresh = not req.output_ids and not decode_req.is_rebootstrap
    original(transfer_queue, decode_req)
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
    setattr(req, _NEEDS_EXTEND, True)


def _prepare_last_token_extend(scheduler, req) -> None:
    """Point the request at one extend token, prompt[-1], over its transferred prefix."""
    prompt_len = len(req.origin_input_ids)
    row = scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    if scheduler.token_to_kv_pool_allocator.page_size == 1:
        scheduler.token_to_kv_pool_allocator.free(row[prompt_len - 1 : prompt_len].to(torch.int64))
    if prompt_len == 1:  # no prefix: give the row back, the extend allocates afresh
        scheduler.req_to_token_pool.free(req)
    req.init_next_round_input(None)
    req.prefix_len = prompt_len - 1
    req.extend_end = prompt_len
    req.kv.kv_allocated_len = prompt_len - 1
    req.kv.kv_committed_len = prompt_len - 1
    # Prefill-side cache hits are already in cached_tokens: the received prefix is
    # not a decode-side hit.
    req.already_computed = prompt_len - 1
    req._cache_breakdown_computed = True


def _build_last_token_extend_batch(scheduler, running_batch):
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    capacity = min(scheduler.req_to_token_pool.size, scheduler.max_running_requests)
    room = capacity - running_batch.batch_size()
    ready, waiting = [], []
    for req in scheduler.waiting_queue:
        if getattr(req, _NEEDS_EXTEND, False) and len(ready) < room:
            ready.append(req)
        else:
            waiting.append(req)
    if not ready:
        return None
    scheduler.waiting_queue = waiting
    for req in ready:
        setattr(req, _NEEDS_EXTEND, False)
        _prepare_last_token_extend(scheduler, req)
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
    return batch


def _merge_finished_extend(scheduler, running_batch):
    last_batch = scheduler.last_batch
    if last_batch is None or not last_batch.forward_mode.is_extend() or last_batch is running_batch:
        return running_batch
    scheduler.last_batch = None  # merge each extend batch once
    last_batch.filter_batch()
    if last_batch.is_empty():
        return running_batch
    if running_batch.is_empty():
        return last_batch
    running_batch.merge_batch(last_batch)
    return running_batch


def next_decode_batch_with_last_token_extend(original, scheduler, running_batch):
    from sglang.srt.managers.schedule_batch import NextBatchPlan

    running_batch = _merge_finished_extend(scheduler, running_batch)
    extend_batch = _build_last_token_extend_batch(scheduler, running_batch)
    if extend_batch is not None:
        return NextBatchPlan(batch_to_run=extend_batch, running_batch=running_batch)
    return original(scheduler, running_batch)


def register_last_prompt_token_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req",
        commit_transfer_without_prefill_token,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.disaggregation.decode.SchedulerDisaggregationDecodeMixin.get_next_disagg_decode_batch_to_run",
        next_decode_batch_with_last_token_extend,
        HookType.AROUND,
    )

