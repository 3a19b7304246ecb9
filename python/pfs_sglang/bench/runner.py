"""One benchmark: write the models, start each system once, run every point, write the results.

For each system in turn (one deployment at a time on the machine): start it, then for
every point (a number of concurrent sessions) empty its caches, warm each model up with
one short request, empty the caches again, read the servers' counters, run the
workload, read them again; then stop it, however the run ends (``started_group``; the
command turns SIGTERM into an exit that runs this). The same seeded sessions run against every
system. Per point, ``write_point`` writes into its directory:

- ``summary.json``: the issue's schema (workload, floor, per-system figures, ratios,
  same-output check);
- ``requests.jsonl``: one record per request and system (latencies, output ids,
  server-reported prompt/cached tokens, error);
- ``details.json``: what the schema has no room for: every server's KV pool, the
  server-side counters (prompt/cached tokens, KV hand-off seconds, active-KV peak), each
  system's own floor, the requests whose outputs differ, skipped systems, machine;
- ``report.md`` and PNG plots (``report.py``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import requests

from pfs_sglang.bench.client import RunOutcome, run_sessions, warm_up
from pfs_sglang.bench.metrics import (
    MIB,
    ServerCounters,
    counter_delta,
    parse_prometheus,
    ratios,
    same_outputs,
    system_summary,
    unique_prefix_tokens,
)
from pfs_sglang.bench.report import write_point_report
from pfs_sglang.bench.shapes import ModelSet, describe, prepare_models
from pfs_sglang.bench.systems import LORA_SYSTEMS, VLLM_SKIPPED, BenchSystem, KVBudget, groups_of, make_group
from pfs_sglang.bench.workloads import Session, WorkloadConfig, build_sessions, vocabulary_of
from pfs_sglang.launch.processes import LaunchError


@dataclass(frozen=True)
class BenchConfig:
    workload: WorkloadConfig
    shape: str
    systems: tuple[str, ...]
    budget: KVBudget
    device: str
    models_dir: Path
    out: Path
    startup_timeout_s: float = 600.0
    progress: bool = True
    decode_cache: bool = True  # PD decode servers keep a prefix cache of base KV (the launcher's default)
    prefill_args: tuple[str, ...] = ()  # extra SGLang arguments of the PD prefill server (the launcher's --prefill-args)


@dataclass
class SystemResult:
    summary: dict
    outcome: RunOutcome
    counters: ServerCounters
    pools: dict[str, int]


@dataclass
class PointResult:
    sessions: int
    systems: dict[str, SystemResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


START_ATTEMPTS = 2


def _say(message: str) -> None:
    print(f"pfs_sglang.bench: {message}", flush=True)


def scrape(system: BenchSystem) -> dict[str, dict[str, float]]:
    return {server.name: parse_prometheus(requests.get(f"{server.url}/metrics", timeout=30).text)
            for server in system.servers()}


def server_counters(system: BenchSystem, before: dict, after: dict, outcome: RunOutcome) -> ServerCounters:
    """Counter deltas: prompt and cached tokens of the servers that prefill (PD: the prefill pool; stock:
    every server), KV hand-offs of the prefill servers, scheduler CPU seconds of every server."""
    prefill_names = [server.name for server in system.prefill_servers()] or [s.name for s in system.servers()]
    counters = ServerCounters(peak_kv_tokens=outcome.peak_kv_tokens, peak_active_kv_tokens=outcome.peak_active_kv_tokens,
                              kv_capacity_tokens=sum(system.server_pools().values()))
    for name in prefill_names:
        counters.prompt_tokens += counter_delta(before[name], after[name], "sglang:prompt_tokens_total")
        counters.cached_tokens += counter_delta(before[name], after[name], "sglang:cached_tokens_total")
    for server in system.servers():
        counters.scheduler_cpu_s += counter_delta(before[server.name], after[server.name],
                                                  "sglang:scheduler_process_cpu_seconds_total")
    for server in system.prefill_servers():
        counters.kv_bytes += counter_delta(before[server.name], after[server.name],
                                           "sglang:kv_transfer_total_mb_sum") * MIB
        counters.kv_seconds += counter_delta(before[server.name], after[server.name],
                                             "sglang:kv_transfer_latency_ms_sum") / 1000.0
    return counters


def measure(system: BenchSystem, sessions: list[Session], models: list[str], vocab, progress: bool) -> SystemResult:
    system.flush()
    warm_up(system.target, models, vocab)
    system.flush()
    before = scrape(system)
    outcome = run_sessions(system.name, sessions, system.target, [server.url for server in system.servers()],
                           progress)
    time.sleep(2.0)  # let the servers' counters catch up with the last replies
    after = scrape(system)
    counters = server_counters(system, before, after, outcome)
    return SystemResult(system_summary(outcome.records, outcome.duration_s, counters), outcome, counters,
                        system.server_pools())


@contextmanager
def started_group(config: BenchConfig, group: tuple[str, ...], models: ModelSet) -> Iterator[list[BenchSystem] | None]:
    """One group of systems, started (None if it would not start: a failed start, e.g. a port
    taken meanwhile, is tried again once) and stopped when the block ends, however it ends."""
    for attempt in range(1, START_ATTEMPTS + 1):
        systems = make_group(group, models, config.budget, config.device, config.out / "logs" / f"attempt-{attempt}",
                             config.startup_timeout_s, config.decode_cache, config.prefill_args)
        try:
            _say(f"starting {' + '.join(group)} (logs in {config.out / 'logs' / f'attempt-{attempt}'})")
            started = time.monotonic()
            try:
                systems[0].start()
            except LaunchError as error:
                _say(f"{' + '.join(group)} did not start (attempt {attempt}): {str(error)[:1500]}")
                continue
            _say(f"{' + '.join(group)} up in {time.monotonic() - started:.0f} s")
            yield systems
            return
        finally:
            systems[0].stop()
    yield None


def run_benchmark(config: BenchConfig, session_counts: list[int]) -> tuple[ModelSet, dict[int, PointResult]]:
    """Run every system over every point; returns the models used and each point's results."""
    from pfs_sglang.oracle import load_tokenizer

    models = prepare_models(config.shape, config.workload.models, config.models_dir, seed=config.workload.seed,
                            lora=any(name in LORA_SYSTEMS for name in config.systems))
    tokenizer = load_tokenizer(str(models.base))
    vocab = vocabulary_of(tokenizer)
    workloads = {count: build_sessions(replace(config.workload, sessions=count), tokenizer) for count in session_counts}
    points = {count: PointResult(count) for count in session_counts}
    if "vllm" in config.systems:
        _say(VLLM_SKIPPED)
        for point in points.values():
            point.skipped["vllm"] = VLLM_SKIPPED
    for group in groups_of(tuple(name for name in config.systems if name != "vllm")):
        with started_group(config, group, models) as systems:
            if systems is None:
                for point in points.values():
                    point.skipped.update({name: "did not start (see the logs)" for name in group})
                continue
            for count in session_counts:
                for system in systems:
                    result = measure(system, workloads[count], list(models.decode), vocab, config.progress)
                    points[count].systems[system.name] = result
                    summary = result.summary
                    _say(f"{system.name}, {count} sessions: p95 e2e {summary['e2e_p95_s']}, "
                         f"{summary['requests_per_s']:.2f} req/s, hit ratio {summary['hit_ratio']}, "
                         f"{summary['errors']} errors")
    return models, points


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def point_summary(config: BenchConfig, models: ModelSet, point: PointResult) -> tuple[dict, dict]:
    """``summary.json`` (the issue's schema) and ``details.json`` of one point."""
    systems = {name: result.summary for name, result in point.systems.items()}
    floors = {name: unique_prefix_tokens(result.outcome.prompts) for name, result in point.systems.items()}
    reference = next((name for name in ("pfs", "pfs-noshare", "pfs-unified", "sglang-lora", "sglang")
                      if name in floors), None)
    same, differing = None, []
    if "pfs" in point.systems and "pfs-noshare" in point.systems:
        same, differing = same_outputs(point.systems["pfs"].outcome.records,
                                       point.systems["pfs-noshare"].outcome.records)
    workload = {**replace(config.workload, sessions=point.sessions).to_dict(), "shape": config.shape,
                "shape_description": describe(config.shape),
                "kv_budget_tokens": config.budget.total(len(models.decode)),
                "kv_per_model_tokens": config.budget.per_model_tokens,
                "decode_context_tokens": config.budget.decode_context_tokens, "decode_cache": config.decode_cache,
                "prefill_args": " ".join(config.prefill_args),
                "device": config.device}
    summary = {"workload": workload, "floor_prefill_tokens": floors.get(reference), "systems": systems,
               "ratios": ratios(systems), "same_outputs_pfs_noshare": same}
    details = {
        "machine": machine(), "commit": git_commit(), "floor_reference_system": reference,
        "floor_prefill_tokens_per_system": floors,
        "differing_outputs_pfs_noshare": differing[:100],
        "skipped_systems": point.skipped,
        "systems": {name: {"server_pools": result.pools, "kv_pool_total_tokens": sum(result.pools.values()),
                           "duration_s": result.outcome.duration_s,
                           "server_counters": vars(result.counters)}
                    for name, result in point.systems.items()},
    }
    return summary, details


def write_point(config: BenchConfig, models: ModelSet, point: PointResult, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary, details = point_summary(config, models, point)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    with open(out / "requests.jsonl", "w") as handle:
        for result in point.systems.values():
            for record in result.outcome.records:
                handle.write(json.dumps(record.to_dict()) + "\n")
    write_point_report(summary, details, out)
    return summary
