"""The CUDA half of the ZMQ engine's copies: device pointers recognised, copies batched and asynchronous.

Owns what the engine does with KV pool memory on a GPU (the GPU issue's transfer path;
the bytes it moves are the prefill module's KV, so invariant 1 is unchanged by it):

* ``pointer_device`` tells host memory from device memory when a region is registered.
  If CUDA is in use and the driver cannot say what a pointer is, the region is refused:
  a device address is never read or written as host memory.
* ``DeviceCopies`` gathers a group's rows with one ``index_select`` on the device and
  copies them to pinned host staging asynchronously, on a stream of the engine's own on
  the region's device; the receiving side copies staged bytes up and writes them with one
  ``index_copy_``. ``finish`` synchronises that stream: a sender hands on its staging,
  and a receiver acknowledges a write, only once the copies are complete.

Never run on this project's CPU machine; the tests marked ``gpu`` exercise it.
"""

from __future__ import annotations

import ctypes
import glob
import sys
import threading
from pathlib import Path
from typing import Optional

import numpy as np

_CUDA_MEMORY_DEVICE, _CUDA_MEMORY_MANAGED = 2, 3
_cudart_lock = threading.Lock()
_cudart = None


def _load_cudart():
    import torch

    global _cudart
    with _cudart_lock:
        if _cudart is None:
            torch_root = Path(torch.__file__).parent
            candidates = [f"libcudart.so.{torch.version.cuda.split('.')[0]}", "libcudart.so"]
            candidates += sorted(glob.glob(str(torch_root / "lib" / "libcudart*.so*")))
            candidates += sorted(glob.glob(str(torch_root.parent / "nvidia" / "*" / "lib" / "libcudart.so*")))
            for name in candidates:
                try:
                    _cudart = ctypes.CDLL(name)
                    break
                except OSError:
                    continue
            else:
                raise RuntimeError("CUDA is in use but libcudart could not be loaded to classify KV memory")
    return _cudart


def pointer_device(ptr: int) -> Optional[int]:
    """The CUDA device ``ptr`` lives on, or None for host memory.

    Raises when CUDA is in use and the pointer's kind cannot be established.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None  # no CUDA context in this process: nothing was allocated on a device
    cudart = _load_cudart()
    attributes = (ctypes.c_int * 64)()  # cudaPointerAttributes (int type, int device, two pointers), room to spare
    status = cudart.cudaPointerGetAttributes(attributes, ctypes.c_void_p(ptr))
    if status != 0:
        cudart.cudaGetLastError()  # clear the error so later CUDA calls in this thread do not see it
        raise RuntimeError(
            f"KV memory at {ptr:#x} refused: cudaPointerGetAttributes failed with status {status}, "
            "so it cannot be told apart from device memory"
        )
    if attributes[0] in (_CUDA_MEMORY_DEVICE, _CUDA_MEMORY_MANAGED):
        return int(attributes[1])
    return None


class _CudaArray:
    """Exposes raw device memory to ``torch.as_tensor`` (no copy)."""

    def __init__(self, ptr: int, rows: int, unit: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (rows, unit), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None,
        }


def device_rows(ptr: int, rows: int, unit: int, device: int):
    import torch

    return torch.as_tensor(_CudaArray(ptr, rows, unit), device=f"cuda:{device}")


class DeviceCopies:
    """One thread's CUDA copies for one plan: a stream per device, pinned staging, one sync at the end."""

    def __init__(self) -> None:
        self._streams: dict[int, object] = {}
        self._pinned = None
        self._pending: list[tuple] = []  # (pinned rows, host rows) to copy once the streams are done
        self._used: set[int] = set()

    def _stream(self, device: int):
        import torch

        if device not in self._streams:
            with torch.cuda.device(device):
                self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pinned_rows(self, group, unit: int):
        """Pinned host rows mirroring the group's place in the staging buffer (grown as needed)."""
        import torch

        lo, hi = group.first * unit, group.last * unit
        if self._pinned is None or self._pinned.numel() < hi:
            if self._pending:  # queued copies still use the old buffer
                self.finish()
            self._pinned = torch.empty(max(hi, 1 << 20), dtype=torch.uint8, pin_memory=True)
        return self._pinned[lo:hi]

    def gather(self, group, unit: int, host_rows: np.ndarray) -> None:
        import torch

        device = group.region.device
        stream = self._stream(device)
        pinned = self._pinned_rows(group, unit)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.default_stream(device))  # KV written by the model is complete
            source = device_rows(group.region.start, group.region.length // unit, unit, device)
            index = torch.from_numpy(group.rows).to(device)
            pinned.copy_(torch.index_select(source, 0, index).view(-1), non_blocking=True)
        self._pending.append((pinned, host_rows))
        self._used.add(device)

    def scatter(self, group, unit: int, host_rows: np.ndarray) -> None:
        import torch

        device = group.region.device
        stream = self._stream(device)
        pinned = self._pinned_rows(group, unit)
        np.copyto(pinned.numpy(), host_rows.view(np.uint8))
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.default_stream(device))
            target = device_rows(group.region.start, group.region.length // unit, unit, device)
            index = torch.from_numpy(group.rows).to(device)
            target.index_copy_(0, index, pinned.to(device, non_blocking=True).view(-1, unit))
        self._pending.append((pinned, None))
        self._used.add(device)

    def finish(self) -> None:
        """Wait for every copy queued since the last ``finish``; complete device-to-host staging."""
        for device in self._used:
            self._streams[device].synchronize()
        for pinned, host_rows in self._pending:
            if host_rows is not None:
                np.copyto(host_rows.view(np.uint8), pinned.numpy())
        self._pending.clear()
        self._used.clear()
