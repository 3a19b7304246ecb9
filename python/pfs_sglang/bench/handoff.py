"""KV hand-off benchmark: the ZMQ engine against a memory copy, and one request, pfs against stock SGLang.

Owns ``python -m pfs_sglang.bench handoff`` (also ``python -m pfs_sglang.bench.handoff``),
the measurement of the transfer issue's two targets on the machine it runs on:

* **throughput**: two :class:`~pfs_sglang.transfer.zmq_engine.ZmqTransferEngine` in
  separate processes, each with a KV pool laid out like SGLang's MHA pool (one K and one
  V buffer per layer, ``[slots, kv_heads * head_dim]`` of the KV dtype, allocated by torch
  and registered as SGLang's KV manager registers them; the sender's in shared memory
  and the receiver started with a decode server's environment, as the launcher runs
  them) for a model shape; a request's prompt KV moves as the ``zmq`` backend asks for
  it (``transfer.kv_blocks.KVSlots``). Page size 1 with scattered slots (ascending, as
  SGLang's PD allocators hand them out; ``--layout shuffled``: in random order) is the
  worst case; consecutive slots the best. Figures are GB/s and a share of a plain memory copy of the same bytes,
  measured in the same run. ``--device cuda`` puts both pools on a GPU and compares
  with a device-to-device copy (the ``cuda`` transport moves the KV GPU to GPU).
* **latency**: one ``/generate`` (max 8 new tokens, greedy) through a pfs deployment of
  the demo models against stock ``sglang.launch_server`` serving the same decode model
  with the same CPU flags (both up at once, taking turns request by request with the
  same prompts, so the machine's load falls on both alike); median of 5, warm (same
  prompt again) and cold (caches flushed before each), for 64- and 1024-token prompts.

Results are printed as tables and written to ``--out`` as ``handoff.json`` (and
``handoff.png`` when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from pfs_sglang.launch.server_commands import cpu_server_env
from pfs_sglang.transfer.kv_blocks import KVSlots
from pfs_sglang.transfer.shared_pool import move_to_shared_memory
from pfs_sglang.transfer.zmq_engine import LOCAL_TRANSPORTS, EngineIdentity, ZmqTransferEngine

PROMPT_TOKENS = (256, 1024, 2048, 4096, 8192)
CONCURRENCY = (1, 4, 16)
LAYOUTS = ("scattered", "consecutive")
BENCH_ROOM = 1  # the bootstrap room the throughput run's writes are tagged with


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
    """SGLang's MHA pool layout in host (``cpu``) or GPU (``cuda``) memory: ``[K_0..K_{L-1}, V_0..V_{L-1}]``, slot 0 reserved.

    ``shared``: host buffers in shared memory, as a CPU prefill server of the ``zmq`` backend
    has them (``transfer.shared_pool``), so same-host receivers may read them in place.
    """

    def __init__(self, shape: KVShape, slots: int, device: str = "cpu", shared: bool = False) -> None:
        self.shape = shape
        if device == "cpu":
            import torch

            # allocated by torch, as SGLang allocates its pool (no transparent huge pages, unlike numpy's)
            tensors = [torch.zeros((slots + 1, shape.item_bytes), dtype=torch.uint8) for _ in range(2 * shape.layers)]
            self.buffers = [tensor.numpy() for tensor in (move_to_shared_memory(tensors) if shared else tensors)]
            for buffer in self.buffers:
                buffer[:] = np.random.default_rng(len(buffer)).integers(0, 255, size=shape.item_bytes, dtype=np.uint8)
            self.ptrs = [buffer.ctypes.data for buffer in self.buffers]
        else:
            import torch

            self.buffers = [torch.randint(0, 255, (slots + 1, shape.item_bytes), dtype=torch.uint8, device=device)
                            for _ in range(2 * shape.layers)]
            self.ptrs = [buffer.data_ptr() for buffer in self.buffers]

    def register_with(self, engine: ZmqTransferEngine) -> None:
        engine.batch_register(self.ptrs, [int(buffer.nbytes) for buffer in self.buffers])


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in this process's environment (which a spawned child starts with), then restored."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _use_device(device: str) -> None:
    """Make ``device`` this process's current CUDA device before an engine is made (it records it)."""
    if device != "cpu":
        import torch

        torch.cuda.init()
        torch.cuda.set_device(torch.device(device).index or 0)


