"""A CPU prefill server's KV pool in shared memory, read in place by receivers on its host.

Owns the memory of the ``map`` transport. Sender side: on a CPU prefill server of the
``zmq`` backend, the buffers of SGLang's MHA KV pool are moved onto ``memfd`` memory
once, as the pool is built (``move_to_shared_memory``, called by the hook
``registration.share_cpu_prefill_pool``): every tensor keeps its shape, strides and
dtype, only where its bytes live changes, one storage at a time. Receiver side
(``PeerPools``): an engine on the same host maps those segments read-only through
``/proc/<pid>/fd/<fd>`` at the identity handshake, after checking each is the announced
memfd (its name and inode), and then copies a request's slots straight from the
sender's pool into its own (``memory_regions.copy_slots``): one pass over the
bytes, no staging, no system call per block. Where mapping is not possible (another
host, no ``/proc`` access, GPU pools) the engines use the other transports; what is
copied is the same. Invariant-neutral: this changes how KV bytes move, not which.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from pfs_sglang.transfer.memory_regions import Region, RegionTable

_MEMFD_NAME = "pfs-kv-pool"


@dataclass(frozen=True)
class SharedSegment:
    """One storage of a pool on memfd memory: where it is in the sender, and how to open it."""

    start: int
    length: int
    fd: int
    inode: int


_segments: dict[int, SharedSegment] = {}  # start address -> segment, for this process's shared storages
_segments_lock = threading.Lock()


def _shared_storage(nbytes: int) -> torch.UntypedStorage:
    """A storage on a new memfd, listed in ``_segments`` until the last tensor over it is gone."""
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
    os.ftruncate(fd, max(nbytes, 1))
    memory = mmap.mmap(fd, max(nbytes, 1))
    storage = torch.frombuffer(memory, dtype=torch.uint8, count=nbytes).untyped_storage()  # holds ``memory``
    with _segments_lock:
        _segments[storage.data_ptr()] = SharedSegment(storage.data_ptr(), nbytes, fd, os.fstat(fd).st_ino)
    weakref.finalize(memory, _release_segment, storage.data_ptr(), fd)
    return storage


def _release_segment(start: int, fd: int) -> None:
    with _segments_lock:
        _segments.pop(start, None)
    os.close(fd)  # the memory goes once no receiver maps it any more


def move_to_shared_memory(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The same views (shape, strides, offset, dtype, bytes) over memfd memory, one new storage per storage."""
    moved: dict[int, torch.UntypedStorage] = {}
    views = []
    for tensor in tensors:
        old = tensor.untyped_storage()
        new = moved.get(old.data_ptr())
        if new is None:
            new = moved[old.data_ptr()] = _shared_storage(old.nbytes())
            torch.empty(0, dtype=torch.uint8).set_(new).copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        views.append(torch.empty(0, dtype=tensor.dtype).set_(new, tensor.storage_offset(), tensor.size(),
                                                             tensor.stride()))
    return views


def segments_holding(regions: Sequence[Region]) -> list[SharedSegment]:
    """This process's shared segments that hold any of ``regions`` (a region lies wholly in one or none)."""
    with _segments_lock:
        segments = list(_segments.values())
    return [segment for segment in segments
            if any(segment.start <= r.start and r.start + r.length <= segment.start + segment.length for r in regions)]


class PeerPools:
    """Receiver side: same-host senders' shared pool segments, mapped read-only, dropped once their process exits.

    A sender is its pid and its process's start time (``/proc/PID/stat``): a pid the
    kernel gave to another process after the sender exited does not keep its mapping.
    """

    def __init__(self) -> None:
        self._tables: dict[int, RegionTable] = {}  # sender pid -> its segments as regions at its addresses
        self._started: dict[int, int] = {}  # sender pid -> its process's start time: which process had the pid
        self._views: dict[tuple[int, int], np.ndarray] = {}  # (sender pid, memfd inode) -> the mapped segment
        self._lock = threading.Lock()

    def open(self, pid: int, segments: Sequence[SharedSegment]) -> None:
        """Map ``pid``'s segments (all or none); raises OSError (PermissionError: not the announced memfd)."""
        self._forget_exited_processes()
        started = _started_at(pid)
        if started is None:
            raise ProcessLookupError(f"no process {pid}: its KV pool cannot be mapped")
        with self._lock:
            mapped = dict(self._views) if self._started.get(pid) == started else {}
        views = {(pid, s.inode): mapped.get((pid, s.inode)) for s in segments}
        views.update({(pid, s.inode): _map(pid, s) for s in segments if views[(pid, s.inode)] is None})
        if _started_at(pid) != started:
            raise ProcessLookupError(f"process {pid} exited while its KV pool was mapped")
        with self._lock:  # the pid's segments now: any it offered before and not now are unmapped
            self._views = {key: view for key, view in self._views.items() if key[0] != pid} | views
            self._tables[pid] = RegionTable([Region(s.start, s.length, None, views[(pid, s.inode)]) for s in segments])
            self._started[pid] = started

    def table(self, pid: int) -> Optional[RegionTable]:
        with self._lock:
            return self._tables.get(pid)

    def close(self, pid: int) -> None:
        """Unmap ``pid``'s pool (no connection of it reads it any more)."""
        with self._lock:
            self._tables.pop(pid, None)
            self._started.pop(pid, None)
            self._views = {key: view for key, view in self._views.items() if key[0] != pid}

    def _forget_exited_processes(self) -> None:
        """Unmap the pools of senders that exited (a restarted prefill server must not stay pinned here),
        also where another process has its pid now."""
        with self._lock:
            for pid in [pid for pid in self._tables if _started_at(pid) != self._started[pid]]:
                del self._tables[pid], self._started[pid]
            for key in [key for key in self._views if key[0] not in self._tables]:
                del self._views[key]


def _started_at(pid: int) -> Optional[int]:
    """When process ``pid`` started (clock ticks after boot, ``/proc/PID/stat``); None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold ") "
    except (OSError, IndexError):
        return None
    return int(fields[19])  # field 22, starttime; fields[0] is field 3


def _map(pid: int, segment: SharedSegment) -> np.ndarray:
    path = f"/proc/{pid}/fd/{segment.fd}"
    if not os.readlink(path).startswith(f"/memfd:{_MEMFD_NAME}"):
        raise PermissionError(f"{path} is not a KV pool segment")
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = os.fstat(fd)
        if stat.st_ino != segment.inode or stat.st_size < segment.length:
            raise PermissionError(f"{path} is not the announced KV pool segment")
        # populated now: a first touch per page during a hand-off would cost more than the copy
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return np.frombuffer(mmap.mmap(fd, segment.length, flags=flags, prot=mmap.PROT_READ), dtype=np.uint8)
    finally:
        os.close(fd)  # the mapping keeps the memory alive
