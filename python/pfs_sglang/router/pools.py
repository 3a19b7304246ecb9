"""Worker choice: prefix locality across models for prefill, least-loaded for decode.

Upholds invariant 3 on the routing side: every request goes to the one shared prefill
pool, whichever decode model it names, and prompts that share a prefix meet the same
prefill replica, so they hit the same nodes of its prefix tree. ``PrefixLocality``
keeps one map from hashes of a prompt's leading text blocks to the replica that last
prefilled them, shared by all models (an approximation of the replicas' trees: text,
not tokens). A prompt with no known prefix, or whose owner is overloaded, goes to the
least-loaded replica. Within a decode pool the replica with the fewest requests in
flight wins. Only healthy workers are chosen (``worker_health.py`` takes failed ones
out and puts them back); a pool with none raises ``NoHealthyWorker`` at once.

Load is counted with a ``Lease``: the count goes up in the same step as the choice and
down when the request is over, so concurrent choices see each other.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar


@dataclass(eq=False)
class Worker:
    """One SGLang HTTP server and the requests the router has in flight on it."""

    url: str
    in_flight: int = 0
    healthy: bool = True  # in rotation (worker_health.py)
    failed_checks: int = 0  # health checks failed in a row


@dataclass(eq=False)
class PrefillWorker(Worker):
    """A prefill server and the bootstrap address decode servers fetch its KV from."""

    bootstrap_host: str = "127.0.0.1"
    bootstrap_port: int = 0


W = TypeVar("W", bound=Worker)


class NoHealthyWorker(Exception):
    """Every worker of a pool is out of rotation; the message names the pool."""


class Lease(Generic[W]):
    """One request in flight on ``worker``: counted from the choice until ``release()`` (idempotent)."""

    def __init__(self, worker: W):
        self.worker = worker
        self._held = True
        worker.in_flight += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self.worker.in_flight -= 1


class LeastLoaded(Generic[W]):
    """The worker with the fewest requests in flight; ties rotate so idle replicas share work."""

    def __init__(self, workers: Sequence[W], pool_name: str):
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers = list(workers)
        self.pool_name = pool_name
        self._turn = itertools.count()

    def choose(self) -> W:
        healthy = [worker for worker in self.workers if worker.healthy]
        if not healthy:
            raise NoHealthyWorker(f"no {self.pool_name} server is healthy "
                                  f"({', '.join(worker.url for worker in self.workers)} out of rotation)")
        fewest = min(worker.in_flight for worker in healthy)
        idle = [worker for worker in healthy if worker.in_flight == fewest]
        return idle[next(self._turn) % len(idle)]


class DecodePool:
    """The decode replicas serving one model name; with ``lora_adapter``, servers holding
    the base's weights that apply that LoRA adapter (named per request as ``lora_path``).
    A server co-locating several adapters is one ``Worker`` in each of their pools."""

    def __init__(self, model: str, workers: Sequence[Worker], lora_adapter: str | None = None):
        self.model = model
        self.workers = list(workers)
        self.lora_adapter = lora_adapter
        self._balance: LeastLoaded[Worker] = LeastLoaded(self.workers, f"decode ({model!r})")

    def acquire(self) -> Lease[Worker]:
        return Lease(self._balance.choose())


class PrefixLocality(Generic[W]):
    """Chooses a prefill replica (or a unified server): the owner of the prompt's longest
    known prefix, else least-loaded.

    ``max_imbalance``: an owner with this many more requests in flight than the
    least-loaded replica loses the prompt to it (the prefix is then recomputed there).
    """

    def __init__(self, workers: Sequence[W], block_chars: int = 64, capacity: int = 100_000,
                 max_imbalance: int = 32, pool_name: str = "prefill"):
        self.workers = list(workers)
        self.block_chars = block_chars
        self.capacity = capacity
        self.max_imbalance = max_imbalance
        self._balance: LeastLoaded[W] = LeastLoaded(self.workers, pool_name)
        self._owner: OrderedDict[str, W] = OrderedDict()

    def _block_hashes(self, text: str) -> list[str]:
        """Hashes of each whole leading block: the hash of block i covers text[: (i+1)*block_chars]."""
        hashes, running = [], hashlib.sha1()
        whole = len(text) - len(text) % self.block_chars
        for start in range(0, whole, self.block_chars):
            running.update(text[start : start + self.block_chars].encode("utf-8", "surrogatepass"))
            hashes.append(running.copy().hexdigest())
        return hashes

    def _owner_of(self, hashes: list[str]) -> W | None:
        for block_hash in reversed(hashes):  # longest known prefix first
            owner = self._owner.get(block_hash)
            if owner is not None:
                return owner
        return None

    def acquire(self, text: str) -> Lease[W]:
        hashes = self._block_hashes(text)
        least_loaded = self._balance.choose()
        owner = self._owner_of(hashes)
        chosen = least_loaded if owner is None or not owner.healthy or owner.in_flight - least_loaded.in_flight > self.max_imbalance else owner
        for block_hash in hashes:
            self._owner[block_hash] = chosen
            self._owner.move_to_end(block_hash)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
        return Lease(chosen)
