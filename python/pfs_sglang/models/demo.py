"""The embedded demo models: a tiny Llama base (the prefill module) and decode modules.

Everything is made here, deterministically from a seed, with no model hub: the
tokenizer (see ``tokenizer.py``), a randomly initialised Llama-architecture base
model, and decode modules of the same architecture whose weights are seeded
perturbations of the base. Each decode module records the base's fingerprint
(invariant 4). The models are small enough that the test suite serves several of
them at once on two CPU cores.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pfs_sglang.identity import fingerprint_of, write_decode_module_record
from pfs_sglang.models.tokenizer import BOS, EOS, PAD, build_tokenizer, save_tokenizer

DEMO_DECODE_MODULES = ("extract", "compute", "transform")
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class TinyLlamaShape:
    """Architecture of the demo models (float32: the oracle runs exact on CPU)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_positions: int = 2048
    rope_theta: float = 10000.0
    initializer_range: float = 0.1  # wider than the usual 0.02: clear, untied greedy logits


@dataclass(frozen=True)
class DemoModels:
    base: Path
    decode: dict[str, Path] = field(default_factory=dict)


def write_base_model(out_dir: str | Path, shape: TinyLlamaShape = TinyLlamaShape(), seed: int = 0) -> Path:
    """Write a randomly initialised tiny Llama with its tokenizer to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=shape.vocab_size, seed=seed)
    save_tokenizer(tokenizer, out_dir, max_length=shape.max_positions)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        initializer_range=shape.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_perturbed_decode_module(
    base_dir: str | Path, out_dir: str | Path, seed: int, relative_noise: float = 0.3
) -> Path:
    """A decode module: the base's files with every weight perturbed by seeded noise."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(base_dir, out_dir)
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(base_dir / WEIGHTS_FILE)
    perturbed = {}
    for name in sorted(weights):
        tensor = weights[name]
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        perturbed[name] = tensor + relative_noise * tensor.std() * noise
    save_file(perturbed, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    write_decode_module_record(out_dir, fingerprint_of(base_dir), {"trained_by": "seeded perturbation"})
    return out_dir


def write_demo_models(
    root: str | Path, seed: int = 0, decode_names: tuple[str, ...] = DEMO_DECODE_MODULES
) -> DemoModels:
    """Write the base model and one decode module per name under ``root``."""
    root = Path(root)
    base = write_base_model(root / "base", seed=seed)
    decode = {
        name: write_perturbed_decode_module(base, root / name, seed=seed + 1 + index)
        for index, name in enumerate(decode_names)
    }
    manifest = {"base": "base", "decode": {name: name for name in decode}, "seed": seed}
    (root / "demo_models.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return DemoModels(base=base, decode=decode)


def load_demo_models(root: str | Path) -> DemoModels:
    """Read the manifest written by :func:`write_demo_models`."""
    root = Path(root)
    manifest = json.loads((root / "demo_models.json").read_text())
    return DemoModels(
        base=root / manifest["base"],
        decode={name: root / rel for name, rel in manifest["decode"].items()},
    )
