"""Worker choice: prefix locality across models for prefill, least-loaded for decode.

Every request goes to the shared prefill pool and to the decode pool of the model it
names. Prompts that share a prefix should meet the same prefill replica whichever
model they name (invariant 3: one tree per prefill module, not per model), so the
prefill choice looks up the prompt's leading blocks in one map shared by all models
and falls back to the least-loaded replica. Within a pool, the replica with the fewest
requests in flight wins.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Worker:
    url: str
    in_flight: int = 0


@dataclass
class PrefillWorker(Worker):
    bootstrap_host: str = "127.0.0.1"
    bootstrap_port: int = 0


@dataclass
class DecodePool:
    model: str
    workers: list[Worker] = field(default_factory=list)

    def least_loaded(self) -> Worker:
        return min(self.workers, key=lambda worker: worker.in_flight)


class PrefixLocality:
    """Maps hashes of a prompt's leading text blocks to the prefill replica that saw them."""

    def __init__(self, workers: list[PrefillWorker], block_chars: int = 128, capacity: int = 100_000):
        self.workers = workers
        self.block_chars = block_chars
        self.capacity = capacity
        self._owner: OrderedDict[str, int] = OrderedDict()

    def _block_hashes(self, text: str) -> list[str]:
        hashes, running = [], hashlib.sha1()
        for start in range(0, len(text) - len(text) % self.block_chars, self.block_chars):
            running.update(text[start : start + self.block_chars].encode("utf-8", "surrogatepass"))
            hashes.append(running.copy().hexdigest())
        return hashes

    def choose(self, text: str) -> PrefillWorker:
        if len(self.workers) == 1:
            return self.workers[0]
        hashes = self._block_hashes(text)
        chosen = None
        for block_hash in reversed(hashes):  # longest cached prefix first
            if block_hash in self._owner:
                chosen = self._owner[block_hash]
                break
        if chosen is None:
            chosen = min(range(len(self.workers)), key=lambda i: self.workers[i].in_flight)
        for block_hash in hashes:
            self._owner[block_hash] = chosen
            self._owner.move_to_end(block_hash)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
        return self.workers[chosen]
