"""What a deployment is made of: the typed topology the launcher starts.

Built from command-line flags, a YAML file holding the same keys, or both (flags win;
see ``launch/cli.py``). With no model given, the embedded demo models are written (once,
under ``$PFS_SGLANG_HOME/demo_models``, default ``~/.cache/pfs_sglang/demo_models``) and
served. GPU placement (``gpus``, ``pack``, TP and memory shares per pool) is planned by
``launch/placement.py``. YAML example::

    base_model: /models/base
    decode_models:
      planner: /models/planner
      coder: {path: /models/coder, tp: 2, args: --chunked-prefill-size 4096}
    decode_replicas: 2
    gpus: 0-7
    prefill_tp: 2
    port: 8000
    decode_args: --max-running-requests 64

A decode model whose directory is a PEFT LoRA adapter (``adapter_config.json``, as
``python -m pfs_sglang.train --mode lora`` writes) is served by a decode server running
the base's weights with SGLang's multi-LoRA; with ``colocate_lora`` (the default) every
adapter shares one such server (``decode-lora-N``), so N task models cost one copy of
the base plus N adapters (``decode_servers()``).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

TRANSFER_BACKENDS = ("zmq", "mooncake", "nixl")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: a LoRA adapter directory
COLOCATED_LORA_SERVER = "lora"  # the name of the decode server co-located adapters share


@dataclass(frozen=True)
class DecodeModelSpec:
    """A decode module served under ``name`` (the OpenAI ``model`` field), with the
    settings of its own pool (``None``/empty: the topology's decode-wide ones)."""

    name: str
    path: Path
    tp: int | None = None
    mem_fraction: float | None = None
    args: tuple[str, ...] = ()  # appended after the topology's decode_args

    @property
    def is_lora_adapter(self) -> bool:
        return (Path(self.path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class DecodeServerSpec:
    """What one decode server (and each of its replicas) serves: one full-weight decode
    module, or LoRA adapters over the base's weights (``lora``), each under its own
    model name. ``tp``, ``mem_fraction`` and ``args`` as in ``DecodeModelSpec``."""

    name: str  # its servers are decode-{name}-{replica}
    models: tuple[DecodeModelSpec, ...]
    lora: bool
    tp: int | None = None
    mem_fraction: float | None = None
    args: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, models: tuple[DecodeModelSpec, ...], lora: bool) -> "DecodeServerSpec":
        settings = {(m.tp, m.mem_fraction, m.args) for m in models}
        if len(settings) > 1:
            raise ValueError(f"co-located LoRA decode models {[m.name for m in models]} must have the same "
                             "tp, memory fraction and args (or pass --no-colocate-lora)")
        tp, mem_fraction, args = settings.pop()
        return cls(name, models, lora, tp, mem_fraction, args)


@dataclass(frozen=True)
class Topology:
    """One prefill pool of ``base_model`` and, per decode model, a pool of ``decode_replicas``."""

    base_model: Path | None
    decode_models: tuple[DecodeModelSpec, ...] = ()
    prefill_replicas: int = 1
    decode_replicas: int = 1
    transfer_backend: str = "zmq"
    host: str = "127.0.0.1"  # the router's
    server_host: str = "127.0.0.1"  # every SGLang server's (HTTP, KV bootstrap, KV engine)
    port: int = 30000
    device: str = "cpu"
    max_total_tokens: int = 8192
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    default_model: str | None = None
    log_dir: Path | None = None
    startup_timeout_s: float | None = None  # None: scaled to the servers started (deployment.py)
    startup_concurrency: int | None = None  # servers starting at once; None: the launcher's default
    colocate_lora: bool = True  # every LoRA decode model on one decode server (with the base's weights)
    api_key: str | None = None  # required by the router and by every server (passed on by the router)
    transfer_timeout_s: float = 120.0  # deadline of one KV hand-off (bootstrap, wait, bytes)
    restart_on_failure: bool = False  # restart a server that exits while serving (supervision.py)
    max_restarts: int = 5  # per server, with restart_on_failure
    gpus: tuple[int, ...] | None = None  # cuda: GPU indices (into CUDA_VISIBLE_DEVICES if set); None = all
    pack: bool = False  # let servers share GPUs, each with its memory share
    prefill_tp: int = 1
    decode_tp: int = 1
    prefill_mem_fraction: float | None = None  # share of each of its GPUs' memory
    decode_mem_fraction: float | None = None

    def decode_servers(self) -> tuple[DecodeServerSpec, ...]:
        """The decode servers to start (each ``decode_replicas`` times): one per full-weight
        decode model, and one for all LoRA adapters (one per adapter without ``colocate_lora``)."""
        adapters = tuple(spec for spec in self.decode_models if spec.is_lora_adapter)
        servers = [DecodeServerSpec.of(spec.name, (spec,), lora=False)
                   for spec in self.decode_models if not spec.is_lora_adapter]
        if self.colocate_lora and len(adapters) > 1:
            if COLOCATED_LORA_SERVER in (spec.name for spec in self.decode_models):
                raise ValueError(f"a decode model may not be named {COLOCATED_LORA_SERVER!r} when LoRA adapters "
                                 "share a server (its name); rename it or pass --no-colocate-lora")
            servers.append(DecodeServerSpec.of(COLOCATED_LORA_SERVER, adapters, lora=True))
        else:
            servers += [DecodeServerSpec.of(spec.name, (spec,), lora=True) for spec in adapters]
        return tuple(servers)

    def decode_tp_of(self, spec: DecodeModelSpec | DecodeServerSpec) -> int:
        return spec.tp if spec.tp is not None else self.decode_tp

    def decode_mem_fraction_of(self, spec: DecodeModelSpec | DecodeServerSpec) -> float | None:
        return spec.mem_fraction if spec.mem_fraction is not None else self.decode_mem_fraction

    def decode_args_of(self, spec: DecodeModelSpec | DecodeServerSpec) -> tuple[str, ...]:
        return (*self.decode_args, *spec.args)

    def validate(self) -> None:
        if self.transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(f"transfer backend must be one of {TRANSFER_BACKENDS}, got {self.transfer_backend!r}")
        if self.prefill_replicas < 1 or self.decode_replicas < 1:
            raise ValueError("replica counts must be at least 1")
        if self.max_restarts < 0:
            raise ValueError(f"max restarts must be at least 0, got {self.max_restarts}")
        if self.startup_concurrency is not None and self.startup_concurrency < 1:
            raise ValueError(f"startup concurrency must be at least 1, got {self.startup_concurrency}")
        names = [spec.name for spec in self.decode_models]
        if len(set(names)) != len(names):
            raise ValueError(f"decode model names must be unique, got {names}")
        if not names:
            raise ValueError("at least one decode model is needed")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default model {self.default_model!r} is not one of the decode models {names}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cpu" and (self.gpus is not None or self.pack):
            raise ValueError("--gpus and --pack place servers on GPUs: they need --device cuda")
        if self.device == "cpu" and any(share is not None for share in (
                self.prefill_mem_fraction, self.decode_mem_fraction, *(s.mem_fraction for s in self.decode_models))):
            raise ValueError("memory fractions are shares of GPU memory: they need --device cuda "
                             "(on CPU, --max-total-tokens sizes each server's KV pool)")
        if self.gpus is not None and (not self.gpus or len(set(self.gpus)) != len(self.gpus)):
            raise ValueError(f"gpus must be a non-empty list of distinct indices, got {self.gpus}")
        for label, tp in [("prefill", self.prefill_tp), ("decode", self.decode_tp),
                          *((f"decode '{s.name}'", s.tp) for s in self.decode_models if s.tp is not None)]:
            if tp < 1:
                raise ValueError(f"{label} TP size must be at least 1, got {tp}")
        for label, share in [("prefill", self.prefill_mem_fraction), ("decode", self.decode_mem_fraction),
                             *((f"decode '{s.name}'", s.mem_fraction) for s in self.decode_models)]:
            if share is not None and not 0 < share < 1:
                raise ValueError(f"{label} memory fraction must be between 0 and 1, got {share}")


def parse_decode_model(text: str) -> DecodeModelSpec:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--decode-model takes NAME=PATH, got {text!r}")
    return DecodeModelSpec(name=name, path=Path(path).expanduser())


def parse_gpus(text: str | int | list | tuple) -> tuple[int, ...]:
    """``"0-3,6"`` (or a YAML list or a single index) -> ``(0, 1, 2, 3, 6)``."""
    if isinstance(text, int):
        return (text,)
    if isinstance(text, (list, tuple)):
        return tuple(int(item) for item in text)
    gpus: list[int] = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"--gpus takes indices and ranges like 0-3,6; got {text!r}")
        gpus.extend(range(int(match[1]), int(match[2] if match[2] is not None else match[1]) + 1))
    return tuple(gpus)


PER_MODEL = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.:-]*)=(.*)", re.S)


