"""The prefill-module fingerprint (invariant 4: identity is checked, never assumed).

A prefill module is a frozen base model whose prompt KV every decode module consumes.
Its fingerprint names everything that decides what that KV *means*: the architecture,
the KV shape (layers, KV heads, head dim), the rope parameters, the dtype, the
tokenizer (a hash of its vocabulary) and a hash of its weights. The weights are
hashed by streaming the safetensors files tensor by tensor, in name order, so the
digest does not depend on how a checkpoint is sharded and never loads the model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

_READ_CHUNK_BYTES = 16 << 20

# Fields that describe the shape and meaning of the KV cache, in the order a mismatch
# is reported. ``weights_hash`` comes last: a structural difference is the clearer reason.
STRUCTURE_FIELDS = (
    "architecture",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "rope",
    "dtype",
    "tokenizer_hash",
)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a prefill module; equal fingerprints produce interchangeable KV."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: str  # canonical JSON of the rope parameters (theta, scaling, ...)
    dtype: str
    tokenizer_hash: str
    weights_hash: str

    @property
    def digest(self) -> str:
        """A short stable id of the whole fingerprint (used as a cache namespace)."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return "pfs-" + hashlib.sha256(canonical.encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "digest": self.digest}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fingerprint":
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ValueError(f"fingerprint is missing fields: {sorted(missing)}")
        fingerprint = cls(**{name: data[name] for name in names})
        recorded_digest = data.get("digest")
        if recorded_digest is not None and recorded_digest != fingerprint.digest:
            raise ValueError(
                f"fingerprint digest {recorded_digest} does not match its fields "
                f"({fingerprint.digest}); the record was edited or corrupted"
            )
        return fingerprint


def read_config(model_dir: Path) -> dict[str, Any]:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model dir")
    return json.loads(config_path.read_text())


def _rope_parameters(config: dict[str, Any]) -> str:
    """Rope settings as canonical JSON; covers transformers 4 and 5 config spellings."""
    rope: dict[str, Any] = {}
    if isinstance(config.get("rope_parameters"), dict):
        rope.update(config["rope_parameters"])
    if "rope_theta" in config:
        rope.setdefault("rope_theta", config["rope_theta"])
    if config.get("rope_scaling"):
        rope.setdefault("rope_scaling", config["rope_scaling"])
    rope.setdefault("rope_type", "default")
    return json.dumps(rope, sort_keys=True, separators=(",", ":"))


def _config_dtype(config: dict[str, Any]) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def tokenizer_hash(model_dir: Path) -> str:
    """Hash of the vocabulary (token -> id, added tokens included) of ``tokenizer.json``."""
    from tokenizers import Tokenizer

    tokenizer_path = Path(model_dir) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab(with_added_tokens=True)
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, header


def weights_hash(model_dir: Path) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in name order, streamed."""
    shard_paths = sorted(Path(model_dir).glob("*.safetensors"))
    if not shard_paths:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    tensors: list[tuple[str, Path, int, dict[str, Any]]] = []
    for shard in shard_paths:
        data_start, header = _safetensors_header(shard)
        tensors.extend((name, shard, data_start, info) for name, info in header.items())
    tensors.sort(key=lambda entry: entry[0])

    digest = hashlib.sha256()
    open_files: dict[Path, Any] = {}
    try:
        for name, shard, data_start, info in tensors:
            handle = open_files.get(shard) or open_files.setdefault(shard, open(shard, "rb"))
            begin, end = info["data_offsets"]
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            handle.seek(data_start + begin)
            remaining = end - begin
            while remaining:
                chunk = handle.read(min(remaining, _READ_CHUNK_BYTES))
                if not chunk:
                    raise ValueError(f"{shard} is truncated inside tensor {name}")
                digest.update(chunk)
                remaining -= len(chunk)
    finally:
        for handle in open_files.values():
            handle.close()
    return digest.hexdigest()


def structure_of(model_dir: Path) -> dict[str, Any]:
    """The structural fields of a model (everything in a fingerprint but the weights)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    num_heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // num_heads
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    return {
        "architecture": architectures[0],
        "num_layers": int(config["num_hidden_layers"]),
        "num_kv_heads": int(config.get("num_key_value_heads") or num_heads),
        "head_dim": int(head_dim),
        "rope": _rope_parameters(config),
        "dtype": _config_dtype(config),
        "tokenizer_hash": tokenizer_hash(model_dir),
    }


def fingerprint_of(model_dir: str | Path) -> Fingerprint:
    """Fingerprint a Hugging Face model directory (config, tokenizer, safetensors)."""
    model_dir = Path(model_dir)
    return Fingerprint(**structure_of(model_dir), weights_hash=weights_hash(model_dir))
