"""The systems the benchmark compares, each started and stopped by the harness.

Every system gets the same total KV budget: the sum of every server's
``--max-total-tokens`` is ``models x per_model_tokens`` in all of them (``KVBudget``),
and the same cores: each CPU server's threads are an equal share of the machine's
(``cpu_server_env``: one server gets every core, three get a third each).

- ``pfs``: this project (``pfs_sglang.launch.Deployment``): one shared prefill server
  whose ``pfs`` tree is keyed on the prefill module (invariant 3), one decode server per
  model, the router. Pools: the launcher's ``--kv-budget`` rule (``KVBudget``).
- ``pfs-noshare``: the same deployment, with sharing off the way the paper's baseline
  has it: every request carries ``extra_key`` = its model name, which the ``pfs`` tree
  keeps as a namespace below the prefill module's, so each model prefills and caches
  its own copy of the shared context in the one prefill pool (checked: a prompt cached
  for one model gives 0 cached tokens to another with its own key; greedy outputs are
  unchanged).
- ``sglang``: stock SGLang, one ordinary (non-PD) server per model with its own radix
  cache and ``per_model_tokens`` of pool, with the launcher's CPU flags.
- ``pfs-unified``: this project's unified deployment (``Deployment`` of a topology whose
  decode models are the LoRA adapters of ``ModelSet.adapters``): one SGLang server holds
  the base and every adapter, one pool of the whole budget, one ``pfs`` tree keyed on
  the prefill module, each adapter applied from the last prompt token; behind the router.
- ``sglang-lora``: stock SGLang's multi-LoRA, one server of the base with every adapter
  and the whole budget, its own radix cache (which keys a request by its adapter, so
  every adapter holds its own copy of a shared context), each adapter applied to the
  whole prompt; requests name the adapter as ``lora_path``. Its command line is the
  unified server's with the ``pfs`` tree left out, so the two differ only in the tree's
  namespace and where the adapter starts.
- ``vllm``: not run here (see ``VLLM_SKIPPED``).
"""

from __future__ import annotations

import json
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import requests

from pfs_sglang.bench.shapes import ModelSet
from pfs_sglang.launch import DecodeModelSpec, Deployment, Topology
from pfs_sglang.launch.pool_sizing import PDPools, split_pd_budget
from pfs_sglang.launch.processes import ManagedProcess, free_port, stop_all, wait_until_healthy
from pfs_sglang.launch.server_commands import (
    RADIX_CACHE_BACKEND,
    ServerPorts,
    cpu_server_env,
    unified_server_command,
)

SYSTEMS = ("pfs", "pfs-noshare", "sglang", "pfs-unified", "sglang-lora", "vllm")
LORA_SYSTEMS = ("pfs-unified", "sglang-lora")  # served from ModelSet.adapters
VLLM_SKIPPED = ("vllm skipped: vLLM has no CPU wheel on PyPI (its CPU backend is built from source) and its "
                "CUDA wheel pins another torch than SGLang's, so it would need its own multi-GB virtualenv "
                "and still not serve on this machine")
FLUSH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class KVBudget:
    """Equal KV budgets: ``models x per_model_tokens`` slots in every system.

    A stock server per model gets ``per_model_tokens``; a PD deployment splits the total
    by the launcher's rule (``launch/pool_sizing.py``, its ``--kv-budget``): each decode
    server one context of ``decode_context_tokens`` plus SGLang's decode reserve, the
    shared prefill server the rest.
    """

    per_model_tokens: int
    decode_context_tokens: int | None = None  # None: no PD system runs (the lone-request benchmark)

    def pd_pools(self, models: int) -> PDPools:
        """The PD split of this budget for ``models`` decode servers (raises ``LaunchError`` if it cannot serve)."""
        if self.decode_context_tokens is None:
            raise ValueError("this budget has no decode context length: it sizes no PD deployment")
        return split_pd_budget(self.total(models), 1, models, self.decode_context_tokens)

    def total(self, models: int) -> int:
        """Every system's KV slots; a single-server system's (``pfs-unified``, ``sglang-lora``) one pool."""
        return models * self.per_model_tokens


@dataclass(frozen=True)
class Target:
    """Where a model's requests go and what the harness adds to their ``/generate`` body."""

    url: str
    fields: dict = field(default_factory=dict)


def cpu_server_args(device: str, max_total_tokens: int, model: Path) -> list[str]:
    """The launcher's serving flags for one server (``launch/server_commands.py``), without PD ones."""
    args = ["--enable-metrics", "--enable-cache-report", "--max-total-tokens", str(max_total_tokens)]
    config = json.loads((Path(model) / "config.json").read_text())
    if (config.get("dtype") or config.get("torch_dtype")) == "float32":
        args += ["--dtype", "float32"]
    if device == "cpu":
        args += ["--device", "cpu", "--attention-backend", "torch_native", "--skip-server-warmup",
                 "--disable-overlap-schedule", "--sleep-on-idle"]
    return args


