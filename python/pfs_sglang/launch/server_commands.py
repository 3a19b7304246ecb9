"""The SGLang command lines of a deployment, in one place.

Prefill: ``--disaggregation-mode prefill`` with the base model, the ``pfs`` prefix tree
keyed on the prefill module (invariant 3) and a bootstrap port for the KV hand-off.
Decode: ``--disaggregation-mode decode`` with one decode module, served under its name.
On CPU both run SGLang's native path (torch_native attention, no overlap scheduling,
sleep when idle so idle PD loops do not spin a core) with a bounded KV pool.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pfs_sglang.cache.prefill_module_cache import RADIX_CACHE_BACKEND


@dataclass(frozen=True)
class ServerPorts:
    http: int
    bootstrap: int | None = None


def _common(model: Path, host: str, ports: ServerPorts, backend: str, device: str, max_total_tokens: int) -> list[str]:
    args = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model),
        "--host", host, "--port", str(ports.http),
        "--disaggregation-transfer-backend", backend,
        "--enable-metrics", "--enable-cache-report",
    ]
    if device == "cpu":
        args += [
            "--device", "cpu", "--attention-backend", "torch_native",
            "--max-total-tokens", str(max_total_tokens),
            "--skip-server-warmup", "--disable-overlap-schedule", "--sleep-on-idle",
        ]
    return args


def prefill_server_command(
    base_model: Path, host: str, ports: ServerPorts, backend: str, device: str,
    max_total_tokens: int, extra: tuple[str, ...] = (),
) -> list[str]:
    return [
        *_common(base_model, host, ports, backend, device, max_total_tokens),
        "--disaggregation-mode", "prefill",
        "--disaggregation-bootstrap-port", str(ports.bootstrap),
        "--radix-cache-backend", RADIX_CACHE_BACKEND,
        *extra,
    ]


def decode_server_command(
    name: str, model: Path, host: str, ports: ServerPorts, backend: str, device: str,
    max_total_tokens: int, extra: tuple[str, ...] = (),
) -> list[str]:
    args = [
        *_common(model, host, ports, backend, device, max_total_tokens),
        "--disaggregation-mode", "decode",
        "--served-model-name", name,
    ]
    if device == "cpu":
        args += ["--disaggregation-decode-retraction-backup", "none"]  # host pools need cudaHostRegister
    return [*args, *extra]
