"""Device-to-device hand-off between processes on one host: the ``cuda`` transport (CUDA IPC).

Owns the same-host path for KV pools on GPUs. Staging device KV through host memory
crosses PCIe twice and copies on the host twice; here the bytes never leave the GPU:

* the sender exports each registered device region in its handshake offer
  (``export_regions``: a CUDA IPC handle of the allocation holding the region and the
  region's offset in it; a sender in the same process exports plain addresses);
* the receiver maps them (``PeerDeviceMemory``: ``cudaIpcOpenMemHandle``, each
  allocation once per process) and accepts the ``cuda`` transport only if every region
  mapped; a mapping is closed with the connection it was made for, and an allocation
  with the last mapping that uses it (``cudaIpcCloseMemHandle``);
* for a request the sender synchronises the devices its sources live on (the KV its
  model wrote is complete) and names its blocks; the receiver, having checked that every
  destination lies in device memory it registered and every source in a region the
  sender exported, moves them on a CUDA stream of its own: per pair of regions one
  ``index_select`` of the sender's rows and one ``index_copy_`` into its own
  (``copy_blocks``), in units of the largest size dividing every block, then
  synchronises that stream before the write is acknowledged.

The bytes moved are the prefill module's KV (invariant 1 unchanged). Never run on this
project's CPU machine (the pairing of rows is tested there on host memory); the
``gpu``-marked tests and ``python -m pfs_sglang.bench handoff --device cuda`` run it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Iterator

import numpy as np

from pfs_sglang.transfer.cuda_copies import _load_cudart
from pfs_sglang.transfer.memory_regions import CopyPlan, Region, RegionTable, _Group

_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


def _allocation_base(ptr: int) -> int:
    """Start of the ``cudaMalloc`` allocation holding ``ptr`` (driver API)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if status != 0:
        raise RuntimeError(f"cuMemGetAddressRange failed with status {status} for {ptr:#x}")
    return base.value


def export_regions(regions: list[Region]) -> list[dict]:
    """What a peer needs to map ``regions`` (device regions only); raises if one cannot be exported."""
    import torch

    cudart = _load_cudart()
    exported = []
    for region in regions:
        with torch.cuda.device(region.device):
            handle = _IpcHandle()
            status = cudart.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(region.start))
            if status != 0:
                cudart.cudaGetLastError()
                raise RuntimeError(f"cudaIpcGetMemHandle failed with status {status}")
            exported.append({"start": region.start, "length": region.length, "handle": bytes(handle.reserved).hex(),
                             "offset": region.start - _allocation_base(region.start)})
    return exported


class OpenedAllocations:
    """The IPC handles this process opened, once each (a second open of one handle fails), while a user holds one."""

    def __init__(self) -> None:
        self._bases: dict[str, int] = {}
        self._users: dict[str, int] = {}  # handle -> how many ``base`` calls have not been released
        self._lock = threading.Lock()

    def base(self, handle_hex: str, device: int) -> int:
        """The handle's allocation mapped here (opened at its first user); ``release`` it when done."""
        import torch

        with self._lock:
            if handle_hex not in self._bases:
                handle = _IpcHandle.from_buffer_copy(bytes.fromhex(handle_hex))
                mapped = ctypes.c_void_p()
                with torch.cuda.device(device):
                    status = _load_cudart().cudaIpcOpenMemHandle(ctypes.byref(mapped), handle,
                                                                 _IPC_LAZY_ENABLE_PEER_ACCESS)
                if status != 0:
                    _load_cudart().cudaGetLastError()
                    raise RuntimeError(f"cudaIpcOpenMemHandle failed with status {status}")
                self._bases[handle_hex] = mapped.value
            self._users[handle_hex] = self._users.get(handle_hex, 0) + 1
            return self._bases[handle_hex]

    def release(self, handle_hex: str) -> None:
        """One user of the handle is done; the last one closes it."""
        with self._lock:
            self._users[handle_hex] -= 1
            if not self._users[handle_hex]:
                del self._users[handle_hex]
                _load_cudart().cudaIpcCloseMemHandle(ctypes.c_void_p(self._bases.pop(handle_hex)))

    def close(self) -> None:
        with self._lock:
            for base in self._bases.values():
                _load_cudart().cudaIpcCloseMemHandle(ctypes.c_void_p(base))
            self._bases.clear()
            self._users.clear()


