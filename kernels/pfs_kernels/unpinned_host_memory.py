"""Pinned host memory on a machine without CUDA: plain host memory.

SGLang's multi-LoRA (``sglang.srt.lora``: the adapter pool, the ``torch_native``
backend's batch metadata, the LoRA layers' offsets) asks for page-locked host tensors
(``pin_memory=True``, ``Tensor.pin_memory()``) so their copies to a GPU can be
asynchronous. Without CUDA, torch refuses to pin ("Found no NVIDIA driver") and a
LoRA server cannot start. Pinning only speeds up host-to-GPU copies, which a CPU
server never makes, so here the request is dropped and the tensor is otherwise the
same. Installed by the pfs_sglang plugin only where no CUDA device is present, so
GPU servers pin as SGLang intends.
"""

from __future__ import annotations

import functools

import torch

# The torch factories SGLang's LoRA code calls with pin_memory=True.
_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like", "ones_like")


def _without_pinning(factory):
    @functools.wraps(factory)
    def unpinned(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    unpinned.pfs_unpinned = True
    return unpinned


def _same_tensor(tensor: torch.Tensor, device=None) -> torch.Tensor:
    return tensor


def install_unpinned_host_memory() -> bool:
    """Make pinning a no-op in this process when it has no CUDA; True when installed (or already)."""
    if torch.cuda.is_available():
        return False
    for name in _FACTORIES:
        factory = getattr(torch, name)
        if not getattr(factory, "pfs_unpinned", False):
            setattr(torch, name, _without_pinning(factory))
    torch.Tensor.pin_memory = _same_tensor
    return True
