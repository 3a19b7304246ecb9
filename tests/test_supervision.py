"""Restarts while serving (``launch/supervision.py``) on stand-in servers (a Python HTTP
server answering ``/health``), so every rule is checked in seconds: a server killed
while serving is restarted on its port after its backoff, comes back, its log keeps both
runs; past ``max_restarts`` (or with no policy) the exit ends the deployment."""

from __future__ import annotations

import signal
import time

from pfs_sglang.launch.processes import ManagedProcess, free_port, stop_all, wait_until_healthy
from pfs_sglang.launch.supervision import RestartPolicy, SupervisionStep, Supervisor
from test_startup_order import stand_in


def supervise_until(supervisor: Supervisor, done, timeout_s: float = 30) -> ManagedProcess | None:
    deadline = time.monotonic() + timeout_s
    while True:
        given_up = supervisor.check()
        if given_up is not None or done():
            return given_up
        assert time.monotonic() < deadline, "supervision did not get there in time"
        time.sleep(0.1)


def test_a_killed_server_is_restarted_on_its_port_with_backoff_until_the_limit(tmp_path):
    port = free_port()
    server = stand_in("decode-x-0", tmp_path, port)
    events = []
    supervisor = Supervisor([server], RestartPolicy(max_restarts=2, first_backoff_s=0.5, max_backoff_s=5),
                            events.append)
    server.start()
    try:
        wait_until_healthy([server], 20)
        first_pid = server.process.pid
        for restart in (1, 2):
            seen = len(events)
            server.signal_group(signal.SIGKILL)
            killed_at = time.monotonic()
            assert supervise_until(supervisor, lambda: events[seen:] and events[-1].step is SupervisionStep.SERVING
                                   ) is None
            assert time.monotonic() - killed_at >= 0.5 * 2 ** (restart - 1)  # the backoff doubles
            assert server.process.pid != first_pid and server.url == f"http://127.0.0.1:{port}"
            assert [e.step for e in events[-3:]] == [SupervisionStep.EXITED, SupervisionStep.RESTARTED,
                                                     SupervisionStep.SERVING]
            assert f"restart {restart} of 2" in events[-1].detail
        assert server.log_path.read_text().count("--- pfs_sglang: exited with code -9 while serving; restart") == 2
        server.signal_group(signal.SIGKILL)
        assert supervise_until(supervisor, lambda: False) is server  # the third exit ends it
        assert events[-1].step is SupervisionStep.GIVEN_UP and "the limit" in events[-1].detail
    finally:
        stop_all([server])


def test_a_restarted_server_whose_health_answers_after_a_second_is_serving_again(tmp_path):
    """SGLang's ``/health`` answers after at least a second: the probe waits longer than that."""
    server = stand_in("prefill-0", tmp_path, free_port(), "slow-health")
    events = []
    supervisor = Supervisor([server], RestartPolicy(max_restarts=1, first_backoff_s=0.1), events.append)
    server.start()
    try:
        wait_until_healthy([server], 20)
        server.signal_group(signal.SIGKILL)
        assert supervise_until(supervisor, lambda: events and events[-1].step is SupervisionStep.SERVING) is None
    finally:
        stop_all([server])


def test_without_a_policy_an_exit_ends_the_deployment_and_others_run_on(tmp_path):
    servers = [stand_in(f"s{i}", tmp_path, free_port()) for i in range(2)]
    events = []
    supervisor = Supervisor(servers, None, events.append)
    for server in servers:
        server.start()
    try:
        for server in servers:
            wait_until_healthy([server], 20)
        assert supervisor.check() is None
        servers[1].signal_group(signal.SIGTERM)
        assert supervise_until(supervisor, lambda: False) is servers[1]
        assert [(e.step, e.server) for e in events] == [(SupervisionStep.GIVEN_UP, "s1")]
        assert servers[0].healthy()
    finally:
        stop_all(servers)