class PeerDeviceMemory:
    """A sender's exported device regions, mapped into this process on ``device`` until ``close``."""

    def __init__(self, exported: list[dict], sender_pid: int, device: int, opened: OpenedAllocations) -> None:
        self.device = device
        same_process = sender_pid == os.getpid()  # its addresses are ours (IPC refuses one's own handles)
        self._sender = RegionTable([Region(int(e["start"]), int(e["length"]), device) for e in exported])
        self._opened, self._handles = opened, []  # the handles this mapping uses, once per ``base`` call
        local = {}
        try:
            for e in exported:
                if same_process:
                    local[int(e["start"])] = int(e["start"])
                else:
                    local[int(e["start"])] = opened.base(e["handle"], device) + int(e["offset"])
                    self._handles.append(e["handle"])
        except BaseException:
            self.close()
            raise
        # per exported region (in the sender's table order): local address minus sender address
        self._shift = np.array([local[r.start] - r.start for r in self._sender.regions], dtype=np.int64)
        self.local = RegionTable([Region(local[r.start], r.length, device) for r in self._sender.regions])

    def close(self) -> None:
        """Unmap: the sender's allocations are closed here once no other mapping uses them."""
        handles, self._handles = self._handles, []
        for handle in handles:
            self._opened.release(handle)

    def translate(self, src: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The sender's source addresses as addresses in this process; raises outside its exported regions."""
        return src + self._shift[self._sender.locate(src, lengths, "read")]


def paired_rows(source: CopyPlan, target: CopyPlan) -> Iterator[tuple[_Group, _Group, np.ndarray, np.ndarray]]:
    """(source group, target group, source rows, target rows) for every stretch the two plans share.

    Both plans lay the same blocks out in the same order, in the same unit, so row ``i`` of
    the source's layout goes to row ``i`` of the target's.
    """
    i = j = 0
    while i < len(source.groups) and j < len(target.groups):
        s, t = source.groups[i], target.groups[j]
        lo, hi = max(s.first, t.first), min(s.last, t.last)
        if lo < hi:
            yield s, t, s.rows[lo - s.first : hi - s.first], t.rows[lo - t.first : hi - t.first]
        if s.last <= t.last:
            i += 1
        else:
            j += 1


def plans_in_one_unit(source_table: RegionTable, src: np.ndarray, target_table: RegionTable, dst: np.ndarray,
                      lengths: np.ndarray) -> tuple[CopyPlan, CopyPlan]:
    """Copy plans for both sides in a common unit (each side's own unit may differ)."""
    source = CopyPlan.build(source_table, src, lengths, "read")
    target = CopyPlan.build(target_table, dst, lengths, "write", unit=source.unit)
    if target.unit != source.unit:
        source = CopyPlan.build(source_table, src, lengths, "read", unit=target.unit)
    return source, target


_streams = threading.local()


def copy_blocks(peer: PeerDeviceMemory, src: np.ndarray, target_table: RegionTable, dst: np.ndarray,
                lengths: np.ndarray) -> None:
    """Move the blocks from the peer's mapped regions into this process's device regions; synchronised."""
    import torch

    source, target = plans_in_one_unit(peer.local, peer.translate(src, lengths), target_table, dst, lengths)
    if any(group.region.device is None for group in target.groups):
        raise RuntimeError("a device read names host destinations")
    stream = getattr(_streams, "by_device", {}).get(peer.device)
    if stream is None:
        stream = torch.cuda.Stream(peer.device)
        _streams.by_device = {**getattr(_streams, "by_device", {}), peer.device: stream}
    with torch.cuda.device(peer.device), torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.default_stream(peer.device))  # this server's own work on these slots is done
        for s_group, t_group, s_rows, t_rows in paired_rows(source, target):
            rows_from = torch.from_numpy(np.ascontiguousarray(s_rows)).to(peer.device, non_blocking=True)
            rows_to = torch.from_numpy(np.ascontiguousarray(t_rows)).to(peer.device, non_blocking=True)
            t_group.region.units(target.unit).index_copy_(
                0, rows_to, s_group.region.units(source.unit).index_select(0, rows_from))
    stream.synchronize()


def synchronize_devices(devices: set[int]) -> None:
    """The sender's side: every kernel queued on these devices (the KV its model wrote) is complete."""
    import torch

    for device in devices:
        torch.cuda.synchronize(device)
