"""A deployment comes up every time (real SGLang servers on CPU, demo models).

One deployment (``Deployment``: base + ``extract``) is started here:

* Port collisions: the ports the launcher chose are taken by another socket before the
  servers bind them (prefill-0's bootstrap port, decode-0's HTTP port): both servers are
  restarted on fresh ports, the deployment comes up, and the router routes to the new
  addresses (greedy output checked against the oracle).
* While starting, the router answers at once: ``/health`` 503 naming the servers still
  starting, requests 503 with an OpenAI error body "deployment is starting".
* ``--api-key``: the router (401 with an OpenAI error body) and every server (401)
  refuse requests without the key, ``/health`` and ``/metrics`` stay open, no SGLang admin endpoint is
  routed, and no metrics or bootstrap endpoint shows prompt text.
* A launch hashes the base's weights once (in the launcher; the servers take its record).

The start-up storm, two deployments started at the same moment (the one above, and one
from the command line) that both come up and serve, the second's server logs free of
tracebacks and SIGTERM stopping every child of it, is a ``scenario`` test (``make
test-scenarios``): it doubles the CPU the start-up takes. A launcher stopping every
child on SIGTERM with clean logs is in ``make test`` on the three launchers of
``test_multi_host.py``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from pfs_sglang.identity import fingerprint as fingerprint_module
from pfs_sglang.launch import DecodeModelSpec, Deployment, Topology
from pfs_sglang.launch import deployment as deployment_module
from pfs_sglang.launch.processes import free_port, free_ports
from pfs_sglang.launch.startup import StartupStep
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from sglang_process import generate_greedy

pytestmark = pytest.mark.server

MODEL = "extract"
PROMPT = [21, 48, 95, 130, 77, 64, 33]
API_KEY = "test-key-5d1f"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class PortThief:
    """Takes chosen ports the moment the launcher picks them, as another process would."""

    def __init__(self, steal: dict[int, int]):
        self.steal = steal  # call number of free_ports -> index of the port to take
        self.calls = 0
        self.held: list[socket.socket] = []

    def __call__(self, count: int, host: str = "127.0.0.1") -> list[int]:
        ports = free_ports(count, host)
        if self.calls in self.steal:
            sock = socket.socket()
            sock.bind((host, ports[self.steal[self.calls]]))
            sock.listen()
            self.held.append(sock)
        self.calls += 1
        return ports

    def close(self) -> None:
        for sock in self.held:
            sock.close()


def poll_while_starting(url: str, answers: list[tuple[str, int, float, dict]], done: threading.Event) -> None:
    while not done.is_set():
        for name, send in (("health", lambda: requests.get(f"{url}/health", timeout=5)),
                           ("completion", lambda: requests.post(f"{url}/v1/completions", timeout=5, headers=AUTH,
                                                                json={"model": MODEL, "prompt": "name: tom",
                                                                      "max_tokens": 2}))):
            began = time.monotonic()
            try:
                reply = send()
            except requests.Timeout:  # no answer within 5 s: recorded, so the test names it
                answers.append((name, 0, time.monotonic() - began, {}))
                continue
            except requests.ConnectionError:
                continue  # the router is not listening yet
            answers.append((name, reply.status_code, time.monotonic() - began, reply.json() if reply.content else {}))
        time.sleep(0.5)


def test_taken_ports_starting_router_api_key(demo_models, tmp_path, monkeypatch):
    bring_up_with_taken_ports_and_an_api_key(demo_models, tmp_path, monkeypatch)


@pytest.mark.scenario
def test_two_deployments_at_once_taken_ports_starting_router_api_key(demo_models, tmp_path, monkeypatch):
    other = CliLaunch(demo_models, tmp_path / "other")  # a second deployment, started at the same moment
    try:
        bring_up_with_taken_ports_and_an_api_key(demo_models, tmp_path, monkeypatch)
        other.check_serves_with_clean_logs_and_stops()
    finally:
        other.stop()


def bring_up_with_taken_ports_and_an_api_key(demo_models, tmp_path, monkeypatch) -> None:
    # free_ports calls: 0 = prefill-0 (http, bootstrap), 1 = decode-extract-0 (http).
    thief = PortThief({0: 1, 1: 0})
    monkeypatch.setattr(deployment_module, "free_ports", thief)
    hashed = []
    original_hash = fingerprint_module.weights_hash
    monkeypatch.setattr(fingerprint_module, "weights_hash",
                        lambda model_dir: hashed.append(model_dir) or original_hash(model_dir))
    events = []
    topology = Topology(base_model=demo_models.base, decode_models=(DecodeModelSpec(MODEL, demo_models.decode[MODEL]),),
                        port=free_port(), log_dir=tmp_path / "logs", max_total_tokens=2048, api_key=API_KEY)
    deployment = Deployment(topology, on_startup=events.append)
    answers: list[tuple[str, int, float, dict]] = []
    done = threading.Event()
    poller = threading.Thread(target=poll_while_starting, args=(deployment.url, answers, done), daemon=True)
    poller.start()
    try:
        deployment.start()
        done.set()
        poller.join(timeout=30)
        restarted = sorted(e.server for e in events if e.step is StartupStep.RESTARTED)
        assert restarted == ["decode-extract-0", "prefill-0"], events
        assert sorted(e.server for e in events if e.step is StartupStep.HEALTHY) == ["decode-extract-0", "prefill-0"]
        for log in ("prefill-0.log", "decode-extract-0.log"):
            assert "pfs_sglang: address in use; restart 1 of" in (tmp_path / "logs" / log).read_text()

        starting = [a for a in answers if a[1] == 503]
        assert starting, answers
        # at once, not when the servers are up (a minute or more later); one answer took over 2 s in a
        # fresh-clone suite run with two deployments starting on 2 cores, so the bound is the poll's timeout
        slow = [(name, round(seconds, 2)) for name, _, seconds, _ in answers if seconds >= 5.0]
        assert not slow, slow
        health = [body for name, _, _, body in starting if name == "health"]
        assert health and "prefill-0" in health[0]["starting"] and health[0]["error"]["code"] == "starting"
        completion = [body for name, _, _, body in starting if name == "completion"]
        assert completion and completion[0]["error"]["message"].startswith("deployment is starting")

        served = generate_greedy(deployment.url, MODEL, PROMPT, 6, headers=AUTH)["output_ids"]
        reference = prefillshare_greedy(demo_models.base, demo_models.decode[MODEL], PROMPT, len(served))
        assert first_real_divergence(served, reference) is None, (served, reference.output_ids)
        check_api_key_and_no_prompt_leak(deployment)

        assert hashed == [demo_models.base]  # once, in the launcher
        prefill_log = deployment.children[0].attempt_log()
        assert prefill_log.count("prefill-module fingerprint of") == 2  # zmq backend and pfs prefix tree
        assert prefill_log.count("taken from the launcher's record") == 2
        for log in (tmp_path / "logs").glob("*.log"):
            assert "hashing the weights" not in log.read_text(), log.name
            assert log.stat().st_mode & 0o077 == 0, log.name  # SGLang logs its --api-key: user-only
        assert (tmp_path / "logs" / "server_auth.yaml").stat().st_mode & 0o077 == 0
        assert not [c for c in deployment.children if API_KEY in " ".join(c.command)]  # never in `ps`
    finally:
        done.set()
        deployment.stop()
        thief.close()


def check_api_key_and_no_prompt_leak(deployment: Deployment) -> None:
    url = deployment.url
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = requests.post(f"{url}/v1/completions", headers=headers, timeout=30,
                                json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text
    assert requests.get(f"{url}/health", timeout=30).status_code == 200  # probes need no key
    assert requests.get(f"{url}/metrics", timeout=30).status_code == 200
    assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
    servers = deployment.children
    for server in servers:  # only the router (which holds the key) reaches the servers
        assert requests.post(f"{server.url}/generate", timeout=30, json={"text": "hi"}).status_code == 401
        assert requests.post(f"{server.url}/flush_cache", timeout=30).status_code == 401
    admin = requests.post(f"{url}/update_weights_from_disk", headers=AUTH, timeout=30, json={"model_path": "/x"})
    assert admin.status_code == 404  # SGLang's admin endpoints are not routed

    marker = "zebra quartz marker"
    reply = requests.post(f"{url}/v1/completions", headers=AUTH, timeout=120,
                          json={"model": MODEL, "prompt": marker, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    prefill = deployment.servers[0]
    pages = [requests.get(f"{url}/metrics", timeout=30).text,
             *(requests.get(f"{server.url}/metrics", timeout=30).text for server in servers),
             *(requests.get(f"http://127.0.0.1:{prefill.ports.bootstrap}{path}", timeout=30).text
               for path in ("/route", "/health"))]
    assert not [page for page in pages if marker in page or "zebra" in page]


class CliLaunch:
    """``python -m pfs_sglang.launch_server`` in a process of its own (another deployment)."""

    def __init__(self, demo_models, log_dir):
        self.log_dir, self.port = log_dir, free_port()
        command = [sys.executable, "-m", "pfs_sglang.launch_server", "--base-model", str(demo_models.base),
                   "--decode-model", f"{MODEL}={demo_models.decode[MODEL]}", "--port", str(self.port),
                   "--log-dir", str(log_dir), "--max-total-tokens", "2048"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def check_serves_with_clean_logs_and_stops(self) -> None:
        output = []
        for line in self.process.stdout:
            output.append(line)
            if "serving on" in line or self.process.poll() is not None:
                break
        assert "serving on" in output[-1], "".join(output)
        assert any("prefill-0 healthy at" in line for line in output), "".join(output)
        reply = requests.post(f"http://127.0.0.1:{self.port}/v1/completions", timeout=120,
                              json={"model": MODEL, "prompt": "name: tom", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        for log in self.log_dir.glob("*.log"):
            assert "Traceback" not in log.read_text(), log
        servers = psutil.Process(self.process.pid).children(recursive=True)
        assert len(servers) >= 2
        self.stop()
        assert self.process.returncode == 0
        time.sleep(1)
        assert not [server.pid for server in servers if alive(server)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=120)


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
