"""The SGLang command lines of a deployment, in one place.

Prefill: ``--disaggregation-mode prefill`` with the base model, the ``pfs`` prefix tree
keyed on the prefill module (invariant 3) and a bootstrap port for the KV hand-off.
Decode: ``--disaggregation-mode decode`` with one decode module, served under its name,
and (unless the topology's ``decode_cache`` is off) SGLang's decode radix cache as the
``pfs`` tree, which there holds base KV only (invariant 1; ``DECODE_CACHE_ARGS``).
On CPU both run SGLang's native path (torch_native attention, sleep when idle so idle
PD loops do not spin a core) with a bounded KV pool; decode servers keep SGLang's overlap
scheduling, prefill servers turn it off (its early send records a CUDA event). CPU
servers share the machine's cores and put torch's large allocations on huge pages
(``cpu_server_env``): torch's default of one thread per core in every server
oversubscribes the cores several times over.
Unified (``pfs_sglang.unified``): no disaggregation; the base with SGLang's multi-LoRA
holding every adapter (and a slot for the base, which serves the positions before
``k``) and the ``pfs`` tree; overlap scheduling stays on.
Serving flags are adjusted here and nowhere else.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pfs_sglang.launch.placement import ServerPlacement

# The name ``pfs_sglang.cache.prefill_module_cache`` registers its tree under; spelled
# out here so the launcher does not import SGLang (tests/test_launch.py checks they agree).
RADIX_CACHE_BACKEND = "pfs"
# A decode server's prefix cache of base KV: SGLang's decode radix cache (the decode side
# promises the prefix it holds and the prefill sends the rest), as the ``pfs`` tree, which
# on a decode server caps every request at ``prompt[:k]`` (invariant 1).
DECODE_CACHE_ARGS = ("--disaggregation-decode-enable-radix-cache", "--radix-cache-backend", RADIX_CACHE_BACKEND)


def cpu_server_env(servers: int) -> dict[str, str]:
    """The environment of each of ``servers`` CPU servers on this machine (a variable the user set is kept).

    ``OMP_NUM_THREADS``: an equal share of its cores (at least one). SGLang sets one thread
    on GPUs and leaves CPU servers at one per core; with several servers on one box their
    idle OpenMP threads spin against each other (measured in docs/benchmarks.md,
    "CPU server environment").

    ``THP_MEM_ALLOC_ENABLE=1``: torch puts its large CPU allocations (the KV pool, the
    weights) on transparent huge pages, as numpy does its own. A KV hand-off writes a
    request's rows all over the decode server's pool, one TLB miss per row on 4 KiB pages
    (measured in docs/benchmarks.md, "CPU server environment").
    """
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, servers)))}
    if "THP_MEM_ALLOC_ENABLE" not in os.environ:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


@dataclass(frozen=True)
class ServerPorts:
    http: int
    bootstrap: int | None = None
    nccl: int | None = None  # torch.distributed rendezvous of a GPU server (chosen by the launcher)


def _placement_args(ports: ServerPorts, placement: ServerPlacement | None) -> list[str]:
    """TP size and memory fraction from ``launch/placement.py`` (devices go in its env)."""
    args = ["--nccl-port", str(ports.nccl)] if ports.nccl is not None else []
    if placement is not None and placement.tp > 1:
        args += ["--tp-size", str(placement.tp)]
    if placement is not None and placement.mem_fraction_static is not None:
        args += ["--mem-fraction-static", f"{placement.mem_fraction_static:g}"]
    return args


def _dtype_args(model: Path) -> list[str]:
    """Serve a float32 checkpoint in float32: SGLang's ``--dtype auto`` would run it (and
    its KV) in float16, and the greedy oracle of invariant 5 is exact only in float32."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    dtype = config.get("dtype") or config.get("torch_dtype")
    return ["--dtype", "float32"] if dtype == "float32" else []


