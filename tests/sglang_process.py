"""Test helpers: run one stock ``sglang.launch_server`` on CPU, read a server's KV usage,
send one greedy ``/generate``, wait until a deployment is idle.

The process handling is the launcher's own (``pfs_sglang.launch.processes``).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

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


def metric_total(url: str, series: str) -> float:
    """The sum of the Prometheus samples at ``url/metrics`` whose line starts with ``series``."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def used_kv_tokens(server_url: str) -> float:
    """KV slots held by requests on an SGLang server (``sglang:num_used_tokens``; cache excluded)."""
    return metric_total(server_url, "sglang:num_used_tokens{")


def wait_deployment_idle(router_url: str, timeout_s: float = 60) -> None:
    """Until no router lease and no KV slot is held anywhere, and every server's
    ``/flush_cache`` succeeds (SGLang answers it only when its scheduler is idle: no
    queued request, no unprocessed batch result)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = requests.get(f"{router_url}/workers", timeout=10).json()["workers"]
        held = {row["url"]: (row["in_flight"], used_kv_tokens(row["url"])) for row in rows}
        if not any(a or b for a, b in held.values()):
            flushed = requests.post(f"{router_url}/flush_cache", timeout=30)
            if flushed.status_code == 200:
                return
            held["flush_cache"] = (flushed.status_code, flushed.text[:200])
        assert time.monotonic() < deadline, f"not idle (router leases, KV slots): {held}"
        time.sleep(0.5)


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
