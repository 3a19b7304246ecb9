"""``python -m pfs_sglang.bench startup``: launch a deployment again and again; time it, read its logs.

Each launch is the real command line (``python -m pfs_sglang.launch_server``, the demo
models unless other launcher flags follow ``--``), stopped with SIGTERM once it
serves. Per launch: whether it came up, seconds until the router served (from the
launcher's own progress lines), seconds until each server was healthy, port-collision
restarts, and the tracebacks in every server log (a healthy start-up has none). With
several ``--concurrency`` values the launches alternate between them, so each setting
sees the same machine. Writes ``DIR/startup.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from pfs_sglang.launch.processes import free_port

_HEALTHY = re.compile(r"pfs_sglang: (\S+) healthy at (\d+) s")
_RESTARTED = re.compile(r"pfs_sglang: (\S+) restarted on fresh ports")


@dataclass
class LaunchResult:
    concurrency: str  # servers starting at once: a number, or "all"
    came_up: bool
    seconds_to_serving: float | None
    healthy_at_s: dict[str, float] = field(default_factory=dict)
    restarts: int = 0
    tracebacks: dict[str, int] = field(default_factory=dict)  # server log -> tracebacks in it
    exit_code: int | None = None


def launch_once(concurrency: str, log_dir: Path, launcher_args: list[str], timeout_s: float) -> LaunchResult:
    command = [sys.executable, "-m", "pfs_sglang.launch_server", "--port", str(free_port()), "--log-dir", str(log_dir),
               *(["--startup-concurrency", concurrency] if concurrency != "all" else []), *launcher_args]
    began = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = LaunchResult(concurrency, came_up=False, seconds_to_serving=None)
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if match := _HEALTHY.search(line):
                result.healthy_at_s[match[1]] = float(match[2])
            result.restarts += bool(_RESTARTED.search(line))
            if "pfs_sglang: serving on" in line:
                result.came_up, result.seconds_to_serving = True, time.monotonic() - began
                break
            if time.monotonic() - began > timeout_s:
                break
    finally:  # also when this command is stopped: the launcher stops every server it started
        process.send_signal(signal.SIGTERM)
        output.append(process.communicate(timeout=120)[0])
    result.exit_code = process.returncode
    (log_dir / "launcher.log").write_text("".join(output))
    result.tracebacks = {log.name: log.read_text(errors="replace").count("Traceback")
                         for log in sorted(log_dir.glob("*.log")) if log.name != "launcher.log"}
    return result


def summarize(results: list[LaunchResult]) -> dict[str, dict]:
    rows = {}
    for concurrency in dict.fromkeys(r.concurrency for r in results):
        runs = [r for r in results if r.concurrency == concurrency]
        times = [r.seconds_to_serving for r in runs if r.came_up]
        rows[concurrency] = {
            "launches": len(runs), "came_up": len(times),
            "median_s": statistics.median(times) if times else None, "max_s": max(times) if times else None,
            "restarts": sum(r.restarts for r in runs),
            "launches_with_tracebacks": sum(any(r.tracebacks.values()) for r in runs),
        }
    return rows


def write_report(results: list[LaunchResult], out: Path, launcher_args: list[str]) -> str:
    rows = summarize(results)
    lines = [f"# Start-up: {len(results)} launches of `python -m pfs_sglang.launch_server "
             f"{' '.join(launcher_args)}`", "",
             "| servers starting at once | launches | came up | median to serving | max | port restarts | "
             "launches with a traceback in a server log |", "|---|---|---|---|---|---|---|"]
    for concurrency, row in rows.items():
        median = f"{row['median_s']:.0f} s" if row["median_s"] is not None else "-"
        worst = f"{row['max_s']:.0f} s" if row["max_s"] is not None else "-"
        lines.append(f"| {concurrency} | {row['launches']} | {row['came_up']} | {median} | {worst} | "
                     f"{row['restarts']} | {row['launches_with_tracebacks']} |")
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    (out / "startup.json").write_text(json.dumps({"launcher_args": launcher_args, "summary": rows,
                                                  "launches": [asdict(r) for r in results]}, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.bench startup",
                                     description="Launch a deployment repeatedly; time each start-up, read its logs. "
                                                 "Launcher flags (default: the demo models) go after --.")
    parser.add_argument("--launches", type=int, default=10, help="launches per concurrency value")
    parser.add_argument("--concurrency", default="all",
                        help='comma-separated values of servers starting at once: numbers or "all" (the default)')
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one launch may take")
    parser.add_argument("--out", type=Path, required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    values = [text for text in args.concurrency.split(",") if text]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tqdm(total=args.launches * len(values), desc="launches", unit="launch") as bar:
        for index in range(args.launches):
            for concurrency in values:
                result = launch_once(concurrency, args.out / f"launch-{index}-c{concurrency}", launcher_args,
                                     args.timeout)
                results.append(result)
                bar.write(f"launch {index} (concurrency {concurrency}): "
                          + (f"serving after {result.seconds_to_serving:.0f} s" if result.came_up else "did not come up")
                          + f", {result.restarts} restarts, tracebacks {sum(result.tracebacks.values())}")
                bar.update()
    print(write_report(results, args.out, launcher_args))
    return 0 if all(r.came_up and not any(r.tracebacks.values()) for r in results) else 1


if __name__ == "__main__":
    from pfs_sglang.launch.processes import exit_on_stop_signals

    exit_on_stop_signals()  # SIGTERM stops what the command started, as Ctrl-C does
    sys.exit(main())
