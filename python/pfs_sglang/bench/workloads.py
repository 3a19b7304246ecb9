"""Agent workloads as session programs: which model is called on which growing context.

A session is a list of steps over one token context. Each step appends its ``prefix``
tokens (a role tag, a tool observation) to the context, sends the whole context as the
prompt to ``model`` and, if ``keep_output``, appends the model's real (greedy) output, so
the next step's prompt holds it. The client runs the steps of a session in order
(closed loop); sessions start together or at Poisson arrival times. Prompts are token
ids (``/generate`` with ``input_ids``), so every system sees exactly the same tokens
and the prefill floor is counted on them.

- ``react``: a shared system prompt (tool descriptions, same for every session), a
  per-session task, then per round one step per model in turn (thought, action, ...,
  each by a different decode model, outputs kept), then a tool observation appended.
- ``reflexion``: per round (trial) the actor (model 0) acts on the trajectory, the
  environment's observation is appended, the evaluator (model 1) scores it with a short
  output, and the self-reflection model (model 2, or the last one) writes a reflection
  that stays in the trajectory for the next trial.
- ``trace``: replay of a JSONL file, one request per line: ``{"session_id", "model",
  "messages", "max_tokens", "arrival_time"}``; each request's prompt is its own messages
  (chat template of the base model's tokenizer), requests of a session run in order and
  not before their arrival time (seconds from the start).

The token contents are seeded random ids from the tokenizer's ordinary vocabulary.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = ("react", "reflexion", "trace")


@dataclass(frozen=True)
class Step:
    model: str
    prefix: tuple[int, ...]  # appended to the context before the call
    max_tokens: int
    keep_output: bool = True
    reset: bool = False  # the prompt is ``prefix`` alone (trace replay)
    not_before_s: float = 0.0  # earliest send time, seconds from the run's start


@dataclass(frozen=True)
class Session:
    session_id: str
    start_s: float  # seconds from the run's start
    context: tuple[int, ...]  # the initial context
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str
    sessions: int
    rounds: int
    models: tuple[str, ...]
    system_tokens: int = 256
    task_tokens: int = 64
    observation_tokens: int = 32
    output_tokens: int = 8
    score_tokens: int = 2
    rate: float | None = None  # sessions per second (Poisson); None: every session starts at once
    seed: int = 0
    trace: Path | None = None

    def validate(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.kind!r}")
        if self.kind == "trace":
            if self.trace is None:
                raise ValueError("--workload trace needs --trace FILE")
            return
        if self.sessions < 1 or self.rounds < 1 or not self.models:
            raise ValueError("sessions, rounds and models must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")

    def to_dict(self) -> dict:
        return {**{key: getattr(self, key) for key in self.__dataclass_fields__},
                "models": list(self.models), "trace": str(self.trace) if self.trace else None}


@dataclass(frozen=True)
class Vocabulary:
    """The token ids random text is drawn from (no special tokens) and a few fixed role tags."""

    low: int
    high: int  # exclusive

    def draw(self, rng: random.Random, count: int) -> tuple[int, ...]:
        return tuple(rng.randrange(self.low, self.high) for _ in range(count))

    def tag(self, index: int, length: int = 3) -> tuple[int, ...]:
        """A fixed short token sequence naming a role (the same in every session)."""
        return self.draw(random.Random(f"role-{index}"), length)


def vocabulary_of(tokenizer) -> Vocabulary:
    special = set(tokenizer.all_special_ids)
    low = max(special) + 1 if special else 0
    return Vocabulary(low=low, high=len(tokenizer))


def start_times(config: WorkloadConfig, rng: random.Random) -> list[float]:
    if config.rate is None:
        return [0.0] * config.sessions
    times, now = [], 0.0
    for _ in range(config.sessions):
        times.append(now)
        now += rng.expovariate(config.rate)
    return times


def react_sessions(config: WorkloadConfig, vocab: Vocabulary) -> list[Session]:
    rng = random.Random(config.seed)
    system = vocab.draw(rng, config.system_tokens)
    observation_tag = vocab.tag(len(config.models))
    sessions = []
    for index, start in enumerate(start_times(config, rng)):
        steps = []
        for round_index in range(config.rounds):
            for role, model in enumerate(config.models):
                prefix = vocab.tag(role)
                if role == 0 and round_index > 0:  # the previous round's tool observation
                    prefix = observation_tag + vocab.draw(rng, config.observation_tokens) + prefix
                steps.append(Step(model, prefix, config.output_tokens))
        sessions.append(Session(f"react-{index}", start, system + vocab.draw(rng, config.task_tokens), tuple(steps)))
    return sessions


def reflexion_sessions(config: WorkloadConfig, vocab: Vocabulary) -> list[Session]:
    rng = random.Random(config.seed)
    system = vocab.draw(rng, config.system_tokens)
    models = config.models
    actor, evaluator, reflector = models[0], models[1 % len(models)], models[min(2, len(models) - 1)]
    actor_tag, observation_tag, evaluator_tag, reflector_tag = (vocab.tag(i) for i in range(4))
    sessions = []
    for index, start in enumerate(start_times(config, rng)):
        steps = []
        for _ in range(config.rounds):
            steps.append(Step(actor, actor_tag, config.output_tokens))
            observation = observation_tag + vocab.draw(rng, config.observation_tokens)
            steps.append(Step(evaluator, observation + evaluator_tag, config.score_tokens))
            steps.append(Step(reflector, reflector_tag, config.output_tokens))
        sessions.append(Session(f"reflexion-{index}", start, system + vocab.draw(rng, config.task_tokens),
                                tuple(steps)))
    return sessions


def trace_sessions(path: Path, tokenizer) -> list[Session]:
    """Sessions of a JSONL trace; each request's prompt is its messages under the chat template."""
    by_session: dict[str, list[dict]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"session_id", "model", "messages", "max_tokens", "arrival_time"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number}: missing {sorted(missing)}")
        by_session.setdefault(str(row["session_id"]), []).append(row)
    sessions = []
    for session_id, rows in by_session.items():
        rows.sort(key=lambda row: float(row["arrival_time"]))
        steps = tuple(
            Step(str(row["model"]), tuple(tokenizer.apply_chat_template(
                row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)),
                int(row["max_tokens"]), keep_output=False, reset=True, not_before_s=float(row["arrival_time"]))
            for row in rows)
        sessions.append(Session(session_id, float(rows[0]["arrival_time"]), (), steps))
    return sessions


