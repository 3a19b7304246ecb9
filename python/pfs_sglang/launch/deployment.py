"""A running PrefillShare deployment: identity checks, SGLang processes, the router.

``Deployment(topology).start()`` checks every decode model against the base's
fingerprint before anything starts (invariant 4), starts the prefill pool and one
decode pool per model, waits until each server is healthy (a child that dies fails the
launch with its log), then serves the router. ``stop()`` (or leaving the ``with``
block) stops the router and every child it started.
"""

from __future__ import annotations

import ipaddress
import logging
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from pfs_sglang.identity import DecodeModuleRecord, DecodeModuleRecordError, Fingerprint, check_compatible, fingerprint_of
from pfs_sglang.launch.processes import LaunchError, ManagedProcess, free_port, wait_until_healthy
from pfs_sglang.launch.server_commands import ServerPorts, decode_server_command, prefill_server_command
from pfs_sglang.launch.topology import Topology
from pfs_sglang.router.app import RouterConfig, build_router_app
from pfs_sglang.router.pools import DecodePool, PrefillWorker, Worker

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "fp8_e4m3": 1}


def check_decode_models(topology: Topology) -> Fingerprint:
    """Fingerprint the base and refuse any decode model not trained against it."""
    if topology.base_model is None or not Path(topology.base_model).is_dir():
        raise LaunchError(f"base model {topology.base_model} is not a directory")
    base = fingerprint_of(topology.base_model)
    for spec in topology.decode_models:
        try:
            record = DecodeModuleRecord.load(spec.path)
        except (DecodeModuleRecordError, FileNotFoundError, ValueError) as error:
            raise LaunchError(f"decode model '{spec.name}' refused: {error}") from error
        result = check_compatible(base, record)
        if not result.ok:
            raise LaunchError(f"decode model '{spec.name}' refused: {result.reason}")
    return base


def kv_bytes_per_token(fingerprint: Fingerprint) -> int:
    return 2 * fingerprint.num_layers * fingerprint.num_kv_heads * fingerprint.head_dim * _DTYPE_BYTES.get(
        fingerprint.dtype, 2
    )


def child_env(host: str, transfer_timeout_s: float) -> dict[str, str]:
    """Environment of every SGLang child: transfer deadlines, and loopback side channels."""
    seconds = str(max(1, int(transfer_timeout_s)))
    env = {
        "PFS_KV_TRANSFER_TIMEOUT_S": str(transfer_timeout_s),  # one batch of KV writes
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": seconds,  # prefill waiting for its decode half
        "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": seconds,  # decode waiting for the KV to land
    }
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:  # keep SGLang's own PD side channels on the address the deployment serves on
        env["SGLANG_HOST_IP"] = "127.0.0.1"
    return env


class Deployment:
    def __init__(self, topology: Topology):
        topology.validate()
        self.topology = topology
        self.log_dir = Path(topology.log_dir or tempfile.mkdtemp(prefix="pfs_sglang-"))
        self.children: list[ManagedProcess] = []
        self._router_server: uvicorn.Server | None = None
        self._router_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.topology.host}:{self.topology.port}"

    def _server(self, name: str, command: list[str], port: int) -> ManagedProcess:
        host = self.topology.host
        return ManagedProcess(name=name, command=command, log_path=self.log_dir / f"{name}.log",
                              url=f"http://{host}:{port}",
                              env=child_env(host, self.topology.transfer_timeout_s))

    def _plan(self, base: Fingerprint) -> RouterConfig:
        t = self.topology
        prefill_workers, pools = [], {}
        for index in range(t.prefill_replicas):
            ports = ServerPorts(http=free_port(t.host), bootstrap=free_port(t.host))
            command = prefill_server_command(t.base_model, t.host, ports, t.transfer_backend, t.device,
                                             t.max_total_tokens, t.prefill_args)
            self.children.append(self._server(f"prefill-{index}", command, ports.http))
            prefill_workers.append(PrefillWorker(url=self.children[-1].url, bootstrap_host=t.host,
                                                 bootstrap_port=ports.bootstrap))
        for spec in t.decode_models:
            pool = DecodePool(model=spec.name)
            for index in range(t.decode_replicas):
                ports = ServerPorts(http=free_port(t.host))
                command = decode_server_command(spec.name, spec.path, t.host, ports, t.transfer_backend,
                                                t.device, t.max_total_tokens, t.decode_args)
                self.children.append(self._server(f"decode-{spec.name}-{index}", command, ports.http))
                pool.workers.append(Worker(url=self.children[-1].url))
            pools[spec.name] = pool
        return RouterConfig(prefill_workers=prefill_workers, decode_pools=pools,
                            default_model=t.decode_models[0].name, kv_bytes_per_token=kv_bytes_per_token(base))

    def start(self) -> str:
        base = check_decode_models(self.topology)
        router_config = self._plan(base)
        try:
            for child in self.children:
                child.start()
            wait_until_healthy(self.children, self.topology.startup_timeout_s)
            self._start_router(router_config)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _start_router(self, config: RouterConfig) -> None:
        uvicorn_config = uvicorn.Config(build_router_app(config), host=self.topology.host,
                                        port=self.topology.port, log_level="warning")
        self._router_server = uvicorn.Server(uvicorn_config)
        self._router_thread = threading.Thread(target=self._router_server.run, name="pfs-router", daemon=True)
        self._router_thread.start()
        deadline = time.monotonic() + 30
        while not self._router_server.started:
            if not self._router_thread.is_alive() or time.monotonic() > deadline:
                raise LaunchError(f"the router could not listen on {self.topology.host}:{self.topology.port}")
            time.sleep(0.1)

    def dead_children(self) -> list[ManagedProcess]:
        return [child for child in self.children if child.exited() is not None]

    def stop(self) -> None:
        if self._router_server is not None:
            self._router_server.should_exit = True
            if self._router_thread is not None:
                self._router_thread.join(timeout=10)
            self._router_server = None
        for child in reversed(self.children):
            child.stop()

    def __enter__(self) -> "Deployment":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
