"""The start-up machinery (``launch/startup.py``) on small stand-in servers (a Python HTTP
server answering ``/health``), so every rule is checked in seconds: a taken port
restarts the server on fresh ports (whether it exits or only logs the error), other
exits fail at once with the server's code, at most ``concurrency`` servers start at
once, and the deadline names the servers still starting."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from pfs_sglang.launch.processes import ChildExitedError, LaunchError, ManagedProcess, free_port, stop_all
from pfs_sglang.launch.startup import PORT_RETRIES, BringUp, ServerLaunch, StartupStep

# Serves /health on argv[1]; with argv[2] == "log-only" a failed bind is only logged (as
# SGLang's bootstrap thread does) and the server goes on without answering; with
# argv[2] == "slow-health" /health answers after a second, as SGLang's does (it generates
# one token and sleeps 1 s before it looks for it).
STAND_IN = """
import http.server, sys, time
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if sys.argv[2:] == ["slow-health"]:
            time.sleep(1.05)
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
try:
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
except OSError as error:
    print("bind failed:", error, flush=True)
    if sys.argv[2:] == ["log-only"]:
        time.sleep(3600)
    raise
server.serve_forever()
"""


def stand_in(name: str, tmp_path, port: int, *extra: str) -> ManagedProcess:
    return ManagedProcess(name=name, command=[sys.executable, "-c", STAND_IN, str(port), *extra],
                          log_path=tmp_path / f"{name}.log", url=f"http://127.0.0.1:{port}")


def launch(child: ManagedProcess, after: tuple[str, ...] = ()) -> ServerLaunch:
    def new_ports() -> None:
        port = free_port()
        child.command = [*child.command[:3], str(port), *child.command[4:]]
        child.url = f"http://127.0.0.1:{port}"

    return ServerLaunch(child, describe=lambda: child.url, new_ports=new_ports, after=after)


@pytest.mark.parametrize("when_taken", ["exits", "log-only"])
def test_a_taken_port_restarts_the_server_on_a_fresh_one(tmp_path, when_taken):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    child = stand_in("server", tmp_path, taken.getsockname()[1], *(["log-only"] if when_taken == "log-only" else []))
    events = []
    try:
        BringUp([launch(child)], concurrency=1, timeout_s=60, report=events.append).run()
        assert [e.step for e in events] == [StartupStep.STARTED, StartupStep.RESTARTED, StartupStep.HEALTHY]
        assert child.url != f"http://127.0.0.1:{taken.getsockname()[1]}" and child.healthy()
        log = child.log_path.read_text()
        assert "Address already in use" in log and "pfs_sglang: address in use; restart 1 of" in log
    finally:
        taken.close()
        stop_all([child])


def test_a_port_taken_on_every_try_fails_the_launch(tmp_path):
    child = stand_in("server", tmp_path, free_port())
    server = launch(child)
    held = []

    def steal_next() -> None:  # every fresh port is taken before the server binds it
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        held.append(sock)
        child.command[3] = str(sock.getsockname()[1])

    server.new_ports = steal_next
    steal_next()
    try:
        with pytest.raises(LaunchError, match=f"a port was in use on {PORT_RETRIES + 1} tries"):
            BringUp([server], concurrency=1, timeout_s=60).run()
    finally:
        for sock in held:
            sock.close()
        stop_all([child])


def test_another_exit_fails_at_once_with_the_servers_code(tmp_path):
    child = ManagedProcess(name="broken", command=[sys.executable, "-c", "import sys; print('no model'); sys.exit(3)"],
                           log_path=tmp_path / "broken.log", url=f"http://127.0.0.1:{free_port()}")
    began = time.monotonic()
    with pytest.raises(ChildExitedError, match="broken exited with code 3 during start-up") as error:
        BringUp([launch(child)], concurrency=1, timeout_s=60).run()
    assert error.value.exit_code == 3 and "no model" in str(error.value) and time.monotonic() - began < 10


def test_concurrency_and_order_and_deadline(tmp_path):
    children = [stand_in(f"s{i}", tmp_path, free_port()) for i in range(3)]
    events = []
    try:
        BringUp([launch(c) for c in children], concurrency=2, timeout_s=60, report=events.append).run()
        steps = [(e.step, e.server) for e in events]
        # s2 starts only after one of s0, s1 is healthy.
        assert steps.index((StartupStep.STARTED, "s2")) > min(steps.index((StartupStep.HEALTHY, "s0")),
                                                              steps.index((StartupStep.HEALTHY, "s1")))
    finally:
        stop_all(children)
    silent = ManagedProcess(name="silent", command=[sys.executable, "-c", "import time; time.sleep(60)"],
                            log_path=tmp_path / "silent.log", url=f"http://127.0.0.1:{free_port()}")
    waiting = stand_in("waiting", tmp_path, free_port())
    bring_up = BringUp([launch(silent), launch(waiting, after=("silent",))], concurrency=2, timeout_s=2)
    try:
        with pytest.raises(LaunchError, match="not healthy after 2 s: silent, waiting"):
            bring_up.run()
        assert waiting.process is None  # it follows silent, which never became healthy
    finally:
        stop_all([silent])