def split_per_model(text: str) -> tuple[str | None, str]:
    """``"coder=--x 1"`` -> ``("coder", "--x 1")``; a value for every model (``"--x 1"``) -> ``(None, text)``."""
    match = PER_MODEL.fullmatch(text)
    return (match[1], match[2]) if match else (None, text)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def demo_models_home() -> Path:
    return Path(os.environ.get("PFS_SGLANG_HOME", Path.home() / ".cache" / "pfs_sglang")) / "demo_models"


# The demo models are tiny: on GPUs, unless placed otherwise, all four servers share
# whatever GPUs there are (one is enough), each holding this share of a GPU's memory.
DEMO_GPU_SHARE = 0.15


def with_demo_models(topology: Topology) -> Topology:
    """Fill in the embedded demo models (written once under ``demo_models_home()``)."""
    from pfs_sglang.models import load_demo_models, write_demo_models

    root = demo_models_home()
    models = load_demo_models(root) if (root / "demo_models.json").exists() else write_demo_models(root)
    placed = topology.gpus is not None or topology.pack or topology.prefill_mem_fraction is not None \
        or topology.decode_mem_fraction is not None
    if topology.device == "cuda" and not placed:
        topology = replace(topology, pack=True, prefill_mem_fraction=DEMO_GPU_SHARE, decode_mem_fraction=DEMO_GPU_SHARE)
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
    data["decode_models"] = tuple(_yaml_decode_model(path, str(name), value) for name, value in decode.items())
    for key in ("base_model", "log_dir"):
        if data.get(key) is not None:
            data[key] = Path(str(data[key])).expanduser()
    for key in ("prefill_args", "decode_args"):
        if key in data:
            data[key] = _yaml_args(data[key])
    if data.get("gpus") is not None:
        data["gpus"] = parse_gpus(data["gpus"])
    known = set(Topology.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown topology keys {sorted(unknown)}")
    return data


def _yaml_args(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, (list, tuple)):
        return tuple(str(arg) for arg in value)
    raise ValueError(f"server arguments are a string or a list, got {value!r}")


def _yaml_decode_model(path: Path, name: str, value: Any) -> DecodeModelSpec:
    """``name: PATH`` or ``name: {path: PATH, tp: N, mem_fraction: F, args: "..."}``."""
    if not isinstance(value, dict):
        return DecodeModelSpec(name, Path(str(value)).expanduser())
    unknown = set(value) - {"path", "tp", "mem_fraction", "args"}
    if unknown or "path" not in value:
        raise ValueError(f"{path}: decode model {name!r} takes path, tp, mem_fraction and args; got {sorted(value)}")
    return DecodeModelSpec(
        name, Path(str(value["path"])).expanduser(),
        tp=int(value["tp"]) if value.get("tp") is not None else None,
        mem_fraction=float(value["mem_fraction"]) if value.get("mem_fraction") is not None else None,
        args=_yaml_args(value.get("args") or ()),
    )
