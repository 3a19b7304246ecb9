"""What one run measured: per-request records, server counters, the prefill floor, the summary.

- Per request (the client's view, ``RequestRecord``): TTFT (first streamed token), end
  to end latency, output ids, and the server's own ``prompt_tokens`` / ``cached_tokens``
  from the reply's ``meta_info`` (for PD systems the decode server reports the tokens
  the prefill tree served).
- Per server (``ServerCounters``, read from each SGLang server's ``/metrics`` before and
  after the run): prompt and cached tokens (``sglang:prompt_tokens_total``,
  ``sglang:cached_tokens_total``) and, on prefill servers, the KV hand-off
  (``sglang:kv_transfer_total_mb_sum`` in MiB, ``sglang:kv_transfer_latency_ms_sum``), which
  SGLang counts for streamed and non-streamed requests alike; plus the peak KV pool
  occupancy polled during the run (``kv_used_tokens + kv_evictable_tokens``, summed over
  the servers); and the CPU seconds every server's scheduler process spent, all its threads
  (``sglang:scheduler_process_cpu_seconds_total``; on a CPU box that is the forward passes,
  prefill and decode, and the scheduling around them; SGLang's forward-time counter needs
  CUDA events).
- The floor: unique prompt tokens of the workload, i.e. the nodes of a token trie over
  every prompt sent; any system must prefill at least that many tokens once.
- ``system_summary`` gives the issue's per-system keys; ``ratios`` the headline ratios
  (``pfs`` against ``pfs-noshare`` and ``sglang``; ``pfs-unified`` against ``sglang-lora``
  and ``sglang``), None where a system was not run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

MIB = 1 << 20


@dataclass
class RequestRecord:
    system: str
    session_id: str
    step: int
    model: str
    prompt_len: int
    start_s: float = 0.0  # from the run's start
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0  # as the server counted them
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def unique_prefix_tokens(prompts: Iterable[Iterable[int]]) -> int:
    """Nodes of the token trie over ``prompts``: the tokens a perfect shared prefix cache prefills."""
    root: dict = {}
    nodes = 0
    for prompt in prompts:
        node = root
        for token in prompt:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                nodes += 1
            node = child
    return nodes


def parse_prometheus(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` for every sample line of a Prometheus text page."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            samples[key] = float(value)
        except ValueError:
            continue
    return samples


def metric_sum(samples: dict[str, float], name: str) -> float:
    """Sum of every sample of metric ``name`` (all label sets)."""
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


@dataclass
class ServerCounters:
    """Counter deltas over a run, summed over a system's servers."""

    prompt_tokens: float = 0.0
    cached_tokens: float = 0.0
    kv_bytes: float = 0.0
    kv_seconds: float = 0.0
    peak_kv_tokens: float = 0.0  # occupied slots (held by requests + cached), summed over servers
    peak_active_kv_tokens: float = 0.0  # slots held by running requests
    kv_capacity_tokens: float = 0.0  # sum of the servers' pools
    scheduler_cpu_s: float = 0.0  # CPU seconds of every server's scheduler process


def counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return metric_sum(after, name) - metric_sum(before, name)


def system_summary(records: list[RequestRecord], duration_s: float, counters: ServerCounters) -> dict:
    """The issue's per-system figures from the requests and the server counters."""
    ok = [record for record in records if record.error is None]
    ttft = [record.ttft_s for record in ok if record.ttft_s is not None]
    e2e = [record.e2e_s for record in ok if record.e2e_s is not None]
    prompt = sum(record.prompt_tokens for record in ok)
    cached = sum(record.cached_tokens for record in ok)
    output = sum(record.completion_tokens for record in ok)
    duration = max(duration_s, 1e-9)
    return {
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95), "ttft_p99_s": percentile(ttft, 99),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p95_s": percentile(e2e, 95), "e2e_p99_s": percentile(e2e, 99),
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": output / duration,
        "prefill_tokens": prompt - cached,
        "hit_ratio": cached / prompt if prompt else None,
        "kv_bytes": int(counters.kv_bytes),
        "kv_gb_per_s": counters.kv_bytes / 1e9 / counters.kv_seconds if counters.kv_seconds > 0 else None,
        "peak_kv_tokens": int(counters.peak_kv_tokens),
        "scheduler_cpu_s": counters.scheduler_cpu_s,
        "errors": len(records) - len(ok),
        "requests": len(records),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def ratios(systems: dict[str, dict]) -> dict[str, float | None]:
    pfs, noshare, sglang, unified, lora = (systems.get(name, {}) for name in (
        "pfs", "pfs-noshare", "sglang", "pfs-unified", "sglang-lora"))
    return {
        "p95_e2e_noshare_over_pfs": _ratio(noshare.get("e2e_p95_s"), pfs.get("e2e_p95_s")),
        "throughput_pfs_over_noshare": _ratio(pfs.get("requests_per_s"), noshare.get("requests_per_s")),
        "p95_e2e_sglang_over_pfs": _ratio(sglang.get("e2e_p95_s"), pfs.get("e2e_p95_s")),
        "throughput_pfs_over_sglang": _ratio(pfs.get("requests_per_s"), sglang.get("requests_per_s")),
        "p95_e2e_sglang_lora_over_unified": _ratio(lora.get("e2e_p95_s"), unified.get("e2e_p95_s")),
        "throughput_unified_over_sglang_lora": _ratio(unified.get("requests_per_s"), lora.get("requests_per_s")),
        "p95_e2e_sglang_over_unified": _ratio(sglang.get("e2e_p95_s"), unified.get("e2e_p95_s")),
        "throughput_unified_over_sglang": _ratio(unified.get("requests_per_s"), sglang.get("requests_per_s")),
    }


def same_outputs(first: list[RequestRecord], second: list[RequestRecord]) -> tuple[bool, list[str]]:
    """Whether two systems gave the same output ids for every request; the keys that differ."""
    outputs = {(r.session_id, r.step): (r.error is None, r.output_ids) for r in first}
    others = {(r.session_id, r.step): (r.error is None, r.output_ids) for r in second}
    differing = [f"{session}#{step}" for (session, step) in sorted(set(outputs) | set(others))
                 if not (outputs.get((session, step)) == others.get((session, step))
                         and outputs[(session, step)][0])]
    return not differing, differing