def _receiver(conn, shape: KVShape, slots: int, transports: tuple[str, ...], device: str) -> None:
    _use_device(device)
    pool = KVPool(shape, slots, device)
    engine = ZmqTransferEngine(_identity("decode"), "127.0.0.1", timeout_s=120, local_transports=transports)
    pool.register_with(engine)
    # every measured request writes for one room, receiving from now until the end
    conn.send((engine.get_session_id(), pool.ptrs, engine.open_room(BENCH_ROOM)))
    conn.recv()  # until told to stop
    engine.close()


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
    device: str = "cpu"  # where both pools live; memcpy is a copy on that device

    @property
    def percent_of_memcpy(self) -> float:
        return 100.0 * self.handoff_gbps / self.memcpy_gbps


def memcpy_gbps(nbytes: int, repeats: int = 5, device: str = "cpu") -> float:
    """A plain memory copy of ``nbytes`` (warm buffers) on ``device``, median of ``repeats``."""
    if device != "cpu":
        return _device_copy_gbps(nbytes, repeats, device)
    source, target = np.ones(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8)
    np.copyto(target, source)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times) / 1e9


def _device_copy_gbps(nbytes: int, repeats: int, device: str) -> float:
    """A device-to-device copy of ``nbytes`` (the GPU's memory speed), timed with CUDA events."""
    import torch

    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        started, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started.record()
        target.copy_(source)
        ended.record()
        ended.synchronize()
        times.append(started.elapsed_time(ended) / 1000)
    return nbytes / statistics.median(times) / 1e9


def _slots(rng, layout: str, tokens: int, pool_slots: int) -> np.ndarray:
    """A request's slots: ``scattered`` no two adjacent in general, ascending as SGLang's PD allocators hand them
    out (they sort their free list); ``shuffled`` the same in random order; ``consecutive`` one run."""
    if layout in ("scattered", "shuffled"):
        slots = rng.choice(pool_slots, size=tokens, replace=False) + 1
        return np.sort(slots) if layout == "scattered" else slots
    start = int(rng.integers(0, pool_slots - tokens + 1))
    return np.arange(start + 1, start + 1 + tokens)


def measure_throughput(
    shape: KVShape, prompt_tokens=PROMPT_TOKENS, concurrency=CONCURRENCY, layouts=LAYOUTS,
    pool_mb: int = 1024, transports: tuple[str, ...] = LOCAL_TRANSPORTS, min_seconds: float = 0.3, progress: Optional[tqdm] = None,
    device: str = "cpu",
) -> list[ThroughputRow]:
    """Hand-off GB/s between two engines in two processes, for every (layout, tokens, concurrency).

    ``device="cuda"``: both pools on the GPU, against a device-to-device copy."""
    # room for four times the largest round, so scattered slots stay scattered (a pool the size of one
    # request would hand it every slot, in one run)
    pool_slots = min(pool_mb * (1 << 20) // shape.bytes_per_token, 4 * max(prompt_tokens) * max(concurrency))
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    receiver = context.Process(target=_receiver, args=(theirs, shape, pool_slots, transports, device), daemon=True)
    with _environment(cpu_server_env(2) if device == "cpu" else {}):  # a decode server's, as the launcher sets it
        receiver.start()
    rows = []
    try:
        session_id, dst_ptrs, generation = ours.recv()
        _use_device(device)
        pool = KVPool(shape, pool_slots, device, shared=True)
        engine = ZmqTransferEngine(_identity("prefill"), "127.0.0.1", timeout_s=120, local_transports=transports)
        pool.register_with(engine)
        rng = np.random.default_rng(0)
        memcpy = {tokens: memcpy_gbps(tokens * shape.bytes_per_token, device=device) for tokens in prompt_tokens}
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
                            KVSlots.of(pool.ptrs, dst_ptrs, [shape.item_bytes] * len(pool.ptrs),
                                       _slots(rng, layout, tokens, pool_slots), _slots(rng, layout, tokens, pool_slots))
                            for _ in range(parallel)
                        ]

                        def one_round() -> float:
                            started = time.perf_counter()
                            def send(slots: KVSlots) -> Optional[str]:
                                with engine.writing_for(BENCH_ROOM, {session_id: generation}.get):
                                    failed = engine.batch_transfer_slots(session_id, slots)
                                return engine.last_error() if failed else None

                            errors = [error for error in threads.map(send, requests) if error]
                            if errors:
                                raise RuntimeError(f"hand-off failed: {errors[0]}")
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
                            concurrency=parallel, mb_per_request=nbytes / 1e6, blocks_per_request=len(requests[0].blocks()),
                            handoff_gbps=parallel * nbytes / statistics.median(times) / 1e9, memcpy_gbps=memcpy[tokens],
                            device=device,
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
        "| shape | slots | transport | prompt | concurrent | MB/request | blocks | hand-off GB/s | memcpy GB/s | % of memcpy | pools |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.shape} | {row.layout} | {row.transport} | {row.prompt_tokens} | {row.concurrency} | "
            f"{row.mb_per_request:.2f} | {row.blocks_per_request} | {row.handoff_gbps:.2f} | {row.memcpy_gbps:.2f} | "
            f"{row.percent_of_memcpy:.0f}% | {row.device} |"
        )
    return "\n".join(lines)


