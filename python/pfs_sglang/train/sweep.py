"""The sweep: how the (i) - (ii) gap of the replication depends on the base and the budget.

Owns the grid and its execution, not the pipeline: for every base capacity (layers,
width) it pretrains a base with ``replicate.pretrain_base``, then for every
decode-module training budget (steps; full fine-tuning gets the same budget), seed
and task it trains and evaluates full fine-tuning (i) and a PrefillShare decode module
(ii) with ``replicate.train_task``. The jobs run in a pool of worker processes (one
GPU serves many tiny trainings at once: each one is bound by its launch overhead), seed
by seed and the largest first, and none starts after the deadline, if one is given; the
trained models live in a scratch directory and are deleted once evaluated. ``OUT_DIR``
gets ``sweep.json`` (every point), ``sweep.md`` (the gap table) and ``sweep.png`` (the
gap per task against the budget, one line per capacity; ``report.py``), all three
rewritten as runs finish, so a sweep cut short keeps what it measured. Run again into the
same ``OUT_DIR`` with the same recipe (more budgets or seeds allowed), a sweep keeps the
points it finds there and runs only the missing cells; given a kept ``--work-dir``, it
reuses the bases that finished pretraining there too.

    python -m pfs_sglang.train sweep OUT_DIR [--device cuda|cpu] [--quick] [--workers N] [--deadline-min M]

``--device cpu`` runs ``CPU_GRID``; ``--device cuda`` runs ``FULL_GRID``, the same grid with the LoRA
arm (ii-LoRA) trained beside (i) and (ii) in every cell.

Nothing on this path imports SGLang, ZMQ or ``datasets``: it runs from a checkout with
torch, transformers, peft, accelerate, tqdm, matplotlib and safetensors installed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from pfs_sglang.models.demo import WEIGHTS_FILE
from pfs_sglang.train.corpus import TASKS, CorpusSizes, write_corpus
from pfs_sglang.train.replicate import ARMS, REPLICATION_SHAPE, Arm, Base, ReplicationConfig, pretrain_base, train_task
from pfs_sglang.train.report import SweepPoint, write_sweep_report


@dataclass(frozen=True)
class Capacity:
    """A base's size: ``layers`` x ``hidden`` (head_dim 16, half as many KV heads), and its learning rates."""

    layers: int
    hidden: int
    pretrain_lr: float
    task_lr: float

    @property
    def label(self) -> str:
        return f"{self.layers}L h{self.hidden}"

    @property
    def dir_name(self) -> str:
        return f"{self.layers}L_h{self.hidden}"

    def config(self, out_dir: Path, grid: SweepGrid, device: str, budget: int) -> ReplicationConfig:
        heads = max(1, self.hidden // REPLICATION_SHAPE.head_dim)
        shape = replace(REPLICATION_SHAPE, num_layers=self.layers, hidden_size=self.hidden,
                        intermediate_size=3 * self.hidden, num_heads=heads, num_kv_heads=max(1, heads // 2))
        return ReplicationConfig(out_dir=out_dir, seeds=grid.seeds, tasks=grid.tasks, arms=grid.arms,
                                 sizes=grid.sizes, shape=shape, pretrain_steps=grid.pretrain_steps,
                                 pretrain_lr=self.pretrain_lr, task_steps=budget, task_lr=self.task_lr,
                                 pretrain_batch_size=grid.pretrain_batch_size, batch_size=grid.batch_size,
                                 device=device)


@dataclass(frozen=True)
class SweepGrid:
    capacities: tuple[Capacity, ...]
    budgets: tuple[int, ...]  # training steps of every task model
    seeds: tuple[int, ...]
    tasks: tuple[str, ...] = TASKS
    pretrain_steps: int = 3000
    pretrain_batch_size: int = 32
    batch_size: int = 32  # of the task models
    sizes: CorpusSizes = CorpusSizes()
    arms: tuple[Arm, ...] = ("full_ft", "prefillshare")  # the trained arms (replicate.ARMS)


# The grid for a CPU (one worker, one thread): the replication's recipe (bases 2500 steps at batch
# 32, task models at batch 16, the replication's corpus sizes) around its base (4 layers, hidden
# 64), with a smaller and a larger one. The replication's table is this grid's 800-step point of
# the 4-layer base. On a small CPU box the 6-layer base takes the longest to pretrain (timings:
# docs/replication/sweep-cpu/NOTE.md); keep the scratch directory (``--work-dir``) and a sweep
# run again reuses it.
CPU_GRID = SweepGrid(
    capacities=(Capacity(2, 32, 3e-3, 3e-3), Capacity(4, 64, 3e-3, 3e-3), Capacity(6, 96, 2e-3, 2e-3)),
    budgets=(100, 300, 800),
    seeds=(0, 1),
    pretrain_steps=2500,
    pretrain_batch_size=32,
    batch_size=16,
)
# The grid for a GPU: the CPU grid's recipe and bases (so its cells compare with the CPU's one to
# one), and the LoRA arm (the replication's recipe, ``LORA_RECIPE``, at its multiple of each cell's
# budget) beside (i) and (ii). Trainings run in worker processes; on a GPU each one is bound by its
# launch overhead at these sizes.
FULL_GRID = replace(CPU_GRID, arms=ARMS)
# A smoke test of the whole path on a CPU (a minute or two).
QUICK_GRID = SweepGrid(
    capacities=(Capacity(1, 32, 3e-3, 1e-3), Capacity(2, 32, 3e-3, 1e-3)),
    budgets=(5, 10),
    seeds=(0,),
    tasks=("extract", "compare"),
    pretrain_steps=10,
    pretrain_batch_size=8,
    batch_size=8,
    sizes=CorpusSizes(pretrain=200, train_per_task=100, test_per_task=16),
)


@dataclass(frozen=True)
class SweepConfig:
    out_dir: Path
    grid: SweepGrid = FULL_GRID
    device: Literal["cpu", "cuda"] = "cuda"
    workers: int = 1
    work_dir: Path | None = None  # scratch for corpora and models (default: a temporary directory)
    deadline_s: float | None = None  # start no run after this many seconds (running ones finish)


@dataclass(frozen=True)
class TaskJob:
    capacity: Capacity
    budget: int
    seed: int
    task: str

    def order(self, grid: SweepGrid) -> tuple[int, float]:
        """Seed by seed, the largest runs first: a sweep cut short has whole grids and its largest runs."""
        return grid.seeds.index(self.seed), -self.budget * self.capacity.layers * self.capacity.hidden


def _base_job(config: ReplicationConfig) -> Base:
    """Pretrain the base, or take the one a kept ``--work-dir`` holds from an earlier, cut-short sweep.

    A base's weights are written once, when its pretraining ends, so their presence means it finished.
    """
    out = Path(config.out_dir)
    if (out / "models" / "base" / WEIGHTS_FILE).is_file():
        return Base(write_corpus(out / "corpus", seed=config.corpus_seed, sizes=config.sizes), out / "models" / "base")
    return pretrain_base(config)


def _task_job(config: ReplicationConfig, base: Base, job: TaskJob) -> SweepPoint:
    result = train_task(config, base, job.seed, job.task)
    for path in result.models.values():
        shutil.rmtree(path, ignore_errors=True)
    accuracies = {accuracy.setting: accuracy.value for accuracy in result.accuracies}
    return SweepPoint(capacity=job.capacity.label, layers=job.capacity.layers, hidden=job.capacity.hidden,
                      budget=job.budget, seed=job.seed, task=job.task, accuracies=accuracies)


@contextmanager
def _quiet_workers():
    """Worker processes inherit TQDM_DISABLE (their Trainer and eval bars would interleave)."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = previous


def _grid_fields(grid: SweepGrid) -> dict:
    """The grid as ``sweep.json`` holds it (plain JSON values)."""
    return json.loads(json.dumps(asdict(grid), default=str))


def _write(config: SweepConfig, points: list[SweepPoint], started: float, jobs: int, final: bool) -> None:
    grid = config.grid
    machine = torch.cuda.get_device_name() if config.device == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    wall = time.monotonic() - started
    summary = {"device": machine, "workers": config.workers, "wall_seconds": wall,
               "complete": final and len(points) == jobs, "jobs_done": len(points), "jobs": jobs,
               "grid": _grid_fields(grid), "points": [asdict(point) for point in points]}
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    preamble = (
        "# Sweep: the (i) - (ii) gap against base capacity and training budget\n\n"
        f"Held-out exact match (%) of (i) full fine-tuning (own KV) and (ii) PrefillShare (base KV + decode "
        f"module), both trained for the budget's steps (batch {grid.batch_size}) from the same base; bases "
        f"pretrained {grid.pretrain_steps} steps at batch {grid.pretrain_batch_size}; mean over seeds "
        f"{list(grid.seeds)}, {grid.sizes.test_per_task} held-out examples per task. {len(points)} of {jobs} runs"
        f"{'' if final else ' (so far)'}; wall time {wall / 60:.1f} min on {machine}, "
        f"{config.workers} worker process(es).\n"
    )
    write_sweep_report(points, list(grid.tasks), config.out_dir, preamble)


_CELL_FIELDS = ("budgets", "seeds", "tasks")  # which cells a grid has, not how each is trained


def _recipe(grid_fields: dict) -> dict:
    """What a point's figures depend on besides its own cell: runs that agree here may share points."""
    return {name: value for name, value in grid_fields.items() if name not in _CELL_FIELDS}


def _kept_points(config: SweepConfig) -> list[SweepPoint]:
    """The points an earlier run of the same recipe left in ``OUT_DIR/sweep.json`` (none if it differs)."""
    path = config.out_dir / "sweep.json"
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    earlier["grid"].setdefault("arms", ["full_ft", "prefillshare"])  # written before grids named their arms
    if _recipe(earlier["grid"]) != _recipe(_grid_fields(config.grid)):
        return []
    return [SweepPoint(**point) for point in earlier["points"]]


def _run(config: SweepConfig, work: Path, started: float) -> list[SweepPoint]:
    """Pretrain every base, then run every task job on it; the points in the order they finished.

    Points an earlier run of the same recipe wrote to ``OUT_DIR`` are kept and their runs skipped,
    so a sweep cut short, or one given more budgets or seeds, runs only what is missing.
    """
    grid = config.grid
    task_jobs = [TaskJob(capacity, budget, seed, task) for capacity in grid.capacities
                 for budget in grid.budgets for seed in grid.seeds for task in grid.tasks]
    cells = {(job.capacity.label, job.budget, job.seed, job.task) for job in task_jobs}
    points = [point for point in _kept_points(config) if (point.capacity, point.budget, point.seed, point.task) in cells]
    done = {(point.capacity, point.budget, point.seed, point.task) for point in points}
    task_jobs = [job for job in task_jobs if (job.capacity.label, job.budget, job.seed, job.task) not in done]
    base_configs = {capacity: capacity.config(work / capacity.dir_name, grid, config.device, 0)
                    for capacity in grid.capacities if any(job.capacity == capacity for job in task_jobs)}
    jobs = len(points) + len(task_jobs)
    ready: list[tuple[TaskJob, ReplicationConfig, Base]] = []  # runs whose base is trained, in TaskJob.order
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with _quiet_workers(), ProcessPoolExecutor(config.workers, mp_context=context) as pool, \
            tqdm(total=len(base_configs) + len(task_jobs), desc="sweep (bases, then runs)", unit="job") as bar:
        running: dict[Future, Capacity | TaskJob] = {
            pool.submit(_base_job, base_config): capacity
            for capacity, base_config in sorted(base_configs.items(), key=lambda item: -item[0].layers * item[0].hidden)
        }
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                item = running.pop(future)
                if isinstance(item, Capacity):
                    ready += [(job, item.config(work / item.dir_name / f"budget{job.budget}", grid, config.device,
                                                job.budget), future.result())
                              for job in task_jobs if job.capacity == item]
                    ready.sort(key=lambda entry: entry[0].order(grid))
                    bar.set_postfix_str(f"base {item.label} ready")
                else:
                    point = future.result()
                    points.append(point)
                    bar.set_postfix_str(f"{point.capacity}, {point.budget} steps, {point.task}, seed {point.seed}: "
                                        f"gap {100 * point.gap:+.1f}")
                    _write(config, points, started, jobs, final=False)
                bar.update(1)
            in_time = config.deadline_s is None or time.monotonic() - started < config.deadline_s
            while ready and len(running) < config.workers and in_time:
                job, job_config, base = ready.pop(0)
                running[pool.submit(_task_job, job_config, base, job)] = job
    _write(config, points, started, jobs, final=True)
    return points


def sweep(config: SweepConfig) -> list[SweepPoint]:
    """Run the grid; write ``sweep.json``, ``sweep.md`` and ``sweep.png`` as points arrive."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    started = time.monotonic()
    work = Path(config.work_dir or tempfile.mkdtemp(prefix="pfs_sweep-"))
    try:
        return _run(config, work, started)
    finally:
        if config.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
