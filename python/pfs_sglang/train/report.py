"""The replication's results table (markdown) and bar chart (PNG) from its accuracies.

Owns presentation only: given held-out exact-match accuracy per seed, task and setting
(``evaluate.SETTINGS``), it writes ``results.md`` and ``results.png``. Accuracies are
shown as mean over seeds with the per-seed values beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

SETTING_LABELS = {
    "full_ft": "(i) full FT, own KV",
    "prefillshare": "(ii) PrefillShare, base KV",
    "naive_reuse": "(iii) naive reuse, base KV",
    "base": "base, untuned",
}


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


def _per_seed(rows: list[Accuracy], task: str, setting: str) -> list[float]:
    return [row.value for row in sorted(rows, key=lambda r: r.seed) if row.task == task and row.setting == setting]


def _values(rows: list[Accuracy], tasks: list[str], task: str, setting: str) -> list[float]:
    """Per-seed accuracies of ``task``, or of the mean over ``tasks`` when ``task`` is "mean"."""
    if task != "mean":
        return _per_seed(rows, task, setting)
    return [mean(seed_values) for seed_values in zip(*(_per_seed(rows, t, setting) for t in tasks))]


def markdown_table(rows: list[Accuracy], tasks: list[str], settings: list[str]) -> str:
    header = "| task | " + " | ".join(SETTING_LABELS[s] for s in settings) + " | (ii) - (i) |"
    lines = [header, "|" + "---|" * (len(settings) + 2)]
    for task in tasks + ["mean"]:
        cells, means = [], {}
        for setting in settings:
            values = _values(rows, tasks, task, setting)
            means[setting] = mean(values)
            per_seed = ", ".join(f"{100 * v:.1f}" for v in values)
            cells.append(f"{100 * means[setting]:.1f} ({per_seed})")
        gap = 100 * (means["prefillshare"] - means["full_ft"])
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {gap:+.1f} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[Accuracy], tasks: list[str], settings: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(settings)
    figure, axes = plt.subplots(figsize=(8, 4))
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


def write_report(rows: list[Accuracy], out_dir: Path, preamble: str) -> tuple[Path, Path]:
    """Write ``results.md`` (``preamble`` then the table) and ``results.png`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(row.task for row in rows))
    settings = [s for s in SETTING_LABELS if any(row.setting == s for row in rows)]
    table_path = out_dir / "results.md"
    table_path.write_text(preamble + "\n" + markdown_table(rows, tasks, settings))
    chart_path = bar_chart(rows, tasks, settings, out_dir / "results.png")
    return table_path, chart_path