def build_sessions(config: WorkloadConfig, tokenizer) -> list[Session]:
    config.validate()
    if config.kind == "trace":
        return trace_sessions(config.trace, tokenizer)
    vocab = vocabulary_of(tokenizer)
    return (react_sessions if config.kind == "react" else reflexion_sessions)(config, vocab)


def models_of(sessions: list[Session]) -> list[str]:
    seen: dict[str, None] = {}
    for session in sessions:
        for step in session.steps:
            seen.setdefault(step.model, None)
    return list(seen)


def context_needed_by(config: WorkloadConfig) -> int | None:
    """The context length every request of the workload needs to be served whole: its
    longest prompt and that prompt's ``max_tokens`` (outputs counted at their maximum),
    with SGLang's margins (``decode.admission.context_needed``). None for a trace (its
    prompts are known only once tokenized). Token counts do not depend on the vocabulary."""
    from pfs_sglang.decode.admission import context_needed

    if config.kind == "trace":
        return None
    config.validate()
    vocab = Vocabulary(low=0, high=2)
    needed = 0
    for session in (react_sessions if config.kind == "react" else reflexion_sessions)(config, vocab):
        context = len(session.context)
        for step in session.steps:
            context = len(step.prefix) if step.reset else context + len(step.prefix)
            needed = max(needed, context_needed(context, step.max_tokens))
            if step.keep_output:
                context += step.max_tokens
    return needed
