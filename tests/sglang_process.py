"""Test helpers: run one stock ``sglang.launch_server`` on CPU, read a server's KV usage,
send one greedy ``/generate``, wait until a deployment is idle, supervise a deployment
as the launcher does (``Supervised``: kill a server, wait until it serves again).

The process handling is the launcher's own (``pfs_sglang.launch.processes``); reading
Prometheus totals, KV slots in use and waiting until idle is the load run's
(``pfs_sglang.bench.server_state``, re-exported here).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from pfs_sglang.bench.server_state import metric_total, used_kv_tokens, wait_deployment_idle  # noqa: F401
from pfs_sglang.launch import Deployment
from pfs_sglang.launch.deployment import PlannedServer
from pfs_sglang.launch.processes import ManagedProcess, free_port, wait_until_healthy
from pfs_sglang.launch.supervision import SupervisionEvent, SupervisionStep

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


class Supervised:
    """A deployment whose ``supervise()`` runs in a thread, as the launcher's loop runs it."""

    def __init__(self, deployment: Deployment, headers: dict[str, str] | None = None):
        self.deployment = deployment
        self.headers = headers  # what the router asks of clients (an API key)
        self.events: list[SupervisionEvent] = []
        self.given_up: list[str] = []
        deployment.on_supervision = self.events.append
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            dead = self.deployment.supervise()
            if dead is not None:
                self.given_up.append(dead.name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def server(self, name: str) -> PlannedServer:
        return next(server for server in self.deployment.servers if server.name == name)

    def kill(self, name: str) -> int:
        pid = self.server(name).child.process.pid
        os.killpg(pid, signal.SIGKILL)  # the server and its scheduler and detokenizer
        return pid

    def workers(self) -> list[dict]:
        return requests.get(f"{self.deployment.url}/workers", headers=self.headers, timeout=10).json()["workers"]

    def wait_serving_again(self, name: str, pid_before: int, restart_timeout_s: float = 300) -> None:
        """Until ``name`` was restarted and is serving, and the router has it in rotation again."""
        url = self.server(name).child.url
        deadline = time.monotonic() + restart_timeout_s
        while not (any(e.server == name and e.step is SupervisionStep.SERVING for e in self.events)
                   and any(w["url"] == url and w["healthy"] for w in self.workers())):
            assert not self.given_up and time.monotonic() < deadline, (self.events, self.given_up)
            time.sleep(1)
        assert self.server(name).child.process.pid != pid_before
