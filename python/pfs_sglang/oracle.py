"""The greedy-output oracle of invariant 5, in plain transformers.

For a decode model, the reference continuation of a prompt is: the base model (the
prefill module) computes the KV of ``prompt[:-1]``; the decode model runs
``prompt[-1]`` on that KV and then greedily generates on its own KV. With the base as
its own decode model this is ordinary greedy generation. Served greedy output must
equal this token for token (float32 on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=8)
def load_causal_lm(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


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
) -> GreedyReference:
    """Greedy continuation: base KV for ``prompt[:-1]``, decode model from ``prompt[-1]``."""
    if len(prompt_ids) < 1:
        raise ValueError("the prompt must hold at least one token")
    base, decode = load_causal_lm(str(base_dir)), load_causal_lm(str(decode_dir))
    past = None
    if len(prompt_ids) > 1:
        past = base(torch.tensor([prompt_ids[:-1]]), use_cache=True).past_key_values
    next_input = torch.tensor([prompt_ids[-1:]])
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