class BenchSystem(ABC):
    """A started system: targets per model, its servers (for /metrics), flush, stop."""

    name: str

    @abstractmethod
    def start(self) -> None:
        """Start every server; raise ``LaunchError`` if one does not come up."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every process the system started (idempotent)."""

    @abstractmethod
    def target(self, model: str) -> Target:
        """Where ``model``'s requests go."""

    @abstractmethod
    def servers(self) -> list[ManagedProcess]:
        """Every SGLang server (their ``/metrics`` are read)."""

    @abstractmethod
    def prefill_servers(self) -> list[ManagedProcess]:
        """The servers that hand KV off (their transfer counters are read)."""

    @abstractmethod
    def flush_urls(self) -> list[str]:
        """Where ``POST /flush_cache`` empties every prefix cache."""

    @abstractmethod
    def server_pools(self) -> dict[str, int]:
        """Each server's ``--max-total-tokens``."""

    def flush(self) -> None:
        """Empty every prefix cache (between measured points); waits until the servers are idle."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        for url in self.flush_urls():
            while True:
                try:
                    if requests.post(f"{url}/flush_cache", timeout=30).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: {url}/flush_cache did not succeed in {FLUSH_TIMEOUT_S:.0f} s")
                time.sleep(1.0)


class PrefillShareSystem(BenchSystem):
    """``pfs`` or ``pfs-noshare`` on a PD deployment; both may share one (``system_group``)."""

    def __init__(self, name: str, deployment: Deployment, budget: KVBudget, share: bool):
        self.name, self.deployment, self.budget, self.share = name, deployment, budget, share

    def start(self) -> None:
        self.deployment.start()

    def stop(self) -> None:
        self.deployment.stop()

    def target(self, model: str) -> Target:
        fields = {"model": model}
        if not self.share:
            fields["extra_key"] = model  # the model's own namespace in the prefill tree
        return Target(self.deployment.url, fields)

    def servers(self) -> list[ManagedProcess]:
        return list(self.deployment.children)

    def prefill_servers(self) -> list[ManagedProcess]:
        return [child for child in self.deployment.children if child.name.startswith("prefill-")]

    def flush_urls(self) -> list[str]:
        return [self.deployment.url]

    def server_pools(self) -> dict[str, int]:
        pools = self.deployment.pools  # the launcher's plan, made when it started
        return {child.name: pools.prefill_tokens if child.name.startswith("prefill-") else pools.decode_tokens
                for child in self.deployment.children}


def pd_deployment(models: ModelSet, budget: KVBudget, device: str, log_dir: Path, startup_timeout_s: float,
                  decode_cache: bool = True, prefill_args: tuple[str, ...] = ()) -> Deployment:
    """One shared prefill server and a decode server per model, the budget split by the launcher's rule;
    ``decode_cache``: the decode servers' prefix cache of base KV (the launcher's ``--no-decode-cache``);
    ``prefill_args``: the prefill server's extra SGLang arguments (the launcher's ``--prefill-args``)."""
    return Deployment(Topology(
        base_model=models.base,
        decode_models=tuple(DecodeModelSpec(name, path) for name, path in models.decode.items()),
        port=free_port(), device=device, kv_budget=budget.total(len(models.decode)),
        decode_args=("--context-length", str(budget.decode_context_tokens)), decode_cache=decode_cache,
        prefill_args=prefill_args,
        log_dir=log_dir, startup_timeout_s=startup_timeout_s,
    ))


class StockSGLangSystem(BenchSystem):
    def __init__(self, models: ModelSet, budget: KVBudget, device: str, log_dir: Path, startup_timeout_s: float,
                 host: str = "127.0.0.1"):
        self.name, self.models, self.budget = "sglang", models, budget
        self.startup_timeout_s = startup_timeout_s
        self.processes: dict[str, ManagedProcess] = {}
        for model, path in models.decode.items():
            port = free_port(host)
            command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(path), "--host", host,
                       "--port", str(port), "--served-model-name", model,
                       *cpu_server_args(device, budget.per_model_tokens, path)]
            self.processes[model] = ManagedProcess(name=f"sglang-{model}", command=command,
                                                   log_path=Path(log_dir) / f"sglang-{model}.log",
                                                   url=f"http://{host}:{port}",
                                                   env=cpu_server_env(len(models.decode)) if device == "cpu" else {})

    def start(self) -> None:
        try:
            for process in self.processes.values():
                process.start()
            wait_until_healthy(list(self.processes.values()), self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_all(list(self.processes.values()))

    def target(self, model: str) -> Target:
        return Target(self.processes[model].url)

    def servers(self) -> list[ManagedProcess]:
        return list(self.processes.values())

    def prefill_servers(self) -> list[ManagedProcess]:
        return []

    def flush_urls(self) -> list[str]:
        return [process.url for process in self.processes.values()]

    def server_pools(self) -> dict[str, int]:
        return {process.name: self.budget.per_model_tokens for process in self.processes.values()}


class UnifiedSystem(BenchSystem):
    """``pfs-unified``: one unified server (the base and every adapter, the whole budget) behind the router."""

    def __init__(self, models: ModelSet, budget: KVBudget, device: str, log_dir: Path, startup_timeout_s: float):
        self.name, self.budget = "pfs-unified", budget
        self.deployment = Deployment(Topology(
            base_model=models.base,
            decode_models=tuple(DecodeModelSpec(name, path) for name, path in models.adapters.items()),
            port=free_port(), device=device, max_total_tokens=budget.total(len(models.adapters)), mode="unified",
            log_dir=log_dir, startup_timeout_s=startup_timeout_s,
        ))

    def start(self) -> None:
        self.deployment.start()

    def stop(self) -> None:
        self.deployment.stop()

    def target(self, model: str) -> Target:
        return Target(self.deployment.url, {"model": model})

    def direct_target(self, model: str) -> Target:
        """The unified server itself, past the router, the adapter named as the router names it."""
        return Target(self.deployment.children[0].url, {"lora_path": model})

    def servers(self) -> list[ManagedProcess]:
        return list(self.deployment.children)

    def prefill_servers(self) -> list[ManagedProcess]:
        return []

    def flush_urls(self) -> list[str]:
        return [self.deployment.url]

    def server_pools(self) -> dict[str, int]:
        return {child.name: self.budget.total(len(self.deployment.model_names)) for child in self.deployment.children}


def stock_lora_command(models: ModelSet, budget: KVBudget, device: str, host: str, port: int) -> list[str]:
    """The unified server's command line for the same base and adapters, without the ``pfs`` tree: stock SGLang."""
    command = unified_server_command(models.base, host, ServerPorts(http=port), device,
                                     budget.total(len(models.adapters)), tuple(models.adapters.items()))
    at = command.index("--radix-cache-backend")
    if command[at + 1] != RADIX_CACHE_BACKEND:
        raise RuntimeError(f"unexpected unified server command: {command}")
    return command[:at] + command[at + 2:]


