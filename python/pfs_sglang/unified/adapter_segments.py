"""Each adapter applies from the position where the decode module takes over (invariant 2).

In a unified server a request for LoRA decode module ``A`` extends its prompt in one
forward: the positions before ``k`` (:func:`prefill_module_len`: ``len - 1``, or the
``logprob_start_len`` position when input logprobs are asked for) are the prefill
module's, so they run with the base's weights alone; the positions from ``k`` on
(the prompt's last token, and every output token a retracted request recomputes) run
with ``A``. SGLang's multi-LoRA routes a whole request to one adapter; its per-token
routing (``LoRAManager.prepare_lora_token_segments``) takes any run of
(adapter, token count) segments. Three hooks:

1. ``note_adapter_starts`` (AROUND ``ForwardBatch.init_new``): while SGLang builds a
   forward batch (its LoRA set-up runs inside), the batch's per-row ``k`` is at hand
   (a context variable); ``None`` for rows with no adapter.
2. ``split_adapter_rows_at_k`` (AROUND ``LoRAManager.prepare_lora_batch``): SGLang
   prepares its per-request routing; when an extend row of an adapter request starts
   before its ``k``, the routing is replaced by token segments: the row's tokens
   before ``k`` with no adapter, the rest with the row's adapter. The base's slot in
   the adapter pool is fetched first (SGLang keeps it zeroed), so "no adapter" costs
   nothing. Decode rows and rows that start at or past ``k`` keep SGLang's routing.
3. ``torch_native_token_segments`` (REPLACE ``TorchNativeLoRABackend.
   prepare_lora_token_segments``): SGLang's CPU LoRA backend has no token segments
   (its base class raises); this builds its batch info from the segments, as its own
   ``prepare_lora_batch`` builds it from requests. The triton backend has its own.

Why every scheduling mode holds: ``k`` is a function of the request alone
(``origin_input_ids``, ``logprob_start_len``), and the split reads each row's
extend range from the forward batch, so a chunk that straddles ``k``, a prefix-cache
hit ending anywhere before ``k`` (the tree caps matches at ``k``:
:mod:`pfs_sglang.cache.prefill_module_cache`), a mixed chunk and a retracted request
rebuilt over ``prompt + output`` all split at the same position. Overlap scheduling
builds the forward batch before it runs; the segments travel in the backend's batch
info, as SGLang's own routing does.

Only unified servers split (:func:`pfs_sglang.unified.is_unified_server`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pfs_sglang.decode.prompt_split import prefill_module_len
from pfs_sglang.unified.server_role import is_unified_server

_ADAPTER_STARTS: contextvars.ContextVar[list[int | None] | None] = contextvars.ContextVar(
    "pfs_adapter_starts", default=None
)


@dataclass(frozen=True)
class TokenSegment:
    """A run of consecutive token rows of one forward that share an adapter (``None``: base)."""

    lora_id: str | None
    length: int


def adapter_start(req) -> int | None:
    """``k`` for a request with an adapter; ``None`` for a base request."""
    return prefill_module_len(req) if req.lora_id is not None else None


def token_segments(
    lora_ids: Sequence[str | None],
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    adapter_starts: Sequence[int | None],
) -> list[TokenSegment]:
    """The rows of an extend forward as segments: before ``k`` no adapter, from ``k`` the row's.

    Adjacent segments with the same adapter merge; empty ones are dropped.
    """
    segments: list[TokenSegment] = []

    def append(lora_id: str | None, length: int) -> None:
        if length <= 0:
            return
        if segments and segments[-1].lora_id == lora_id:
            segments[-1] = TokenSegment(lora_id, segments[-1].length + length)
        else:
            segments.append(TokenSegment(lora_id, length))

    for lora_id, prefix, extend, start in zip(lora_ids, prefix_lens, extend_lens, adapter_starts, strict=True):
        base_rows = 0 if lora_id is None or start is None else min(max(start - prefix, 0), extend)
        append(None, base_rows)
        append(lora_id, extend - base_rows)
    return segments


def note_adapter_starts(original, cls, batch, model_runner, *args, **kwargs):
    if model_runner.lora_manager is None or not batch.forward_mode.is_extend() or not is_unified_server():
        return original(cls, batch, model_runner, *args, **kwargs)
    token = _ADAPTER_STARTS.set([adapter_start(req) for req in batch.reqs])
    try:
        return original(cls, batch, model_runner, *args, **kwargs)
    finally:
        _ADAPTER_STARTS.reset(token)


def _segments_if_split(forward_batch) -> list[TokenSegment] | None:
    starts = _ADAPTER_STARTS.get()
    if starts is None or not forward_batch.forward_mode.is_extend():
        return None
    prefix_lens = forward_batch.extend_prefix_lens_cpu
    extend_lens = forward_batch.extend_seq_lens_cpu
    lora_ids = forward_batch.lora_ids
    if len(starts) != len(lora_ids):
        raise RuntimeError(
            f"pfs_sglang: forward batch has {len(lora_ids)} rows but {len(starts)} requests; "
            "cannot place adapter segments (invariant 2)"
        )
    splits = any(
        lora_id is not None and start is not None and prefix < start
        for lora_id, prefix, start in zip(lora_ids, prefix_lens, starts)
    )
    return token_segments(lora_ids, prefix_lens, extend_lens, starts) if splits else None


def split_adapter_rows_at_k(original, lora_manager, forward_batch, *args, **kwargs):
    segments = _segments_if_split(forward_batch)
    if segments is None:
        return original(lora_manager, forward_batch, *args, **kwargs)
    lora_manager.fetch_new_loras(set(forward_batch.lora_ids) | {None})
    result = original(lora_manager, forward_batch, *args, **kwargs)
    lora_manager.prepare_lora_token_segments(
        lora_ids=[segment.lora_id for segment in segments],
        segment_lens=[segment.length for segment in segments],
    )
    lora_manager.lora_backend.batch_info.is_prefill = True
    return result


def torch_native_token_segments(
    backend, *, segment_lens: list[int], weight_indices: list[int], lora_ranks: list[int], scalings: list[float]
) -> None:
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABatchInfo

    seg_lens = torch.tensor(segment_lens, dtype=torch.int32)
    seg_indptr = torch.zeros(len(segment_lens) + 1, dtype=torch.int32)
    seg_indptr[1:] = torch.cumsum(seg_lens, dim=0)
    indices = torch.tensor(weight_indices, dtype=torch.int32)
    ranks = torch.tensor(lora_ranks, dtype=torch.int32)
    scales = torch.tensor(scalings, dtype=torch.float)
    device = backend.device
    backend.reset_batch_state()
    backend.batch_info = TorchNativeLoRABatchInfo(
        use_cuda_graph=False,
        bs=len(segment_lens),
        num_segments=len(segment_lens),
        max_len=max(segment_lens),
        seg_lens=seg_lens.to(device),
        seg_indptr=seg_indptr.to(device),
        weight_indices=indices.to(device),
        lora_ranks=ranks.to(device),
        scalings=scales.to(device),
        permutation=None,
        expected_tokens=sum(segment_lens),
        lora_ranks_cpu=ranks,
        seg_indptr_cpu=seg_indptr,
        seg_lens_cpu=seg_lens,
        weight_indices_cpu=indices,
        scalings_cpu=scales,
    )


def register_adapter_segment_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        note_adapter_starts,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.lora.lora_manager.LoRAManager.prepare_lora_batch",
        split_adapter_rows_at_k,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.lora.backend.torch_backend.TorchNativeLoRABackend.prepare_lora_token_segments",
        torch_native_token_segments,
        HookType.REPLACE,
    )
