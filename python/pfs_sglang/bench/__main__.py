"""``python -m pfs_sglang.bench``: run, sweep, handoff.

- ``run``: one workload against every system: ``DIR/summary.json``, ``requests.jsonl``,
  ``details.json``, ``report.md``, ``systems.png``.
- ``sweep``: the same over several numbers of concurrent sessions (each system started
  once): ``DIR/sessions-N/`` per point, plus ``DIR/sweep.json``, ``DIR/report.md`` and
  ``DIR/sweep_*.png``.
- ``handoff ARGS...``: the KV hand-off microbenchmark (``pfs_sglang.bench.handoff``).
- ``lone ARGS...``: one request for a LoRA decode module, the unified deployment against
  stock SGLang multi-LoRA, and the router's hop (``pfs_sglang.bench.lone``).
- ``startup ARGS...``: launch a deployment repeatedly, time it, read its logs
  (``pfs_sglang.bench.startup``).
- ``load ARGS...``: closed-loop sessions for a while against one deployment; checks
  exactly-once answers, no leaked KV slot, bounded memory (``pfs_sglang.bench.load``).
- ``react-trace ARGS...``: a replay trace for ``--workload trace`` made of the real ReAct
  trajectories of a prompts file the user fetched (``pfs_sglang.bench.react_trace``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from pfs_sglang.bench.shapes import SHAPES, default_model_names
from pfs_sglang.bench.systems import SYSTEMS, KVBudget
from pfs_sglang.bench.workloads import WORKLOADS, WorkloadConfig

EXAMPLES = """examples:
  python -m pfs_sglang.bench run --shape tiny --sessions 2 --rounds 2 --out out/bench-tiny
  python -m pfs_sglang.bench run --workload reflexion --shape small --sessions 8 --out out/bench-small
  python -m pfs_sglang.bench run --workload trace --trace trace.jsonl --shape tiny --out out/bench-trace
  python -m pfs_sglang.bench sweep --shape small --sessions-list 2,4,8,16 --out docs/bench/small
  python -m pfs_sglang.bench handoff --help
  python -m pfs_sglang.bench lone --repeats 20 --out docs/bench/lone
  python -m pfs_sglang.bench sweep --shape small --systems pfs-unified,sglang-lora,sglang --out docs/bench/unified
  python -m pfs_sglang.bench startup --launches 10 --out out/startup
  python -m pfs_sglang.bench load --sessions 200 --duration 120 --out docs/bench/load
  python -m pfs_sglang.bench react-trace --prompts fever.json --key webthink_simple3 --rate 0.5 --out trace.jsonl
