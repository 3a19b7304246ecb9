"""The synthetic multi-task corpus of the small-scale replication (a shared context, many tasks).

Every example shares one kind of context: a *record*, a line of ``field: value`` pairs
(``name: tom; city: oslo; color: red; qty: 3; price: 7; size: 5``). Each task asks its
own question about that record, so the answer depends on the shared context:

- ``extract``: "What is the city?" -> ``oslo`` (copy one field's value)
- ``compute``: "What is qty plus price?" -> ``10`` (find two numeric fields, add them)
- ``transform``: "Write the name in upper case." -> ``TOM`` (rewrite one field)
- ``compare``: "Which is larger, qty or size?" -> ``size`` (find two numeric fields,
  compare them, answer with a field's name; the two always differ)

The chat format (the tokenizer's template, see ``pfs_sglang.models.tokenizer``) is a
single user turn holding the record, a newline and the question; the assistant's reply
is the bare answer::

    <|bos|><|user|>\\n{record}\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>

The base (the prefill module) is pretrained as a *general* model of this corpus: a
language-modelling objective over whole rows (records, questions and answers) of a
broad mix of questions about records (``PRETRAIN_QUESTIONS``): repeating the record or
single fields, listing the fields with their values, reverse lookups, comparisons
(yes/no, extremes), arithmetic (differences, products, doubling, sums written out as
equations) and formatting (spelling, reversing, capitalising, the record in capitals).
Several of its answers name a field and then give its value (``qty 4, price 9``), so
the base learns to fetch a field's value where the field is mentioned. The tasks'
questions and their answer forms are held out of it (``is_task_question`` checks the
mix): the base answers none of the tasks as asked, and each task is new to it, as it
is for a real base.
Rows are JSONL chat ``messages``, the format ``pfs_sglang.train.data`` reads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NAMES = ("tom", "ana", "bob", "eva", "max", "ida", "leo", "mia", "sam", "zoe", "kim", "ray",
         "lou", "amy", "ben", "joy", "ned", "pia", "rex", "uma")
CITIES = ("oslo", "rome", "lima", "kyiv", "bern", "doha", "riga", "baku", "nice", "graz",
          "pune", "kobe", "cork", "agra", "turin", "porto", "dakar", "quito", "tunis", "perth")
COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold")
TEXT_FIELDS = {"name": NAMES, "city": CITIES, "color": COLORS}
NUMBER_FIELDS = ("qty", "price", "size")
TASKS = ("extract", "compute", "transform", "compare")

Record = dict[str, str]
QuestionMaker = Callable[[Record, random.Random], tuple[str, str]]

# What a task's question looks like; no pretraining question may match one of these.
TASK_QUESTION_PATTERNS = {
    "extract": re.compile(r"^What is the \w+\?$"),
    "compute": re.compile(r"^What is \w+ plus \w+\?$"),
    "transform": re.compile(r"^Write the \w+ in upper case\.$"),
    "compare": re.compile(r"^Which is larger, \w+ or \w+\?$"),
}


@dataclass(frozen=True)
class CorpusSizes:
    """How many rows each file of the corpus gets."""

    pretrain: int = 20000
    train_per_task: int = 4000
    test_per_task: int = 200


@dataclass(frozen=True)
class CorpusFiles:
    """Where :func:`write_corpus` put each JSONL file."""

    pretrain: Path
    train: dict[str, Path]
    test: dict[str, Path]


def random_record(rng: random.Random) -> Record:
    record = {field: rng.choice(values) for field, values in TEXT_FIELDS.items()}
    record.update({field: str(rng.randint(1, 9)) for field in NUMBER_FIELDS})
    return record


def render_record(record: Record) -> str:
    return "; ".join(f"{field}: {value}" for field, value in record.items())


def _untied_pairs(record: Record) -> list[tuple[str, str]]:
    return [(a, b) for a in NUMBER_FIELDS for b in NUMBER_FIELDS if a != b and record[a] != record[b]]


def task_question(task: str, record: Record, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of ``task`` about ``record``.

    ``compare`` asks about two fields whose values differ; on a record whose three
    numbers are all equal (1 in 81) it answers ``equal``, and the task's rows avoid such
    records (:func:`task_rows`).
    """
    if task == "extract":
        field = rng.choice(tuple(record))
        return f"What is the {field}?", record[field]
    if task == "compute":
        first, second = rng.sample(NUMBER_FIELDS, 2)
        return f"What is {first} plus {second}?", str(int(record[first]) + int(record[second]))
    if task == "transform":
        field = rng.choice(tuple(TEXT_FIELDS))
        return f"Write the {field} in upper case.", record[field].upper()
    if task == "compare":
        pairs = _untied_pairs(record)
        if not pairs:
            first, second = rng.sample(NUMBER_FIELDS, 2)
            return f"Which is larger, {first} or {second}?", "equal"
        first, second = rng.choice(pairs)
        return f"Which is larger, {first} or {second}?", max(first, second, key=lambda f: int(record[f]))
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def is_task_question(question: str) -> bool:
    return any(pattern.match(question) for pattern in TASK_QUESTION_PATTERNS.values())


# The base's pretraining mix: general questions about records, none of them a task's.
def _repeat_record(record: Record, rng: random.Random) -> tuple[str, str]:
    return "Repeat the record.", render_record(record)


def _repeat_field(record: Record, rng: random.Random) -> tuple[str, str]:
    field = rng.choice(tuple(record))
    return f"Repeat the {field} field.", f"{field}: {record[field]}"


