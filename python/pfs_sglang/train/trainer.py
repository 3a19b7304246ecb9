"""Fine-tuning with transformers' Trainer: cache-conditioned (PrefillShare) or own-KV.

``finetune`` trains a copy of the base model, fully or as a PEFT LoRA adapter, with
one of two objectives (see ``objective.py``):

- ``prefillshare``: cache-conditioned fine-tuning (invariant 2). The frozen base
  computes the prompt KV; the trained model is a *decode module* and its output records
  the base's fingerprint (invariant 4), so the identity check and the launcher accept it.
- ``own-kv``: ordinary fine-tuning, the model computes its own prompt KV. Used for the
  full fine-tuning baseline. Its output is not a decode module and gets no record: the
  launcher refuses it as one.
- ``lm``: language modelling over whole rows (the loss covers the prompt's tokens too);
  pretrains the replication's base. Not a decode module either.

The loop, optimizer, schedule, gradient accumulation, bf16 autocast, checkpoints and
resume are the Trainer's; this module supplies the loss and writes the outputs.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ProgressCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from pfs_sglang.identity import fingerprint_of, token_sequence_of, write_decode_module_record
from pfs_sglang.identity.compat import PREFILL_TOKEN_SEQUENCE
from pfs_sglang.train.collate import SplitBatch, collate_split
from pfs_sglang.train.data import Example, load_examples
from pfs_sglang.train.objective import (
    cache_conditioned_logits,
    completion_loss,
    language_model_logits,
    language_model_targets,
    own_kv_logits,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What else decides the token sequence (pfs_sglang.identity.token_sequence), copied when the base has it.
TOKEN_SEQUENCE_FILES = ("chat_template.jinja", "chat_template.json", "generation_config.json")
Objective = Literal["prefillshare", "own-kv", "lm"]
Mode = Literal["full", "lora"]
# Every linear projection of a Llama block: what SGLang's multi-LoRA serves on every backend,
# the CPU's (torch_native) included, and the default of ``--mode lora``.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraRecipe:
    """The replication's LoRA arm (docs/replication.md, "LoRA decode modules"): rank, alpha and
    learning rate are also ``--mode lora``'s defaults. Its targets add ``lm_head`` to the linear
    projections: a base's output row for a token it never emitted cannot be made the argmax by any
    hidden state, so only an adapter of the head can emit such a token (``--lora-targets`` adds it;
    the CPU LoRA backend does not serve an ``lm_head`` adapter yet, hence not the CLI's default)."""

    rank: int = 16
    alpha: int = 32
    learning_rate: float = 3e-3
    targets: tuple[str, ...] = LORA_TARGETS + ("lm_head",)
    budget_factor: int = 4  # its training steps, as a multiple of the full-weight arms' steps


LORA_RECIPE = LoraRecipe()


@dataclass(frozen=True)
class FinetuneConfig:
    base: Path  # the prefill module; the trained model starts from its weights too
    data: Path  # JSONL, see data.py
    out_dir: Path
    mode: Mode = "full"
    objective: Objective = "prefillshare"
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    bf16: bool = False
    warmup_ratio: float = 0.0  # fraction of the steps
    weight_decay: float = 0.0
    lora_rank: int = LORA_RECIPE.rank
    lora_alpha: int = LORA_RECIPE.alpha
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lr_scheduler: str = "cosine"  # transformers' lr_scheduler_type
    save_steps: int = 500
    logging_steps: int = 10
    resume: bool = False
    device: Literal["cpu", "cuda"] | None = None  # None: CUDA when available


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    steps: int
    final_loss: float  # mean training loss over the run


class LossInProgressBar(ProgressCallback):
    """The Trainer's tqdm bar, with the latest loss shown on the bar instead of printed lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")


class SplitTrainer(Trainer):
    """Trainer whose loss is the objective's loss of ``objective.py``.

    ``prefill_model`` is the frozen base for cache-conditioned training, or ``None``
    for own-KV and language-model training. The loss is a per-batch mean (the Trainer
    scales it for gradient accumulation).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: Objective, prefill_model: torch.nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.prefill_model = prefill_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = SplitBatch(**inputs)
        if self.objective == "lm":
            logits, targets = language_model_logits(model, batch), language_model_targets(batch)
        elif self.objective == "own-kv":
            logits, targets = own_kv_logits(model, batch), batch.target_ids
        else:
            logits, targets = cache_conditioned_logits(self.prefill_model, model, batch), batch.target_ids
        loss = completion_loss(logits, targets)
        return (loss, {"logits": logits}) if return_outputs else loss


def load_frozen(model_dir: Path, device: torch.device | str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    model.requires_grad_(False)
    return model


def trainable_model(config: FinetuneConfig) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32)
    if config.mode == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def training_arguments(config: FinetuneConfig) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(config.out_dir / "checkpoints"),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        use_cpu=config.device == "cpu" or not torch.cuda.is_available(),
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        save_only_model=False,
        remove_unused_columns=False,
        label_names=["target_ids"],
        report_to="none",
        dataloader_num_workers=0,
    )


