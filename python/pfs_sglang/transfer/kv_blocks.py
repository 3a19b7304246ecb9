"""A request's KV as ``(src, dst, length)`` blocks, built with array operations.

Owns the block list a hand-off moves: for every KV buffer (each layer's K, then each
layer's V), one block per run of slots consecutive on both sides, exactly the blocks
SGLang's Mooncake manager builds (``group_concurrent_contiguous``, then one Python tuple
per run and buffer in ``_send_kvcache_generic``). SGLang's loop makes a Python tuple per
block, which for a request with scattered slots (tens of thousands of blocks) costs more
than copying the request's bytes. Here the same blocks come out of a few numpy
operations, as int64 arrays the ZMQ engine takes as they are. Measured against SGLang's
loop: docs/benchmarks.md ("How the KV moves").
Moves no bytes and checks nothing: the engine bounds-checks every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KVBlocks:
    """Parallel int64 arrays: ``lengths[i]`` bytes from ``src[i]`` to ``dst[i]``."""

    src: np.ndarray
    dst: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class KVSlots:
    """A request's KV by slots: buffer ``i`` (``item_lens[i]`` bytes a slot) from ``src_slots`` to ``dst_slots``.

    The same transfer as :func:`kv_blocks` gives, in a form whose size does not grow with
    the number of buffers: the ``map`` transport checks and copies it as it is.
    """

    src_ptrs: np.ndarray  # int64, one per buffer
    dst_ptrs: np.ndarray
    item_lens: np.ndarray
    src_slots: np.ndarray  # int64, one per slot
    dst_slots: np.ndarray

    @classmethod
    def of(cls, src_ptrs, dst_ptrs, item_lens, src_slots, dst_slots) -> "KVSlots":
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (src_ptrs, dst_ptrs, item_lens, src_slots, dst_slots)]
        if not len(arrays[0]) == len(arrays[1]) == len(arrays[2]):
            raise ValueError(f"{len(arrays[0])} source buffers, {len(arrays[1])} destination buffers, "
                             f"{len(arrays[2])} item lengths")
        if len(arrays[3]) != len(arrays[4]):
            raise ValueError(f"{len(arrays[3])} source slots but {len(arrays[4])} destination slots")
        return cls(*arrays)

    @property
    def nbytes(self) -> int:
        return int(self.item_lens.sum()) * len(self.src_slots)

    def blocks(self) -> "KVBlocks":
        return kv_blocks(self.src_ptrs, self.dst_ptrs, self.item_lens, self.src_slots, self.dst_slots)


def kv_blocks(src_ptrs, dst_ptrs, item_lens, src_slots: np.ndarray, dst_slots: np.ndarray) -> KVBlocks:
    """Buffer ``i`` (``item_lens[i]`` bytes a slot) copied at ``src_slots`` -> ``dst_slots``, by runs.

    Blocks come buffer by buffer, each buffer's in slot order, as SGLang orders them.
    """
    src_slots = np.asarray(src_slots, dtype=np.int64)
    dst_slots = np.asarray(dst_slots, dtype=np.int64)
    if len(src_slots) != len(dst_slots):
        raise ValueError(f"{len(src_slots)} source slots but {len(dst_slots)} destination slots")
    buffers = len(src_ptrs)
    if len(src_slots) == 0 or buffers == 0:
        empty = np.zeros(0, dtype=np.int64)
        return KVBlocks(empty, empty, empty)
    breaks = np.flatnonzero((np.diff(src_slots) != 1) | (np.diff(dst_slots) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    runs = np.diff(np.append(starts, len(src_slots)))
    item = np.asarray(item_lens, dtype=np.int64)[:, None]
    src = np.asarray(src_ptrs, dtype=np.int64)[:, None] + src_slots[starts][None, :] * item
    dst = np.asarray(dst_ptrs, dtype=np.int64)[:, None] + dst_slots[starts][None, :] * item
    return KVBlocks(src.ravel(), dst.ravel(), (runs[None, :] * item).ravel())
