"""Keeping a serving deployment's servers up: restart with backoff and a limit.

Called once a second while the deployment serves (``Supervisor.check``). Without a
``RestartPolicy`` a server that exits is the end of the deployment (the launcher stops
everything and exits 1, as before). With one, a server that exits is restarted on the
same command line and ports (so the router's addresses stay right) after a backoff
that doubles with each of its restarts (``first_backoff_s``, 2x, 4x ... at most
``max_backoff_s``), at most ``max_restarts`` times in the deployment's life; what is left
of its process group is killed first. Its log keeps every run, each restart after a
``--- pfs_sglang: ... ---`` line, and every step is reported (``SupervisionEvent``):
exited, restarting, serving again, given up. Meanwhile the router takes the server out
of rotation as soon as a request or health check finds its port refusing connections,
and puts it back when its health check passes (``router/worker_health.py``), so the
launcher never touches the router; the decode servers fetch KV from a restarted prefill
server at the same bootstrap address. A server past its limit ends the deployment as without a policy.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from pfs_sglang.launch.processes import ManagedProcess


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # per server, over the deployment's life
    first_backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def backoff_s(self, restarts_so_far: int) -> float:
        return min(self.first_backoff_s * 2 ** restarts_so_far, self.max_backoff_s)


class SupervisionStep(Enum):
    EXITED = "exited"
    RESTARTED = "restarted"
    SERVING = "serving again"
    GIVEN_UP = "given up"


@dataclass(frozen=True)
class SupervisionEvent:
    step: SupervisionStep
    server: str
    detail: str


@dataclass
class _ServerState:
    restarts: int = 0
    restart_at: float | None = None  # set while the server waits out its backoff
    awaiting_health: bool = False  # restarted, not yet answering /health


@dataclass
class Supervisor:
    """Watches ``servers`` while they serve; see the module docstring."""

    servers: Sequence[ManagedProcess]
    policy: RestartPolicy | None
    on_event: Callable[[SupervisionEvent], None] = lambda event: None
    _states: dict[str, _ServerState] = field(default_factory=dict, init=False)

    def check(self) -> ManagedProcess | None:
        """One pass: restart what is due, note what came back; a server that exited and
        will not be restarted is returned (the deployment must end)."""
        for server in self.servers:
            state = self._states.setdefault(server.name, _ServerState())
            code = server.exit_code()
            if state.restart_at is not None:
                if time.monotonic() >= state.restart_at:
                    self._restart(server, state)
            elif code is not None:
                if not self._exited(server, state, code):
                    return server
            elif state.awaiting_health and server.healthy():  # the start-up probe (SGLang answers after 1 s)
                state.awaiting_health = False
                self.on_event(SupervisionEvent(SupervisionStep.SERVING, server.name,
                                               f"after restart {state.restarts} of {self.policy.max_restarts}"))
        return None

    def _exited(self, server: ManagedProcess, state: _ServerState, code: int) -> bool:
        """Schedule the restart of ``server``; False when it will not be restarted."""
        server.signal_group(signal.SIGKILL)  # what is left of it (SGLang's scheduler, detokenizer)
        state.awaiting_health = False
        how = f"exited with code {code} while serving"
        if self.policy is None or state.restarts >= self.policy.max_restarts:
            limit = "" if self.policy is None else f" (restarted {state.restarts} times, the limit)"
            self.on_event(SupervisionEvent(SupervisionStep.GIVEN_UP, server.name, how + limit))
            return False
        backoff = self.policy.backoff_s(state.restarts)
        state.restart_at = time.monotonic() + backoff
        self.on_event(SupervisionEvent(SupervisionStep.EXITED, server.name,
                                       f"{how}; restart {state.restarts + 1} of {self.policy.max_restarts} "
                                       f"in {backoff:.0f} s"))
        return True

    def _restart(self, server: ManagedProcess, state: _ServerState) -> None:
        state.restarts += 1
        state.restart_at = None
        note = (f"exited with code {server.exit_code()} while serving; "
                f"restart {state.restarts} of {self.policy.max_restarts}")
        server.start(restart_note=note)
        state.awaiting_health = True
        self.on_event(SupervisionEvent(SupervisionStep.RESTARTED, server.name,
                                       f"restart {state.restarts} of {self.policy.max_restarts}; "
                                       f"log {server.log_path}"))