def write_outputs(trainer: Trainer, config: FinetuneConfig, result: FinetuneResult) -> None:
    """Weights (full checkpoint or adapter); the base's tokenizer, chat template, generation
    config and config; and the record. The launcher refuses a decode module whose token
    sequence differs from the base's, so these are the base's own files, not re-saved ones."""
    out = config.out_dir
    # An adapter holds its LoRA matrices only, lm_head's included (PEFT would add the frozen head's weights).
    extra = {"save_embedding_layers": False} if config.mode == "lora" else {}
    trainer.model.save_pretrained(out, safe_serialization=True, **extra)
    for name in TOKENIZER_FILES:
        shutil.copy2(config.base / name, out / name)
    for name in TOKEN_SEQUENCE_FILES:
        if (config.base / name).is_file():
            shutil.copy2(config.base / name, out / name)
    if (config.base / "additional_chat_templates").is_dir():
        shutil.copytree(config.base / "additional_chat_templates", out / "additional_chat_templates",
                        dirs_exist_ok=True)
    if config.mode == "lora":
        # The adapter's dir also carries the base's config: the identity check reads the
        # KV shape from it, and the adapter only ever runs on that architecture.
        shutil.copy2(config.base / "config.json", out / "config.json")
    if config.objective == "prefillshare":
        extra = {
            "trained_by": "cache-conditioned fine-tuning (pfs_sglang.train)",
            "mode": config.mode,
            "dataset": config.data.name,
            "steps": result.steps,
            "seed": config.seed,
            PREFILL_TOKEN_SEQUENCE: token_sequence_of(config.base),
        }
        write_decode_module_record(out, fingerprint_of(config.base), extra)


def finetune(config: FinetuneConfig, examples: list[Example] | None = None) -> FinetuneResult:
    """Train per ``config`` and write the model to ``config.out_dir``."""
    # An absolute base path: a LoRA adapter names the base it applies to by this path.
    config = FinetuneConfig(**{**asdict(config), "base": Path(config.base).resolve(), "data": Path(config.data),
                               "out_dir": Path(config.out_dir)})
    tokenizer = AutoTokenizer.from_pretrained(config.base)
    if examples is None:
        examples = load_examples(config.data, tokenizer, max_length=config.max_length)
    args = training_arguments(config)
    prefill_model = load_frozen(config.base, args.device) if config.objective == "prefillshare" else None
    # The LoRA matrices are drawn when the adapter is made, before the Trainer seeds anything:
    # seed here, or their init depends on whatever ran before in the process.
    set_seed(config.seed)
    trainer = SplitTrainer(
        model=trainable_model(config),
        args=args,
        train_dataset=examples,
        data_collator=lambda rows: collate_split(rows, tokenizer.pad_token_id).as_dict(),
        objective=config.objective,
        prefill_model=prefill_model,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossInProgressBar)
    resume = config.resume and get_last_checkpoint(args.output_dir) is not None
    output = trainer.train(resume_from_checkpoint=True if resume else None)
    result = FinetuneResult(out_dir=config.out_dir, steps=output.global_step, final_loss=output.training_loss)
    write_outputs(trainer, config, result)
    return result