class StockLoRASystem(BenchSystem):
    """``sglang-lora``: one stock SGLang server of the base with every adapter (SGLang's multi-LoRA)."""

    def __init__(self, models: ModelSet, budget: KVBudget, device: str, log_dir: Path, startup_timeout_s: float,
                 host: str = "127.0.0.1"):
        self.name, self.budget, self.startup_timeout_s = "sglang-lora", budget, startup_timeout_s
        self.pool = budget.total(len(models.adapters))
        port = free_port(host)
        self.process = ManagedProcess(name="sglang-lora", command=stock_lora_command(models, budget, device, host, port),
                                      log_path=Path(log_dir) / "sglang-lora.log", url=f"http://{host}:{port}",
                                      env=cpu_server_env(1) if device == "cpu" else {})

    def start(self) -> None:
        try:
            self.process.start()
            wait_until_healthy([self.process], self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_all([self.process])

    def target(self, model: str) -> Target:
        return Target(self.process.url, {"lora_path": model})

    def servers(self) -> list[ManagedProcess]:
        return [self.process]

    def prefill_servers(self) -> list[ManagedProcess]:
        return []

    def flush_urls(self) -> list[str]:
        return [self.process.url]

    def server_pools(self) -> dict[str, int]:
        return {self.process.name: self.pool}


def groups_of(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The requested systems (``vllm`` left out), grouped by the processes they run on.

    ``pfs`` and ``pfs-noshare`` are one PD deployment (only the requests' namespace
    differs), so they share it; caches are flushed between their runs. Every other
    system is a group of its own.
    """
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    pd = tuple(name for name in names if name in ("pfs", "pfs-noshare"))
    alone = [(name,) for name in ("sglang", *LORA_SYSTEMS) if name in names]
    return [group for group in (pd, *alone) if group]


def make_group(group: tuple[str, ...], models: ModelSet, budget: KVBudget, device: str, log_dir: Path,
               startup_timeout_s: float, decode_cache: bool = True, prefill_args: tuple[str, ...] = ()
               ) -> list[BenchSystem]:
    """Fresh systems (new ports) of one group; starting or stopping the first starts or stops them all."""
    if group == ("sglang",):
        return [StockSGLangSystem(models, budget, device, Path(log_dir) / "sglang", startup_timeout_s)]
    if group == ("pfs-unified",):
        return [UnifiedSystem(models, budget, device, Path(log_dir) / "unified", startup_timeout_s)]
    if group == ("sglang-lora",):
        return [StockLoRASystem(models, budget, device, Path(log_dir) / "sglang-lora", startup_timeout_s)]
    deployment = pd_deployment(models, budget, device, Path(log_dir) / "pd", startup_timeout_s, decode_cache,
                               prefill_args)
    return [PrefillShareSystem(name, deployment, budget, share=name == "pfs") for name in group]
