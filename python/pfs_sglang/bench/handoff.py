"""KV hand-off benchmark: the ZMQ engine against a memory copy, and one request, pfs against stock SGLang.

Owns ``python -m pfs_sglang.bench handoff`` (also ``python -m pfs_sglang.bench.handoff``),
the measurement of the transfer issue's two targets on the machine it runs on:

* **throughput**: two :class:`~pfs_sglang.transfer.zmq_engine.ZmqTransferEngine` in
  separate processes, each with a KV pool laid out like SGLang's MHA pool (one K and one
  V buffer per layer, ``[slots, kv_heads * head_dim]`` of the KV dtype, registered as
  SGLang's KV manager registers them) for a model shape; a request's prompt KV moves as
  SGLang's Mooncake backend asks for it (one block per run of consecutive slots, per
  layer, K then V). Page size 1 with scattered slots is the worst case; consecutive slots
  the best. Figures are GB/s and a share of a plain memory copy of the same bytes,
  measured in the same run.
* **latency**: one ``/generate`` (max 8 new tokens, greedy) through a pfs deployment of
  the demo models against stock ``sglang.launch_server`` serving the same decode model
  with the same CPU flags; median of 5, warm (same prompt again) and cold (caches
  flushed before each), for 64- and 1024-token prompts.

Results are printed as tables and written to ``--out`` as ``handoff.json`` (and
``handoff.png`` when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from pfs_sglang.transfer.zmq_engine import LOCAL_TRANSPORTS, EngineIdentity, ZmqTransferEngine

PROMPT_TOKENS = (256, 1024, 2048, 4096, 8192)
CONCURRENCY = (1, 4, 16)
LAYOUTS = ("scattered", "consecutive")


@dataclass(frozen=True)
class KVShape:
    """The KV pool of a model: per layer a K and a V buffer of ``kv_heads * head_dim`` values per slot."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def item_bytes(self) -> int:  # one slot of one layer's K (or V) buffer, page size 1
        return self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.item_bytes


SHAPES = {
    "demo": KVShape("demo", layers=2, kv_heads=2, head_dim=16, dtype_bytes=4),  # the demo models, float32
    "small": KVShape("small", layers=28, kv_heads=8, head_dim=128, dtype_bytes=2),  # Qwen3-0.6B-like, bf16
    "llama8b": KVShape("llama8b", layers=32, kv_heads=8, head_dim=128, dtype_bytes=2),  # Llama-3.1-8B, bf16
}


def _identity(role: str) -> EngineIdentity:
    return EngineIdentity(role=role, prefill_fingerprint="bench", page_size=1, kv_dtype="bench", kv_layout="nhd")


class KVPool:
    """SGLang's MHA pool layout in host memory: ``[K_0..K_{L-1}, V_0..V_{L-1}]``, slot 0 reserved."""

    def __init__(self, shape: KVShape, slots: int) -> None:
        self.shape = shape
        self.buffers = [np.zeros((slots + 1, shape.item_bytes), dtype=np.uint8) for _ in range(2 * shape.layers)]
        for buffer in self.buffers:
            buffer[:] = np.random.default_rng(len(buffer)).integers(0, 255, size=shape.item_bytes, dtype=np.uint8)

    @property
    def ptrs(self) -> list[int]:
        return [buffer.ctypes.data for buffer in self.buffers]

    def register_with(self, engine: ZmqTransferEngine) -> None:
        engine.batch_register(self.ptrs, [buffer.nbytes for buffer in self.buffers])


def _receiver(conn, shape: KVShape, slots: int, transports: tuple[str, ...]) -> None:
    pool = KVPool(shape, slots)
    engine = ZmqTransferEngine(_identity("decode"), "127.0.0.1", timeout_s=120, local_transports=transports)
    pool.register_with(engine)
    conn.send((engine.get_session_id(), pool.ptrs))
    conn.recv()  # until told to stop
    engine.close()


