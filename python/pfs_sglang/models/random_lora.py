"""Random-weight LoRA decode modules of a base: what the tests and the benchmark serve when no trained adapter exists.

``random_lora_adapter`` writes a PEFT LoRA adapter of ``base`` (rank 8 on every
projection) with random weights scaled up, so the tokens an adapter computes differ
visibly from the base's, plus the decode-module record of the base's fingerprint
(invariant 4) that the launcher checks, as ``python -m pfs_sglang.train --mode lora``
writes it for a trained one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pfs_sglang.identity import fingerprint_of, token_sequence_of, write_decode_module_record
from pfs_sglang.identity.compat import PREFILL_TOKEN_SEQUENCE

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


def random_lora_adapter(base: Path, out: Path, seed: int, rank: int = 8, scale: float = 3.0) -> Path:
    """A LoRA decode module of ``base`` at ``out`` with seeded random weights times ``scale`` (its record says so)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, out = Path(base), Path(out)
    config = json.loads((base / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=dtype),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS),
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_" in name:
                weight.mul_(scale)
    model.save_pretrained(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(base)}))
    for name in BASE_FILES:
        if (base / name).exists():
            shutil.copy2(base / name, out / name)
    write_decode_module_record(out, fingerprint_of(base), {"trained_by": "random weights",
                                                          PREFILL_TOKEN_SEQUENCE: token_sequence_of(base)})
    return out
