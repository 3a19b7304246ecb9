"""What a deployment is made of: the typed topology the launcher starts.

Built from command-line flags, a YAML file holding the same keys, or both (flags win;
see ``launch/cli.py``). With no model given, the embedded demo models are written (once,
under ``$PFS_SGLANG_HOME/demo_models``, default ``~/.cache/pfs_sglang/demo_models``) and
served. YAML example::

    base_model: /models/base
    decode_models: {planner: /models/planner, coder: /models/coder}
    decode_replicas: 2
    port: 8000
    decode_args: --mem-fraction-static 0.8
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

TRANSFER_BACKENDS = ("zmq", "mooncake", "nixl")


@dataclass(frozen=True)
class DecodeModelSpec:
    """A decode module served under ``name`` (the OpenAI ``model`` field)."""

    name: str
    path: Path


@dataclass(frozen=True)
class Topology:
    """One prefill pool of ``base_model`` and, per decode model, a pool of ``decode_replicas``."""

    base_model: Path | None
    decode_models: tuple[DecodeModelSpec, ...] = ()
    prefill_replicas: int = 1
    decode_replicas: int = 1
    transfer_backend: str = "zmq"
    host: str = "127.0.0.1"
    port: int = 30000
    device: str = "cpu"
    max_total_tokens: int = 8192
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    default_model: str | None = None
    log_dir: Path | None = None
    startup_timeout_s: float = 300.0
    transfer_timeout_s: float = 120.0  # deadline of one KV hand-off (bootstrap, wait, bytes)

    def validate(self) -> None:
        if self.transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(f"transfer backend must be one of {TRANSFER_BACKENDS}, got {self.transfer_backend!r}")
        if self.prefill_replicas < 1 or self.decode_replicas < 1:
            raise ValueError("replica counts must be at least 1")
        names = [spec.name for spec in self.decode_models]
        if len(set(names)) != len(names):
            raise ValueError(f"decode model names must be unique, got {names}")
        if not names:
            raise ValueError("at least one decode model is needed")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default model {self.default_model!r} is not one of the decode models {names}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")


def parse_decode_model(text: str) -> DecodeModelSpec:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--decode-model takes NAME=PATH, got {text!r}")
    return DecodeModelSpec(name=name, path=Path(path).expanduser())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def demo_models_home() -> Path:
    return Path(os.environ.get("PFS_SGLANG_HOME", Path.home() / ".cache" / "pfs_sglang")) / "demo_models"


def with_demo_models(topology: Topology) -> Topology:
    """Fill in the embedded demo models (written once under ``demo_models_home()``)."""
    from pfs_sglang.models import load_demo_models, write_demo_models

    root = demo_models_home()
    models = load_demo_models(root) if (root / "demo_models.json").exists() else write_demo_models(root)
    return replace(
        topology,
        base_model=models.base,
        decode_models=tuple(DecodeModelSpec(name, path) for name, path in models.decode.items()),
    )


def load_yaml_topology(path: Path) -> dict[str, Any]:
    """Read a YAML topology: the same keys as the flags, ``decode_models`` as a name->path map."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a topology file holds a mapping")
    decode = data.pop("decode_models", {}) or {}
    if not isinstance(decode, dict):
        raise ValueError(f"{path}: decode_models is a mapping of name to path")
    data["decode_models"] = tuple(DecodeModelSpec(str(name), Path(str(p)).expanduser()) for name, p in decode.items())
    for key in ("base_model", "log_dir"):
        if data.get(key) is not None:
            data[key] = Path(str(data[key])).expanduser()
    for key in ("prefill_args", "decode_args"):
        if isinstance(data.get(key), str):
            data[key] = tuple(shlex.split(data[key]))
        elif isinstance(data.get(key), list):
            data[key] = tuple(str(arg) for arg in data[key])
    known = set(Topology.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown topology keys {sorted(unknown)}")
    return data
