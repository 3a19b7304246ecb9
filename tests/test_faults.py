"""Servers killed while serving, on real processes (issue 10, faults a, b and d).

One launcher (``python -m pfs_sglang.launch_server --restart-on-failure``) serves the
demo ``extract`` model with two decode replicas and one prefill server. A decode replica
killed (SIGKILL, its whole process group) mid-request: that request fails within
seconds, the other replica's request finishes, new requests go to the other replica,
the launcher restarts the dead one and says so, and it rejoins the rotation. The
prefill server killed: every request gets 503 with an OpenAI error body at once; the
launcher restarts it; service resumes, exact against the greedy oracle, with the same
decode processes. Afterwards no KV slot is held anywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from pfs_sglang.launch.processes import free_port
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from sglang_process import generate_greedy, wait_deployment_idle

MODEL = "extract"
START_TIMEOUT_S = 420
RESTART_TIMEOUT_S = 300
PROMPT = [(7 * i) % 150 + 20 for i in range(48)]


@dataclass
class Launcher:
    url: str
    process: subprocess.Popen
    output: Path

    def said(self) -> str:
        return self.output.read_text(errors="replace")

    def workers(self) -> list[dict]:
        return requests.get(f"{self.url}/workers", timeout=10).json()["workers"]

    def server_pid(self, worker_url: str) -> int:
        """The pid of the SGLang server (its process group leader) listening at ``worker_url``."""
        port = worker_url.rsplit(":", 1)[1]
        for child in psutil.Process(self.process.pid).children():
            command = child.cmdline()
            if "--port" in command and command[command.index("--port") + 1] == port:
                return child.pid
        raise AssertionError(f"no server process for {worker_url}")

    def kill(self, worker_url: str) -> int:
        pid = self.server_pid(worker_url)
        os.killpg(pid, signal.SIGKILL)  # the server and its scheduler and detokenizer
        return pid

    def wait_restarted(self, worker_url: str, pid_before: int, line: str) -> None:
        """Until the launcher has said ``line`` and the router has ``worker_url`` in rotation again."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while not (line in self.said() and any(w["url"] == worker_url and w["healthy"] for w in self.workers())):
            assert self.process.poll() is None, self.said()
            assert time.monotonic() < deadline, self.said()
            time.sleep(1)
        assert self.server_pid(worker_url) != pid_before


@pytest.fixture(scope="module")
def launcher(demo_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fault_logs")
    port = free_port()
    output = logs / "launcher.out"
    with open(output, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pfs_sglang.launch_server", "--base-model", str(demo_models.base),
             "--decode-model", f"{MODEL}={demo_models.decode[MODEL]}", "--decode-replicas", "2",
             "--restart-on-failure", "--transfer-timeout", "10", "--port", str(port), "--log-dir", str(logs)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    running = Launcher(f"http://127.0.0.1:{port}", process, output)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving on" not in running.said():
            assert process.poll() is None and time.monotonic() < deadline, running.said()
            time.sleep(1)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0, running.said()


def _long_generate(url: str, rid: str) -> tuple[int, float]:
    """Status and end time of a generation long enough to be killed in the middle of."""
    reply = requests.post(f"{url}/generate", json={
        "model": MODEL, "input_ids": PROMPT, "rid": rid,
        "sampling_params": {"max_new_tokens": 1900, "temperature": 0, "ignore_eos": True}}, timeout=300)
    return reply.status_code, time.monotonic()


def _assert_exact(url: str, demo_models) -> None:
    served = generate_greedy(url, MODEL, PROMPT, 12)["output_ids"]
    reference = prefillshare_greedy(demo_models.base, demo_models.decode[MODEL], PROMPT, 12)
    assert first_real_divergence(served, reference) is None, (served, reference.output_ids)


def test_a_killed_decode_replica_fails_its_request_the_other_serves_and_it_rejoins(launcher, demo_models):
    decodes = [w["url"] for w in launcher.workers() if w["role"] == "decode"]
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(_long_generate, launcher.url, f"long-{i}") for i in range(2)]
        deadline = time.monotonic() + 60
        while not all(w["in_flight"] == 1 for w in launcher.workers() if w["role"] == "decode"):
            assert time.monotonic() < deadline, launcher.workers()  # least-loaded: one on each replica
            time.sleep(0.05)
        time.sleep(1)  # both are decoding
        killed_pid, killed_at = launcher.kill(decodes[0]), time.monotonic()
        outcomes = sorted(future.result() for future in running)
    (ok_status, _), (failed_status, failed_at) = outcomes
    assert ok_status == 200 and failed_status in (502, 503)
    assert failed_at - killed_at < 10, "the request on the killed replica did not end within 10 s"

    assert not next(w for w in launcher.workers() if w["url"] == decodes[0])["healthy"]
    for _ in range(3):  # the other replica serves meanwhile
        _assert_exact(launcher.url, demo_models)
    launcher.wait_restarted(decodes[0], killed_pid, "decode-extract-0 serving again: after restart 1 of 5")
    assert "decode-extract-0 exited: exited with code -9 while serving; restart 1 of 5" in launcher.said()
    with ThreadPoolExecutor(4) as pool:  # least-loaded spreads these over both replicas again
        replies = list(pool.map(lambda i: generate_greedy(launcher.url, MODEL, PROMPT, 12, rid=f"after-{i}"),
                                range(4)))
    reference = prefillshare_greedy(demo_models.base, demo_models.decode[MODEL], PROMPT, 12)
    assert all(first_real_divergence(reply["output_ids"], reference) is None for reply in replies)
    wait_deployment_idle(launcher.url)


def test_a_killed_prefill_server_is_503_at_once_and_service_resumes_after_its_restart(launcher, demo_models):
    workers = launcher.workers()
    prefill = next(w["url"] for w in workers if w["role"] == "prefill")
    decode_pids = {w["url"]: launcher.server_pid(w["url"]) for w in workers if w["role"] == "decode"}
    killed_pid = launcher.kill(prefill)
    time.sleep(0.5)
    for body in ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                 {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
                 {"model": MODEL, "prompt": "hi", "max_tokens": 4}):
        endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        started = time.monotonic()
        reply = requests.post(launcher.url + endpoint, json=body, timeout=60)
        assert reply.status_code == 503 and time.monotonic() - started < 3, reply.text
        assert reply.json()["error"]["type"] == "service_unavailable"
    launcher.wait_restarted(prefill, killed_pid, "prefill-0 serving again: after restart 1 of 5")
    _assert_exact(launcher.url, demo_models)
    assert {url: launcher.server_pid(url) for url in decode_pids} == decode_pids  # decode servers kept running
    wait_deployment_idle(launcher.url)