def _pairs(record: Record, rng: random.Random) -> tuple[str, str]:
    return "List the fields with their values.", ", ".join(f"{field} {value}" for field, value in record.items())


def _two_fields(record: Record, rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(tuple(record), 2)
    return f"Give the {first} and the {second}.", f"{first} {record[first]}, {second} {record[second]}"


def _which_field(record: Record, rng: random.Random) -> tuple[str, str]:
    field = rng.choice(tuple(TEXT_FIELDS))
    return f"Which field holds {record[field]}?", field


def _is_larger(record: Record, rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NUMBER_FIELDS, 2)
    verdict = "yes" if int(record[first]) > int(record[second]) else "no"
    return f"Is {first} more than {second}?", f"{first} {record[first]}, {second} {record[second]}: {verdict}"


def _extreme(record: Record, rng: random.Random) -> tuple[str, str]:
    values = [int(record[field]) for field in NUMBER_FIELDS]
    if rng.random() < 0.5:
        return "What is the biggest number in the record?", str(max(values))
    return "What is the smallest number in the record?", str(min(values))


def _difference(record: Record, rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NUMBER_FIELDS, 2)
    return f"What is {first} minus {second}?", str(int(record[first]) - int(record[second]))


def _product(record: Record, rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NUMBER_FIELDS, 2)
    return f"What is {first} times {second}?", str(int(record[first]) * int(record[second]))


def _double(record: Record, rng: random.Random) -> tuple[str, str]:
    field = rng.choice(NUMBER_FIELDS)
    return f"Double the {field}.", str(2 * int(record[field]))


def _sum_equation(record: Record, rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NUMBER_FIELDS, 2)
    a, b = int(record[first]), int(record[second])
    return f"Add {first} and {second}, showing the sum.", f"{first} {a} + {second} {b} = {a + b}"


def _spell(record: Record, rng: random.Random) -> tuple[str, str]:
    field = rng.choice(tuple(TEXT_FIELDS))
    return f"Spell the {field}.", "-".join(record[field])


def _reverse(record: Record, rng: random.Random) -> tuple[str, str]:
    field = rng.choice(tuple(TEXT_FIELDS))
    return f"Write the {field} backwards.", record[field][::-1]


def _capitalise(record: Record, rng: random.Random) -> tuple[str, str]:
    field = rng.choice(tuple(TEXT_FIELDS))
    return f"Capitalise the {field}.", record[field].capitalize()


def _shout_record(record: Record, rng: random.Random) -> tuple[str, str]:
    return "Shout the record.", render_record(record).upper()


PRETRAIN_QUESTIONS: dict[str, QuestionMaker] = {
    "repeat record": _repeat_record,
    "repeat field": _repeat_field,
    "pairs": _pairs,
    "two fields": _two_fields,
    "which field": _which_field,
    "is more": _is_larger,
    "extreme": _extreme,
    "difference": _difference,
    "product": _product,
    "double": _double,
    "sum equation": _sum_equation,
    "spell": _spell,
    "reverse": _reverse,
    "capitalise": _capitalise,
    "shout record": _shout_record,
}


def chat_row(record: Record, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": f"{render_record(record)}\n{question}"},
        {"role": "assistant", "content": answer},
    ]}


def task_rows(task: str, count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        record = random_record(rng)
        while task == "compare" and not _untied_pairs(record):
            record = random_record(rng)
        question, answer = task_question(task, record, rng)
        rows.append(chat_row(record, question, answer))
    return rows


def pretrain_rows(count: int, rng: random.Random) -> list[dict]:
    """The base's general mix: every row one record and one question of ``PRETRAIN_QUESTIONS``."""
    makers = tuple(PRETRAIN_QUESTIONS.values())
    rows = []
    for _ in range(count):
        record = random_record(rng)
        question, answer = rng.choice(makers)(record, rng)
        rows.append(chat_row(record, question, answer))
    return rows


def tokenizer_text(seed: int, lines: int = 2000) -> list[str]:
    """Sample corpus text for training the tokenizer's merges (records, questions, answers)."""
    rng = random.Random(seed)
    makers = tuple(PRETRAIN_QUESTIONS.values())
    text = []
    for index in range(lines):
        record = random_record(rng)
        if index % 2:
            question, answer = rng.choice(makers)(record, rng)
        else:
            question, answer = task_question(TASKS[index // 2 % len(TASKS)], record, rng)
        text.append(f"{render_record(record)}\n{question}\n{answer}")
    return text


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_corpus(out_dir: str | Path, seed: int, sizes: CorpusSizes = CorpusSizes()) -> CorpusFiles:
    """Write the pretraining corpus and a train/test split per task (disjoint seeds)."""
    out_dir = Path(out_dir)
    pretrain = write_jsonl(pretrain_rows(sizes.pretrain, random.Random(seed)), out_dir / "pretrain.jsonl")
    train, test = {}, {}
    for index, task in enumerate(TASKS):
        train_rng = random.Random(f"{seed}-train-{index}")
        test_rng = random.Random(f"{seed}-test-{index}")
        train[task] = write_jsonl(task_rows(task, sizes.train_per_task, train_rng), out_dir / f"{task}.train.jsonl")
        test[task] = write_jsonl(task_rows(task, sizes.test_per_task, test_rng), out_dir / f"{task}.test.jsonl")
    return CorpusFiles(pretrain=pretrain, train=train, test=test)
