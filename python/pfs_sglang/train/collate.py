"""Batching for the prefill/decode split of invariant 2, with padding made harmless.

Each example becomes two segments: the *prefix* ``prompt[:-1]``, whose KV the prefill
module computes, and the *decode segment* ``prompt[-1] + completion[:-1]``, which the
decode module runs on top of that KV and which predicts ``completion`` token by token.
Prefixes are left-padded (so every prefix ends at the same column, right before its
decode segment) and decode segments right-padded. Positions count real tokens only, so
a padded row sees exactly the positions it would see alone; the attention mask hides
every pad from every query. Targets are ``-100`` (ignored) on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pfs_sglang.train.data import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SplitBatch:
    prefix_ids: torch.Tensor  # [B, P] prompt[:-1], left-padded
    prefix_mask: torch.Tensor  # [B, P] 1 on real tokens
    prefix_positions: torch.Tensor  # [B, P]
    decode_ids: torch.Tensor  # [B, D] prompt[-1] + completion[:-1], right-padded
    decode_mask: torch.Tensor  # [B, D]
    decode_positions: torch.Tensor  # [B, D] continue each row's prefix positions
    target_ids: torch.Tensor  # [B, D] the completion; IGNORE_INDEX on padding

    @property
    def full_mask(self) -> torch.Tensor:
        """Attention mask over prefix and decode segment together (what the decode forward sees)."""
        return torch.cat([self.prefix_mask, self.decode_mask], dim=1)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> "SplitBatch":
        return SplitBatch(**{name: tensor.to(device) for name, tensor in self.as_dict().items()})


def collate_split(examples: list[Example], pad_id: int) -> SplitBatch:
    prefixes = [example.prompt_ids[:-1] for example in examples]
    decodes = [example.prompt_ids[-1:] + example.completion_ids[:-1] for example in examples]
    targets = [example.completion_ids for example in examples]
    width_p, width_d = max(map(len, prefixes)), max(map(len, decodes))
    batch = len(examples)

    prefix_ids = torch.full((batch, width_p), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((batch, width_p), dtype=torch.long)
    decode_ids = torch.full((batch, width_d), pad_id, dtype=torch.long)
    decode_mask = torch.zeros((batch, width_d), dtype=torch.long)
    target_ids = torch.full((batch, width_d), IGNORE_INDEX, dtype=torch.long)
    for row, (prefix, decode, target) in enumerate(zip(prefixes, decodes, targets)):
        prefix_ids[row, width_p - len(prefix):] = torch.tensor(prefix)
        prefix_mask[row, width_p - len(prefix):] = 1
        decode_ids[row, : len(decode)] = torch.tensor(decode)
        decode_mask[row, : len(decode)] = 1
        target_ids[row, : len(target)] = torch.tensor(target)

    prefix_lengths = prefix_mask.sum(dim=1, keepdim=True)
    prefix_positions = (prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
    decode_positions = prefix_lengths + torch.arange(width_d).unsqueeze(0)
    return SplitBatch(prefix_ids, prefix_mask, prefix_positions, decode_ids, decode_mask,
                      decode_positions, target_ids)
