"""Staging buffers for the ZMQ engine, shared with the receiving process when both run on one host.

Owns where a request's KV sits between the sender's gather and the receiver's scatter.
A sender thread stages into a ``memfd`` (anonymous shared memory: no file in ``/dev/shm``
to leak or to outgrow, freed when both processes close it); a receiver on the same host
maps it read-only through ``/proc/<pid>/fd/<fd>``, so the KV crosses processes with two
memory copies and no socket copy. Whether that works between two engines is proven once
per peer, at the identity handshake, with a probe buffer holding a random token; where it
does not (another host, a container without ``/proc`` access), the staging is sent as
ZMQ frames instead. Either way the receiver still bounds-checks every destination.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

_MEMFD_NAME = "pfs-kv-staging"
_TOKEN_PAGE = 4096  # the first page holds the buffer's token; staged bytes follow it


@dataclass(frozen=True)
class StagingRef:
    """How a receiver on the same host finds a sender's staging buffer."""

    pid: int
    fd: int
    size: int
    token: str  # random per buffer: a reused fd number or pid never maps the wrong buffer

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "StagingRef":
        fields = json.loads(raw)
        return cls(pid=int(fields["pid"]), fd=int(fields["fd"]), size=int(fields["size"]), token=str(fields["token"]))


class StagingBuffer:
    """A sender's staging memory: shared (memfd) or private (sent as ZMQ frames)."""

    def __init__(self, size: int, shared: bool) -> None:
        self.size = size
        self.ref = None
        if shared:
            fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
            os.ftruncate(fd, _TOKEN_PAGE + size)
            self._mmap = mmap.mmap(fd, _TOKEN_PAGE + size)
            token = secrets.token_hex(8)
            self.ref = StagingRef(pid=os.getpid(), fd=fd, size=size, token=token)
            self._mmap[: len(token)] = token.encode()
            self.token_view = np.frombuffer(self._mmap, dtype=np.uint8, count=len(token))
            self.array = np.frombuffer(self._mmap, dtype=np.uint8, offset=_TOKEN_PAGE)
        else:
            self._mmap = None
            self.array = np.empty(size, dtype=np.uint8)

    @property
    def shared(self) -> bool:
        return self.ref is not None

    def close(self) -> None:
        """Release the buffer (its memory goes once no view and no peer mapping holds it)."""
        self.array = self.token_view = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass
            os.close(self.ref.fd)
            self._mmap = None


class PeerStagings:
    """Receiver side: read-only mappings of same-host senders' staging buffers (a small LRU)."""

    def __init__(self, capacity: int = 64) -> None:
        self._maps: OrderedDict[StagingRef, np.ndarray] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def open(self, ref: StagingRef) -> np.ndarray:
        with self._lock:
            if ref in self._maps:
                self._maps.move_to_end(ref)
                return self._maps[ref]
        path = f"/proc/{ref.pid}/fd/{ref.fd}"
        if not os.readlink(path).startswith(f"/memfd:{_MEMFD_NAME}"):
            raise PermissionError(f"{path} is not a KV staging buffer")
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < _TOKEN_PAGE + ref.size:
                raise ValueError(f"{path} is smaller than announced")
            view = np.frombuffer(mmap.mmap(fd, _TOKEN_PAGE + ref.size, prot=mmap.PROT_READ), dtype=np.uint8)
        finally:
            os.close(fd)  # the mapping keeps the memory alive
        if bytes(view[: len(ref.token)]) != ref.token.encode():
            raise PermissionError(f"{path} does not hold the announced staging buffer")
        view = view[_TOKEN_PAGE:]
        with self._lock:
            self._maps[ref] = view
            while len(self._maps) > self._capacity:
                self._maps.popitem(last=False)
        return view
