"""Memory of a deployment's processes over a run: which processes, and their RSS each second.

A deployment's processes are found by the ports they listen on: the router (the
launcher process, which serves it in a thread) on the router's port, and each SGLang
server's HTTP process on its worker port (``/workers``). A server is sampled as its
whole process tree (HTTP and tokenizer process, scheduler, detokenizer); the router as
its one process (its children are the servers). ``RssSampler`` reads them from a thread,
so samples keep coming while the load generator's event loop is busy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import psutil

MIB = 1 << 20


def listening_pids(ports: set[int]) -> dict[int, int]:
    """``{port: pid}`` of the local processes listening on ``ports`` (those this user may see)."""
    found: dict[int, int] = {}
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # e.g. macOS: ask each process instead
        connections = []
        for process in psutil.process_iter():
            try:
                connections += [c._replace(pid=process.pid) for c in process.net_connections(kind="tcp")]
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port in ports \
                and connection.pid is not None:
            found[connection.laddr.port] = connection.pid
    return found


def port_of(url: str) -> int:
    parsed = urlparse(url)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


@dataclass(frozen=True)
class Tracked:
    """One process, sampled alone or with its whole tree of descendants."""

    name: str
    pid: int
    tree: bool


def tree_rss(pid: int, tree: bool) -> int | None:
    """RSS in bytes of ``pid`` (and its descendants with ``tree``); None once it is gone."""
    try:
        process = psutil.Process(pid)
        members = [process, *(process.children(recursive=True) if tree else ())]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return total


@dataclass
class RssSampler:
    """Samples every tracked process each ``interval_s`` from a thread: ``samples[name] = [(t, bytes)]``,
    ``t`` in seconds from ``t0`` (a ``time.perf_counter()`` value)."""

    tracked: list[Tracked]
    t0: float
    interval_s: float = 1.0
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = {entry.name: [] for entry in self.tracked}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        now = time.perf_counter() - self.t0
        for entry in self.tracked:
            rss = tree_rss(entry.pid, entry.tree)
            if rss is not None:
                self.samples[entry.name].append((now, rss))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the end-of-run value

    def at(self, name: str, t: float) -> int | None:
        """The last sample of ``name`` taken at or before ``t`` (the first one if none was)."""
        series = self.samples.get(name) or []
        before = [rss for when, rss in series if when <= t]
        return before[-1] if before else (series[0][1] if series else None)

    def peak(self, name: str) -> int | None:
        series = self.samples.get(name) or []
        return max((rss for _, rss in series), default=None)

    def end(self, name: str) -> int | None:
        series = self.samples.get(name) or []
        return series[-1][1] if series else None
