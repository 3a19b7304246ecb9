"""Registered KV memory, and the vectorised copies of a hand-off in and out of it.

Owns the rule that the ZMQ engine touches only memory its own server registered: every
block of a transfer is located in a registered region and bounds-checked at once, on
index arrays (``RegionTable.locate``), before a byte moves. A request's blocks are then
copied as a few large operations: :class:`CopyPlan` groups consecutive blocks that lie in
one region (one layer's K or V buffer) and moves each group with one indexed copy
between the region and a contiguous staging buffer, in units of the largest size that
divides every block (a token's or a page's KV row), never block by block in Python.
:func:`copy_slots` copies a request given by slots (``KVSlots``) from one process's view of
another's shared pool into registered memory in one pass, checked per buffer.

Host regions are numpy views of the pool memory. CUDA regions (invariant-neutral, but the
GPU half of the transfer issue) are recognised when registered, as torch tensors over the
device memory; a pointer whose kind cannot be established is refused, never read or
written as host memory. Their copies run on a CUDA stream of the engine's own with pinned
host staging, and are synchronised before the staging is handed on (sender) or the write
is acknowledged (receiver).
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import reduce
from typing import Optional

import numpy as np
import torch

from pfs_sglang.transfer.kv_blocks import KVSlots


_MAX_BLOCK = 1 << 48


class OutsideRegisteredMemory(ValueError):
    """A block lies outside every registered region (or in memory of unknown kind)."""


@dataclass(frozen=True)
class Region:
    """One registered buffer: host memory (``device is None``) or memory on CUDA device ``device``."""

    start: int
    length: int
    device: Optional[int] = None
    host_bytes: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @classmethod
    def host(cls, start: int, length: int) -> "Region":
        view = np.ctypeslib.as_array(ctypes.cast(start, ctypes.POINTER(ctypes.c_uint8)), shape=(length,))
        return cls(start, length, None, view)

    def units(self, unit: int):
        """The region as an array of ``unit``-byte rows (numpy for host, torch for device)."""
        rows = self.length // unit
        if self.device is None:
            return self.host_bytes[: rows * unit].view(np.dtype((np.void, unit)))
        from pfs_sglang.transfer.cuda_copies import device_rows

        return device_rows(self.start, rows, unit, self.device)


def _byte_rows(region: Region, unit: int) -> torch.Tensor:
    """A host region as a (rows, unit) uint8 tensor over its memory."""
    return torch.from_numpy(region.host_bytes[: region.length // unit * unit].reshape(-1, unit))


class RegionTable:
    """An immutable snapshot of the registered regions, sorted by address."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = sorted(regions, key=lambda region: region.start)
        self._starts = np.array([r.start for r in self.regions], dtype=np.int64)
        self._ends = np.array([r.start + r.length for r in self.regions], dtype=np.int64)

    def locate(self, addrs: np.ndarray, lengths: np.ndarray, what: str) -> np.ndarray:
        """The region index of every block; raises if any block is not wholly inside one."""
        index = np.searchsorted(self._starts, addrs, side="right") - 1
        inside = (index >= 0) & (addrs >= 0) & (lengths > 0) & (lengths < _MAX_BLOCK)  # no int64 wrap-around
        if len(self._ends):
            inside &= addrs + lengths <= self._ends[np.clip(index, 0, None)]
        else:
            inside[:] = False
        if not inside.all():
            bad = int(np.flatnonzero(~inside)[0])
            raise OutsideRegisteredMemory(
                f"{what} of {int(lengths[bad])} bytes at {int(addrs[bad]):#x} is outside registered KV memory"
            )
        return index


