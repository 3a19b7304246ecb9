"""Child processes of a deployment: start in their own process group, wait, stop.

A child that exits during start-up fails the launch with its exit code and the tail of
its log, never a hang; stopping sends SIGTERM to the whole group, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

LOG_TAIL_CHARS = 4000


class LaunchError(RuntimeError):
    """The deployment could not be started; the message says which part and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ManagedProcess:
    name: str
    command: list[str]
    log_path: Path
    url: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **self.env},
            )

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def wait_until_healthy(processes: list[ManagedProcess], timeout_s: float) -> None:
    """Block until every process answers /health; raise LaunchError if one dies or time runs out."""
    pending = list(processes)
    deadline = time.monotonic() + timeout_s
    while pending:
        for proc in list(pending):
            code = proc.exited()
            if code is not None:
                raise LaunchError(
                    f"{proc.name} exited with code {code} during start-up; its log ({proc.log_path}) ends:\n"
                    f"{proc.log_tail()}"
                )
            if proc.healthy():
                pending.remove(proc)
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise LaunchError(f"not healthy after {timeout_s:.0f}s: {names}")
        if pending:
            time.sleep(1.0)