# ----- one request's latency: pfs deployment vs stock SGLang on the same decode model -----

LATENCY_PROMPTS = (64, 1024)
MAX_NEW_TOKENS = 8
TIME_STATS_FLAG = "--enable-request-time-stats-logging"


@dataclass(frozen=True)
class LatencyRow:
    prompt_tokens: int
    cache: str  # "cold": caches flushed before each request; "warm": the same prompt again
    pfs_ms: float
    stock_ms: float

    @property
    def ratio(self) -> float:
        return self.pfs_ms / self.stock_ms


def _prompt(rng, tokens: int, vocab: int) -> list[int]:
    return rng.integers(10, vocab - 10, size=tokens).tolist()


def _flush(urls: list[str]) -> None:
    """Empty every server's prefix cache (SGLang answers 400 until a server is idle: retry)."""
    import requests

    for url in urls:
        deadline = time.monotonic() + 30
        while requests.post(f"{url}/flush_cache", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} would not flush its cache")
            time.sleep(0.2)


@dataclass(frozen=True)
class LatencyTarget:
    """One system the lone-request table times: where to send ``/generate``, and which servers to flush."""

    name: str
    url: str
    model: Optional[str]  # the decode model's name (the pfs router needs it), or None
    server_urls: tuple[str, ...]


def _time_requests(targets: list[LatencyTarget], prompt_tokens, repeats: int, vocab: int,
                   progress: Optional[tqdm]) -> tuple[dict[tuple[str, int, str], float], dict[int, tuple[float, float]]]:
    """Median milliseconds of one /generate per (target, prompt length, cold/warm).

    The targets take turns request by request, with the same prompts, so load on the
    machine falls on all of them alike. Also returns the wall-clock window of the first
    target's last warm request per prompt length (for the per-stage breakdown).
    """
    import requests

    rng = np.random.default_rng(7)
    sessions = {target.name: requests.Session() for target in targets}

    def generate(target: LatencyTarget, prompt: list[int]) -> float:
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0,
                                                         "ignore_eos": True}}
        if target.model is not None:
            body["model"] = target.model
        started = time.perf_counter()
        reply = sessions[target.name].post(f"{target.url}/generate", json=body, timeout=120)
        elapsed = time.perf_counter() - started
        reply.raise_for_status()
        assert len(reply.json()["output_ids"]) == MAX_NEW_TOKENS, reply.text
        return elapsed * 1000

    for target in targets:
        generate(target, _prompt(rng, 16, vocab))  # first request of a server pays one-off set-up
    times: dict[tuple[str, int, str], list[float]] = {}
    windows = {}
    for tokens in prompt_tokens:
        for _ in range(repeats):
            prompt = _prompt(rng, tokens, vocab)
            for target in targets:
                _flush(list(target.server_urls))
                times.setdefault((target.name, tokens, "cold"), []).append(generate(target, prompt))
                progress and progress.update(1)
        prompt = _prompt(rng, tokens, vocab)
        for target in targets:
            generate(target, prompt)
        for _ in range(repeats):
            for number, target in enumerate(targets):
                started = time.time()
                times.setdefault((target.name, tokens, "warm"), []).append(generate(target, prompt))
                if number == 0:
                    windows[tokens] = (started, time.time())
                progress and progress.update(1)
    return {key: statistics.median(values) for key, values in times.items()}, windows


def stock_command(decode_command: list[str], port: int) -> list[str]:
    """Stock SGLang serving the decode model with the decode server's own flags, PD flags (and the
    decode cache's ``pfs`` tree) removed."""
    command, skip = [], False
    for index, arg in enumerate(decode_command):
        if skip:
            skip = False
            continue
        if arg.startswith("--disaggregation-") or arg == "--radix-cache-backend":
            skip = index + 1 < len(decode_command) and not decode_command[index + 1].startswith("--")
            continue
        command.append(arg)
    command[command.index("--port") + 1] = str(port)
    return command


