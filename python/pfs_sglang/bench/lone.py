"""A lone request for one LoRA decode module: the unified deployment against stock SGLang multi-LoRA.

Owns ``python -m pfs_sglang.bench lone``, the measurement of the unified issue's
lone-request target: a request for adapter A through a unified deployment
(``pfs-unified``: the router, then one server holding the base and every adapter)
costs at most 1.1x stock SGLang serving the same base with the same adapters
(``sglang-lora``, requests straight to its server, adapter named as ``lora_path``).

Both systems are started once, each on the machine's cores (``cpu_server_env``) and
the same KV pool, with the same command line but the tree (``bench/systems.py``), and
then take turns request by request with the same prompts, so the machine's load falls on
both alike. A third target is the unified server itself, past the router (the same
request with ``lora_path``, as the router sends it), so the router's hop is measured in
the same turns. Per prompt length (64 and 1024 tokens by default): ``cold`` is a new
prompt with every cache flushed before it, ``warm`` the same prompt again; the medians
of ``--repeats`` non-streamed ``/generate`` calls (8 greedy tokens) and their ratios are
written to ``--out`` as ``lone.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
from tqdm import tqdm

from pfs_sglang.bench.runner import git_commit, machine
from pfs_sglang.bench.shapes import SHAPES, default_model_names, describe, prepare_models
from pfs_sglang.bench.systems import BenchSystem, KVBudget, StockLoRASystem, Target, UnifiedSystem

PROMPT_TOKENS = (64, 1024)
MAX_NEW_TOKENS = 8
GOAL = 1.1  # the issue's: unified / stock at most this
TARGETS = ("pfs-unified", "unified-direct", "sglang-lora")


@dataclass(frozen=True)
class LoneTarget:
    """One way to send the request: the system whose caches are flushed, and where the body goes."""

    name: str
    system: BenchSystem
    target: Target


@dataclass(frozen=True)
class LoneRow:
    """Per prompt length and cache state: the median and the fastest milliseconds of each target."""

    prompt_tokens: int
    cache: str  # "cold": caches flushed, a new prompt; "warm": the same prompt again
    unified_ms: float  # through the router
    direct_ms: float  # the unified server itself
    stock_ms: float  # sglang-lora
    unified_min_ms: float
    direct_min_ms: float
    stock_min_ms: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.unified_ms / self.stock_ms

    @property
    def router_ms(self) -> float:
        return self.unified_ms - self.direct_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "unified_over_stock": self.ratio, "direct_over_stock": self.direct_ms / self.stock_ms,
                "router_hop_ms": self.router_ms, "fastest_unified_over_stock": self.unified_min_ms / self.stock_min_ms}


def _generate(session: requests.Session, target: Target, prompt: list[int]) -> float:
    """Milliseconds of one non-streamed greedy ``/generate``."""
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0,
                                                     "ignore_eos": True}, **target.fields}
    started = time.perf_counter()
    reply = session.post(f"{target.url}/generate", json=body, timeout=300)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    if len(reply.json()["output_ids"]) != MAX_NEW_TOKENS:
        raise RuntimeError(f"expected {MAX_NEW_TOKENS} tokens: {reply.text[:300]}")
    return elapsed * 1000


def time_turns(targets: list[LoneTarget], prompt_tokens: tuple[int, ...], repeats: int, vocab: tuple[int, int],
               progress: tqdm | None = None) -> dict[tuple[str, int, str], list[float]]:
    """Milliseconds per (target, prompt length, cold/warm), the targets taking turns request by request."""
    rng = random.Random(7)
    session = requests.Session()

    def prompt(tokens: int) -> list[int]:
        return [rng.randrange(*vocab) for _ in range(tokens)]

    for item in targets:  # a server's first requests pay one-off set-up (the adapter's buffers, ...)
        for _ in range(2):
            _generate(session, item.target, prompt(16))
    times: dict[tuple[str, int, str], list[float]] = {}
    for tokens in prompt_tokens:
        for _ in range(repeats):
            cold = prompt(tokens)
            for item in targets:
                item.system.flush()
                times.setdefault((item.name, tokens, "cold"), []).append(_generate(session, item.target, cold))
                progress and progress.update(1)
        warm = prompt(tokens)
        for item in targets:
            _generate(session, item.target, warm)
        for _ in range(repeats):
            for item in targets:
                times.setdefault((item.name, tokens, "warm"), []).append(_generate(session, item.target, warm))
                progress and progress.update(1)
    return times


def rows_of(times: dict[tuple[str, int, str], list[float]], prompt_tokens: tuple[int, ...]) -> list[LoneRow]:
    rows = []
    for tokens in prompt_tokens:
        for cache in ("cold", "warm"):
            samples = [times[(name, tokens, cache)] for name in TARGETS]
            rows.append(LoneRow(tokens, cache, *(statistics.median(values) for values in samples),
                                *(min(values) for values in samples), len(samples[0])))
    return rows


def table(rows: list[LoneRow]) -> str:
    lines = ["| prompt | cache | pfs-unified (router) ms | unified server direct ms | sglang-lora ms | "
             "pfs-unified / sglang-lora | direct / sglang-lora | router hop ms | fastest: unified / direct / stock ms "
             "| fastest ratio |", "|---" * 10 + "|"]
    for row in rows:
        lines.append(f"| {row.prompt_tokens} | {row.cache} | {row.unified_ms:.1f} | {row.direct_ms:.1f} | "
                     f"{row.stock_ms:.1f} | {row.ratio:.2f}x | {row.direct_ms / row.stock_ms:.2f}x | "
                     f"{row.router_ms:+.1f} | {row.unified_min_ms:.1f} / {row.direct_min_ms:.1f} / "
                     f"{row.stock_min_ms:.1f} | {row.unified_min_ms / row.stock_min_ms:.2f}x |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[LoneRow], times: dict, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"settings": settings, "goal_unified_over_stock": GOAL, "rows": [row.to_dict() for row in rows],
              "samples_ms": {f"{name}/{tokens}/{cache}": values for (name, tokens, cache), values in times.items()}}
    (out / "lone.json").write_text(json.dumps(result, indent=2) + "\n")
    worst = max(row.ratio for row in rows)
    text = [
        "# A lone request: pfs-unified against sglang-lora",
        "",
        f"Machine: {settings['machine']}; load average before the run {settings['load_before']}, after "
        f"{settings['load_after']}; commit {settings['commit']}. Models: {settings['shape_description']}; "
        f"adapters {', '.join(settings['adapters'])}, requests for `{settings['adapter']}`. Each system one SGLang "
        f"server of {settings['kv_pool_tokens']} KV tokens with the unified server's flags "
        f"(`{' '.join(settings['stock_flags'])}`); pfs-unified adds `--radix-cache-backend pfs` and the router. "
        f"{MAX_NEW_TOKENS} greedy tokens, non-streamed `/generate`, median of {settings['repeats']}, the three "
        "targets in turns request by request; cold: a new prompt, every cache flushed before it; warm: the same "
        "prompt again.",
        "",
        table(rows),
        "",
        f"Worst ratio {worst:.2f}x against the goal of at most {GOAL}x: "
        + ("met." if worst <= GOAL else "not met.")
        + " The router hop is the median through the router minus the median straight to the unified server. "
        "The fastest of each target's samples is the least disturbed by other work on the machine.",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))


def server_flags(command: list[str]) -> list[str]:
    """A server command line's serving flags (what follows its address)."""
    return command[command.index("--port") + 2:]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.bench lone", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="tiny: the trained demo LoRA adapters; small: random-weight adapters")
    parser.add_argument("--adapter", help="the adapter the requests name (default: the shape's first)")
    parser.add_argument("--prompt-tokens", default=",".join(map(str, PROMPT_TOKENS)))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kv-tokens", type=int, default=8192, help="each system's KV pool")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "pfs_sglang" / "bench_models")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--log-dir", type=Path, help="the servers' logs (default: a new temporary directory)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pfs_sglang.bench.systems import stock_lora_command
    from pfs_sglang.launch.topology import default_device
    from pfs_sglang.oracle import load_tokenizer

    args = build_parser().parse_args(argv)
    prompt_tokens = tuple(int(text) for text in args.prompt_tokens.split(",") if text)
    device = args.device or default_device()
    names = default_model_names(args.shape)
    adapter = args.adapter or names[0]
    if adapter not in names:
        raise SystemExit(f"pfs_sglang.bench lone: --adapter must be one of {names}")
    models = prepare_models(args.shape, names, args.models_dir, lora=True)
    budget = KVBudget(per_model_tokens=-(-args.kv_tokens // len(names)))
    tokenizer = load_tokenizer(str(models.base))
    special = set(tokenizer.all_special_ids)
    vocab = (max(special) + 1 if special else 0, len(tokenizer))
    logs = args.log_dir or Path(tempfile.mkdtemp(prefix="pfs_bench_lone-"))
    unified = UnifiedSystem(models, budget, device, logs / "unified", args.startup_timeout)
    stock = StockLoRASystem(models, budget, device, logs / "sglang-lora", args.startup_timeout)
    settings = {"machine": machine(), "commit": git_commit(), "load_before": load_average(), "shape": args.shape,
                "shape_description": describe(args.shape), "adapters": list(models.adapters), "adapter": adapter,
                "prompt_tokens": list(prompt_tokens), "repeats": args.repeats, "max_new_tokens": MAX_NEW_TOKENS,
                "kv_pool_tokens": budget.total(len(names)), "device": device,
                "stock_flags": server_flags(stock_lora_command(models, budget, device, "127.0.0.1", 0))}
    try:
        print("pfs_sglang.bench lone: starting pfs-unified and sglang-lora", flush=True)
        unified.start()
        stock.start()
        targets = [LoneTarget("pfs-unified", unified, unified.target(adapter)),
                   LoneTarget("unified-direct", unified, unified.direct_target(adapter)),
                   LoneTarget("sglang-lora", stock, stock.target(adapter))]
        with tqdm(total=2 * len(prompt_tokens) * args.repeats * len(targets), desc="lone requests") as progress:
            times = time_turns(targets, prompt_tokens, args.repeats, vocab, progress)
    finally:
        stock.stop()
        unified.stop()
    settings["load_after"] = load_average()
    rows = rows_of(times, prompt_tokens)
    write_results(args.out, rows, times, settings)
    print(table(rows))
    print(f"pfs_sglang.bench lone: wrote {args.out}/lone.json and report.md (server logs in {logs})")
    return 0
