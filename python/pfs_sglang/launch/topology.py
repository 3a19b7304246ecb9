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

**Mode** (``mode``: ``auto``, ``unified`` or ``pd``; ``deployment_mode()`` says which and
why). When every decode model is a LoRA adapter of the base and one host serves them,
``auto`` chooses the unified deployment (``pfs_sglang.unified``): ``replicas`` SGLang
servers (``unified-N``), each holding the base and every adapter, one KV pool and one
prefix tree, with no prefill server, no KV transfer and no bootstrap; the co-located
LoRA server's settings (``decode_tp``, ``decode_mem_fraction``, ``decode_args``) are
theirs. Otherwise (a full-weight decode module, a server role of a multi-host
deployment, ``--no-colocate-lora``) it is PD, as below; ``mode: unified`` where that
cannot hold is refused with the reason.

A deployment can span machines (``docs/multi_host.md``): ``role`` says what this host
runs of it (``Role``: everything, the prefill server, one decode server, or only the
router); the server roles listen on fixed ports (``port``, ``bootstrap_port``) at
``server_host``, and the router role routes to the servers listed under
``external_servers`` (``ExternalServers``)::

    role: router
    external_servers:
      prefill:
        - {url: http://10.0.0.1:30001, bootstrap: 10.0.0.1:30002}
      decode:
        extract: [http://10.0.0.2:30001]
        sql: {urls: [http://10.0.0.3:30001], lora: true}
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

TRANSFER_BACKENDS = ("zmq", "mooncake", "nixl")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: a LoRA adapter directory
COLOCATED_LORA_SERVER = "lora"  # the name of the decode server co-located adapters share
SGLANG_BOOTSTRAP_PORT = 8998  # SGLang's default --disaggregation-bootstrap-port: the prefill role's default
MODES = ("auto", "unified", "pd")
UNIFIED_SERVER = "unified"  # its servers are unified-{replica}


@dataclass(frozen=True)
class Role:
    """What this host runs of the topology (``--role``): ``all`` (every server and the
    router), ``prefill`` (the prefill server), ``decode:NAME`` (the decode server NAME of
    ``Topology.decode_servers()``: a model name, or ``lora`` for co-located adapters) or
    ``router`` (the router alone, over ``Topology.external_servers``)."""

    kind: str = "all"
    decode_server: str | None = None  # with kind "decode"

    @classmethod
    def parse(cls, text: str) -> "Role":
        kind, sep, name = str(text).partition(":")
        if kind in ("all", "prefill", "router") and not sep:
            return cls(kind)
        if kind == "decode" and name:
            return cls(kind, name)
        raise ValueError(f"--role takes all, prefill, decode:NAME or router; got {text!r}")

    def __str__(self) -> str:
        return f"decode:{self.decode_server}" if self.kind == "decode" else self.kind

    @property
    def runs_prefill(self) -> bool:
        return self.kind in ("all", "prefill")

    @property
    def runs_router(self) -> bool:
        return self.kind in ("all", "router")

    @property
    def serves_alone(self) -> bool:
        """A server role: one server of the topology, on the fixed ports other hosts are told."""
        return self.kind in ("prefill", "decode")


@dataclass(frozen=True)
class ExternalPrefillServer:
    """A prefill server another host runs: its HTTP URL and its KV bootstrap address."""

    url: str
    bootstrap_host: str
    bootstrap_port: int


@dataclass(frozen=True)
class ExternalDecodePool:
    """The decode servers other hosts run for ``model``; with ``lora`` they hold the base's
    weights and serve ``model`` as the LoRA adapter of that name (``--role decode:lora``)."""

    model: str
    urls: tuple[str, ...]
    lora: bool = False


@dataclass(frozen=True)
class ExternalServers:
    """The servers a router role routes to (YAML ``external_servers``)."""

    prefill: tuple[ExternalPrefillServer, ...]
    decode: tuple[ExternalDecodePool, ...]

    @property
    def models(self) -> list[str]:
        return [pool.model for pool in self.decode]


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
class DeploymentMode:
    """The shape a topology is served in: ``unified`` or ``pd``, and why (the launcher prints it)."""

    mode: str
    reason: str

    @property
    def unified(self) -> bool:
        return self.mode == "unified"


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
    kv_budget: int | None = None  # cpu: KV tokens of all servers together, split by launch/pool_sizing.py's rule
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    default_model: str | None = None
    log_dir: Path | None = None
    startup_timeout_s: float | None = None  # None: scaled to the servers started (deployment.py)
    startup_concurrency: int | None = None  # servers starting at once; None: the launcher's default
    colocate_lora: bool = True  # every LoRA decode model on one decode server (with the base's weights)
    decode_cache: bool = True  # PD decode servers keep a prefix cache of base KV (invariant 1: prompt[:k] only)
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
    role: Role = Role()  # what this host runs (multi-host: docs/multi_host.md)
    bootstrap_port: int | None = None  # --role prefill: its KV bootstrap port (None: SGLANG_BOOTSTRAP_PORT)
    transfer_force_tcp: bool = False  # zmq engines talk TCP over the socket even on one host
    kv_secret: str | None = None  # the KV secret every host's servers share (None: made at launch, role all)
    external_servers: ExternalServers | None = None  # --role router: the servers started elsewhere
    mode: str = "auto"  # auto, unified or pd (deployment_mode())
    replicas: int = 1  # unified servers (the unified mode's; PD has prefill_replicas and decode_replicas)

    def _unified_blocker(self) -> str | None:
        """Why one server cannot hold every decode model, or None."""
        if self.role.kind != "all":
            return f"--role {self.role} is one part of a multi-host deployment, which is PD"
        full = [spec.name for spec in self.decode_models if not spec.is_lora_adapter]
        if full:
            return (f"decode model(s) {', '.join(map(repr, full))} are full-weight models, not LoRA adapters of the "
                    "base: each needs a server of its own")
        if not self.colocate_lora:
            return "--no-colocate-lora asks for one decode server per adapter"
        return None

    def deployment_mode(self) -> DeploymentMode:
        """Unified where every decode model is a LoRA adapter served by one host, else PD (``mode`` forces either)."""
        if self.mode == "pd":
            return DeploymentMode("pd", "asked for (--mode pd)")
        blocker = self._unified_blocker()
        if self.mode == "unified":
            if blocker is not None:
                raise ValueError(f"--mode unified cannot hold: {blocker}")
            return DeploymentMode("unified", "asked for (--mode unified)")
        if blocker is not None:
            return DeploymentMode("pd", blocker)
        return DeploymentMode("unified", "every decode model is a LoRA adapter of the base, served on one host: one "
                                         "server holds the base and every adapter (no KV is copied)")

    def unified_server(self) -> DecodeServerSpec:
        """What each unified server serves: every decode model, as LoRA adapters over the base."""
        return DecodeServerSpec.of(UNIFIED_SERVER, self.decode_models, lora=True)

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

    def local_decode_servers(self) -> tuple[DecodeServerSpec, ...]:
        """The decode servers this host's ``role`` starts (each ``decode_replicas`` times)."""
        if self.role.kind == "all":
            return self.decode_servers()
        return tuple(spec for spec in self.decode_servers() if spec.name == self.role.decode_server)

    def local_decode_models(self) -> tuple[DecodeModelSpec, ...]:
        """The decode models this host serves, so checks against the base here."""
        return tuple(model for spec in self.local_decode_servers() for model in spec.models)

    @property
    def prefill_bootstrap_port(self) -> int:
        """The fixed KV bootstrap port of ``--role prefill``."""
        return self.bootstrap_port if self.bootstrap_port is not None else SGLANG_BOOTSTRAP_PORT

    def decode_tp_of(self, spec: DecodeModelSpec | DecodeServerSpec) -> int:
        return spec.tp if spec.tp is not None else self.decode_tp

    def decode_mem_fraction_of(self, spec: DecodeModelSpec | DecodeServerSpec) -> float | None:
        return spec.mem_fraction if spec.mem_fraction is not None else self.decode_mem_fraction

    def decode_args_of(self, spec: DecodeModelSpec | DecodeServerSpec) -> tuple[str, ...]:
        return (*self.decode_args, *spec.args)

    def validate(self) -> None:
        if self.transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(f"transfer backend must be one of {TRANSFER_BACKENDS}, got {self.transfer_backend!r}")
        if self.prefill_replicas < 1 or self.decode_replicas < 1 or self.replicas < 1:
            raise ValueError("replica counts must be at least 1")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max restarts must be at least 0, got {self.max_restarts}")
        if self.startup_concurrency is not None and self.startup_concurrency < 1:
            raise ValueError(f"startup concurrency must be at least 1, got {self.startup_concurrency}")
        names = [spec.name for spec in self.decode_models]
        if len(set(names)) != len(names):
            raise ValueError(f"decode model names must be unique, got {names}")
        served = self._validate_role(names)
        if not served and self.role.kind != "prefill":
            raise ValueError("at least one decode model is needed")
        if self.default_model is not None and self.default_model not in served:
            raise ValueError(f"default model {self.default_model!r} is not one of the decode models {served}")
        if self.transfer_force_tcp and self.transfer_backend != "zmq":
            raise ValueError(f"--transfer-force-tcp is for the zmq transfer backend, not {self.transfer_backend!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cpu" and (self.gpus is not None or self.pack):
            raise ValueError("--gpus and --pack place servers on GPUs: they need --device cuda")
        if self.device == "cpu" and any(share is not None for share in (
                self.prefill_mem_fraction, self.decode_mem_fraction, *(s.mem_fraction for s in self.decode_models))):
            raise ValueError("memory fractions are shares of GPU memory: they need --device cuda "
                             "(on CPU, --max-total-tokens sizes each server's KV pool)")
        if self.kv_budget is not None and (self.device != "cpu" or self.role.kind != "all" or self.kv_budget < 1):
            raise ValueError(f"--kv-budget {self.kv_budget}: a positive number of KV tokens that one host's servers "
                             "share on CPU (with --device cuda, memory fractions size the pools; with a --role, "
                             "give each host's servers --max-total-tokens)")
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
        mode = self.deployment_mode()
        if mode.unified and (self.prefill_replicas != 1 or self.decode_replicas != 1):
            raise ValueError("the unified mode runs --replicas whole servers; --prefill-replicas and "
                             "--decode-replicas are PD's")
        if not mode.unified and self.replicas != 1:
            raise ValueError(f"--replicas counts unified servers, but this deployment is PD ({mode.reason}); "
                             "use --prefill-replicas and --decode-replicas")

    def _validate_role(self, names: list[str]) -> list[str]:
        """Refuse what ``role`` cannot run; the model names the router serves."""
        role = self.role
        if self.bootstrap_port is not None and role.kind != "prefill":
            instead = "chooses free ports" if role.kind == "all" else "starts no prefill server"
            raise ValueError(f"--bootstrap-port is the KV bootstrap port of --role prefill; with --role {role} "
                             f"the launcher {instead}")
        if role.kind == "prefill":
            if self.prefill_replicas != 1:
                raise ValueError("--role prefill runs one prefill server on fixed ports (--port, --bootstrap-port); "
                                 "for more, run one launcher per replica, each on its own ports, and list every "
                                 "one under the router's external_servers")
            if self.port == self.prefill_bootstrap_port:
                raise ValueError(f"--role prefill: --port and --bootstrap-port are both {self.port}")
        if role.kind == "decode":
            servers = [spec.name for spec in self.decode_servers()]
            if role.decode_server not in servers:
                raise ValueError(f"--role {role}: no decode server of that name; the decode servers are {servers} "
                                 f"(a decode model's name, or {COLOCATED_LORA_SERVER!r} for co-located LoRA adapters)")
            if self.decode_replicas != 1:
                raise ValueError(f"--role {role} runs one decode server on a fixed port (--port); for more, run one "
                                 "launcher per replica, each on its own port, and list every one under the "
                                 "router's external_servers")
        if role.kind == "all" and self.external_servers is not None:
            raise ValueError("external_servers lists servers started on other hosts, for --role router; "
                             "with --role all the launcher starts its own")
        if role.kind != "router":
            return names
        if self.external_servers is None:
            raise ValueError("--role router routes to servers started elsewhere: list them under external_servers "
                             "in the YAML topology (--config)")
        served = self.external_servers.models
        if names and sorted(names) != sorted(served):
            raise ValueError(f"decode_models {sorted(names)} and the models of external_servers {sorted(served)} "
                             "differ: the router serves the models its decode servers serve")
        return served


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
    """Fill in the embedded demo models (written under ``demo_models_home()``): the LoRA
    decode modules, served unified, or with ``mode: pd`` the full-weight ones, served PD."""
    from pfs_sglang.models import load_demo_models, write_demo_lora_adapters, write_demo_models

    root = demo_models_home()
    models = load_demo_models(root) if (root / "demo_models.json").exists() else write_demo_models(root)
    if topology.mode != "pd":
        models = write_demo_lora_adapters(root, write_base=False)
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
    if data.get("role") is not None:
        data["role"] = Role.parse(data["role"])
    if data.get("external_servers") is not None:
        data["external_servers"] = parse_external_servers(data["external_servers"], f"{path}: external_servers")
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


def parse_external_servers(value: Any, where: str = "external_servers") -> ExternalServers:
    """``{prefill: [{url, bootstrap}, ...], decode: {model: URLS or {urls, lora}}}`` -> ``ExternalServers``.

    ``bootstrap`` is ``HOST:PORT``, or a port on the host of ``url``; a model's ``URLS`` is
    one URL or a list of them. Every URL is ``http(s)://HOST:PORT``.
    """
    if not isinstance(value, dict) or set(value) != {"prefill", "decode"}:
        raise ValueError(f"{where} takes prefill (a list of servers) and decode (model: URLs), got {value!r}")
    prefill, decode = value["prefill"], value["decode"]
    if not isinstance(prefill, list) or not prefill:
        raise ValueError(f"{where}.prefill is a non-empty list of {{url, bootstrap}}, got {prefill!r}")
    if not isinstance(decode, dict) or not decode:
        raise ValueError(f"{where}.decode maps each model to its decode servers' URLs, got {decode!r}")
    return ExternalServers(
        prefill=tuple(_external_prefill(f"{where}.prefill[{index}]", entry) for index, entry in enumerate(prefill)),
        decode=tuple(_external_decode(f"{where}.decode.{model}", str(model), entry) for model, entry in decode.items()),
    )


def _external_prefill(where: str, entry: Any) -> ExternalPrefillServer:
    if not isinstance(entry, dict) or set(entry) != {"url", "bootstrap"}:
        raise ValueError(f"{where} takes url and bootstrap, got {entry!r}")
    url = _server_url(where, entry["url"])
    host, sep, port = str(entry["bootstrap"]).rpartition(":")
    host = host.strip("[]") if sep else urlsplit(url).hostname
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{where}: bootstrap is HOST:PORT or a port on the url's host, got {entry['bootstrap']!r}")
    return ExternalPrefillServer(url, host, int(port))


def _external_decode(where: str, model: str, entry: Any) -> ExternalDecodePool:
    """``URL``, ``[URL, ...]`` or ``{urls: URL or [URL, ...], lora: BOOL}``."""
    lora = False
    if isinstance(entry, dict):
        if "urls" not in entry or set(entry) - {"urls", "lora"} or not isinstance(entry.get("lora", False), bool):
            raise ValueError(f"{where} takes urls and lora (true or false), got {entry!r}")
        entry, lora = entry["urls"], entry.get("lora", False)
    urls = [entry] if isinstance(entry, str) else entry
    if not isinstance(urls, list) or not urls:
        raise ValueError(f"{where}: a URL or a non-empty list of URLs, got {entry!r}")
    return ExternalDecodePool(model, tuple(_server_url(where, url) for url in urls), lora)


def _server_url(where: str, text: Any) -> str:
    """``http(s)://HOST:PORT`` (a trailing ``/`` dropped)."""
    parts = urlsplit(str(text).rstrip("/"))
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path or parts.query:
        raise ValueError(f"{where}: a server URL is http://HOST:PORT, got {text!r}")
    return f"{parts.scheme}://{parts.netloc}"