class RegisteredMemory:
    """The regions of this server that transfers may read (sender) or write (receiver)."""

    def __init__(self) -> None:
        self._regions: dict[int, Region] = {}
        self._lock = threading.Lock()
        self._table = RegionTable([])

    def add(self, start: int, length: int) -> None:
        from pfs_sglang.transfer.cuda_copies import pointer_device

        device = pointer_device(start)  # raises for a pointer of unknown kind: never treated as host
        region = Region.host(start, length) if device is None else Region(start, length, device)
        with self._lock:
            self._regions[start] = region
            self._table = RegionTable(list(self._regions.values()))

    def remove(self, start: int) -> None:
        with self._lock:
            self._regions.pop(start, None)
            self._table = RegionTable(list(self._regions.values()))

    def table(self) -> RegionTable:
        return self._table

    def devices(self) -> set[int]:
        return {region.device for region in self._table.regions if region.device is not None}


@dataclass(frozen=True)
class _Group:
    """Consecutive blocks in one region: staging rows ``[first, last)`` <-> region rows ``rows``."""

    region: Region
    first: int
    last: int
    rows: np.ndarray


@dataclass(frozen=True)
class CopyPlan:
    """How one side of a transfer maps its blocks to rows of a contiguous staging buffer.

    Blocks are laid out in the staging buffer in the order given, back to back.
    """

    unit: int
    nbytes: int
    groups: tuple[_Group, ...]

    @classmethod
    def build(cls, table: RegionTable, addrs: np.ndarray, lengths: np.ndarray, what: str, unit: int = 0) -> "CopyPlan":
        """The plan for ``addrs``; its unit divides ``unit`` too when one is given (two sides in one unit)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(addrs) == 0:
            return cls(1, 0, ())
        region_index = table.locate(addrs, lengths, what)
        starts = np.array([r.start for r in table.regions], dtype=np.int64)[region_index]
        offsets = addrs - starts
        unit = int(reduce(np.gcd, (np.gcd.reduce(lengths), np.gcd.reduce(offsets)), unit)) or 1
        offsets //= unit
        counts = lengths // unit
        positions = np.cumsum(counts) - counts  # each block's first staging row
        cuts = np.flatnonzero(np.diff(region_index)) + 1
        bounds = [0, *cuts.tolist(), len(addrs)]
        groups = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            block_counts, block_offsets = counts[lo:hi], offsets[lo:hi]
            first = int(positions[lo])
            if (block_counts == 1).all():
                rows = block_offsets
            else:
                local = positions[lo:hi] - first
                rows = np.repeat(block_offsets - local, block_counts) + np.arange(int(block_counts.sum()))
            groups.append(_Group(table.regions[int(region_index[lo])], first, first + int(block_counts.sum()), rows))
        return cls(unit, int(lengths.sum()), tuple(groups))

    def _staging_rows(self, staging: np.ndarray) -> np.ndarray:
        return staging[: self.nbytes].view(np.dtype((np.void, self.unit)))

    def gather(self, staging: np.ndarray, device_copies=None) -> None:
        """Copy every block into ``staging`` (host bytes), in order.

        Host groups are gathered with torch's ``index_select`` into the staging rows, which
        is faster than numpy's ``take`` on rows of bytes (measured in docs/benchmarks.md,
        "How the KV moves").
        """
        rows = self._staging_rows(staging)
        host_rows = None
        for group in self.groups:
            if group.region.device is None:
                if host_rows is None:
                    host_rows = torch.from_numpy(staging[: self.nbytes].reshape(-1, self.unit))
                torch.index_select(_byte_rows(group.region, self.unit), 0, torch.from_numpy(group.rows),
                                   out=host_rows[group.first : group.last])
            else:
                device_copies.gather(group, self.unit, rows[group.first : group.last])
        if device_copies is not None:
            device_copies.finish()

    def scatter(self, staging, device_copies=None) -> None:
        """Copy ``staging`` (host bytes, laid out as :meth:`gather` writes them) into the blocks."""
        rows = self._staging_rows(np.frombuffer(staging, dtype=np.uint8))
        for group in self.groups:
            if group.region.device is None:
                group.region.units(self.unit)[group.rows] = rows[group.first : group.last]
            else:
                device_copies.scatter(group, self.unit, rows[group.first : group.last])
        if device_copies is not None:
            device_copies.finish()

    @property
    def uses_device(self) -> bool:
        return any(group.region.device is not None for group in self.groups)


_COPY_TASK_BYTES = 4 << 20  # a copy split over threads goes in pieces of about this size (smaller: slower here)


def copy_slots(src_table: RegionTable, dst_table: RegionTable, slots: KVSlots,
               threads: Optional[Executor] = None) -> None:
    """Copy every buffer's slots from host regions of ``src_table`` into host regions of ``dst_table``.

    One pass over the bytes: buffer ``i``'s rows ``src_slots`` go to its rows ``dst_slots``
    with one indexed copy (one memory copy where both are consecutive). Checked before a
    byte moves: each buffer's rows, from slot 0 to the highest slot named, must lie in one
    region (else :class:`OutsideRegisteredMemory`). With ``threads``, the copy goes to the
    threads in pieces of about ``_COPY_TASK_BYTES`` (numpy releases the GIL while it copies).
    """
    src_slots, dst_slots, items = slots.src_slots, slots.dst_slots, slots.item_lens
    if not len(src_slots) or not len(items):
        return
    src_rows = _slot_rows(src_table, slots.src_ptrs, items, src_slots, "read")
    dst_rows = _slot_rows(dst_table, slots.dst_ptrs, items, dst_slots, "write")
    consecutive = _consecutive(src_slots) and _consecutive(dst_slots)
    pieces = []
    for source, target, item in zip(src_rows, dst_rows, items.tolist()):
        step = max(1, _COPY_TASK_BYTES // item) if threads is not None else len(src_slots)
        pieces += [(source, target, lo, lo + step) for lo in range(0, len(src_slots), step)]

    def copy(piece) -> None:
        source, target, lo, hi = piece
        if consecutive:  # one memory copy
            first_source, first_target = int(src_slots[0]) + lo, int(dst_slots[0]) + lo
            count = min(hi, len(src_slots)) - lo
            np.copyto(target[first_target : first_target + count].view(np.uint8),
                      source[first_source : first_source + count].view(np.uint8))
        else:
            target[dst_slots[lo:hi]] = source[src_slots[lo:hi]]

    if threads is None or len(pieces) < 2:
        for piece in pieces:
            copy(piece)
    else:
        for _ in threads.map(copy, pieces):
            pass


def locate_slot_spans(table: RegionTable, ptrs: np.ndarray, items: np.ndarray, slots: np.ndarray,
                      what: str) -> np.ndarray:
    """The region of each buffer's rows from slot 0 to the highest slot named; raises if any lies outside one."""
    low, rows_needed = int(slots.min()), int(slots.max()) + 1
    if low < 0 or (items <= 0).any() or rows_needed * int(items.max()) >= _MAX_BLOCK:  # Python ints: no wrap-around
        raise OutsideRegisteredMemory(f"{what} of slots {low}..{rows_needed - 1} of {items.tolist()}-byte items "
                                      "is out of range")
    return table.locate(ptrs, rows_needed * items, what)


def _slot_rows(table: RegionTable, ptrs: np.ndarray, items: np.ndarray, slots: np.ndarray, what: str) -> list:
    """Each buffer as ``item``-byte rows, from its slot 0 to the highest slot named, all inside one region."""
    rows_needed = int(slots.max()) + 1
    regions = locate_slot_spans(table, ptrs, items, slots, what)
    rows = []
    for ptr, item, index in zip(ptrs.tolist(), items.tolist(), regions.tolist()):
        region = table.regions[index]
        if region.device is not None:
            raise OutsideRegisteredMemory(f"{what} names device memory where host memory was expected")
        offset = ptr - region.start
        rows.append(region.host_bytes[offset : offset + rows_needed * item].view(np.dtype((np.void, item))))
    return rows


def _consecutive(slots: np.ndarray) -> bool:
    return int(slots[-1]) - int(slots[0]) == len(slots) - 1 and bool((np.diff(slots) == 1).all())
