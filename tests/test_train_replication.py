"""The replication's corpus and the sweep's report, without training.

The base's pretraining mix must hold the tasks out (no task question in it); every
task's rows ask that task's question; ``compare`` never asks about a tie; the sweep's
table and gap chart come out of its points.
"""

from __future__ import annotations

import json
import random

from pfs_sglang.train.corpus import (
    NUMBER_FIELDS,
    PRETRAIN_QUESTIONS,
    TASK_QUESTION_PATTERNS,
    TASKS,
    is_task_question,
    pretrain_rows,
    task_question,
    task_rows,
)
from pfs_sglang.train.report import SweepPoint, write_sweep_report


def _question_and_answer(row: dict) -> tuple[str, str]:
    user, assistant = row["messages"]
    return user["content"].split("\n")[1], assistant["content"]


def test_pretraining_mix_holds_the_tasks_out():
    questions = {_question_and_answer(row)[0] for row in pretrain_rows(4000, random.Random(0))}
    assert not [question for question in questions if is_task_question(question)]
    assert len(questions) > 50  # a broad mix: every kind, over many fields
    assert len(PRETRAIN_QUESTIONS) >= 10


def test_task_rows_ask_their_own_question():
    for task in TASKS:
        for row in task_rows(task, 200, random.Random(task)):
            question, _ = _question_and_answer(row)
            assert TASK_QUESTION_PATTERNS[task].match(question), (task, question)


def test_compare_answers_the_larger_field_and_skips_ties():
    for row in task_rows("compare", 500, random.Random(1)):
        record = dict(pair.split(": ") for pair in row["messages"][0]["content"].split("\n")[0].split("; "))
        question, answer = _question_and_answer(row)
        first, second = question.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
        assert record[first] != record[second]
        assert answer == max(first, second, key=lambda field: int(record[field]))
    all_equal = {"name": "tom", "city": "oslo", "color": "red"} | dict.fromkeys(NUMBER_FIELDS, "4")
    assert task_question("compare", all_equal, random.Random(0))[1] == "equal"


def test_sweep_report_has_a_row_per_capacity_and_budget(tmp_path):
    points = [SweepPoint(capacity=f"{layers}L h{hidden}", layers=layers, hidden=hidden, budget=budget, seed=seed,
                         task=task, accuracies={"full_ft": 1.0, "prefillshare": 0.9 + 0.01 * seed})
              for layers, hidden in ((2, 32), (4, 64)) for budget in (10, 20) for seed in (0, 1)
              for task in ("extract", "compare")]
    table, chart = write_sweep_report(points, ["extract", "compare"], tmp_path, "# sweep\n")
    rows = [line for line in table.read_text().splitlines() if line.startswith("| 2L") or line.startswith("| 4L")]
    assert len(rows) == 4
    assert rows[0] == "| 2L h32 | 10 | 100.0 / 90.5, -9.5 | 100.0 / 90.5, -9.5 | -9.5 |"
    assert chart.stat().st_size > 1000
    json.dumps([point.__dict__ for point in points])  # the sweep writes them as JSON


def test_sweep_report_gives_the_lora_arm_where_it_ran(tmp_path):
    points = [SweepPoint(capacity="4L h64", layers=4, hidden=64, budget=800, seed=seed, task=task,
                         accuracies={"full_ft": 1.0, "prefillshare": 0.99, "prefillshare_lora": 0.98 - 0.01 * seed})
              for seed in (0, 1) for task in ("extract", "compare")]
    table, _ = write_sweep_report(points, ["extract", "compare"], tmp_path, "# sweep\n")
    row = [line for line in table.read_text().splitlines() if line.startswith("| 4L")][0]
    assert row == "| 4L h64 | 800 | 100.0 / 99.0 / 97.5, -1.0 / -2.5 | 100.0 / 99.0 / 97.5, -1.0 / -2.5 | -1.0 | -2.5 |"


