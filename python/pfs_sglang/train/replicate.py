"""The small-scale replication of the PrefillShare accuracy claim, end to end, in one call.

Owns the pipeline, not its parts: write the synthetic corpus (``corpus.py``), pretrain
a tiny Llama base on it (own-KV objective), then for every seed and task train a full
fine-tuning baseline (own KV) and a PrefillShare decode module (cache-conditioned on
the frozen base, invariant 2), evaluate settings (i), (ii), (iii) of ``evaluate.py`` on
held-out data, and write ``results.json``, ``results.md`` and ``results.png``
(``report.py``). ``export_demo_models`` copies the base and the first seed's decode
modules to the package's demo assets (``pfs_sglang/models/assets``).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pfs_sglang.models.demo import TinyLlamaShape, write_base_model
from pfs_sglang.train.corpus import TASKS, CorpusSizes, tokenizer_text, write_corpus
from pfs_sglang.train.evaluate import three_ways
from pfs_sglang.train.report import Accuracy, write_report
from pfs_sglang.train.trainer import FinetuneConfig, finetune

# The demo shape, trained from a narrow init (the wide 0.1 init is for random demo weights).
# Four layers: the decode module computes only prompt[-1] onwards, so it needs depth to read
# the base's KV (two layers left PrefillShare far behind on `compute` in trial runs).
REPLICATION_SHAPE = TinyLlamaShape(num_layers=4, initializer_range=0.02)


@dataclass(frozen=True)
class ReplicationConfig:
    out_dir: Path
    seeds: tuple[int, ...] = (0, 1)  # fine-tuning seeds (the corpus and the base use corpus_seed)
    corpus_seed: int = 0
    sizes: CorpusSizes = CorpusSizes()
    shape: TinyLlamaShape = REPLICATION_SHAPE
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    task_steps: int = 1500
    task_lr: float = 1e-3
    batch_size: int = 32
    threads: int = 1  # torch intra-op threads (the replication is sized for 2 CPU cores)
    report_dir: Path | None = None  # also write results.md and results.png here (e.g. docs/replication)


@dataclass(frozen=True)
class ReplicationResult:
    out_dir: Path
    base: Path
    decode_modules: dict[int, dict[str, Path]]  # seed -> task -> PrefillShare decode module
    accuracies: list[Accuracy] = field(default_factory=list)
    wall_seconds: float = 0.0


def _train(config: ReplicationConfig, base: Path, data: Path, out_dir: Path, objective: str, seed: int,
           steps: int, lr: float) -> Path:
    finetune(FinetuneConfig(base=base, data=data, out_dir=out_dir, objective=objective, seed=seed,
                            max_steps=steps, learning_rate=lr, batch_size=config.batch_size,
                            warmup_ratio=0.05, save_steps=steps + 1, logging_steps=25))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # nothing to resume once finished
    return out_dir


def _preamble(config: ReplicationConfig, wall_seconds: float) -> str:
    shape = config.shape
    return (
        "# Small-scale replication: held-out exact match (%)\n\n"
        f"Tiny Llama ({shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_heads} heads / "
        f"{shape.num_kv_heads} KV heads, head_dim {shape.head_dim}, float32), base pretrained "
        f"{config.pretrain_steps} steps on the synthetic records; each task model fine-tuned "
        f"{config.task_steps} steps (batch {config.batch_size}, lr {config.task_lr}) from that base; "
        f"{config.sizes.train_per_task} training and {config.sizes.test_per_task} held-out examples per task. "
        f"Cells: mean over fine-tuning seeds {list(config.seeds)} (per-seed values in brackets). "
        f"Wall time {wall_seconds / 60:.1f} min on {config.threads} CPU thread(s) "
        f"({platform.processor() or platform.machine()}).\n"
    )


def replicate(config: ReplicationConfig) -> ReplicationResult:
    started = time.monotonic()
    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    corpus = write_corpus(out / "corpus", seed=config.corpus_seed, sizes=config.sizes)
    init = write_base_model(out / "models" / "init", config.shape, seed=config.corpus_seed,
                            tokenizer_text=tokenizer_text(config.corpus_seed))
    base = _train(config, init, corpus.pretrain, out / "models" / "base", "own-kv", config.corpus_seed,
                  config.pretrain_steps, config.pretrain_lr)
    decode_modules: dict[int, dict[str, Path]] = {}
    accuracies: list[Accuracy] = []
    for seed in config.seeds:
        decode_modules[seed] = {}
        for task in TASKS:
            seed_dir = out / "models" / f"seed{seed}"
            full_ft = _train(config, base, corpus.train[task], seed_dir / "full_ft" / task, "own-kv", seed,
                             config.task_steps, config.task_lr)
            decode = _train(config, base, corpus.train[task], seed_dir / "prefillshare" / task, "prefillshare",
                            seed, config.task_steps, config.task_lr)
            decode_modules[seed][task] = decode
            for setting, result in three_ways(base, full_ft, decode, corpus.test[task]).items():
                accuracies.append(Accuracy(seed, task, setting, result.correct, result.total))
                print(f"seed {seed} {task:9s} {setting:12s} {100 * result.accuracy:5.1f}%  {result.mistakes[:1]}")
    wall_seconds = time.monotonic() - started
    result = ReplicationResult(out, base, decode_modules, accuracies, wall_seconds)
    results = json.dumps({
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "wall_seconds": wall_seconds,
        "accuracies": [asdict(a) for a in accuracies],
    }, indent=2) + "\n"
    for report_dir in (out, config.report_dir):
        if report_dir is not None:
            write_report(accuracies, Path(report_dir), _preamble(config, wall_seconds))
            (Path(report_dir) / "results.json").write_text(results)
    return result


def export_demo_models(result: ReplicationResult, assets_dir: Path) -> Path:
    """Copy the base and the first seed's decode modules to ``assets_dir`` (the demo models)."""
    assets_dir = Path(assets_dir)
    if assets_dir.exists():
        shutil.rmtree(assets_dir)
    ignore = shutil.ignore_patterns("checkpoints")
    shutil.copytree(result.base, assets_dir / "base", ignore=ignore)
    first_seed = min(result.decode_modules)
    for task, path in result.decode_modules[first_seed].items():
        shutil.copytree(path, assets_dir / task, ignore=ignore)
    return assets_dir
