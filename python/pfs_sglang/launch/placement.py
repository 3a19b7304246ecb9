"""Which GPUs, TP size and memory share each server of a deployment gets.

Every server is one SGLang process: the prefill pool's replicas, then each decode
model's replicas (names as the launcher gives them: ``prefill-0``, ``decode-coder-1``),
of those this host runs (``Topology.role``).

- **Own GPUs** (default): each server gets ``tp`` GPUs of its own, taken in order
  from ``--gpus`` (all visible GPUs when not given); too few GPUs is a
  :class:`PlacementError` that says how many the topology needs.
- **Packed** (``--pack``): servers may share GPUs. Every pool then needs a memory
  share (``--prefill-mem-fraction``, ``--decode-mem-fraction [NAME=]F``): the fraction
  of each of its GPUs' memory it may hold for weights and KV. A server goes on the
  ``tp`` GPUs with the most memory left; the shares on one GPU may add up to at most
  ``PACKED_GPU_CAPACITY`` (the rest is the servers' working memory: CUDA contexts,
  graphs, activations). A share that fits nowhere is a :class:`PlacementError`.

SGLang's ``--mem-fraction-static`` is a fraction of the memory *free when the server
starts*, so servers that share a GPU start one after another (``after``: each waits
until the earlier ones on its GPUs are healthy) and get
``share / (1 - shares already placed on their fullest GPU)``.

Devices reach a server as ``CUDA_VISIBLE_DEVICES`` (its GPUs are then 0..tp-1, so no
``--base-gpu-id``); ``--gpus`` indices count within the launcher's own
``CUDA_VISIBLE_DEVICES`` when that is set. CPU deployments get no placement.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from pfs_sglang.launch.processes import LaunchError
from pfs_sglang.launch.topology import Topology

PACKED_GPU_CAPACITY = 0.9


class PlacementError(LaunchError):
    """The GPUs given cannot hold the topology."""


@dataclass(frozen=True)
class ServerPlacement:
    """Where one server runs."""

    name: str
    tp: int = 1
    gpus: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES entries; () on CPU
    share: float | None = None  # of each of its GPUs' memory; None: SGLang's default
    mem_fraction_static: float | None = None  # what SGLang is given (see the module docstring)
    after: tuple[str, ...] = ()  # servers sharing a GPU that must be healthy before this one starts

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)} if self.gpus else {}

    def describe(self) -> str:
        if not self.gpus:
            return "CPU" + (f", TP {self.tp}" if self.tp > 1 else "")
        memory = "SGLang's default memory fraction" if self.share is None else \
            f"memory share {self.share:g} (--mem-fraction-static {self.mem_fraction_static:g})"
        return f"GPU {','.join(self.gpus)}, TP {self.tp}, {memory}" + \
            (f", starts after {', '.join(self.after)}" if self.after else "")


@dataclass(frozen=True)
class _Pool:
    label: str  # "prefill" or "decode 'coder'", for messages
    servers: tuple[str, ...]
    tp: int
    share: float | None


def _pools(topology: Topology) -> list[_Pool]:
    """The pools this host runs (``Topology.role``): all of them, one, or none (the router)."""
    t = topology
    if t.deployment_mode().unified:
        spec = t.unified_server()
        return [_Pool("unified", tuple(f"{spec.name}-{i}" for i in range(t.replicas)), t.decode_tp_of(spec),
                      t.decode_mem_fraction_of(spec))]
    pools = [_Pool("prefill", tuple(f"prefill-{i}" for i in range(t.prefill_replicas)), t.prefill_tp,
                   t.prefill_mem_fraction)] if t.role.runs_prefill else []
    for spec in t.local_decode_servers():
        pools.append(_Pool(f"decode '{spec.name}'", tuple(f"decode-{spec.name}-{i}" for i in range(t.decode_replicas)),
                           t.decode_tp_of(spec), t.decode_mem_fraction_of(spec)))
    return pools


def visible_devices() -> list[str]:
    """The launcher's GPUs as ``CUDA_VISIBLE_DEVICES`` entries (``[]`` without CUDA)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def _devices(topology: Topology, visible: Sequence[str]) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries that ``topology.gpus`` names."""
    if topology.gpus is None:
        if not visible:
            raise PlacementError("--device cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, driver); "
                                 "name them with --gpus or use --device cpu")
        return list(visible)
    if not visible and "CUDA_VISIBLE_DEVICES" not in os.environ:
        return [str(index) for index in topology.gpus]  # nothing to check them against (e.g. --dry-run on CPU)
    missing = [index for index in topology.gpus if index >= len(visible)]
    if missing:
        raise PlacementError(f"--gpus names GPU {missing[0]}, but only {len(visible)} are visible "
                             f"({','.join(visible) or 'none'})")
    return [visible[index] for index in topology.gpus]