"""


@dataclass(frozen=True)
class ShapeDefaults:
    system_tokens: int
    task_tokens: int
    observation_tokens: int
    output_tokens: int
    kv_tokens_per_model: int
    decode_context_tokens: int  # PD decode servers serve at least this (more where the workload needs it)


SHAPE_DEFAULTS = {
    "tiny": ShapeDefaults(256, 64, 32, 8, kv_tokens_per_model=2048, decode_context_tokens=512),
    "small": ShapeDefaults(1024, 128, 64, 8, kv_tokens_per_model=4096, decode_context_tokens=1536),
    "llama-8b": ShapeDefaults(4096, 512, 256, 64, kv_tokens_per_model=65536, decode_context_tokens=8192),
}


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=WORKLOADS, default="react")
    parser.add_argument("--trace", type=Path, help="JSONL trace for --workload trace (session_id, model, messages, "
                                                   "max_tokens, arrival_time per line)")
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--models", help="comma-separated decode model names (default: the shape's three)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, help="shared system prompt length (all sessions)")
    parser.add_argument("--task-tokens", type=int, help="per-session task length")
    parser.add_argument("--observation-tokens", type=int, help="tool observation length per round")
    parser.add_argument("--output-tokens", type=int, help="tokens generated per step")
    parser.add_argument("--rate", type=float, help="Poisson session arrivals per second (default: closed loop, "
                                                   "every session at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="pfs,pfs-noshare,sglang",
                        help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--kv-tokens-per-model", type=int,
                        help="KV budget per model; every system gets models x this in all")
    parser.add_argument("--decode-context-tokens", type=int,
                        help="context length of each PD decode server (default: the workload's longest request, "
                             "at least the shape's); its pool is that plus SGLang's decode reserve and the prefill "
                             "server gets the rest (the launcher's --kv-budget rule)")
    parser.add_argument("--no-decode-cache", action="store_true",
                        help="pfs and pfs-noshare: decode servers without the prefix cache of base KV (the launcher's "
                             "--no-decode-cache), to measure the KV it saves moving")
    parser.add_argument("--prefill-args", default="",
                        help='pfs and pfs-noshare: extra SGLang arguments of the prefill server (the launcher\'s '
                             '--prefill-args), e.g. "--optimistic-prefill-attempts 1"')
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "pfs_sglang" / "bench_models",
                        help="where the shape's models are written once and reused")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.bench", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Multi-agent workloads against pfs, pfs-noshare, pfs-unified, "
                                                 "stock SGLang and stock SGLang multi-LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one workload, every system")
    add_common(run)
    run.add_argument("--sessions", type=int, default=2)
    sweep = sub.add_parser("sweep", help="the workload over several numbers of concurrent sessions")
    add_common(sweep)
    sweep.add_argument("--sessions-list", default="2,4,8,16")
    sub.add_parser("handoff", help="KV hand-off microbenchmark (pfs_sglang.bench.handoff)", add_help=False)
    sub.add_parser("lone", help="a lone LoRA request, pfs-unified against sglang-lora (pfs_sglang.bench.lone)",
                   add_help=False)
    sub.add_parser("startup", help="launch a deployment repeatedly (pfs_sglang.bench.startup)", add_help=False)
    sub.add_parser("load", help="closed-loop load run with exactly-once, KV and memory checks "
                                "(pfs_sglang.bench.load)", add_help=False)
    sub.add_parser("react-trace", help="a replay trace of real ReAct trajectories (pfs_sglang.bench.react_trace)",
                   add_help=False)
    return parser


def bench_config(args: argparse.Namespace, sessions: int):
    from pfs_sglang.bench.runner import BenchConfig
    from pfs_sglang.launch.topology import default_device

    defaults = SHAPE_DEFAULTS[args.shape]

    def pick(value, default):
        return default if value is None else value

    models = tuple(args.models.split(",")) if args.models else default_model_names(args.shape)
    workload = WorkloadConfig(
        kind=args.workload, sessions=sessions, rounds=args.rounds, models=models,
        system_tokens=pick(args.system_tokens, defaults.system_tokens),
        task_tokens=pick(args.task_tokens, defaults.task_tokens),
        observation_tokens=pick(args.observation_tokens, defaults.observation_tokens),
        output_tokens=pick(args.output_tokens, defaults.output_tokens),
        rate=args.rate, seed=args.seed, trace=args.trace)
    workload.validate()
    systems = tuple(name for name in args.systems.split(",") if name)
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    budget = KVBudget(pick(args.kv_tokens_per_model, defaults.kv_tokens_per_model),
                      decode_context_tokens(workload, args.decode_context_tokens, defaults.decode_context_tokens))
    if {"pfs", "pfs-noshare"} & set(systems):
        budget.pd_pools(len(models))  # refuses a budget the PD split cannot serve before anything starts
    return BenchConfig(workload=workload, shape=args.shape, systems=systems, budget=budget,
                       device=args.device or default_device(), models_dir=args.models_dir, out=args.out,
                       startup_timeout_s=args.startup_timeout, progress=not args.no_progress,
                       decode_cache=not args.no_decode_cache, prefill_args=tuple(shlex.split(args.prefill_args)))


def decode_context_tokens(workload: WorkloadConfig, asked: int | None, default: int) -> int:
    """The context length of each PD decode server: the shape's default grown, or the one
    asked for checked, so every request of the workload fits it whole."""
    from pfs_sglang.bench.workloads import context_needed_by

    needed = context_needed_by(workload)
    if needed is None:  # a trace: its requests over the limit are refused (400) and counted as failed
        return default if asked is None else asked
    if asked is None:
        return max(default, needed)
    if asked < needed:
        raise ValueError(f"--decode-context-tokens {asked} cannot serve this workload: its longest request needs a "
                         f"context of {needed} tokens")
    return asked


def run_command(args: argparse.Namespace) -> int:
    from pfs_sglang.bench.runner import run_benchmark, write_point

    config = bench_config(args, args.sessions)
    models, points = run_benchmark(config, [args.sessions])
    summary = write_point(config, models, points[args.sessions], args.out)
    print(json.dumps({"ratios": summary["ratios"], "floor_prefill_tokens": summary["floor_prefill_tokens"],
                      "same_outputs_pfs_noshare": summary["same_outputs_pfs_noshare"]}, indent=2))
    print(f"pfs_sglang.bench: wrote {args.out}/summary.json, report.md, requests.jsonl, systems.png")
    return 0 if points[args.sessions].systems else 1


def sweep_command(args: argparse.Namespace) -> int:
    from pfs_sglang.bench.report import write_sweep_report
    from pfs_sglang.bench.runner import point_summary, run_benchmark, write_point

    counts = sorted({int(text) for text in args.sessions_list.split(",") if text})
    if args.workload == "trace":
        raise ValueError("a sweep varies the number of sessions; a trace fixes them (use run)")
    config = bench_config(args, counts[0])
    models, points = run_benchmark(config, counts)
    summaries, details = {}, {}
    for count in counts:
        summaries[count] = write_point(config, models, points[count], args.out / f"sessions-{count}")
        details[count] = point_summary(config, models, points[count])[1]
    write_sweep_report(summaries, details, args.out)
    sweep = {"sessions": counts, "ratios": {str(c): summaries[c]["ratios"] for c in counts},
             "points": {str(c): summaries[c] for c in counts}}
    (args.out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    print(json.dumps(sweep["ratios"], indent=2))
    print(f"pfs_sglang.bench: wrote {args.out}/sweep.json, report.md, sweep_*.png and sessions-N/")
    return 0 if all(points[c].systems for c in counts) else 1


def handoff_command(argv: list[str]) -> int:
    try:
        handoff = importlib.import_module("pfs_sglang.bench.handoff")
    except ModuleNotFoundError as error:
        if error.name != "pfs_sglang.bench.handoff":
            raise
        print("pfs_sglang.bench: the handoff microbenchmark (pfs_sglang/bench/handoff.py, issue 13) is not "
              "in this checkout yet", file=sys.stderr)
        return 2
    return handoff.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["handoff"]:
        return handoff_command(argv[1:])
    if argv[:1] == ["lone"]:
        from pfs_sglang.bench.lone import main as lone_main

        return lone_main(argv[1:])
    if argv[:1] == ["startup"]:
        from pfs_sglang.bench.startup import main as startup_main

        return startup_main(argv[1:])
    if argv[:1] == ["load"]:
        from pfs_sglang.bench.load import main as load_main

        return load_main(argv[1:])
    if argv[:1] == ["react-trace"]:
        from pfs_sglang.bench.react_trace import main as react_trace_main

        return react_trace_main(argv[1:])
    from pfs_sglang.launch.processes import LaunchError

    args = build_parser().parse_args(argv)
    try:
        return run_command(args) if args.command == "run" else sweep_command(args)
    except (ValueError, LaunchError) as error:
        print(f"pfs_sglang.bench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from pfs_sglang.launch.processes import exit_on_stop_signals

    exit_on_stop_signals()  # SIGTERM stops what the command started, as Ctrl-C does
    sys.exit(main())
