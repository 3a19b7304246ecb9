"""The greedy-output oracle of invariant 5, in plain transformers.

For a decode model, the reference continuation of a prompt is: the base model (the
prefill module) computes the KV of ``prompt[:-1]``; the decode model runs
``prompt[-1]`` on that KV and then greedily generates on its own KV. With the base as
its own decode model this is ordinary greedy generation. Served greedy output must
equal this token for token (float32 on CPU).

Input logprobs follow the same split with ``k`` prompt tokens from the base
(invariant 2): :func:`prefillshare_input_logprobs` gives the decode model's logprob of
every prompt token it scores over the base KV of ``prompt[:k]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch


def load_model(model_dir: str | Path) -> torch.nn.Module:
    """A full checkpoint, or a PEFT LoRA adapter merged into the base it names, in float32.

    An adapter's relative base path is read from the adapter's dir when it names a dir
    there (the embedded demo adapters name their sibling ``../base``), else as given.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        if not Path(base_path).is_absolute() and (model_dir / base_path).is_dir():
            base_path = model_dir / base_path
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@lru_cache(maxsize=8)
def load_causal_lm(model_dir: str) -> torch.nn.Module:
    """``load_model``, loaded once per directory (do not modify the result)."""
    return load_model(model_dir)


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@dataclass(frozen=True)
class GreedyReference:
    output_ids: list[int]
    top2_margins: list[float]  # logit gap between the best and second-best token per step


@torch.no_grad()
def prefillshare_greedy(
    base_dir: str | Path,
    decode_dir: str | Path,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...] = (),
    prefill_len: int | None = None,
) -> GreedyReference:
    """Greedy continuation: base KV for ``prompt[:k]``, decode model from ``prompt[k]``
    (``k = prefill_len``, by default ``len - 1``; smaller where input logprobs start earlier)."""
    if len(prompt_ids) < 1:
        raise ValueError("the prompt must hold at least one token")
    k = len(prompt_ids) - 1 if prefill_len is None else prefill_len
    if not 0 <= k < len(prompt_ids):
        raise ValueError(f"prefill_len {k} outside [0, {len(prompt_ids)})")
    base, decode = load_causal_lm(str(base_dir)), load_causal_lm(str(decode_dir))
    past = None
    if k > 0:
        past = base(torch.tensor([prompt_ids[:k]]), use_cache=True).past_key_values
    next_input = torch.tensor([prompt_ids[k:]])
    output_ids: list[int] = []
    margins: list[float] = []
    for _ in range(max_new_tokens):
        out = decode(next_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        top2 = torch.topk(logits, 2)
        token = int(top2.indices[0])
        output_ids.append(token)
        margins.append(float(top2.values[0] - top2.values[1]))
        if token in stop_token_ids:
            break
        next_input = torch.tensor([[token]])
    return GreedyReference(output_ids=output_ids, top2_margins=margins)


@torch.no_grad()
def prefillshare_input_logprobs(
    base_dir: str | Path, decode_dir: str | Path, prompt_ids: list[int], prefill_len: int
) -> dict[int, float]:
    """``{i: log p(prompt[i] | prompt[:i])}`` for ``prefill_len < i < len(prompt)``.

    The base computes the KV of ``prompt[:prefill_len]``; the decode model runs
    ``prompt[prefill_len:]`` over it, and its logits at position ``i - 1`` score token ``i``.
    """
    if not 0 <= prefill_len < len(prompt_ids):
        raise ValueError(f"prefill_len {prefill_len} outside [0, {len(prompt_ids)})")
    base, decode = load_causal_lm(str(base_dir)), load_causal_lm(str(decode_dir))
    past = base(torch.tensor([prompt_ids[:prefill_len]]), use_cache=True).past_key_values if prefill_len else None
    logits = decode(torch.tensor([prompt_ids[prefill_len:]]), past_key_values=past, use_cache=True).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return {i: float(logprobs[i - 1 - prefill_len, prompt_ids[i]]) for i in range(prefill_len + 1, len(prompt_ids))}


# Logit gaps below this are near-ties: float reordering between batched serving and the
# single-sequence reference may flip them (seen on random-weight models, margin ~5e-4).
NEAR_TIE_MARGIN = 1e-3


def first_real_divergence(
    served_ids: list[int], reference: GreedyReference, near_tie_margin: float = NEAR_TIE_MARGIN
) -> int | None:
    """Index where served output departs from the reference at a clear margin, else None.

    Tokens are compared in order; the first difference ends the comparison (the two
    continuations are then conditioned on different text). A first difference where the
    reference's top-2 gap is below ``near_tie_margin`` is a near-tie, not a divergence.
    """
    for index, (served, expected) in enumerate(zip(served_ids, reference.output_ids)):
        if served != expected:
            return None if reference.top2_margins[index] < near_tie_margin else index
    if len(served_ids) != len(reference.output_ids):
        return min(len(served_ids), len(reference.output_ids))
    return None
