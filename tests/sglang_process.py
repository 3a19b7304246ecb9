"""Test helpers: run one stock ``sglang.launch_server`` on CPU, read a server's KV usage,
send one greedy ``/generate``, wait until a deployment is idle.

The process handling is the launcher's own (``pfs_sglang.launch.processes``); reading
Prometheus totals, KV slots in use and waiting until idle is the load run's
(``pfs_sglang.bench.server_state``, re-exported here).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import requests

from pfs_sglang.bench.server_state import metric_total, used_kv_tokens, wait_deployment_idle  # noqa: F401
from pfs_sglang.launch.processes import ManagedProcess, free_port, wait_until_healthy

CPU_SERVER_ARGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--max-total-tokens", "4096",
    "--skip-server-warmup",
    "--dtype", "float32",  # SGLang's auto would serve the float32 demo models in float16
]


@contextmanager
def sglang_server(model_path: Path, log_path: Path, extra_args: list[str] = (), timeout_s: float = 180):
    """Start stock SGLang on CPU, wait for /health, yield its base URL, stop it."""
    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--host", "127.0.0.1", "--port", str(port), *CPU_SERVER_ARGS, *extra_args]
    server = ManagedProcess(name="sglang", command=command, log_path=log_path, url=f"http://127.0.0.1:{port}")
    server.start()
    try:
        wait_until_healthy([server], timeout_s)
        yield server.url
    finally:
        server.stop()


def generate_greedy(url: str, model: str, prompt_ids: list[int], max_new_tokens: int,
                    headers: dict[str, str] | None = None, **extra) -> dict:
    """One greedy ``/generate`` of ``max_new_tokens`` tokens (EOS ignored) through a router; its reply."""
    reply = requests.post(f"{url}/generate", headers=headers, json={
        "model": model, "input_ids": prompt_ids,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
        **extra,
    }, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()
