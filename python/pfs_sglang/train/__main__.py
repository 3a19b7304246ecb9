"""CLI of cache-conditioned fine-tuning (see ``pfs_sglang.train``).

    python -m pfs_sglang.train [finetune] --base BASE --data DATA.jsonl --out OUT [--mode full|lora] ...
    python -m pfs_sglang.train eval DATA.jsonl --model M [--prefill BASE]
    python -m pfs_sglang.train eval DATA.jsonl --base BASE --full-ft F --decode-module D
    python -m pfs_sglang.train eval DATA.jsonl --url URL --served-model NAME [--api-key KEY]
    python -m pfs_sglang.train replicate OUT_DIR [--seeds 0 1] [--report-dir DIR] [--export-demo DIR] [--served]
    python -m pfs_sglang.train sweep OUT_DIR [--device cuda|cpu] [--quick] [--workers N] [--budgets ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pfs_sglang.train.corpus import TASKS
from pfs_sglang.train.replicate import ARMS
from pfs_sglang.train.trainer import LORA_RECIPE, LORA_TARGETS

FULL_LR = 1e-4  # --mode full's default learning rate

COMMANDS = ("finetune", "eval", "replicate", "sweep")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="the base model (prefill module) dir")
    parser.add_argument("--data", required=True, type=Path, help="JSONL: chat 'messages' or 'prompt'/'completion'")
    parser.add_argument("--out", required=True, type=Path, help="where the trained model is written")
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--objective", choices=("prefillshare", "own-kv", "lm"), default="prefillshare",
                        help="prefillshare: cache-conditioned on the frozen base (a decode module); "
                             "own-kv: ordinary fine-tuning (baselines); lm: language modelling over whole "
                             "rows, prompt included (pretraining)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default: {FULL_LR} for --mode full, {LORA_RECIPE.learning_rate} for "
                             "--mode lora)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512, help="longer rows are dropped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay float32)")
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--lora-rank", type=int, default=LORA_RECIPE.rank)
    parser.add_argument("--lora-alpha", type=int, default=LORA_RECIPE.alpha)
    parser.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS),
                        help="the modules LoRA adapts (default: every linear projection); add lm_head as the "
                             "replication's recipe does when answers use tokens the base never emits")
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps under OUT/checkpoints")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT/checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run_finetune(args: argparse.Namespace) -> int:
    from pfs_sglang.train.trainer import FinetuneConfig, finetune

    default_lr = LORA_RECIPE.learning_rate if args.mode == "lora" else FULL_LR
    result = finetune(FinetuneConfig(
        base=args.base, data=args.data, out_dir=args.out, mode=args.mode, objective=args.objective,
        learning_rate=default_lr if args.lr is None else args.lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length, seed=args.seed,
        bf16=args.bf16, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets), save_steps=args.save_steps,
        logging_steps=args.logging_steps, resume=args.resume,
    ))
    print(f"wrote {result.out_dir} ({result.steps} steps, mean loss {result.final_loss:.4f})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from pfs_sglang.train.evaluate import evaluate_settings, exact_match

    offline = [flag for flag, value in (("--model", args.model), ("--prefill", args.prefill), ("--base", args.base),
                                        ("--full-ft", args.full_ft), ("--decode-module", args.decode_module))
               if value is not None]
    if args.url is not None:
        if args.served_model is None or offline:
            print("eval --url needs --served-model and none of the offline flags "
                  f"({', '.join(offline) or '--model, --prefill, ...'}: evaluate those without --url)", file=sys.stderr)
            return 2
        from pfs_sglang.train.served_eval import ServedEvalError, ServedModel, served_exact_match

        try:
            results = {"served": served_exact_match(ServedModel(args.url.rstrip("/"), args.served_model, args.api_key),
                                                    args.data, args.tokenizer, args.max_new_tokens, args.concurrency)}
        except ServedEvalError as error:
            print(f"eval --url: {error}", file=sys.stderr)
            return 1
    elif args.served_model is not None or args.api_key is not None:
        print("--served-model and --api-key go with --url (the deployment to evaluate)", file=sys.stderr)
        return 2
    elif args.model is not None:
        results = {"model": exact_match(args.model, args.data, args.prefill, args.batch_size, args.max_new_tokens)}
    elif None not in (args.base, args.full_ft, args.decode_module):
        results = evaluate_settings(args.base, args.data, args.full_ft, {"prefillshare": args.decode_module},
                                    args.batch_size, args.max_new_tokens)
    else:
        print("eval needs --model, or all of --base, --full-ft and --decode-module", file=sys.stderr)
        return 2
    for setting, result in results.items():
        print(json.dumps({"setting": setting, "accuracy": result.accuracy, "correct": result.correct,
                          "total": result.total, "model": result.model, "prompt_kv_from": result.prefill,
                          "mistakes": result.mistakes[:3]}))
    return 0


def run_replicate(args: argparse.Namespace) -> int:
    from pfs_sglang.train.replicate import ReplicationConfig, export_demo_models, replicate

    config = ReplicationConfig(out_dir=args.out_dir)
    config = replace(config, seeds=tuple(args.seeds or config.seeds), tasks=tuple(args.tasks or config.tasks),
                     arms=tuple(args.arms or config.arms), threads=args.threads or config.threads,
                     pretrain_steps=args.pretrain_steps or config.pretrain_steps,
                     task_steps=args.task_steps or config.task_steps, report_dir=args.report_dir,
                     lora_steps=args.lora_steps or config.lora_steps,
                     lora_targets=tuple(args.lora_targets or config.lora_targets), served=args.served)
    result = replicate(config)
    print((args.out_dir / "results.md").read_text())
    if args.export_demo is not None:
        print(f"demo models exported to {export_demo_models(result, args.export_demo)}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from pfs_sglang.train.sweep import CPU_GRID, FULL_GRID, QUICK_GRID, SweepConfig, sweep

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = QUICK_GRID if args.quick else FULL_GRID if device == "cuda" else CPU_GRID
    grid = replace(grid, seeds=tuple(args.seeds or grid.seeds), budgets=tuple(args.budgets or grid.budgets),
                   pretrain_steps=args.pretrain_steps or grid.pretrain_steps)
    workers = args.workers or (min(12, max(1, (os.cpu_count() or 2) - 2)) if device == "cuda" else 1)
    deadline = 60 * args.deadline_min if args.deadline_min else None
    sweep(SweepConfig(out_dir=args.out_dir, grid=grid, device=device, workers=workers, work_dir=args.work_dir,
                      deadline_s=deadline))
    print((args.out_dir / "sweep.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "finetune")
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_finetune_arguments(commands.add_parser("finetune", help="train a decode module (the default command)"))

    evaluate = commands.add_parser("eval", help="held-out exact-match accuracy")
    evaluate.add_argument("data", type=Path)
    evaluate.add_argument("--model", type=Path, help="the model to evaluate (full checkpoint or LoRA adapter)")
    evaluate.add_argument("--prefill", type=Path, help="compute prompt[:-1] KV with this model (default: --model)")
    evaluate.add_argument("--base", type=Path, help="three-way evaluation: the base (prefill module)")
    evaluate.add_argument("--full-ft", type=Path, help="three-way evaluation: the fully fine-tuned model")
    evaluate.add_argument("--decode-module", type=Path, help="three-way evaluation: the PrefillShare decode module")
    evaluate.add_argument("--url", help="evaluate through a running deployment (its router's URL) instead of offline")
    evaluate.add_argument("--served-model", help="with --url: the decode model's name there")
    evaluate.add_argument("--api-key", help="with --url: the deployment's API key")
    evaluate.add_argument("--tokenizer", type=Path, help="with --url: the base's tokenizer dir (default: the one the "
                                                         "model's decode server loaded, if it is on this machine)")
    evaluate.add_argument("--concurrency", type=int, default=8, help="with --url: requests in flight at once")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--max-new-tokens", type=int, default=16)
    evaluate.add_argument("--threads", type=int, default=None)

    rep = commands.add_parser("replicate", help="the small-scale replication (corpus, base, tasks, table)")
    rep.add_argument("out_dir", type=Path)
    rep.add_argument("--seeds", type=int, nargs="+")
    rep.add_argument("--tasks", nargs="+", choices=TASKS)
    rep.add_argument("--arms", nargs="+", choices=ARMS, help="the trained arms (default: all)")
    rep.add_argument("--pretrain-steps", type=int)
    rep.add_argument("--task-steps", type=int)
    rep.add_argument("--lora-steps", type=int, help="the LoRA arm's budget (default: the recipe's multiple of "
                                                            "--task-steps)")
    rep.add_argument("--lora-targets", nargs="+", help="the LoRA arm's target modules (default: the recipe's)")
    rep.add_argument("--threads", type=int)
    rep.add_argument("--report-dir", type=Path, help="also write results.md and results.png here")
    rep.add_argument("--export-demo", type=Path, help="copy base + first-seed decode modules here (demo assets)")
    rep.add_argument("--served", action="store_true", help="also score the PrefillShare arms through deployments "
                                                           "(full-weight: PD, LoRA: unified) beside the offline scores")

    swp = commands.add_parser("sweep", help="the (i)-(ii) gap against base capacity and training budget")
    swp.add_argument("out_dir", type=Path, help="gets sweep.json, sweep.md and sweep.png")
    swp.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    swp.add_argument("--quick", action="store_true", help="a tiny grid: a smoke test of the whole path")
    swp.add_argument("--workers", type=int, help="parallel training processes (default: 1 on CPU, "
                                                   "min(12, cores - 2) on CUDA)")
    swp.add_argument("--seeds", type=int, nargs="+")
    swp.add_argument("--budgets", type=int, nargs="+", help="training steps of the task models")
    swp.add_argument("--pretrain-steps", type=int)
    swp.add_argument("--deadline-min", type=float, help="start no run after this many minutes (the table says "
                                                         "how many of the grid's runs finished)")
    swp.add_argument("--work-dir", type=Path, help="keep corpora and bases here (default: a temporary dir, removed)")

    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    commands = {"finetune": run_finetune, "eval": run_eval, "replicate": run_replicate, "sweep": run_sweep}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
