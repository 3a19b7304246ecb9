"""Import-only stand-ins: modules SGLang imports on CPU but never calls there.

Each function here exists only to satisfy an import and raises if it is ever called.
They are registered in ``sys.modules`` only when the real module cannot be imported
and no CUDA device is present, so on a GPU box the real wheels always win.
"""

from __future__ import annotations

import importlib
import sys
import types

# vllm._custom_ops names SGLang imports on code paths that only run on CUDA/ROCm.
_VLLM_CUSTOM_OPS_NAMES = ("rotary_embedding", "rms_norm", "fused_add_rms_norm", "awq_dequantize")


class StandInCalledError(RuntimeError):
    """A CUDA-only kernel stand-in was called: this code path is not supported on CPU."""


def _raising(qualified_name: str):
    def stand_in(*args, **kwargs):
        raise StandInCalledError(
            f"{qualified_name} is an import stand-in installed by pfs_kernels on a machine "
            "without CUDA; SGLang called it, so this path needs a real CPU implementation"
        )

    stand_in.__name__ = qualified_name.rsplit(".", 1)[-1]
    stand_in.__qualname__ = qualified_name
    return stand_in


def _module_imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def install_import_stand_ins() -> list[str]:
    """Register the stand-ins that are needed here; return the module names installed."""
    if _cuda_available() or _module_imports("vllm._custom_ops"):
        return []
    package = sys.modules.get("vllm") or types.ModuleType("vllm")
    package.__path__ = getattr(package, "__path__", [])
    package.__doc__ = "pfs_kernels import stand-in: no real vllm is installed (CPU box)"
    custom_ops = types.ModuleType("vllm._custom_ops")
    custom_ops.__doc__ = "pfs_kernels import stand-in: every function raises StandInCalledError"
    for name in _VLLM_CUSTOM_OPS_NAMES:
        setattr(custom_ops, name, _raising(f"vllm._custom_ops.{name}"))
    package._custom_ops = custom_ops
    sys.modules["vllm"] = package
    sys.modules["vllm._custom_ops"] = custom_ops
    return ["vllm", "vllm._custom_ops"]
