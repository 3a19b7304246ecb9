"""Human-readable results: ``report.md`` tables and PNG plots (matplotlib, no display).

One point: a table of every system's figures beside the workload's prefill floor, the
ratios and the same-output check; bar charts of p95 latency, throughput, prefilled
tokens against the floor, and hit ratio. A sweep: the same figures against the number
of concurrent sessions, one line per system, and the ratios at each point.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = (
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"), ("ttft_p95_s", "TTFT p95 s", "{:.3f}"),
    ("e2e_p50_s", "e2e p50 s", "{:.3f}"), ("e2e_p95_s", "e2e p95 s", "{:.3f}"), ("e2e_p99_s", "e2e p99 s", "{:.3f}"),
    ("requests_per_s", "req/s", "{:.2f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("prefill_tokens", "prefilled tokens", "{:d}"), ("hit_ratio", "hit ratio", "{:.3f}"),
    ("kv_bytes", "KV moved MB", None), ("kv_gb_per_s", "KV GB/s", "{:.3f}"),
    ("peak_kv_tokens", "peak KV tokens", "{:d}"), ("scheduler_cpu_s", "scheduler CPU s", "{:.1f}"),
    ("errors", "errors", "{:d}"), ("requests", "requests", "{:d}"),
)
RATIO_NAMES = {
    "p95_e2e_noshare_over_pfs": "p95 e2e, pfs-noshare / pfs",
    "throughput_pfs_over_noshare": "throughput, pfs / pfs-noshare",
    "p95_e2e_sglang_over_pfs": "p95 e2e, sglang / pfs",
    "throughput_pfs_over_sglang": "throughput, pfs / sglang",
    "p95_e2e_sglang_lora_over_unified": "p95 e2e, sglang-lora / pfs-unified",
    "throughput_unified_over_sglang_lora": "throughput, pfs-unified / sglang-lora",
    "p95_e2e_sglang_over_unified": "p95 e2e, sglang / pfs-unified",
    "throughput_unified_over_sglang": "throughput, pfs-unified / sglang",
}
COLORS = {"pfs": "tab:green", "pfs-noshare": "tab:orange", "sglang": "tab:blue", "pfs-unified": "tab:red",
          "sglang-lora": "tab:cyan", "vllm": "tab:purple"}


def fmt(value, pattern: str | None, key: str = "") -> str:
    if value is None:
        return "–"
    if key == "kv_bytes":
        return f"{value / 1e6:.1f}"
    try:
        return pattern.format(int(value) if pattern == "{:d}" else value)
    except (TypeError, ValueError):
        return str(value)


def systems_table(summary: dict) -> str:
    lines = ["| system | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, figures in summary["systems"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(figures.get(key), pattern, key) for key, _, pattern in COLUMNS)
                     + " |")
    return "\n".join(lines)


def ratios_line(ratios: dict) -> str:
    """The ratios of the systems that ran."""
    return "; ".join(f"{RATIO_NAMES[key]} = {fmt(value, '{:.2f}')}" for key, value in ratios.items()
                     if value is not None)


def workload_line(workload: dict) -> str:
    """What was sent: a trace's file (its prompts, models, output lengths and arrival times are its
    own), or the synthetic workload's parameters."""
    if workload["kind"] == "trace":
        return (f"replay of the trace {Path(workload['trace']).name} (each request's messages, model, max_tokens and "
                "arrival time from the file; greedy, ignore_eos).")
    arrivals = f"Poisson arrivals at {workload['rate']} sessions/s" if workload["rate"] else "closed loop"
    return (f"{workload['kind']}, {workload['rounds']} rounds, models {', '.join(workload['models'])}, system prompt "
            f"{workload['system_tokens']} tokens, task {workload['task_tokens']}, observations "
            f"{workload['observation_tokens']}, outputs {workload['output_tokens']} tokens (greedy, ignore_eos), "
            f"{arrivals}, seed {workload['seed']}.")


def budget_line(workload: dict) -> str:
    return (f"KV budget: {workload['kv_budget_tokens']} tokens in every system ({workload['kv_per_model_tokens']} "
            f"per model: a stock server per model holds that; PD decode servers one context of "
            f"{workload.get('decode_context_tokens')} tokens plus SGLang's decode reserve each, the prefill server "
            "the rest, the launcher's --kv-budget rule; pfs-unified and sglang-lora one server of the whole budget). "
            + ("PD decode servers without their prefix cache (--no-decode-cache). "
               if workload.get("decode_cache") is False else "")
            + (f"PD prefill server with --prefill-args \"{workload['prefill_args']}\". "
               if workload.get("prefill_args") else "")
            + "Each CPU server runs an equal share of the cores as its threads.")