def _demand(pools: list[_Pool]) -> str:
    return "; ".join(f"{pool.label}: {len(pool.servers)} x TP {pool.tp}" for pool in pools)


def plan_placement(topology: Topology, visible: Sequence[str] | None = None) -> dict[str, ServerPlacement]:
    """Every server's placement by name, or a :class:`PlacementError` saying why the GPUs cannot hold it."""
    pools = _pools(topology)
    if topology.device == "cpu" or not pools:
        return {name: ServerPlacement(name, pool.tp) for pool in pools for name in pool.servers}
    devices = _devices(topology, visible_devices() if visible is None else visible)
    widest = max(pools, key=lambda pool: pool.tp)
    if widest.tp > len(devices):
        raise PlacementError(f"{widest.label} needs TP {widest.tp}, but --gpus gives {len(devices)} GPU(s) "
                             f"({','.join(devices)})")
    return _packed(pools, devices) if topology.pack else _own_gpus(pools, devices)


def _own_gpus(pools: list[_Pool], devices: list[str]) -> dict[str, ServerPlacement]:
    needed = sum(pool.tp * len(pool.servers) for pool in pools)
    if needed > len(devices):
        raise PlacementError(
            f"the topology needs {needed} GPUs, one set per server ({_demand(pools)}), but --gpus gives "
            f"{len(devices)} ({','.join(devices)}): give more GPUs, fewer replicas or a smaller TP, or let "
            "servers share GPUs with --pack and memory fractions")
    placements, free = {}, iter(devices)
    for pool in pools:
        for name in pool.servers:
            gpus = tuple(next(free) for _ in range(pool.tp))
            placements[name] = ServerPlacement(name, pool.tp, gpus, pool.share, pool.share)
    return placements


def _packed(pools: list[_Pool], devices: list[str]) -> dict[str, ServerPlacement]:
    unset = [pool.label for pool in pools if pool.share is None]
    if unset:
        raise PlacementError(f"--pack needs a memory fraction for every pool; none for {', '.join(unset)} "
                             "(--prefill-mem-fraction F, --decode-mem-fraction F or NAME=F)")
    used = {device: 0.0 for device in devices}
    holders: dict[str, list[str]] = {device: [] for device in devices}
    placements = {}
    for pool in pools:
        for name in pool.servers:
            roomiest = sorted(devices, key=lambda device: (used[device], devices.index(device)))[:pool.tp]
            if any(used[device] + pool.share > PACKED_GPU_CAPACITY + 1e-9 for device in roomiest):
                load = ", ".join(f"GPU {d}: {used[d]:g}" for d in devices)
                raise PlacementError(
                    f"the GPUs given cannot hold the topology: {name} ({pool.label}, TP {pool.tp}, memory share "
                    f"{pool.share:g}) fits on no {pool.tp} GPU(s) with at most {PACKED_GPU_CAPACITY:g} in use "
                    f"each (placed so far: {load}); give more GPUs or smaller memory fractions")
            fuller = max(used[device] for device in roomiest)
            after = tuple(dict.fromkeys(holder for device in roomiest for holder in holders[device]))
            placements[name] = ServerPlacement(name, pool.tp, tuple(sorted(roomiest, key=devices.index)), pool.share,
                                               round(pool.share / (1.0 - fuller), 4), after)
            for device in roomiest:
                used[device] += pool.share
                holders[device].append(name)
    return placements
