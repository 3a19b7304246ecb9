"""Exact-match evaluation of a model on held-out JSONL, with the prompt KV from a chosen model.

Greedy generation with transformers' ``generate``. With ``prefill`` given, that model
computes the KV of ``prompt[:-1]`` and ``generate`` continues from it with the
evaluated model, which runs ``prompt[-1]`` and every generated token: the serving split
of invariant 2, and the greedy oracle of invariant 5 (``pfs_sglang.oracle``) batched.
Without ``prefill`` the model reads its own KV. The settings of the replication
(``evaluate_settings``):

- (i) full fine-tuning, own KV:           ``model=full_ft``
- (ii) PrefillShare, base KV:             ``model=decode_module, prefill=base``
  (a full decode module, or a LoRA one: ``prefillshare_lora``)
- (iii) naive reuse, base KV, no training: ``model=full_ft, prefill=base``
- the untuned base, for reference:        ``model=base``

``score_answers`` is the exact-match rule itself; the served evaluation
(``served_eval.py``, the same held-out set sent to a running deployment) scores its
answers with it, so both paths count the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from pfs_sglang.oracle import load_model
from pfs_sglang.train.collate import collate_split
from pfs_sglang.train.data import Example, load_examples
from pfs_sglang.train.objective import base_prefix_cache


@dataclass(frozen=True)
class EvalResult:
    model: str
    prefill: str  # whose KV the prompt was read from
    correct: int
    total: int
    mistakes: list[dict[str, str]] = field(default_factory=list)  # a few (prompt tail, expected, got)
    answers: list[str] = field(default_factory=list, repr=False)  # every example's answer, in the data's order

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    prefill: torch.nn.Module | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of every example's prompt."""
    answers = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", leave=False):
        batch = collate_split(examples[start:start + batch_size], tokenizer.pad_token_id).to(device)
        prompt_ids = torch.cat([batch.prefix_ids, batch.decode_ids[:, :1]], dim=1)
        prompt_mask = torch.cat([batch.prefix_mask, batch.decode_mask[:, :1]], dim=1)
        past = base_prefix_cache(prefill, batch) if prefill is not None else None
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            past_key_values=past,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers.extend(tokenizer.batch_decode(output[:, prompt_ids.shape[1]:], skip_special_tokens=True))
    return answers


def exact_match(
    model_dir: str | Path,
    data: str | Path,
    prefill_dir: str | Path | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Accuracy of ``model_dir`` on ``data``, reading prompt KV from ``prefill_dir`` if given."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(data, tokenizer)
    model = load_model(model_dir).to(device)
    prefill = load_model(prefill_dir).to(device) if prefill_dir is not None else None
    answers = greedy_answers(model, tokenizer, examples, prefill, batch_size, max_new_tokens)
    return score_answers(examples, answers, tokenizer, model=str(model_dir), prefill=str(prefill_dir or model_dir))


def score_answers(examples: list[Example], answers: list[str], tokenizer, model: str, prefill: str) -> EvalResult:
    """Exact match of each answer (whitespace stripped) against its example's, with the first few mistakes."""
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples")
    correct = 0
    mistakes = []
    for example, answer in zip(examples, answers):
        if answer.strip() == example.answer.strip():
            correct += 1
        elif len(mistakes) < 5:
            prompt_tail = tokenizer.decode(example.prompt_ids[-24:])
            mistakes.append({"prompt_tail": prompt_tail, "expected": example.answer, "got": answer})
    return EvalResult(model=model, prefill=prefill, correct=correct, total=len(examples), mistakes=mistakes,
                      answers=list(answers))


SETTINGS = ("full_ft", "prefillshare", "prefillshare_lora", "naive_reuse", "base")


def evaluate_settings(base_dir: str | Path, data: str | Path, full_ft_dir: str | Path | None = None,
                      decode_dirs: dict[str, str | Path] | None = None, batch_size: int = 64,
                      max_new_tokens: int = 16, device: torch.device | str = "cpu") -> dict[str, EvalResult]:
    """The settings of the module docstring that the given models allow, in ``SETTINGS`` order.

    ``decode_dirs`` maps a setting (``prefillshare``, ``prefillshare_lora``) to its decode
    module; ``full_ft_dir`` gives settings (i) and (iii); the base is always evaluated.
    """
    runs: dict[str, tuple[str | Path, str | Path | None]] = {"base": (base_dir, None)}
    if full_ft_dir is not None:
        runs["full_ft"] = (full_ft_dir, None)
        runs["naive_reuse"] = (full_ft_dir, base_dir)
    for setting, decode_dir in (decode_dirs or {}).items():
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; settings are {SETTINGS}")
        runs[setting] = (decode_dir, base_dir)
    return {setting: exact_match(runs[setting][0], data, runs[setting][1], batch_size, max_new_tokens, device)
            for setting in SETTINGS if setting in runs}