def measure_latency(prompt_tokens=LATENCY_PROMPTS, repeats: int = 5, log_dir: Optional[Path] = None,
                    time_stats: bool = False, progress: Optional[tqdm] = None):
    """One request at a time through a pfs deployment of the demo models and through stock SGLang, in turns.

    Returns the latency rows and, with ``time_stats``, the per-stage breakdown of the last
    warm request of each prompt length (:func:`stage_breakdown`).
    """
    import tempfile

    from pfs_sglang.launch import Deployment, Topology
    from pfs_sglang.launch.processes import ManagedProcess, free_port, stop_all, wait_until_healthy
    from pfs_sglang.launch.topology import with_demo_models

    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pfs_bench_handoff-"))
    demo = with_demo_models(Topology(base_model=None, mode="pd"))  # the hand-off is PD's
    decode = demo.decode_models[0]
    extra = (TIME_STATS_FLAG,) if time_stats else ()
    topology = Topology(base_model=demo.base_model, decode_models=(decode,), port=free_port(), log_dir=log_dir / "pfs",
                        max_total_tokens=max(8192, 4 * max(prompt_tokens)), prefill_args=extra, decode_args=extra)
    vocab = json.loads((Path(decode.path) / "config.json").read_text())["vocab_size"]
    with Deployment(topology) as deployment:
        decode_child = next(child for child in deployment.children if child.name.startswith("decode-"))
        port = free_port()
        stock = ManagedProcess(name="stock-sglang", command=stock_command(decode_child.command, port),
                               log_path=log_dir / "stock-sglang.log", url=f"http://127.0.0.1:{port}",
                               env=decode_child.env)
        stock.start()
        try:
            wait_until_healthy([stock], 300)
            targets = [LatencyTarget("pfs", deployment.url, decode.name, tuple(c.url for c in deployment.children)),
                       LatencyTarget("stock", stock.url, None, (stock.url,))]
            medians, windows = _time_requests(targets, prompt_tokens, repeats, vocab, progress)
        finally:
            stop_all([stock])
    rows = [LatencyRow(tokens, cache, medians[("pfs", tokens, cache)], medians[("stock", tokens, cache)])
            for tokens in prompt_tokens for cache in ("cold", "warm")]
    breakdowns = {tokens: stage_breakdown(log_dir / "pfs", *windows[tokens]) for tokens in prompt_tokens} if time_stats else {}
    return rows, breakdowns


_STATS_LINE = re.compile(r"ReqTimeStats\((?P<head>[^)]*)\): (?P<body>.*)$")


def _time_stats_lines(log: Path) -> list[dict]:
    """SGLang's per-request ``ReqTimeStats`` log lines as dicts (durations in ms, wall-clock times in s)."""
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        match = _STATS_LINE.search(line)
        if match:
            fields = dict(re.findall(r"(\w+)=([^,\s]+)", match["head"] + ", " + match["body"]))
            lines.append(fields)
    return lines


def _ms(fields: dict, key: str) -> float:
    value = fields.get(key, "0ms")
    return float(value[:-2]) if value.endswith("ms") else 0.0


def stage_breakdown(log_dir: Path, started: float, finished: float) -> list[tuple[str, float]]:
    """Where one request's time went, from the servers' time-stats lines and the client's clock.

    ``started``/``finished``: wall-clock times the client sent the request and got the reply.
    The prefill and decode lines of the request are matched by bootstrap room.
    """
    prefill = [f for log in sorted(log_dir.glob("prefill-*.log")) for f in _time_stats_lines(log)]
    decode = [f for log in sorted(log_dir.glob("decode-*.log")) for f in _time_stats_lines(log)]
    mine = [f for f in decode if started <= float(f.get("entry_time", 0)) <= finished]
    if not mine:
        return []
    d = mine[-1]
    p = next((f for f in prefill if f.get("bootstrap_room") == d.get("bootstrap_room")), {})
    prefill_entry, decode_entry = float(p.get("entry_time", started)), float(d["entry_time"])
    decode_done = decode_entry + sum(_ms(d, key) for key in d if key.endswith("_duration")) / 1000
    stages = [
        ("client -> router -> prefill scheduler (HTTP, tokenizer)", (prefill_entry - started) * 1000),
        ("client -> router -> decode scheduler (HTTP, tokenizer)", (decode_entry - started) * 1000),
        *((f"prefill {key}", _ms(p, key)) for key in p if key.endswith("_duration")),
        *((f"decode {key}", _ms(d, key)) for key in d if key.endswith("_duration")),
        ("decode scheduler done -> client (detokenizer, HTTP, router)", (finished - decode_done) * 1000),
        ("total seen by the client", (finished - started) * 1000),
    ]
    if "transfer_total" in p:
        stages.append((f"KV moved: {p['transfer_total']} at {p.get('transfer_speed', '?')} GB/s", 0.0))
    return stages


