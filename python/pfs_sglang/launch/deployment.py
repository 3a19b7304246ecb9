"""A running PrefillShare deployment: checks, placement, SGLang processes, the router.

Upholds invariant 4 at launch: ``Deployment(topology)`` plans where every server runs
(``placement.py``; GPUs that cannot hold the topology fail here), and ``start()``
refuses what cannot hold the invariants (``guards.py``), fingerprints the base model
once and refuses any decode model not trained against it or tokenizing differently,
all before any process starts. The fingerprint is handed to the servers in a file
(``identity/handoff.py``), so no server hashes the weights again. Then it starts the
prefill pool and one decode pool per model (commands from ``server_commands.py``;
servers that share a GPU one after another), waits until every server is healthy (a
child that dies fails the launch with its log; start-up has a deadline), and serves
the router in a thread. ``dry_run()`` does the checks and returns every server's
environment and command line instead of starting them. ``stop()``, or leaving the
``with`` block, stops the router and every child::

    with Deployment(topology) as deployment:
        requests.post(deployment.url + "/v1/completions", json={"model": "coder", ...})
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from pfs_sglang.identity import (
    FINGERPRINT_FILE_ENV,
    DecodeModuleRecord,
    DecodeModuleRecordError,
    Fingerprint,
    check_compatible,
    fingerprint_of,
    token_sequence_of,
    write_fingerprint_handoff,
)
from pfs_sglang.launch.guards import check_guards
from pfs_sglang.launch.placement import plan_placement
from pfs_sglang.launch.processes import LaunchError, ManagedProcess, free_port, listening_socket, stop_all, wait_until_healthy
from pfs_sglang.launch.server_commands import (
    ServerPorts,
    cpu_threads_env,
    decode_server_command,
    prefill_server_command,
)
from pfs_sglang.launch.topology import Topology
from pfs_sglang.router import DecodePool, PrefillWorker, RouterConfig, Worker, build_router_app

ROUTER_START_TIMEOUT_S = 30.0
FINGERPRINT_HANDOFF_FILE = "prefill_fingerprint.json"


def check_decode_models(topology: Topology) -> Fingerprint:
    """Fingerprint the base (once) and refuse any decode model not trained against it, or
    whose tokenizer, special tokens, chat template or stop ids differ (``LaunchError``)."""
    base_dir = topology.base_model
    if base_dir is None or not Path(base_dir).is_dir():
        raise LaunchError(f"base model {base_dir} is not a directory")
    try:
        base = fingerprint_of(base_dir)
        base_tokens = token_sequence_of(base_dir)
    except Exception as error:  # any unreadable config/tokenizer/weights: say which model
        raise LaunchError(f"cannot fingerprint base model {base_dir}: {error}") from error
    for spec in topology.decode_models:
        try:
            record = DecodeModuleRecord.load(spec.path)
        except (DecodeModuleRecordError, OSError, ValueError) as error:
            raise LaunchError(f"decode model '{spec.name}' refused: {error}") from error
        result = check_compatible(base, record, base_tokens)
        if not result.ok:
            raise LaunchError(f"decode model '{spec.name}' refused: {result.reason}")
    return base


# Read by pfs_sglang.transfer.zmq_backend in every server: the deadline of one KV hand-off.
TRANSFER_TIMEOUT_ENV = "PFS_KV_TRANSFER_TIMEOUT_S"


def child_env(host: str, transfer_timeout_s: float) -> dict[str, str]:
    """Environment added to every server: the KV hand-off deadline, and PD side channels
    (bootstrap, ZMQ) on loopback when the deployment is.

    The deadline bounds each batch of KV writes (our engine) and SGLang's own waits: a
    prefill request whose decode half never comes, and a decode request whose KV never
    lands, fail after it instead of after SGLang's 300 s defaults.
    """
    whole_seconds = str(max(1, int(transfer_timeout_s)))
    env = {
        TRANSFER_TIMEOUT_ENV: str(transfer_timeout_s),
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": whole_seconds,
        "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": whole_seconds,
    }
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        env["SGLANG_HOST_IP"] = "127.0.0.1"
    return env


class Deployment:
    def __init__(self, topology: Topology):
        topology.validate()
        self.topology = topology
        self.placements = plan_placement(topology)
        self.log_dir = Path(topology.log_dir or tempfile.mkdtemp(prefix="pfs_sglang-"))
        self.children: list[ManagedProcess] = []
        self._router_server: uvicorn.Server | None = None
        self._router_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.topology.host}:{self.topology.port}"

    @property
    def model_names(self) -> list[str]:
        return [spec.name for spec in self.topology.decode_models]

    def _add_child(self, name: str, command: list[str], port: int, env: dict[str, str]) -> ManagedProcess:
        t = self.topology
        threads = cpu_threads_env(t.prefill_replicas + len(t.decode_models) * t.decode_replicas) \
            if t.device == "cpu" else {}
        child = ManagedProcess(name=name, command=command, log_path=self.log_dir / f"{name}.log",
                               url=f"http://{t.host}:{port}", env={**child_env(t.host, t.transfer_timeout_s), **threads,
                                                                   **self.placements[name].env, **env})
        self.children.append(child)
        return child

    def _ports(self, bootstrap: bool = False) -> ServerPorts:
        host = self.topology.host
        return ServerPorts(http=free_port(host), bootstrap=free_port(host) if bootstrap else None,
                           nccl=free_port(host) if self.topology.device == "cuda" else None)

    def check(self) -> Path:
        """Refuse what cannot be served (guards, identities); write the base's fingerprint
        for the servers and return that file."""
        check_guards(self.topology)
        base = check_decode_models(self.topology)
        return write_fingerprint_handoff(self.topology.base_model, base, self.log_dir / FINGERPRINT_HANDOFF_FILE)

    def _plan(self, fingerprint_file: Path) -> RouterConfig:
        """Choose ports and build every child's command line and the router's view of them."""
        t = self.topology
        handoff = {FINGERPRINT_FILE_ENV: str(fingerprint_file)}
        self.children = []
        prefill_workers = []
        for index in range(t.prefill_replicas):
            name, ports = f"prefill-{index}", self._ports(bootstrap=True)
            command = prefill_server_command(t.base_model, t.host, ports, t.transfer_backend, t.device,
                                             t.max_total_tokens, t.prefill_args, self.placements[name])
            child = self._add_child(name, command, ports.http, handoff)
            prefill_workers.append(PrefillWorker(url=child.url, bootstrap_host=t.host, bootstrap_port=ports.bootstrap))
        pools = {}
        for spec in t.decode_models:
            workers = []
            for index in range(t.decode_replicas):
                name, ports = f"decode-{spec.name}-{index}", self._ports()
                command = decode_server_command(spec.name, spec.path, t.host, ports, t.transfer_backend, t.device,
                                                t.max_total_tokens, t.decode_args_of(spec), self.placements[name])
                workers.append(Worker(url=self._add_child(name, command, ports.http, handoff).url))
            pools[spec.name] = DecodePool(spec.name, workers)
        vocab_size = json.loads((Path(t.base_model) / "config.json").read_text()).get("vocab_size")
        return RouterConfig(prefill_workers=prefill_workers, decode_pools=pools, default_model=t.default_model,
                            vocab_size=vocab_size)

    def dry_run(self) -> str:
        """Check everything ``start`` checks and describe every server and the router; start nothing."""
        config = self._plan(self.check())
        lines = []
        for child in self.children:
            lines.append(f"# {child.name}: {self.placements[child.name].describe()}; log {child.log_path}")
            lines.append(" ".join([*(f"{key}={shlex.quote(value)}" for key, value in child.env.items()),
                                   shlex.join(child.command)]))
        pools = "; ".join(f"{name} -> {', '.join(worker.url for worker in pool.workers)}"
                          for name, pool in config.decode_pools.items())
        lines.append(f"# router (in the launcher process): {self.url}; prefill pool "
                     f"{', '.join(worker.url for worker in config.prefill_workers)}; decode pools {pools}")
        return "\n".join(lines)

    def _start_children(self, deadline: float) -> None:
        """Start every child; one that shares a GPU waits until the earlier ones there are healthy."""
        by_name = {child.name: child for child in self.children}
        for child in self.children:
            earlier = [by_name[name] for name in self.placements[child.name].after]
            if earlier:
                wait_until_healthy(earlier, max(1.0, deadline - time.monotonic()))
            child.start()
        wait_until_healthy(self.children, max(1.0, deadline - time.monotonic()))

    def start(self) -> str:
        """Check, start every server and the router; return the router URL."""
        fingerprint_file = self.check()
        deadline = time.monotonic() + self.topology.startup_timeout_s
        # Held from now on: the servers' free ports can then never be the router's.
        router_socket = listening_socket(self.topology.host, self.topology.port)
        router_config = self._plan(fingerprint_file)
        try:
            self._start_children(deadline)
            self._start_router(router_config, router_socket)
        except BaseException:
            router_socket.close()
            self.stop()
            raise
        return self.url

    def _start_router(self, config: RouterConfig, sock: socket.socket) -> None:
        uvicorn_config = uvicorn.Config(build_router_app(config), log_level="warning")
        self._router_server = uvicorn.Server(uvicorn_config)
        self._router_thread = threading.Thread(target=self._router_server.run, kwargs={"sockets": [sock]},
                                               name="pfs-router", daemon=True)
        self._router_thread.start()
        deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
        while not self._router_server.started:
            if not self._router_thread.is_alive() or time.monotonic() > deadline:
                raise LaunchError(f"the router could not listen on {self.topology.host}:{self.topology.port}")
            time.sleep(0.1)

    def dead_children(self) -> list[ManagedProcess]:
        return [child for child in self.children if child.exit_code() is not None]

    def stop(self) -> None:
        """Stop the router, then every child (SIGTERM, SIGKILL after a grace period). Idempotent."""
        if self._router_server is not None:
            self._router_server.should_exit = True
            if self._router_thread is not None:
                self._router_thread.join(timeout=10)
            self._router_server = None
        stop_all(self.children)

    def __enter__(self) -> "Deployment":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
