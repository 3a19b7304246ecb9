"""Model shapes the benchmark serves: the demo models, and random-weight Llama sets it writes.

- ``tiny``: the embedded demo models (``pfs_sglang.models.write_demo_models``): a 2-layer
  trained base and its three decode modules. For CI and for finding bugs; request
  overhead dominates on a CPU.
- ``small``: a random-weight float32 Llama (8 layers, hidden 512) written here, big
  enough that prefill compute dominates request overhead on a 2-core CPU.
- ``llama-8b``: Llama-3.1-8B's transformer dimensions (32 layers, hidden 4096, 32 query
  and 8 KV heads, FFN 14336, rope theta 500000) in bfloat16 with random weights, for GPU
  machines. Its vocabulary is the project's 512-token tokenizer instead of 128256 (the
  LM head runs on one position per prefill, so prefill cost is nearly unchanged).

Random-weight sets are one base (the prefill module) plus one decode module per model
name, each a seeded perturbation of the base that records the base's fingerprint in
``prefillshare.json`` (``write_perturbed_decode_module``), so the launcher's identity
check (invariant 4) accepts them. Written sets are cached under a directory and reused
when the manifest matches.

The LoRA systems (``pfs-unified``, ``sglang-lora``) serve each model name as a LoRA
adapter of the same base instead (``ModelSet.adapters``, written only when asked for):
the trained demo adapters for ``tiny`` (``write_demo_lora_adapters``), seeded
random-weight ones for the random shapes (``random_lora_adapter``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pfs_sglang.models import TinyLlamaShape, load_demo_models, write_demo_models
from pfs_sglang.models.demo import (
    DEMO_DECODE_MODULES,
    write_base_model,
    write_demo_lora_adapters,
    write_perturbed_decode_module,
)
from pfs_sglang.models.random_lora import random_lora_adapter

SHAPES = ("tiny", "small", "llama-8b")
MANIFEST = "bench_models.json"
LORA_MANIFEST = "bench_lora_adapters.json"

SMALL = TinyLlamaShape(vocab_size=512, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                       num_kv_heads=4, head_dim=64, max_positions=8192)
LLAMA_8B = TinyLlamaShape(vocab_size=512, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, max_positions=8192, rope_theta=500000.0,
                          initializer_range=0.02)
RANDOM_SHAPES = {"small": (SMALL, "float32"), "llama-8b": (LLAMA_8B, "bfloat16")}


@dataclass(frozen=True)
class ModelSet:
    """A base (prefill module) and named decode modules trained (or perturbed) against it;
    ``adapters``: the same names as LoRA adapters of the base (empty unless asked for)."""

    shape: str
    base: Path
    decode: dict[str, Path]
    adapters: dict[str, Path] = field(default_factory=dict)

    def kv_bytes_per_token(self) -> int:
        """KV bytes one prompt token takes in every layer (K and V)."""
        config = json.loads((self.base / "config.json").read_text())
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        width = 4 if dtype == "float32" else 2
        return 2 * config["num_hidden_layers"] * heads * head_dim * width


def default_model_names(shape: str) -> tuple[str, ...]:
    return DEMO_DECODE_MODULES if shape == "tiny" else ("planner", "actor", "critic")


def prepare_models(shape: str, names: tuple[str, ...], root: Path, seed: int = 0, lora: bool = False) -> ModelSet:
    """Write (or reuse) the models of ``shape`` with decode modules named ``names`` under ``root``;
    with ``lora`` also a LoRA adapter of the base per name."""
    models = _prepare_decode_modules(shape, names, root, seed)
    if not lora:
        return models
    if shape == "tiny":
        unknown = set(names) - set(DEMO_DECODE_MODULES)
        if unknown:
            raise ValueError(f"the tiny shape's LoRA adapters are the demo ones {DEMO_DECODE_MODULES}, not {sorted(unknown)}")
        return replace(models, adapters=write_demo_lora_adapters(models.base.parent, names, write_base=False).decode)
    return replace(models, adapters=_random_adapters(models.base, names, seed))


def _random_adapters(base: Path, names: tuple[str, ...], seed: int) -> dict[str, Path]:
    """Seeded random-weight LoRA adapters of ``base`` beside it (reused when their manifest matches)."""
    root = base.parent
    adapters = {name: root / f"lora-{name}" for name in names}
    wanted = {"seed": seed, "adapters": list(names)}
    manifest = root / LORA_MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return adapters
    for index, (name, path) in enumerate(adapters.items()):
        if path.exists():
            shutil.rmtree(path)
        random_lora_adapter(base, path, seed=seed + 101 + index)
    manifest.write_text(json.dumps(wanted, indent=2) + "\n")
    return adapters


def _prepare_decode_modules(shape: str, names: tuple[str, ...], root: Path, seed: int) -> ModelSet:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    root = Path(root) / shape
    if shape == "tiny":
        unknown = set(names) - set(DEMO_DECODE_MODULES)
        if unknown:
            raise ValueError(f"the tiny shape serves the demo models {DEMO_DECODE_MODULES}, not {sorted(unknown)}")
        demo = load_demo_models(root) if (root / "demo_models.json").exists() else None
        if demo is None or set(names) - set(demo.decode):
            demo = write_demo_models(root)
        return ModelSet(shape, demo.base, {name: demo.decode[name] for name in names})
    architecture, dtype = RANDOM_SHAPES[shape]
    wanted = {"shape": asdict(architecture), "dtype": dtype, "seed": seed, "decode": list(names)}
    manifest = root / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return ModelSet(shape, root / "base", {name: root / name for name in names})
    if root.exists():
        shutil.rmtree(root)
    base = write_base_model(root / "base", architecture, seed=seed)
    if dtype != "float32":
        _convert_dtype(base, dtype)
    decode = {name: write_perturbed_decode_module(base, root / name, seed=seed + 1 + index)
              for index, name in enumerate(names)}
    manifest.write_text(json.dumps(wanted, indent=2) + "\n")
    return ModelSet(shape, base, decode)


def _convert_dtype(model_dir: Path, dtype: str) -> None:
    """Store a written float32 checkpoint in ``dtype`` (weights and config), before it is fingerprinted."""
    import torch
    from safetensors.torch import load_file, save_file

    weights_path = model_dir / "model.safetensors"
    weights = {name: tensor.to(getattr(torch, dtype)) for name, tensor in load_file(weights_path).items()}
    save_file(weights, weights_path, metadata={"format": "pt"})
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"torch_dtype": dtype, "dtype": dtype})
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def describe(shape: str) -> str:
    if shape == "tiny":
        return "demo models (2 layers, hidden 64, float32, trained)"
    architecture, dtype = RANDOM_SHAPES[shape]
    return (f"random-weight Llama: {architecture.num_layers} layers, hidden {architecture.hidden_size}, "
            f"FFN {architecture.intermediate_size}, {architecture.num_heads} heads / {architecture.num_kv_heads} KV "
            f"heads x {architecture.head_dim}, vocab {architecture.vocab_size}, {dtype}")