def breakdown_table(tokens: int, stages: list[tuple[str, float]]) -> str:
    lines = [f"| stage ({tokens}-token prompt, warm) | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in stages]
    return "\n".join(lines)


def latency_table(rows: list[LatencyRow]) -> str:
    lines = ["| prompt | cache | pfs ms | stock SGLang ms | pfs / stock |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.prompt_tokens} | {row.cache} | {row.pfs_ms:.0f} | {row.stock_ms:.0f} | {row.ratio:.2f}x |")
    return "\n".join(lines)


# ----- command line -----


def _plot(rows: list[ThroughputRow], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    series = sorted({(r.device, r.shape, r.layout, r.transport, r.concurrency) for r in rows})
    for key in series:
        points = [(r.prompt_tokens, r.handoff_gbps) for r in rows if (r.device, r.shape, r.layout, r.transport, r.concurrency) == key]
        axis.plot(*zip(*points), marker="o", label="{} {} {} {} x{}".format(*key))
    for device, shape in sorted({(r.device, r.shape) for r in rows}):
        points = sorted({(r.prompt_tokens, r.memcpy_gbps) for r in rows if (r.device, r.shape) == (device, shape)})
        axis.plot(*zip(*points), linestyle="--", color="grey", label=f"memcpy on {device} ({shape} sizes)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel("GB/s")
    axis.set_title("KV hand-off between two ZMQ engines (two processes)")
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.bench handoff", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES),
                        help="KV shape(s) for the throughput table (default: demo and small)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(PROMPT_TOKENS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--layout", nargs="+", choices=(*LAYOUTS, "shuffled"), default=list(LAYOUTS))
    parser.add_argument("--transports", default=",".join(LOCAL_TRANSPORTS),
                        help="same-host transports the engines may use, in order: cuda,map,pvm,shm (default), "
                             "any subset, or none (socket)")
    parser.add_argument("--device", default="cpu",
                        help="where both KV pools live for the throughput table: cpu (default) or cuda[:N]")
    parser.add_argument("--pool-mb", type=int, default=1024, help="KV pool per engine; larger requests are skipped")
    parser.add_argument("--latency-tokens", type=int, nargs="+", default=list(LATENCY_PROMPTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true", help="no SGLang servers (throughput only)")
    parser.add_argument("--time-stats", action="store_true",
                        help=f"start the pfs servers with {TIME_STATS_FLAG} (per-stage times in their logs)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/handoff"))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = [SHAPES[name] for name in (args.shape or ["demo", "small"])]
    transports = tuple(name for name in args.transports.split(",") if name and name != "none")
    results: dict = {"machine": _machine(), "throughput": [], "latency": []}
    throughput: list[ThroughputRow] = []
    if not args.skip_throughput:
        steps = len(shapes) * len(args.layout) * len(args.tokens) * len(args.concurrency)
        with tqdm(total=steps, desc="hand-off throughput") as progress:
            for shape in shapes:
                throughput += measure_throughput(shape, tuple(args.tokens), tuple(args.concurrency), tuple(args.layout),
                                                 args.pool_mb, transports, progress=progress, device=args.device)
        print("\nKV hand-off throughput (two engines, two processes on this host):")
        print(throughput_table(throughput))
        results["throughput"] = [{**asdict(row), "percent_of_memcpy": row.percent_of_memcpy} for row in throughput]
    if not args.skip_latency:
        steps = 2 * 2 * len(args.latency_tokens) * args.repeats
        with tqdm(total=steps, desc="lone-request latency") as progress:
            latency, breakdowns = measure_latency(tuple(args.latency_tokens), args.repeats, args.out / "logs",
                                                  args.time_stats, progress)
        print(f"\nOne /generate, {MAX_NEW_TOKENS} new tokens, median of {args.repeats} (demo models):")
        print(latency_table(latency))
        for tokens, stages in breakdowns.items():
            print()
            print(breakdown_table(tokens, stages))
        results["latency"] = [{**asdict(row), "ratio": row.ratio} for row in latency]
        results["stages"] = {str(tokens): stages for tokens, stages in breakdowns.items()}
    (args.out / "handoff.json").write_text(json.dumps(results, indent=2))
    plotted = bool(throughput) and _plot(throughput, args.out / "handoff.png")
    print(f"\nresults: {args.out / 'handoff.json'}" + (f", {args.out / 'handoff.png'}" if plotted else ""))
    return 0


def _machine() -> dict:
    import os
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "load_average": os.getloadavg()}


if __name__ == "__main__":
    from pfs_sglang.launch.processes import exit_on_stop_signals

    exit_on_stop_signals()  # SIGTERM stops what the command started, as Ctrl-C does
    sys.exit(main())
