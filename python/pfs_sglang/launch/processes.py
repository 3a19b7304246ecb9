"""Child processes of a deployment: start each in its own process group, wait, stop.

A child that exits during start-up fails the launch with its exit code and the tail of
its log (never a hang: start-up has a deadline). Stopping sends SIGTERM to every
child's whole process group at once, waits a grace period, then SIGKILLs what is left.
On Linux each child also gets SIGTERM if the launcher dies without stopping it
(``PR_SET_PDEATHSIG``; SGLang's own subprocesses follow their parent the same way).
The death signal is tied to the thread that started the child: start deployments from
a thread that outlives them (normally the main thread). It reaches the child only, not
the processes the child started (an SGLang server's scheduler): a command that starts
servers calls ``exit_on_stop_signals``, so SIGTERM ends it through the code that stops
them, as Ctrl-C does.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

LOG_TAIL_CHARS = 4000
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """The deployment could not be started; the message says which part and why."""

    exit_code = 1


class ChildExitedError(LaunchError):
    """A server exited during start-up; ``exit_code`` is its own (128 + signal if killed, 1 if 0)."""

    def __init__(self, message: str, child_code: int):
        super().__init__(message)
        self.exit_code = child_code if child_code > 0 else 128 - child_code if child_code < 0 else 1


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free now, all held until every one is chosen.

    They come from below the kernel's ephemeral range (``ip_local_port_range``), where
    no ``bind(0)`` (gloo's listeners, for one) and no outgoing connection can take one
    before the server binds it, and outside the range SGLang picks its NCCL port from.
    A process choosing the same fixed port can still take one: ``startup.py`` restarts
    on that. Where the range cannot be read (off Linux), the kernel chooses.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = _ports_below_ephemeral()
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            port = candidates.pop() if candidates else 0
            sock = socket.socket(family)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                if port == 0:
                    raise
                continue
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


PORT_RANGE = (10000, 21999)
"""Where ``free_ports`` looks: below Linux's default ephemeral range (32768 up) and the
range SGLang picks its NCCL port from (22000-29999, ``get_free_port_below_ephemeral``)."""


def _ports_below_ephemeral() -> list[int]:
    """Candidate ports in random order, empty where the ephemeral range cannot be read."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    low, high = PORT_RANGE[0], min(PORT_RANGE[1], ephemeral_low - 1)
    return random.sample(range(low, high + 1), min(256, max(0, high - low + 1)))


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` now, so no server started later can take the port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise LaunchError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    return sock


def exit_on_stop_signals() -> None:
    """SIGTERM and Ctrl-C end this command through its ``finally`` and ``with`` blocks (which
    stop every server it started): the first raises ``SystemExit(128 + signal)``; later ones
    are ignored, so the stopping is not cut short. Call it from a command's main thread."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)


def _exit_on_signal(signum: int, _frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ManagedProcess:
    """One SGLang server: its command line, log file and HTTP address."""

    name: str
    command: list[str]
    log_path: Path
    url: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    _attempt_log_offset: int = field(default=0, init=False, repr=False)

    def start(self, restart_note: str | None = None) -> None:
        """Start the server, writing a new log (mode 0600); a restart (``restart_note`` says
        why) appends to the log, after a line with the note, so every attempt stays readable."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Readable by this user only: SGLang logs its server arguments, --api-key included.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if restart_note is None else os.O_APPEND)
        with os.fdopen(os.open(self.log_path, flags, 0o600), "w" if restart_note is None else "a") as log:
            if restart_note is not None:
                log.write(f"\n--- pfs_sglang: {restart_note} ---\n")
                log.flush()
            self._attempt_log_offset = log.tell()
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent, env={**os.environ, **self.env},
            )

    def log_tail(self) -> str:
        return self.attempt_log()[-LOG_TAIL_CHARS:]

    def attempt_log(self) -> str:
        """The log of the latest start."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._attempt_log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self, timeout_s: float = 5.0) -> bool:
        return answers_health(self.url, timeout_s)

    def signal_group(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the child's process group; False if the group is gone."""
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, sig)  # start_new_session: the group id is the child's pid
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self, grace_s: float = 20.0) -> None:
        stop_all([self], grace_s)

    def group_alive(self) -> bool:
        if self.process is not None:
            self.process.poll()  # reap the leader, so a zombie does not count
        return self.signal_group(0)


def answers_health(url: str, timeout_s: float = 5.0) -> bool:
    """The SGLang server at ``url`` answers ``/health`` with 200. SGLang's ``/health``
    generates one token and answers after at least a second (it sleeps 1 s before it looks
    for the reply), so ``timeout_s`` must be longer than that."""
    try:
        return requests.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


@dataclass
class RemoteServer:
    """A server another host's launcher runs (``--role router`` waits for it): there is no
    process here to start, watch or stop, and its log is on its own host."""

    name: str
    url: str

    def healthy(self, timeout_s: float = 5.0) -> bool:
        return answers_health(self.url, timeout_s)


def stop_all(processes: Sequence[ManagedProcess], grace_s: float = 20.0) -> None:
    """SIGTERM every group, wait up to ``grace_s`` for all of them, then SIGKILL the rest."""
    running = [proc for proc in processes if proc.signal_group(signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    while running and time.monotonic() < deadline:
        time.sleep(0.2)
        running = [proc for proc in running if proc.group_alive()]
    for proc in running:
        proc.signal_group(signal.SIGKILL)
    for proc in processes:
        if proc.process is not None:
            try:
                proc.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def wait_until_healthy(processes: Sequence[ManagedProcess], timeout_s: float) -> None:
    """Block until every process answers /health with 200.

    Raises ``LaunchError`` as soon as one exits (with its exit code and log tail), or
    when ``timeout_s`` passes (naming the servers still starting).
    """
    pending = list(processes)
    deadline = time.monotonic() + timeout_s
    while pending:
        for proc in list(pending):
            code = proc.exit_code()
            if code is not None:
                raise ChildExitedError(f"{proc.name} exited with code {code} during start-up; "
                                       f"its log ({proc.log_path}) ends:\n{proc.log_tail()}", code)
            if proc.healthy():
                pending.remove(proc)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise LaunchError(f"not healthy after {timeout_s:.0f} s: {', '.join(p.name for p in pending)} "
                              f"(logs in {pending[0].log_path.parent})")
        time.sleep(0.5)
