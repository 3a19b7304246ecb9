"""The synthetic multi-task corpus of the small-scale replication (a shared context, many tasks).

Every example shares one kind of context: a *record*, a line of ``field: value`` pairs
(``name: tom; city: oslo; color: red; qty: 3; price: 7; size: 5``). Each task asks its
own question about that record, so the answer depends on the shared context:

- ``extract``: "What is the city?" -> ``oslo`` (copy one field's value)
- ``compute``: "What is qty plus price?" -> ``10`` (add two numeric fields)
- ``transform``: "Write the name in upper case." -> ``TOM`` (rewrite one field)

The chat format (the tokenizer's template, see ``pfs_sglang.models.tokenizer``) is a
single user turn holding the record, a newline and the question; the assistant's reply
is the bare answer::

    <|bos|><|user|>\\n{record}\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>

The base (the prefill module) is pretrained on an instruction mix over the same records,
``Repeat the record.`` (echo it) and ``Repeat the qty field.`` (-> ``qty: 4``), so it
knows the format, can copy and look fields up, but has seen none of the tasks' questions
or answer forms (its exact match on every task is 0).
Rows are JSONL chat ``messages``, the format ``pfs_sglang.train.data`` reads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ("tom", "ana", "bob", "eva", "max", "ida", "leo", "mia", "sam", "zoe", "kim", "ray",
         "lou", "amy", "ben", "joy", "ned", "pia", "rex", "uma")
CITIES = ("oslo", "rome", "lima", "kyiv", "bern", "doha", "riga", "baku", "nice", "graz",
          "pune", "kobe", "cork", "agra", "turin", "porto", "dakar", "quito", "tunis", "perth")
COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold")
TEXT_FIELDS = {"name": NAMES, "city": CITIES, "color": COLORS}
NUMBER_FIELDS = ("qty", "price", "size")
TASKS = ("extract", "compute", "transform")


@dataclass(frozen=True)
class CorpusSizes:
    """How many rows each file of the corpus gets."""

    pretrain: int = 6000
    train_per_task: int = 4000
    test_per_task: int = 200


@dataclass(frozen=True)
class CorpusFiles:
    """Where :func:`write_corpus` put each JSONL file."""

    pretrain: Path
    train: dict[str, Path]
    test: dict[str, Path]


def random_record(rng: random.Random) -> dict[str, str]:
    record = {field: rng.choice(values) for field, values in TEXT_FIELDS.items()}
    record.update({field: str(rng.randint(1, 9)) for field in NUMBER_FIELDS})
    return record


def render_record(record: dict[str, str]) -> str:
    return "; ".join(f"{field}: {value}" for field, value in record.items())


def task_question(task: str, record: dict[str, str], rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of ``task`` about ``record``."""
    if task == "extract":
        field = rng.choice(tuple(record))
        return f"What is the {field}?", record[field]
    if task == "compute":
        first, second = rng.sample(NUMBER_FIELDS, 2)
        return f"What is {first} plus {second}?", str(int(record[first]) + int(record[second]))
    if task == "transform":
        field = rng.choice(tuple(TEXT_FIELDS))
        return f"Write the {field} in upper case.", record[field].upper()
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def chat_row(record: dict[str, str], question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": f"{render_record(record)}\n{question}"},
        {"role": "assistant", "content": answer},
    ]}


def task_rows(task: str, count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        record = random_record(rng)
        question, answer = task_question(task, record, rng)
        rows.append(chat_row(record, question, answer))
    return rows


def pretrain_rows(count: int, rng: random.Random) -> list[dict]:
    """The base's instruction mix: repeat the record, or repeat one of its fields."""
    rows = []
    for _ in range(count):
        record = random_record(rng)
        if rng.random() < 0.5:
            rows.append(chat_row(record, "Repeat the record.", render_record(record)))
        else:
            field = rng.choice(tuple(record))
            rows.append(chat_row(record, f"Repeat the {field} field.", f"{field}: {record[field]}"))
    return rows


def tokenizer_text(seed: int, lines: int = 2000) -> list[str]:
    """Sample corpus text for training the tokenizer's merges (records and questions)."""
    rng = random.Random(seed)
    text = []
    for index in range(lines):
        record = random_record(rng)
        question, answer = task_question(TASKS[index % len(TASKS)], record, rng)
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
