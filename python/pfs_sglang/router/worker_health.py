"""Which servers get requests: a server whose process is gone is taken out at once and
comes back when its health check passes.

A worker is taken *out* (``Worker.healthy = False``) when a request to it fails at the
connection (refused, reset, closed without an answer: ``is_connection_failure``) and a
new TCP connection to its port is then refused: the process is gone (a reset from a
live server leaves it in). It is also taken out after ``failures_to_exclude`` health
checks in a row fail (a non-200 ``/health``, or none within ``timeout_s``), *unless it
is the last worker of its pool in rotation*: a failed check only says the server is slow
or stuck, and on a starved machine SGLang's own check fails for servers that still
serve, so checks never empty a pool (only a dead process does). A worker that is out
gets no new request (``pools.py`` chooses among healthy workers and says 503 at once
when a pool has none) and is checked every ``recheck_s``; its first passing check puts
it back. Healthy workers are checked every ``interval_s``. SGLang's ``/health`` runs a
one-token generation, only when the server is idle, and answers 503 itself when its
scheduler has not answered for 20 s, so ``timeout_s`` is longer than that. The checker
is one asyncio task of the router's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from pfs_sglang.router.pools import Worker

logger = logging.getLogger(__name__)


def is_connection_failure(error: httpx.HTTPError) -> bool:
    """The server is gone or not listening (not: it is merely slow)."""
    return isinstance(error, (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))


PORT_PROBE_TIMEOUT_S = 2.0


async def port_refuses(url: str) -> bool:
    """True when nothing listens at ``url``'s host and port (a connect that times out is not proof)."""
    parts = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), PORT_PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return False
    except OSError:
        return True
    writer.close()
    return False


def take_out(worker: Worker, reason: str) -> None:
    if worker.healthy:
        logger.warning("pfs router: %s is out of rotation: %s", worker.url, reason)
    worker.healthy = False
    worker.failed_checks = 0


@dataclass(frozen=True)
class HealthCheckSettings:
    interval_s: float = 10.0  # between checks of a healthy worker
    recheck_s: float = 1.0  # between checks of a worker that is out
    timeout_s: float = 25.0  # a /health slower than this failed (SGLang's own verdict comes after 20 s)
    failures_to_exclude: int = 3  # failed checks in a row (not refused) that take a worker out


class WorkerHealthChecker:
    """Checks every worker of ``pools`` (the prefill pool, each decode pool) in the
    background and takes them out or puts them back."""

    def __init__(self, pools: Sequence[Sequence[Worker]], client: httpx.AsyncClient, settings: HealthCheckSettings):
        self.pools = [list(pool) for pool in pools]
        self.client = client
        self.settings = settings
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def connection_failed(self, worker: Worker, error: httpx.HTTPError) -> None:
        """A request to ``worker`` failed at the connection: take it out if its port refuses.

        Awaited before that request's error goes to its client, so a client that saw the
        failure never finds the dead server still in rotation (the probe takes at most
        ``PORT_PROBE_TIMEOUT_S``; a refused connect answers at once)."""
        if worker.healthy and await port_refuses(worker.url):
            take_out(worker, f"{error!r}, and its port refuses connections")

    async def _run(self) -> None:
        await asyncio.gather(*(self._watch(worker) for pool in self.pools for worker in pool))

    async def _watch(self, worker: Worker) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s if worker.healthy else self.settings.recheck_s)
            await self.check(worker)

    async def check(self, worker: Worker) -> None:
        """One health check of ``worker``, and what it means for its place in rotation."""
        try:
            reply = await self.client.get(worker.url + "/health", timeout=self.settings.timeout_s)
            failure = None if reply.status_code == 200 else f"/health answered {reply.status_code}"
        except httpx.HTTPError as error:
            if is_connection_failure(error) and await port_refuses(worker.url):
                take_out(worker, f"/health: {error!r}, and its port refuses connections")
                return
            failure = f"/health: {error!r}"
        if failure is None:
            if not worker.healthy:
                logger.warning("pfs router: %s is back in rotation", worker.url)
            worker.healthy, worker.failed_checks = True, 0
            return
        worker.failed_checks += 1
        if worker.failed_checks >= self.settings.failures_to_exclude and self._others_in_rotation(worker):
            take_out(worker, f"{failure} ({worker.failed_checks} checks in a row)")

    def _others_in_rotation(self, worker: Worker) -> bool:
        pool = next(pool for pool in self.pools if worker in pool)
        return any(other.healthy for other in pool if other is not worker)