def mooncake_blocks(src_ptrs, dst_ptrs, item_bytes: int, src_slots: np.ndarray, dst_slots: np.ndarray):
    """The ``(src, dst, length)`` lists SGLang's Mooncake backend hands its engine for one request.

    One block per run of slots consecutive on both sides (``group_concurrent_contiguous``),
    for every layer's K buffer, then every V buffer.
    """
    breaks = np.flatnonzero((np.diff(src_slots) != 1) | (np.diff(dst_slots) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    runs = np.diff(np.concatenate([starts, [len(src_slots)]]))
    src_off, dst_off, lengths = src_slots[starts] * item_bytes, dst_slots[starts] * item_bytes, runs * item_bytes
    src = np.concatenate([ptr + src_off for ptr in src_ptrs])
    dst = np.concatenate([ptr + dst_off for ptr in dst_ptrs])
    return src.tolist(), dst.tolist(), np.tile(lengths, len(src_ptrs)).tolist()


@dataclass(frozen=True)
class ThroughputRow:
    shape: str
    layout: str
    transport: str
    prompt_tokens: int
    concurrency: int
    mb_per_request: float
    blocks_per_request: int
    handoff_gbps: float
    memcpy_gbps: float

    @property
    def percent_of_memcpy(self) -> float:
        return 100.0 * self.handoff_gbps / self.memcpy_gbps


def memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    """A plain memory copy of ``nbytes`` (warm buffers), median of ``repeats``."""
    source, target = np.ones(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8)
    np.copyto(target, source)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times) / 1e9


def _slots(rng, layout: str, tokens: int, pool_slots: int) -> np.ndarray:
    if layout == "scattered":
        return rng.choice(pool_slots, size=tokens, replace=False) + 1
    start = int(rng.integers(0, pool_slots - tokens + 1))
    return np.arange(start + 1, start + 1 + tokens)


def measure_throughput(
    shape: KVShape, prompt_tokens=PROMPT_TOKENS, concurrency=CONCURRENCY, layouts=LAYOUTS,
    pool_mb: int = 1024, transports: tuple[str, ...] = LOCAL_TRANSPORTS, min_seconds: float = 0.3, progress: Optional[tqdm] = None,
) -> list[ThroughputRow]:
    """Hand-off GB/s between two engines in two processes, for every (layout, tokens, concurrency)."""
    pool_slots = min(pool_mb * (1 << 20) // shape.bytes_per_token, max(prompt_tokens) * max(concurrency))
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    receiver = context.Process(target=_receiver, args=(theirs, shape, pool_slots, transports), daemon=True)
    receiver.start()
    rows = []
    try:
        session_id, dst_ptrs = ours.recv()
        pool = KVPool(shape, pool_slots)
        engine = ZmqTransferEngine(_identity("prefill"), "127.0.0.1", timeout_s=120, local_transports=transports)
        pool.register_with(engine)
        rng = np.random.default_rng(0)
        memcpy = {tokens: memcpy_gbps(tokens * shape.bytes_per_token) for tokens in prompt_tokens}
        with ThreadPoolExecutor(max(concurrency)) as threads:
            for layout in layouts:
                for tokens in prompt_tokens:
                    for parallel in concurrency:
                        if progress is not None:
                            progress.set_postfix_str(f"{shape.name} {layout} {tokens} tok x{parallel}")
                        if tokens > pool_slots:
                            progress and progress.update(1)
                            continue
                        requests = [
                            mooncake_blocks(pool.ptrs, dst_ptrs, shape.item_bytes,
                                            _slots(rng, layout, tokens, pool_slots), _slots(rng, layout, tokens, pool_slots))
                            for _ in range(parallel)
                        ]

                        def one_round() -> float:
                            started = time.perf_counter()
                            results = list(threads.map(lambda blocks: engine.batch_transfer_sync(session_id, *blocks), requests))
                            if any(results):
                                raise RuntimeError(f"hand-off failed: {engine.last_error()}")
                            return time.perf_counter() - started

                        one_round()  # warm-up: handshake, staging buffers, page faults
                        transport = "+".join(engine.peer_transports(session_id))
                        times, spent = [], 0.0
                        while len(times) < 3 or (spent < min_seconds and len(times) < 50):
                            times.append(one_round())
                            spent += times[-1]
                        nbytes = tokens * shape.bytes_per_token
                        rows.append(ThroughputRow(
                            shape=shape.name, layout=layout, transport=transport, prompt_tokens=tokens,
                            concurrency=parallel, mb_per_request=nbytes / 1e6, blocks_per_request=len(requests[0][0]),
                            handoff_gbps=parallel * nbytes / statistics.median(times) / 1e9, memcpy_gbps=memcpy[tokens],
                        ))
                        if progress is not None:
                            progress.update(1)
        engine.close()
    finally:
        ours.send("stop")
        receiver.join(timeout=10)
        if receiver.is_alive():
            receiver.kill()
    return rows


def throughput_table(rows: list[ThroughputRow]) -> str:
    lines = [
        "| shape | slots | transport | prompt | concurrent | MB/request | blocks | hand-off GB/s | memcpy GB/s | % of memcpy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.shape} | {row.layout} | {row.transport} | {row.prompt_tokens} | {row.concurrency} | "
            f"{row.mb_per_request:.2f} | {row.blocks_per_request} | {row.handoff_gbps:.2f} | {row.memcpy_gbps:.2f} | "
            f"{row.percent_of_memcpy:.0f}% |"
        )
    return "\n".join(lines)
