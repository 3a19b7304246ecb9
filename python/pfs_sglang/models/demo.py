"""The embedded demo models: a tiny trained Llama base (the prefill module) and decode modules.

The demo models are the output of the small-scale replication
(``python -m pfs_sglang.train replicate OUT --export-demo python/pfs_sglang/models/assets``):
a tiny float32 Llama pretrained on synthetic records, and three decode modules trained
by cache-conditioned fine-tuning against it (invariant 2), each recording the base's
fingerprint (invariant 4). They do different tasks over one shared record (see
``pfs_sglang.train.corpus`` for the chat format): ``extract`` a field, ``compute`` a sum,
``transform`` a field to upper case. The trained weights ship as package data under
``assets/`` (a few MB) and :func:`write_demo_models` copies them, so no model hub and
no training are needed. The models are small enough that the test suite serves several
of them at once on two CPU cores.

The same three tasks also ship as LoRA decode modules (``DEMO_LORA_DECODE_MODULES``,
``assets/lora-<task>``): PEFT adapters of the demo base (rank 16, alpha 32, on the
attention and MLP projections only, about 320 KB each), trained with the replication's
LoRA recipe (its ``prefillshare_lora`` arm: ``python -m pfs_sglang.train --mode lora``,
cache-conditioned on the embedded base, 800 steps at batch 16, lr 3e-3 with 5% warmup,
seed 0, the task data of the corpus of seed 0), each recording the base's fingerprint;
held-out exact match 96.5% (extract), 99.0% (compute), 96.0% (transform).
:func:`write_demo_lora_adapters` copies them beside a copy of the base (``--export-demo``
writes them too); SGLang's multi-LoRA serves them on a decode server holding the base's
weights.

:func:`write_base_model` writes a randomly initialised model of the same kind (the
replication starts from it) and :func:`write_perturbed_decode_module` a seeded
perturbation of a model (an untrained stand-in, e.g. a foreign base in tests).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pfs_sglang.identity import fingerprint_of, write_decode_module_record
from pfs_sglang.models.tokenizer import BOS, EOS, PAD, build_tokenizer, save_tokenizer

DEMO_DECODE_MODULES = ("extract", "compute", "transform")
DEMO_SEED = 0
ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = "model.safetensors"
# The LoRA decode modules of the demo tasks: task name -> its adapter dir (under ASSETS, and
# under the root write_demo_lora_adapters writes).
DEMO_LORA_DECODE_MODULES = {name: f"lora-{name}" for name in DEMO_DECODE_MODULES}
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's
# What an embedded adapter's adapter_config.json names as its base: the sibling dir ``base``
# (relative to the adapter's dir; transformers and PEFT would read a relative path from the
# working directory, so write_demo_lora_adapters writes the copied base's absolute path).
EMBEDDED_ADAPTER_BASE = "../base"


@dataclass(frozen=True)
class TinyLlamaShape:
    """Architecture of the demo models (float32: the oracle runs exact on CPU).

    ``initializer_range`` is wide for random-weight models (clear, untied greedy
    logits); the replication trains from a narrow 0.02 init.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_positions: int = 2048
    rope_theta: float = 10000.0
    initializer_range: float = 0.1


@dataclass(frozen=True)
class DemoModels:
    base: Path
    decode: dict[str, Path] = field(default_factory=dict)


