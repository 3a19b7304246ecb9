"""The replication's and the sweep's tables (markdown) and charts (PNG) from their accuracies.

Owns presentation only. Given held-out exact-match accuracy per seed, task and setting
(``evaluate.SETTINGS``), it writes ``results.md`` and ``results.png`` (a bar per
setting and task); accuracies are shown as mean over seeds with the per-seed values
beside them; with served accuracies (``ServedAccuracy``: the PrefillShare arms scored
through a running deployment, ``replicate --served``) ``results.md`` also gets a table of
offline and served accuracy per arm, seed and task, and whether every answer agreed.
Given the sweep's points (``SweepPoint``: one capacity, budget, seed and
task), it writes ``sweep.md`` (the (i) - (ii) gap per capacity, budget and task) and
``sweep.png`` (that gap against the budget, one panel per task, one line per capacity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

SETTING_LABELS = {
    "full_ft": "(i) full FT, own KV",
    "prefillshare": "(ii) PrefillShare, base KV",
    "prefillshare_lora": "(ii-LoRA) PrefillShare LoRA, base KV",
    "naive_reuse": "(iii) naive reuse, base KV",
    "base": "base, untuned",
}
GAPS = {"prefillshare": "(ii) - (i)", "prefillshare_lora": "(ii-LoRA) - (i)"}


@dataclass(frozen=True)
class Accuracy:
    seed: int
    task: str
    setting: str
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class ServedAccuracy:
    """One arm's held-out exact match through a deployment, beside its offline evaluation's."""

    seed: int
    task: str
    setting: str  # prefillshare or prefillshare_lora
    deployment: str  # the shape that served it: pd or unified
    offline_correct: int
    total: int
    served_correct: int | None = None  # None: not served (``note`` says why)
    same_answers: bool | None = None  # every example's served answer equals the offline one
    note: str = ""


def served_table(rows: list[ServedAccuracy]) -> str:
    lines = ["| arm | task | seed | deployment | offline | served | same answers |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        served = f"{100 * row.served_correct / row.total:.1f}" if row.served_correct is not None else row.note
        same = "-" if row.same_answers is None else "yes" if row.same_answers else "**no**"
        lines.append(f"| {SETTING_LABELS[row.setting]} | {row.task} | {row.seed} | {row.deployment} | "
                     f"{100 * row.offline_correct / row.total:.1f} | {served} | {same} |")
    return "\n".join(lines) + "\n"


def _per_seed(rows: list[Accuracy], task: str, setting: str) -> list[float]:
    return [row.value for row in sorted(rows, key=lambda r: r.seed) if row.task == task and row.setting == setting]


def _values(rows: list[Accuracy], tasks: list[str], task: str, setting: str) -> list[float]:
    """Per-seed accuracies of ``task``, or of the mean over ``tasks`` when ``task`` is "mean"."""
    if task != "mean":
        return _per_seed(rows, task, setting)
    return [mean(seed_values) for seed_values in zip(*(_per_seed(rows, t, setting) for t in tasks))]


def markdown_table(rows: list[Accuracy], tasks: list[str], settings: list[str]) -> str:
    gaps = [setting for setting in GAPS if setting in settings and "full_ft" in settings]
    header = "| task | " + " | ".join(SETTING_LABELS[s] for s in settings)
    header += "".join(f" | {GAPS[setting]}" for setting in gaps) + " |"
    lines = [header, "|" + "---|" * (len(settings) + len(gaps) + 1)]
    for task in tasks + ["mean"]:
        cells, means = [], {}
        for setting in settings:
            values = _values(rows, tasks, task, setting)
            means[setting] = mean(values)
            per_seed = ", ".join(f"{100 * v:.1f}" for v in values)
            cells.append(f"{100 * means[setting]:.1f} ({per_seed})")
        cells += [f"{100 * (means[setting] - means['full_ft']):+.1f}" for setting in gaps]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[Accuracy], tasks: list[str], settings: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(settings)
    figure, axes = plt.subplots(figsize=(9, 4))
    for index, setting in enumerate(settings):
        values = [_per_seed(rows, task, setting) for task in tasks]
        centers = [task_index + (index - (len(settings) - 1) / 2) * width for task_index in range(len(tasks))]
        heights = [100 * mean(v) for v in values]
        errors = [[h - 100 * min(v) for h, v in zip(heights, values)],
                  [100 * max(v) - h for h, v in zip(heights, values)]]
        axes.bar(centers, heights, width, yerr=errors, capsize=3, label=SETTING_LABELS[setting])
    axes.set_xticks(range(len(tasks)), tasks)
    axes.set_ylabel("held-out exact match (%)")
    axes.set_ylim(0, 125)  # headroom for the legend above the bars
    axes.set_yticks(range(0, 101, 20))
    axes.set_title("Cache-conditioned fine-tuning, small-scale replication (mean, min-max over seeds)")
    axes.title.set_fontsize(10)
    axes.legend(fontsize=8, loc="upper center", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(rows: list[Accuracy], out_dir: Path, preamble: str,
                 served: list[ServedAccuracy] = ()) -> tuple[Path, Path]:
    """Write ``results.md`` (``preamble``, the table, then the served table if ``served``) and
    ``results.png`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(row.task for row in rows))
    settings = [s for s in SETTING_LABELS if any(row.setting == s for row in rows)]
    table_path = out_dir / "results.md"
    text = preamble + "\n" + markdown_table(rows, tasks, settings)
    if served:
        text += ("\n## Through the served path\n\nThe PrefillShare arms' held-out sets sent to a running deployment "
                 "(greedy `/generate`, the offline evaluation's prompt ids; `replicate --served`): exact match offline "
                 "and served (%), and whether every example's answer was the same.\n\n" + served_table(list(served)))
    table_path.write_text(text)
    chart_path = bar_chart(rows, tasks, settings, out_dir / "results.png")
    return table_path, chart_path


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep: a base capacity, a training budget, a seed and a task."""

    capacity: str  # "4L h64"
    layers: int
    hidden: int
    budget: int  # training steps of both arms
    seed: int
    task: str
    accuracies: dict[str, float]  # setting -> held-out exact match (0-1)

    @property
    def gap(self) -> float:
        """(ii) - (i): PrefillShare's accuracy minus full fine-tuning's."""
        return self.accuracies["prefillshare"] - self.accuracies["full_ft"]


def _sweep_cells(points: list[SweepPoint]) -> dict[tuple[str, int, str], list[SweepPoint]]:
    cells: dict[tuple[str, int, str], list[SweepPoint]] = {}
    for point in sorted(points, key=lambda p: (p.layers * p.hidden, p.budget, p.seed)):
        cells.setdefault((point.capacity, point.budget, point.task), []).append(point)
    return cells


def sweep_table(points: list[SweepPoint], tasks: list[str]) -> str:
    """Rows: capacity x budget; per task (i) / (ii) and the gap (mean over seeds); the mean gap.
    Where the points have the LoRA arm, each cell also gives (ii-LoRA) and its gap to (i)."""
    cells = _sweep_cells(points)
    lora = any("prefillshare_lora" in point.accuracies for point in points)
    arms = "(i) / (ii) / (ii-LoRA), gaps" if lora else "(i) / (ii), gap"
    header = "| base | budget (steps) | " + " | ".join(f"{task}: {arms}" for task in tasks) + " | mean gap |"
    header += " mean LoRA gap |" if lora else ""
    lines = [header, "|" + "---|" * (len(tasks) + 3 + lora)]
    for capacity, budget in dict.fromkeys((c, b) for c, b, _ in cells):
        row, gaps, lora_gaps = [], [], []
        for task in tasks:
            runs = cells.get((capacity, budget, task), [])
            if not runs:
                row.append("-")
                continue
            full_ft = mean(run.accuracies["full_ft"] for run in runs)
            ours = mean(run.accuracies["prefillshare"] for run in runs)
            gaps.append(ours - full_ft)
            if lora:
                ours_lora = mean(run.accuracies.get("prefillshare_lora", float("nan")) for run in runs)
                lora_gaps.append(ours_lora - full_ft)
                row.append(f"{100 * full_ft:.1f} / {100 * ours:.1f} / {100 * ours_lora:.1f}, "
                           f"{100 * (ours - full_ft):+.1f} / {100 * (ours_lora - full_ft):+.1f}")
            else:
                row.append(f"{100 * full_ft:.1f} / {100 * ours:.1f}, {100 * (ours - full_ft):+.1f}")
        mean_gap = f"{100 * mean(gaps):+.1f}" if len(gaps) == len(tasks) else "-"
        line = f"| {capacity} | {budget} | " + " | ".join(row) + f" | {mean_gap} |"
        if lora:
            line += f" {100 * mean(lora_gaps):+.1f} |" if len(lora_gaps) == len(tasks) else " - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def gap_chart(points: list[SweepPoint], tasks: list[str], path: Path, target: float = -2.0) -> Path:
    """The (ii) - (i) gap (points) against the budget, a panel per task, a line per capacity (min-max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _sweep_cells(points)
    capacities = list(dict.fromkeys(capacity for capacity, _, _ in cells))
    all_budgets = sorted({budget for _, budget, _ in cells})
    lines = {}
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), sharey=True, squeeze=False)
    for panel, task in zip(axes[0], tasks):
        for capacity in capacities:
            budgets = sorted(b for c, b, t in cells if c == capacity and t == task)
            gaps = [[100 * run.gap for run in cells[(capacity, b, task)]] for b in budgets]
            if not budgets:
                continue
            centers = [mean(g) for g in gaps]
            errors = [[c - min(g) for c, g in zip(centers, gaps)], [max(g) - c for c, g in zip(centers, gaps)]]
            lines[capacity] = panel.errorbar(budgets, centers, yerr=errors, marker="o", capsize=3, label=capacity)
        panel.axhline(0, color="black", linewidth=0.8)
        panel.axhline(target, color="gray", linestyle="--", linewidth=0.8)
        panel.set_xscale("log")
        panel.set_xticks(all_budgets, [str(budget) for budget in all_budgets])
        panel.minorticks_off()
        panel.set_title(task, fontsize=10)
        panel.set_xlabel("training steps")
    axes[0][0].set_ylabel("(ii) - (i), exact-match points")
    axes[0][-1].legend(list(lines.values()), list(lines), fontsize=8, title="base", title_fontsize=8)
    figure.suptitle(f"PrefillShare minus full fine-tuning (dashed: {target:+.0f} points)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_sweep_report(points: list[SweepPoint], tasks: list[str], out_dir: Path, preamble: str) -> tuple[Path, Path]:
    """Write ``sweep.md`` (``preamble`` then the table) and ``sweep.png`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / "sweep.md"
    table_path.write_text(preamble + "\n" + sweep_table(points, tasks))
    return table_path, gap_chart(points, tasks, out_dir / "sweep.png")
