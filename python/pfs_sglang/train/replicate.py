"""The small-scale replication of the PrefillShare accuracy claim, end to end, in one call.

Owns the pipeline, not its parts: write the synthetic corpus (``corpus.py``), pretrain
a tiny Llama base on it as a general model of the corpus (language modelling over its
records and a broad question mix, the tasks held out), then for every seed and task
train the arms from that base:

- ``full_ft``: full fine-tuning on its own KV (the baseline, setting (i));
- ``prefillshare``: a full decode module, cache-conditioned on the frozen base (ii);
- ``prefillshare_lora``: a LoRA decode module, cache-conditioned the same way (ii-LoRA);

evaluate every setting of ``evaluate.py`` on held-out data (naive reuse (iii) and the
untuned base need no training of their own), and write ``results.json``, ``results.md``
and ``results.png`` (``report.py``). ``pretrain_base`` and ``train_task`` are the
pipeline's two stages, which the sweep (``sweep.py``) runs over a grid.
With ``served`` (``replicate --served``), ``serve_arms`` then serves each seed's
PrefillShare arms as a user would deploy them (the full-weight decode modules on a PD
deployment, the LoRA ones on a unified one: ``pfs_sglang.launch``), sends them the same
held-out sets (``served_eval.py``) and records the served accuracy beside the offline
one, and whether every answer was the same (invariant 5: it must be).
``export_demo_models`` copies the base and the first seed's full and LoRA decode modules
of the demo tasks to the package's demo assets (``pfs_sglang/models/assets``).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from pfs_sglang.models.demo import (
    DEMO_DECODE_MODULES,
    DEMO_LORA_DECODE_MODULES,
    EMBEDDED_ADAPTER_BASE,
    TinyLlamaShape,
    install_lora_adapter,
    write_base_model,
)
from pfs_sglang.train.corpus import TASKS, CorpusFiles, CorpusSizes, tokenizer_text, write_corpus
from pfs_sglang.train.evaluate import evaluate_settings
from pfs_sglang.train.report import Accuracy, ServedAccuracy, write_report
from pfs_sglang.train.trainer import LORA_RECIPE, FinetuneConfig, finetune

# The demo shape, trained from a narrow init (the wide 0.1 init is for random demo weights).
# Four layers: the decode module computes only prompt[-1] onwards, so it needs depth to read
# the base's KV (two layers left PrefillShare far behind on `compute` in trial runs).
REPLICATION_SHAPE = TinyLlamaShape(num_layers=4, initializer_range=0.02)
ARMS = ("full_ft", "prefillshare", "prefillshare_lora")
Arm = Literal["full_ft", "prefillshare", "prefillshare_lora"]


@dataclass(frozen=True)
class ReplicationConfig:
    out_dir: Path
    seeds: tuple[int, ...] = (0, 1)  # fine-tuning seeds (the corpus and the base use corpus_seed)
    corpus_seed: int = 0
    tasks: tuple[str, ...] = TASKS
    arms: tuple[Arm, ...] = ARMS
    sizes: CorpusSizes = CorpusSizes()
    shape: TinyLlamaShape = REPLICATION_SHAPE
    pretrain_steps: int = 2500
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 32
    task_steps: int = 800  # every arm's budget
    task_lr: float = 3e-3  # full_ft and prefillshare
    # The LoRA arm's recipe (trainer.LORA_RECIPE) and budget: lora_steps, or by default the recipe's
    # multiple of task_steps (docs/replication.md, "LoRA decode modules").
    lora_lr: float = LORA_RECIPE.learning_rate
    lora_rank: int = LORA_RECIPE.rank
    lora_alpha: int = LORA_RECIPE.alpha
    lora_targets: tuple[str, ...] = LORA_RECIPE.targets
    lora_steps: int | None = None
    batch_size: int = 16  # of the task models
    threads: int = 1  # torch intra-op threads (the replication is sized for 2 CPU cores)
    device: Literal["cpu", "cuda"] | None = None  # None: CUDA when available
    report_dir: Path | None = None  # also write results.md and results.png here (e.g. docs/replication)
    served: bool = False  # also score the PrefillShare arms through deployments (serve_arms)

    @property
    def lora_budget(self) -> int:
        return self.lora_steps or LORA_RECIPE.budget_factor * self.task_steps

    @property
    def torch_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Base:
    """What ``pretrain_base`` leaves: the corpus files and the pretrained base (the prefill module)."""

    corpus: CorpusFiles
    model: Path


@dataclass(frozen=True)
class TaskResult:
    seed: int
    task: str
    models: dict[str, Path]  # arm -> trained model
    accuracies: list[Accuracy]
    mistakes: dict[str, list[dict[str, str]]]  # setting -> a mistake, if any (prompt tail, expected, got)
    answers: dict[str, list[str]] = field(default_factory=dict)  # setting -> every held-out answer


@dataclass(frozen=True)
class ReplicationResult:
    out_dir: Path
    base: Path
    tasks: list[TaskResult] = field(default_factory=list)
    wall_seconds: float = 0.0
    served: list[ServedAccuracy] = field(default_factory=list)

    @property
    def accuracies(self) -> list[Accuracy]:
        return [accuracy for task in self.tasks for accuracy in task.accuracies]


def _train(config: ReplicationConfig, base: Path, data: Path, out_dir: Path, seed: int, arm: Arm | None) -> Path:
    """Train one arm (``None``: pretrain the base) and drop its checkpoints (nothing to resume)."""
    if arm is None:
        settings = dict(objective="lm", mode="full", max_steps=config.pretrain_steps, learning_rate=config.pretrain_lr,
                        batch_size=config.pretrain_batch_size)
    else:
        lora = arm == "prefillshare_lora"
        settings = dict(objective="own-kv" if arm == "full_ft" else "prefillshare", mode="lora" if lora else "full",
                        max_steps=config.lora_budget if lora else config.task_steps,
                        learning_rate=config.lora_lr if lora else config.task_lr, batch_size=config.batch_size)
    steps = settings["max_steps"]
    finetune(FinetuneConfig(base=base, data=data, out_dir=out_dir, seed=seed, warmup_ratio=0.05, save_steps=steps + 1,
                            logging_steps=25, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                            lora_targets=config.lora_targets, device=config.device, **settings))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return out_dir


def pretrain_base(config: ReplicationConfig) -> Base:
    """Write the corpus and pretrain the base on it (``out_dir/corpus``, ``out_dir/models/base``)."""
    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    corpus = write_corpus(out / "corpus", seed=config.corpus_seed, sizes=config.sizes)
    init = write_base_model(out / "models" / "init", config.shape, seed=config.corpus_seed,
                            tokenizer_text=tokenizer_text(config.corpus_seed))
    return Base(corpus, _train(config, init, corpus.pretrain, out / "models" / "base", config.corpus_seed, None))


def train_task(config: ReplicationConfig, base: Base, seed: int, task: str) -> TaskResult:
    """Train every arm of ``config`` for one seed and task, and evaluate every setting they allow."""
    torch.set_num_threads(config.threads)
    seed_dir = Path(config.out_dir) / "models" / f"seed{seed}"
    models = {arm: _train(config, base.model, base.corpus.train[task], seed_dir / arm / task, seed, arm)
              for arm in config.arms}
    decode_dirs = {arm: path for arm, path in models.items() if arm != "full_ft"}
    results = evaluate_settings(base.model, base.corpus.test[task], models.get("full_ft"), decode_dirs,
                                batch_size=200, device=config.torch_device)
    accuracies = [Accuracy(seed, task, setting, result.correct, result.total) for setting, result in results.items()]
    mistakes = {setting: result.mistakes[:1] for setting, result in results.items()}
    answers = {setting: result.answers for setting, result in results.items()}
    return TaskResult(seed, task, models, accuracies, mistakes, answers)


# The shape a user would deploy each PrefillShare arm in (Topology.mode).
SERVED_ARMS = {"prefillshare": "pd", "prefillshare_lora": "unified"}


def _not_served(config: ReplicationConfig, setting: str) -> str:
    """Why ``setting`` cannot be served here, or ''."""
    if setting == "prefillshare_lora" and "lm_head" in config.lora_targets and config.torch_device == "cpu":
        return ("not served: SGLang's CPU LoRA backend (torch_native) builds no lm_head routing "
                "(only its chunked GPU backend does)")
    return ""


def serve_arms(config: ReplicationConfig, base: Base, tasks: list[TaskResult]) -> list[ServedAccuracy]:
    """Each seed's PrefillShare arms, every task's decode module in one deployment per arm
    (PD for the full-weight ones, unified for the LoRA ones), scored on the held-out sets."""
    from pfs_sglang.launch import DecodeModelSpec, Deployment, Topology
    from pfs_sglang.launch.processes import free_port
    from pfs_sglang.train.served_eval import ServedModel, served_exact_match

    rows = []
    for seed in config.seeds:
        for setting, mode in SERVED_ARMS.items():
            trained = [task for task in tasks if task.seed == seed and setting in task.models]
            offline = {task.task: next(a for a in task.accuracies if a.setting == setting) for task in trained}
            note = _not_served(config, setting)
            if not trained or note:
                rows += [ServedAccuracy(seed, task.task, setting, mode, offline[task.task].correct,
                                        offline[task.task].total, note=note) for task in trained]
                continue
            topology = Topology(
                base_model=base.model.resolve(), port=free_port(), mode=mode, device=config.torch_device,
                decode_models=tuple(DecodeModelSpec(task.task, task.models[setting].resolve()) for task in trained),
                log_dir=Path(config.out_dir).resolve() / "served" / f"seed{seed}-{mode}")
            with Deployment(topology) as deployment:
                for task in tqdm(trained, desc=f"served seed {seed} {setting}", unit="task"):
                    result = served_exact_match(ServedModel(deployment.url, task.task), base.corpus.test[task.task],
                                                tokenizer_dir=base.model)
                    rows.append(ServedAccuracy(seed, task.task, setting, mode, offline[task.task].correct,
                                               offline[task.task].total, result.correct,
                                               result.answers == task.answers[setting]))
                    tqdm.write(f"seed {seed} {task.task:9s} {setting:17s} served ({mode}) "
                               f"{100 * result.accuracy:5.1f}%, offline {100 * offline[task.task].value:5.1f}%, "
                               f"same answers: {rows[-1].same_answers}")
    return rows


def _preamble(config: ReplicationConfig, wall_seconds: float) -> str:
    shape = config.shape
    machine = f"{config.threads} CPU thread(s) ({platform.processor() or platform.machine()})" \
        if config.torch_device == "cpu" else torch.cuda.get_device_name()
    return (
        "# Small-scale replication: held-out exact match (%)\n\n"
        f"Tiny Llama ({shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_heads} heads / "
        f"{shape.num_kv_heads} KV heads, head_dim {shape.head_dim}, float32). Base pretrained "
        f"{config.pretrain_steps} steps at batch {config.pretrain_batch_size} (language modelling over "
        f"{config.sizes.pretrain} rows of records and general questions about them, the tasks held out); "
        f"each task model trained {config.task_steps} steps "
        f"(batch {config.batch_size}, lr {config.task_lr}) from that base, the LoRA arm "
        f"{config.lora_budget} steps (lr {config.lora_lr}, rank {config.lora_rank}, "
        f"alpha {config.lora_alpha}, on {', '.join(config.lora_targets)}); {config.sizes.train_per_task} "
        f"training and {config.sizes.test_per_task} held-out examples per task. Cells: mean over fine-tuning seeds {list(config.seeds)} (per-seed values in "
        f"brackets). Wall time {wall_seconds / 60:.1f} min on {machine}.\n"
    )


def write_results(config: ReplicationConfig, accuracies: list[Accuracy], wall_seconds: float,
                  served: list[ServedAccuracy] = ()) -> None:
    payload = {
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "wall_seconds": wall_seconds,
        "accuracies": [asdict(a) for a in accuracies],
    }
    if served:
        payload["served"] = [asdict(row) for row in served]
    results = json.dumps(payload, indent=2) + "\n"
    for report_dir in (config.out_dir, config.report_dir):
        if report_dir is not None:
            write_report(accuracies, Path(report_dir), _preamble(config, wall_seconds), served)
            (Path(report_dir) / "results.json").write_text(results)


def replicate(config: ReplicationConfig) -> ReplicationResult:
    started = time.monotonic()
    config = replace(config, out_dir=Path(config.out_dir))
    base = pretrain_base(config)
    jobs = [(seed, task) for seed in config.seeds for task in config.tasks]
    tasks = []
    for seed, task in tqdm(jobs, desc="seeds x tasks", unit="task"):
        tasks.append(train_task(config, base, seed, task))
        for accuracy in tasks[-1].accuracies:
            tqdm.write(f"seed {seed} {task:9s} {accuracy.setting:17s} {100 * accuracy.value:5.1f}%  "
                       f"{tasks[-1].mistakes[accuracy.setting]}")
    served = serve_arms(config, base, tasks) if config.served else []
    result = ReplicationResult(config.out_dir, base.model, tasks, time.monotonic() - started, served)
    write_results(config, result.accuracies, result.wall_seconds, served)
    return result


def export_demo_models(result: ReplicationResult, assets_dir: Path) -> Path:
    """Copy the base and the first seed's decode modules of the demo tasks to ``assets_dir``:
    the full ones (``prefillshare``) as ``<task>``, the LoRA ones (``prefillshare_lora``, when
    that arm was trained) as ``lora-<task>``. ``assets_dir`` is replaced as a whole."""
    assets_dir = Path(assets_dir)
    if assets_dir.exists():
        shutil.rmtree(assets_dir)
    ignore = shutil.ignore_patterns("checkpoints")
    shutil.copytree(result.base, assets_dir / "base", ignore=ignore)
    first_seed = min(task.seed for task in result.tasks)
    for task in result.tasks:
        if task.seed == first_seed and task.task in DEMO_DECODE_MODULES:
            shutil.copytree(task.models["prefillshare"], assets_dir / task.task, ignore=ignore)
            if "prefillshare_lora" in task.models:
                install_lora_adapter(task.models["prefillshare_lora"], assets_dir / DEMO_LORA_DECODE_MODULES[task.task],
                                     EMBEDDED_ADAPTER_BASE)
    return assets_dir