def test_the_gpu_grid_is_the_cpu_grid_with_the_lora_arm():
    from dataclasses import replace

    from pfs_sglang.train.replicate import ARMS
    from pfs_sglang.train.sweep import CPU_GRID, FULL_GRID

    assert FULL_GRID.arms == ARMS
    assert replace(FULL_GRID, arms=CPU_GRID.arms) == CPU_GRID


def test_a_sweep_run_again_keeps_the_points_of_its_recipe_and_runs_only_what_is_missing(tmp_path):
    from dataclasses import asdict, replace

    from pfs_sglang.train.sweep import QUICK_GRID, SweepConfig, _kept_points, sweep

    grid = replace(QUICK_GRID, budgets=(5,), seeds=(0,))
    points = [SweepPoint(capacity=capacity.label, layers=capacity.layers, hidden=capacity.hidden, budget=5, seed=0,
                         task=task, accuracies={"full_ft": 1.0, "prefillshare": 0.5})
              for capacity in grid.capacities for task in grid.tasks]
    earlier = {"grid": json.loads(json.dumps(asdict(replace(grid, budgets=(5, 10))), default=str)),
               "points": [asdict(point) for point in points]}
    (tmp_path / "sweep.json").write_text(json.dumps(earlier))
    config = SweepConfig(out_dir=tmp_path, grid=grid, device="cpu")
    assert sweep(config) == points  # every cell was measured: nothing is trained again
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written["complete"] and written["jobs"] == len(points)
    assert "| 1L h32 | 5 | 100.0 / 50.0, -50.0 |" in (tmp_path / "sweep.md").read_text()
    assert _kept_points(replace(config, grid=replace(grid, pretrain_steps=11))) == []  # another recipe: none kept


def test_the_lora_arm_trains_the_recipes_multiple_of_the_budget():
    from pfs_sglang.train.replicate import ReplicationConfig
    from pfs_sglang.train.trainer import LORA_RECIPE

    assert ReplicationConfig(out_dir=".", task_steps=300).lora_budget == LORA_RECIPE.budget_factor * 300
    assert ReplicationConfig(out_dir=".", task_steps=300, lora_steps=50).lora_budget == 50
    assert "lm_head" in ReplicationConfig(out_dir=".").lora_targets


def test_the_report_gives_served_accuracy_beside_offline_and_whether_the_answers_agreed(tmp_path):
    from pfs_sglang.train.replicate import ReplicationConfig, _not_served, write_results
    from pfs_sglang.train.report import Accuracy, ServedAccuracy

    accuracies = [Accuracy(0, "extract", setting, 190, 200) for setting in ("full_ft", "prefillshare")]
    served = [ServedAccuracy(0, "extract", "prefillshare", "pd", 190, 200, 190, True),
              ServedAccuracy(0, "compute", "prefillshare", "pd", 100, 200, 99, False),
              ServedAccuracy(0, "extract", "prefillshare_lora", "unified", 180, 200, note="not served: why")]
    write_results(ReplicationConfig(out_dir=tmp_path, served=True), accuracies, 60.0, served)
    table = (tmp_path / "results.md").read_text()
    assert "| (ii) PrefillShare, base KV | extract | 0 | pd | 95.0 | 95.0 | yes |" in table
    assert "| (ii) PrefillShare, base KV | compute | 0 | pd | 50.0 | 49.5 | **no** |" in table
    assert "| (ii-LoRA) PrefillShare LoRA, base KV | extract | 0 | unified | 90.0 | not served: why | - |" in table
    assert json.loads((tmp_path / "results.json").read_text())["served"][1]["same_answers"] is False
    # On a CPU the recipe's LoRA arm (an lm_head adapter) is not served; without lm_head it is.
    cpu = ReplicationConfig(out_dir=tmp_path, device="cpu")
    assert _not_served(cpu, "prefillshare_lora") and not _not_served(cpu, "prefillshare")
    without_head = ReplicationConfig(out_dir=tmp_path, device="cpu", lora_targets=("q_proj",))
    assert not _not_served(without_head, "prefillshare_lora")