def write_point_report(summary: dict, details: dict, out: Path) -> None:
    workload = summary["workload"]
    plots = plot_point(summary, out)
    text = [
        f"# Benchmark: {workload['kind']}, {workload['sessions']} sessions, shape {workload['shape']}",
        "",
        f"Machine: {details['machine']}; commit {details['commit']}. Models: {workload['shape_description']}. "
        f"Workload: {workload_line(workload)} {budget_line(workload)}",
        "",
        systems_table(summary),
        "",
        f"Floor (unique prompt tokens, from the {details['floor_reference_system']} run's prompts): "
        f"**{summary['floor_prefill_tokens']}**; per system: "
        + ", ".join(f"{name} {floor}" for name, floor in details["floor_prefill_tokens_per_system"].items()) + ".",
        "",
        f"Ratios: {ratios_line(summary['ratios'])}.",
    ]
    if summary["same_outputs_pfs_noshare"] is not None:
        text += ["", f"Same greedy outputs, pfs vs pfs-noshare, every request: **{summary['same_outputs_pfs_noshare']}**"
                 + (f" (differing: {', '.join(details['differing_outputs_pfs_noshare'][:10])})"
                    if details["differing_outputs_pfs_noshare"] else "") + "."]
    for name, reason in details["skipped_systems"].items():
        text += ["", f"Skipped {name}: {reason.splitlines()[0]}"]
    text += ["", *(f"![{plot.stem}]({plot.name})" for plot in plots), ""]
    (out / "report.md").write_text("\n".join(text))


def _bars(ax, names: list[str], values: list, title: str) -> None:
    ax.bar(names, [value or 0 for value in values], color=[COLORS.get(name, "gray") for name in names])
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)


def plot_point(summary: dict, out: Path) -> list[Path]:
    systems = summary["systems"]
    if not systems:
        return []
    names = list(systems)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    _bars(axes[0], names, [systems[n]["e2e_p95_s"] for n in names], "p95 end-to-end latency (s)")
    _bars(axes[1], names, [systems[n]["requests_per_s"] for n in names], "throughput (requests/s)")
    _bars(axes[2], names, [systems[n]["prefill_tokens"] for n in names], "prompt tokens prefilled")
    if summary["floor_prefill_tokens"]:
        axes[2].axhline(summary["floor_prefill_tokens"], color="black", linestyle="--", label="floor")
        axes[2].legend(fontsize=8)
    _bars(axes[3], names, [systems[n]["hit_ratio"] for n in names], "prefix hit ratio")
    workload = summary["workload"]
    fig.suptitle(f"{workload['kind']}, {workload['sessions']} sessions, shape {workload['shape']}", fontsize=11)
    fig.tight_layout()
    path = out / "systems.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_sweep_report(summaries: dict[int, dict], details: dict[int, dict], out: Path) -> list[Path]:
    """``report.md`` and line plots over the number of sessions."""
    counts = sorted(summaries)
    names = [name for name in COLORS if any(name in summaries[count]["systems"] for count in counts)]
    panels = (("e2e_p95_s", "p95 end-to-end latency (s)"), ("requests_per_s", "throughput (requests/s)"),
              ("hit_ratio", "prefix hit ratio"), ("prefill_tokens", "prompt tokens prefilled"))
    paths = []
    for key, title in panels:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for name in names:
            xs = [c for c in counts if summaries[c]["systems"].get(name, {}).get(key) is not None]
            ax.plot(xs, [summaries[c]["systems"][name][key] for c in xs], marker="o", label=name,
                    color=COLORS[name])
        if key == "prefill_tokens":
            ax.plot(counts, [summaries[c]["floor_prefill_tokens"] for c in counts], "k--", label="floor")
        ax.set_xlabel("concurrent sessions")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"sweep_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    first = summaries[counts[0]]
    workload = first["workload"]
    shown = [key for key in RATIO_NAMES if any(summaries[c]["ratios"].get(key) is not None for c in counts)]
    lines = [
        f"# Sweep: {workload['kind']}, shape {workload['shape']}, sessions {', '.join(map(str, counts))}",
        "",
        f"Machine: {details[counts[0]]['machine']}; commit {details[counts[0]]['commit']}. "
        f"Models: {workload['shape_description']}. Workload: {workload_line(workload)} {budget_line(workload)}",
        "",
        "| sessions | " + " | ".join(RATIO_NAMES[key] for key in shown) + " | floor | prefilled: " + ", ".join(names)
        + " | hit ratio: " + ", ".join(names) + " | same outputs | errors |",
        "|---" * (len(shown) + 6) + "|",
    ]
    for count in counts:
        summary = summaries[count]
        systems = summary["systems"]
        lines.append(
            f"| {count} | " + " | ".join(fmt(summary["ratios"][key], "{:.2f}") for key in shown)
            + f" | {summary['floor_prefill_tokens']} | "
            + ", ".join(fmt(systems.get(n, {}).get("prefill_tokens"), "{:d}") for n in names) + " | "
            + ", ".join(fmt(systems.get(n, {}).get("hit_ratio"), "{:.2f}") for n in names)
            + f" | {summary['same_outputs_pfs_noshare']} | "
            + ", ".join(fmt(systems.get(n, {}).get("errors"), "{:d}") for n in names) + " |")
    for count in counts:
        lines += ["", f"## {count} sessions", "", systems_table(summaries[count])]
    lines += ["", *(f"![{path.stem}]({path.name})" for path in paths), ""]
    (out / "report.md").write_text("\n".join(lines))
    return paths
