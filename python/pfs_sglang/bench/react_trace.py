"""``python -m pfs_sglang.bench react-trace``: a replay trace made of real ReAct trajectories.

The benchmark's ``--workload trace`` replays a JSONL file of chat requests
(``workloads.trace_sessions``). This module writes one from the few-shot prompts of the
ReAct paper's repository (``prompts/*.json`` of github.com/ysymyth/ReAct: a JSON object
of prompt name -> text; the text is an instruction, then worked examples separated by
blank lines, each a ``Claim:`` or ``Question:`` line followed by ``Thought N:``,
``Action N:`` and ``Observation N:`` lines written by the authors and real Wikipedia
observations). The project ships no such file: the user fetches it and points at it.

Each session replays one worked example as a three-model agent run, the way ReAct's
own loop calls its model:

- the system message is the whole few-shot prompt (every session shares it);
- the user message is the session's task: ``Task <id>.`` and the example's claim or
  question, so no two sessions' contexts are equal past the shared prompt;
- per step, the ``planner`` is asked for the thought, then the ``actor`` for the
  action, each prompt holding the example's real text of every earlier step (the trace
  carries prompts, not outputs); the observation is appended as a user message;
- after the last step the ``critic`` is asked to check the answer.

Sessions take the examples in turn and arrive as a Poisson process (``--rate``) or all
at once. Invariant-neutral: a workload, not a serving path.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MODELS = ("planner", "actor", "critic")
_TASK_LINE = re.compile(r"^(Claim|Question):")
_STEP_LINE = re.compile(r"^(Thought|Action|Observation) \d+:")
CRITIC_REQUEST = "Check the trajectory: is the answer supported by the observations?"


@dataclass(frozen=True)
class Trajectory:
    """One worked example: its task line and its step lines in order."""

    task: str
    steps: tuple[str, ...]


def trajectories(prompt: str) -> list[Trajectory]:
    """The worked examples of a ReAct few-shot prompt, each with at least one thought or action."""
    found = []
    for block in re.split(r"\n\s*\n", prompt):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        starts = [i for i, line in enumerate(lines) if _TASK_LINE.match(line)]
        if not starts:
            continue
        task_at = starts[0]
        steps = tuple(line for line in lines[task_at + 1:] if _STEP_LINE.match(line))
        if any(not step.startswith("Observation") for step in steps):
            found.append(Trajectory(lines[task_at], steps))
    return found


def session_requests(session: int, prompt: str, trajectory: Trajectory, arrival_s: float,
                     output_tokens: int) -> list[dict]:
    """The trace rows of one session (``workloads.trace_sessions``' format)."""
    messages = [{"role": "system", "content": prompt.strip()},
                {"role": "user", "content": f"Task {session}.\n{trajectory.task}"}]
    rows = []

    def ask(model: str) -> None:
        rows.append({"session_id": f"s{session}", "model": model, "messages": [dict(m) for m in messages],
                     "max_tokens": output_tokens, "arrival_time": round(arrival_s, 3)})

    for step in trajectory.steps:
        if step.startswith("Observation"):
            messages.append({"role": "user", "content": step})
            continue
        ask("planner" if step.startswith("Thought") else "actor")
        messages.append({"role": "assistant", "content": step})
    messages.append({"role": "user", "content": CRITIC_REQUEST})
    ask("critic")
    return rows


def build_trace(prompts: dict[str, str], key: str, sessions: int, rate: float | None, output_tokens: int,
                seed: int) -> list[dict]:
    """Every request of ``sessions`` sessions over the examples of ``prompts[key]``."""
    if key not in prompts:
        raise ValueError(f"no prompt {key!r}; the file has {sorted(prompts)}")
    prompt = prompts[key]
    examples = trajectories(prompt)
    if not examples:
        raise ValueError(f"prompt {key!r} holds no worked example (a Claim:/Question: line, then "
                         "Thought N:/Action N: lines)")
    rng = random.Random(seed)
    rows, arrival = [], 0.0
    for session in range(sessions):
        rows += session_requests(session, prompt, examples[session % len(examples)], arrival, output_tokens)
        if rate is not None:
            arrival += rng.expovariate(rate)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pfs_sglang.bench react-trace",
        description="Write a replay trace (JSONL, for --workload trace) from a ReAct few-shot prompt file.")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="a prompts JSON of the ReAct repository, e.g. prompts/fever.json")
    parser.add_argument("--key", required=True, help="which prompt of the file, e.g. webthink_simple3")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rate", type=float, help="Poisson session arrivals per second (default: all at once)")
    parser.add_argument("--output-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        rows = build_trace(json.loads(args.prompts.read_text()), args.key, args.sessions, args.rate,
                           args.output_tokens, args.seed)
    except ValueError as error:
        print(f"pfs_sglang.bench react-trace: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"pfs_sglang.bench react-trace: {len(rows)} requests of {args.sessions} sessions in {args.out}")
    return 0
