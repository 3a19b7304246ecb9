"""Bringing a deployment's servers up: order, how many at once, port collisions, progress, deadline.

A server starts once the servers it must follow are healthy (``after``: servers sharing
a GPU, from ``placement.py``) and fewer than ``concurrency`` servers are still starting.
Ports are chosen by the launcher and released before the server binds them, and SGLang
picks some of its own, so another process can take one in between: a server that exits
during start-up with "address already in use" in its log is started again on fresh
ports (``ServerLaunch.new_ports``), at most ``PORT_RETRIES`` times, and so is one still
running with that error (SGLang's bootstrap server only logs it); its log keeps every
attempt; a server on fixed ports (a server ``--role``: other hosts are told them) has
none to change to and fails the launch at once. Any other exit fails the launch at once
with that server's exit code and log tail (``ChildExitedError``); the deadline fails it
naming the servers still starting.
Every step is reported as a ``StartupEvent`` (the launcher prints them; the router says
which servers are still starting). A server another host runs (``RemoteServer``, for
``--role router``) is not started here: it is awaited, and healthy once its ``/health``
answers, under the same deadline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from pfs_sglang.launch.processes import ChildExitedError, LaunchError, ManagedProcess, RemoteServer

PORT_RETRIES = 3
POLL_S = 0.5
# uvicorn: "[Errno 98] error while attempting to bind ... address already in use";
# ZMQ and torch.distributed: "Address already in use".
_PORT_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


class StartupStep(Enum):
    STARTED = "started"
    AWAITED = "awaited (runs on another host)"
    RESTARTED = "restarted on fresh ports"
    HEALTHY = "healthy"


@dataclass(frozen=True)
class StartupEvent:
    server: str
    step: StartupStep
    elapsed_s: float  # since the bring-up began
    detail: str  # where it listens and logs (started, restarted on fresh ports)


@dataclass
class ServerLaunch:
    """One server to bring up; ``new_ports`` picks fresh ports and rebuilds the command and
    URL of a server started here (a remote one has none)."""

    child: ManagedProcess | RemoteServer
    describe: Callable[[], str]  # its addresses and log, for the launcher's own output
    new_ports: Callable[[], None] | None = None
    after: tuple[str, ...] = ()
    port_retries: int = field(default=0, init=False)

    @property
    def name(self) -> str:
        return self.child.name


def port_in_use(log_text: str) -> bool:
    return _PORT_IN_USE.search(log_text) is not None


class BringUp:
    """Start ``servers`` and wait until every one is healthy (see the module docstring)."""

    def __init__(self, servers: list[ServerLaunch], concurrency: int, timeout_s: float,
                 report: Callable[[StartupEvent], None] = lambda event: None):
        self.waiting = list(servers)  # not started yet, in launch order
        self.starting: list[ServerLaunch] = []
        self.healthy: list[str] = []
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s
        self.report = report
        self._began = time.monotonic()

    def not_healthy(self) -> list[str]:
        return [server.name for server in (*self.starting, *self.waiting)]

    def run(self) -> None:
        deadline = self._began + self.timeout_s
        while self.waiting or self.starting:
            self._start_what_may_start()
            for server in list(self.starting):
                self._check(server)
            if not (self.waiting or self.starting):
                return
            if time.monotonic() > deadline:
                local = [s.child for s in (*self.starting, *self.waiting) if isinstance(s.child, ManagedProcess)]
                where = f"logs in {local[0].log_path.parent}" if local else \
                    "they run on other hosts: see their logs there"
                raise LaunchError(f"not healthy after {self.timeout_s:.0f} s: {', '.join(self.not_healthy())} "
                                  f"({where})")
            time.sleep(POLL_S)

    def _say(self, server: ServerLaunch, step: StartupStep, detail: str = "") -> None:
        self.report(StartupEvent(server.name, step, time.monotonic() - self._began, detail))

    def _start_what_may_start(self) -> None:
        for server in list(self.waiting):
            if len(self.starting) >= self.concurrency:
                return
            if all(name in self.healthy for name in server.after):
                self.waiting.remove(server)
                here = isinstance(server.child, ManagedProcess)
                if here:
                    server.child.start()
                self.starting.append(server)
                self._say(server, StartupStep.STARTED if here else StartupStep.AWAITED, server.describe())

    def _check(self, server: ServerLaunch) -> None:
        if isinstance(server.child, ManagedProcess) and self._restarted(server):
            return
        if server.child.healthy():
            self.starting.remove(server)
            self.healthy.append(server.name)
            self._say(server, StartupStep.HEALTHY)

    def _restarted(self, server: ServerLaunch) -> bool:
        """Restart a server of this host whose port was taken (True); fail the launch if it exited."""
        child = server.child
        code = child.exit_code()
        # A taken port ends a server (uvicorn) or only one of its threads (SGLang's
        # bootstrap server logs the error and the server runs on without it): both restart.
        if port_in_use(child.attempt_log()):
            if server.new_ports is None:
                raise LaunchError(f"{child.name}: a port it must listen on is in use; its log ({child.log_path}) "
                                  f"ends:\n{child.log_tail()}")
            if server.port_retries == PORT_RETRIES:
                raise LaunchError(f"{child.name}: a port was in use on {PORT_RETRIES + 1} tries; its log "
                                  f"({child.log_path}) ends:\n{child.log_tail()}")
            if code is None:
                child.stop()
            server.port_retries += 1
            server.new_ports()
            child.start(restart_note=f"address in use; restart {server.port_retries} of {PORT_RETRIES} "
                                     f"on fresh ports")
            self._say(server, StartupStep.RESTARTED, server.describe())
            return True
        if code is not None:
            raise ChildExitedError(f"{child.name} exited with code {code} during start-up; "
                                   f"its log ({child.log_path}) ends:\n{child.log_tail()}", code)
        return False
