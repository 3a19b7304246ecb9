"""The training objectives: next-token loss on the completion (prompt KV from the base or the
model itself), or on whole rows.

``cache_conditioned_logits`` is invariant 2 as a forward pass: the frozen base (the
prefill module) computes the KV of ``prompt[:-1]`` without gradients, and the decode
module runs ``prompt[-1] + completion`` with that KV as its past (a ``DynamicCache``).
Only the decode module's own tokens get gradients, exactly the tokens it computes when
served. ``own_kv_logits`` is the usual fine-tuning forward, where the trained model
also computes the prompt KV itself (the full fine-tuning baseline).
``language_model_targets`` extends the own-KV forward's targets to the prompt: every
token predicts the next one (the language-modelling objective that pretrains the
replication's base over whole rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfs_sglang.train.collate import IGNORE_INDEX, SplitBatch


@torch.no_grad()
def base_prefix_cache(base: torch.nn.Module, batch: SplitBatch):
    """The prefill module's KV of every ``prompt[:-1]`` (a DynamicCache; no gradients)."""
    return base(
        input_ids=batch.prefix_ids,
        attention_mask=batch.prefix_mask,
        position_ids=batch.prefix_positions,
        use_cache=True,
        logits_to_keep=1,  # only the KV is used
    ).past_key_values


def cache_conditioned_logits(base: torch.nn.Module, decode: torch.nn.Module, batch: SplitBatch) -> torch.Tensor:
    """Decode-module logits over the decode segment, reading the base's prompt KV."""
    past = base_prefix_cache(base, batch)
    return decode(
        input_ids=batch.decode_ids,
        attention_mask=batch.full_mask,
        position_ids=batch.decode_positions,
        past_key_values=past,
        use_cache=True,
    ).logits


def language_model_logits(model: torch.nn.Module, batch: SplitBatch, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits over prompt and decode segment together (the model computes all of the KV);
    only over the last ``logits_to_keep`` positions if that is not 0."""
    return model(
        input_ids=torch.cat([batch.prefix_ids, batch.decode_ids], dim=1),
        attention_mask=batch.full_mask,
        position_ids=torch.cat([batch.prefix_positions, batch.decode_positions], dim=1),
        use_cache=False,
        logits_to_keep=logits_to_keep,
    ).logits


def own_kv_logits(model: torch.nn.Module, batch: SplitBatch) -> torch.Tensor:
    """Logits over the decode segment when ``model`` computes the prompt KV itself."""
    return language_model_logits(model, batch, logits_to_keep=batch.decode_ids.shape[1])


def language_model_targets(batch: SplitBatch) -> torch.Tensor:
    """Next-token targets of ``language_model_logits``: the prompt's next tokens, then the completion."""
    prefix_next = torch.cat([batch.prefix_ids[:, 1:], batch.decode_ids[:, :1]], dim=1)
    prefix_targets = prefix_next.masked_fill(batch.prefix_mask == 0, IGNORE_INDEX)
    return torch.cat([prefix_targets, batch.target_ids], dim=1)


def completion_loss(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ignored (already aligned with logits)."""
    return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), ignore_index=IGNORE_INDEX)