def write_base_model(
    out_dir: str | Path, shape: TinyLlamaShape = TinyLlamaShape(), seed: int = 0, tokenizer_text: Sequence[str] = ()
) -> Path:
    """Write a randomly initialised tiny Llama with its tokenizer (trained on ``tokenizer_text`` too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=shape.vocab_size, seed=seed, extra_text=tokenizer_text)
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
    root: str | Path, seed: int = DEMO_SEED, decode_names: tuple[str, ...] = DEMO_DECODE_MODULES
) -> DemoModels:
    """Copy the embedded base and the named decode modules under ``root``, with a manifest.

    ``seed`` is the replication's fine-tuning seed of the decode modules; the package
    embeds seed ``DEMO_SEED`` only (train others with ``python -m pfs_sglang.train replicate``).
    """
    if seed != DEMO_SEED:
        raise ValueError(
            f"the embedded demo models were trained with seed {DEMO_SEED}; for seed {seed} run "
            f"`python -m pfs_sglang.train replicate OUT --seeds {seed} --export-demo DIR`"
        )
    unknown = set(decode_names) - set(DEMO_DECODE_MODULES)
    if unknown:
        raise ValueError(f"no embedded decode modules {sorted(unknown)}; there are {DEMO_DECODE_MODULES}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in ("base",) + tuple(decode_names):
        if (root / name).exists():
            shutil.rmtree(root / name)
        models[name] = Path(shutil.copytree(ASSETS / name, root / name))
    manifest = {"base": "base", "decode": {name: name for name in decode_names}, "seed": seed,
                "base_digest": fingerprint_of(models["base"]).digest}
    (root / "demo_models.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return DemoModels(base=models.pop("base"), decode=models)


def install_lora_adapter(adapter_dir: str | Path, out_dir: str | Path, base_path: str | Path) -> Path:
    """Copy the LoRA decode module ``adapter_dir`` (as ``python -m pfs_sglang.train --mode lora``
    writes it) to ``out_dir``, naming ``base_path`` as its base in ``adapter_config.json``.

    Everything but its ``checkpoints`` and PEFT's model card (``README.md``) is copied:
    the adapter, the record of the base's fingerprint, and the base's config and tokenizer
    files, which the identity check reads.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{adapter_dir} is not a LoRA adapter: it has no {ADAPTER_CONFIG}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(adapter_dir, out_dir, ignore=shutil.ignore_patterns("checkpoints", "README.md"))
    for path in out_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # PEFT writes its weights 0600
    config = json.loads((out_dir / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(base_path)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_demo_lora_adapters(
    root: str | Path, names: Sequence[str] = tuple(DEMO_LORA_DECODE_MODULES), write_base: bool = True
) -> DemoModels:
    """Copy the embedded base to ``root/base`` and the named LoRA decode modules to
    ``root/lora-<name>``; each adapter names that base (absolute path) as its own.

    The result's ``decode`` maps each task name to its adapter dir. With ``write_base``
    false an existing ``root/base`` is kept if it is the embedded base (as
    :func:`write_demo_models` writes it to the same root) and copied otherwise.
    """
    unknown = set(names) - set(DEMO_LORA_DECODE_MODULES)
    if unknown:
        raise ValueError(f"no embedded LoRA decode modules {sorted(unknown)}; "
                         f"there are {tuple(DEMO_LORA_DECODE_MODULES)}")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if write_base or not base.is_dir() or fingerprint_of(base).digest != fingerprint_of(ASSETS / "base").digest:
        if base.exists():
            shutil.rmtree(base)
        shutil.copytree(ASSETS / "base", base)
    adapters = {name: install_lora_adapter(ASSETS / DEMO_LORA_DECODE_MODULES[name],
                                           root / DEMO_LORA_DECODE_MODULES[name], base)
                for name in names}
    return DemoModels(base=base, decode=adapters)


def load_demo_models(root: str | Path) -> DemoModels:
    """Read the manifest written by :func:`write_demo_models`.

    A directory written from other embedded models (an older package) is rewritten
    from the current ones, so a cached demo directory never serves stale weights.
    """
    root = Path(root)
    manifest = json.loads((root / "demo_models.json").read_text())
    if manifest.get("base_digest") != fingerprint_of(ASSETS / "base").digest:
        return write_demo_models(root, seed=manifest.get("seed", DEMO_SEED), decode_names=tuple(manifest["decode"]))
    return DemoModels(
        base=root / manifest["base"],
        decode={name: root / rel for name, rel in manifest["decode"].items()},
    )