def write_server_auth(api_key: str, path: Path) -> Path:
    """SGLang's ``--api-key`` in a YAML file only this user can read, for ``--config``: on
    the command line every local user would see it in ``ps``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({"api-key": api_key}, file)  # JSON is YAML; keys are spelled like the flags
    return path


def _common(model: Path, host: str, ports: ServerPorts, backend: str | None, device: str, max_total_tokens: int,
            auth_file: Path | None) -> list[str]:
    args = [
        sys.executable, "-m", "sglang.launch_server",
        *(["--config", str(auth_file)] if auth_file is not None else []),
        "--model-path", str(model),
        "--host", host, "--port", str(ports.http),
        *(["--disaggregation-transfer-backend", backend] if backend is not None else []),
        "--enable-metrics", "--enable-cache-report",
        *_dtype_args(model),
    ]
    if device == "cpu":
        args += [
            "--device", "cpu", "--attention-backend", "torch_native",
            "--max-total-tokens", str(max_total_tokens),
            "--skip-server-warmup", "--sleep-on-idle",
        ]
    return args


def prefill_server_command(
    base_model: Path, host: str, ports: ServerPorts, backend: str, device: str,
    max_total_tokens: int, extra: tuple[str, ...] = (), placement: ServerPlacement | None = None,
    auth_file: Path | None = None,
) -> list[str]:
    return [
        *_common(base_model, host, ports, backend, device, max_total_tokens, auth_file),
        *_placement_args(ports, placement),
        "--disaggregation-mode", "prefill",
        "--disaggregation-bootstrap-port", str(ports.bootstrap),
        "--radix-cache-backend", RADIX_CACHE_BACKEND,
        # SGLang's overlapped prefill records a CUDA event when it sends a cached prefix early.
        *(["--disable-overlap-schedule"] if device == "cpu" else []),
        *extra,
    ]


def decode_server_command(
    name: str, model: Path, host: str, ports: ServerPorts, backend: str, device: str,
    max_total_tokens: int, extra: tuple[str, ...] = (), placement: ServerPlacement | None = None,
    auth_file: Path | None = None, lora_adapters: tuple[tuple[str, Path], ...] = (), decode_cache: bool = False,
) -> list[str]:
    """A decode server of ``model``; with ``lora_adapters`` ((name, adapter dir), ...),
    ``model`` is the base and SGLang's multi-LoRA serves each adapter under its name
    (the router names it per request as ``lora_path``); with ``decode_cache``, its prefix
    cache of base KV (``DECODE_CACHE_ARGS``)."""
    args = [
        *_common(model, host, ports, backend, device, max_total_tokens, auth_file),
        *_placement_args(ports, placement),
        "--disaggregation-mode", "decode",
        "--served-model-name", name,
    ]
    if device == "cpu":
        # Retraction keeps an exact copy of the request's KV (invariant 1); SGLang's
        # default host pool needs cudaHostRegister, a plain CPU tensor does not.
        args += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
    if decode_cache:
        args += DECODE_CACHE_ARGS
    if lora_adapters:
        args += _lora_args(lora_adapters, device, slots=len(lora_adapters))
    return [*args, *extra]


def _lora_args(lora_adapters: tuple[tuple[str, Path], ...], device: str, slots: int) -> list[str]:
    args = ["--enable-lora", "--max-loras-per-batch", str(slots),
            "--lora-paths", *(f"{adapter}={path}" for adapter, path in lora_adapters)]
    if device == "cpu":
        args += ["--lora-backend", "torch_native"]  # SGLang's only LoRA backend without GPU kernels
    return args


def unified_server_command(
    base_model: Path, host: str, ports: ServerPorts, device: str, max_total_tokens: int,
    lora_adapters: tuple[tuple[str, Path], ...], extra: tuple[str, ...] = (),
    placement: ServerPlacement | None = None, auth_file: Path | None = None,
) -> list[str]:
    """A unified server: the base, every adapter under its name, the ``pfs`` tree; one batch
    may hold every adapter and the base (``--max-loras-per-batch`` adapters + 1)."""
    return [
        *_common(base_model, host, ports, None, device, max_total_tokens, auth_file),
        *_placement_args(ports, placement),
        "--radix-cache-backend", RADIX_CACHE_BACKEND,
        *_lora_args(lora_adapters, device, slots=len(lora_adapters) + 1),
        *extra,
    ]
