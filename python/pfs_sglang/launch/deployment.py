"""A running PrefillShare deployment: checks, placement, SGLang processes, the router.

Upholds invariant 4 at launch: ``Deployment(topology)`` plans where every server runs
(``placement.py``; GPUs that cannot hold the topology fail here), and ``start()``
refuses what cannot hold the invariants (``guards.py``), fingerprints the base model
once and refuses any decode model not trained against it or tokenizing differently,
all before any process starts. The fingerprint is handed to the servers in a file
(``identity/handoff.py``), so no server hashes the weights again. Then it serves the
router in a thread at once (503 "deployment is starting" until every server is
healthy), brings up the prefill pool and one decode pool per model (commands from
``server_commands.py``; order, concurrency, restarts on taken ports and the deadline in
``startup.py``), and hands the router the servers' final addresses. While it serves,
``supervise()`` (called by the launcher every second) restarts a server that exits,
when the topology says so (``supervision.py``). Servers bind ``server_host``
(127.0.0.1 unless told otherwise), the router ``host``. Every server gets the
deployment's KV secret (made at launch, or given: ``kv_secret``, ``PFS_KV_SECRET``; the
``zmq`` engines refuse writes without it) and, with ``api_key``, the key the router then
requires of clients and passes on. ``dry_run()`` does the checks and returns every
server's environment and command line instead of starting them.

Each PD decode server whose KV pool the launcher sizes gets the context length that pool
can admit (SGLang's decode admission reserves ``--num-reserved-decode-tokens`` per
request on top of its prompt): ``--context-length`` when that is less than the model's,
said in ``--dry-run`` and its start-up line; a pool that admits nothing is refused
(``decode_limits.py``). On CPU each server's pool is ``--max-total-tokens``, or its share
of ``--kv-budget`` by the rule in ``pool_sizing.py`` (the first line of ``--dry-run``).

In the unified mode (``Topology.deployment_mode()``) the servers are ``replicas`` unified
servers (``unified-N``: the base and every LoRA decode module in one SGLang server,
``pfs_sglang.unified``) and no prefill server; the router sends each request whole to
one of them. Everything else above holds.

A deployment can span hosts (``topology.role``, ``docs/multi_host.md``): a server role
(``prefill``, ``decode:NAME``) checks and starts only its own server, on the fixed ports
the topology gives (``port``, ``bootstrap_port``) and with the KV secret every host
shares (given, never made), and runs no router; the ``router`` role starts no server and
checks no model (it needs no weights), routes to ``external_servers`` and waits for
their ``/health`` as for its own servers (``startup.py``, ``RemoteServer``).

``stop()``, or leaving the ``with`` block, stops the router and every child::

    with Deployment(topology) as deployment:
        requests.post(deployment.url + "/v1/completions", json={"model": "coder", ...})
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import uvicorn
from fastapi import FastAPI

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
from pfs_sglang.launch.decode_limits import PlannedDecodeLimit, check_decode_limits
from pfs_sglang.launch.pool_sizing import ServerPools, plan_server_pools
from pfs_sglang.launch.guards import check_guards
from pfs_sglang.launch.placement import ServerPlacement, plan_placement
from pfs_sglang.launch.processes import (
    LaunchError,
    ManagedProcess,
    RemoteServer,
    free_ports,
    listening_socket,
    stop_all,
)
from pfs_sglang.launch.server_commands import (
    ServerPorts,
    cpu_server_env,
    decode_server_command,
    prefill_server_command,
    unified_server_command,
    write_server_auth,
)
from pfs_sglang.launch.startup import BringUp, ServerLaunch, StartupEvent
from pfs_sglang.launch.supervision import RestartPolicy, SupervisionEvent, Supervisor
from pfs_sglang.launch.topology import DecodeServerSpec, Topology
from pfs_sglang.router import DecodePool, PrefillWorker, RouterConfig, Worker, build_router_app
from pfs_sglang.router.api_key import RequireApiKey
from pfs_sglang.transfer import FORCE_TCP_ENV, KV_SECRET_ENV, TRANSFER_TIMEOUT_ENV

ROUTER_START_TIMEOUT_S = 30.0
# Start-up deadlines (``default_startup_timeout_s``), sized from the start-ups measured on a
# 2-core box (docs/benchmarks.md, "Start-up").
STARTUP_BASE_S = 120.0
CPU_SERVER_START_S = 90.0
GPU_SERVER_START_S = 300.0
FINGERPRINT_HANDOFF_FILE = "prefill_fingerprint.json"
# Seconds the router keeps a client's idle connection: past any client's own reuse window
# (httpx 5 s, aiohttp 15 s), so a client seconds behind under load never reuses a
# connection the router is closing (uvicorn's 5 s made such reuses fail in the load run).
ROUTER_KEEPALIVE_S = 75
SERVER_AUTH_FILE = "server_auth.yaml"  # the servers' --api-key (mode 0600), read through SGLang's --config


def check_decode_models(topology: Topology) -> Fingerprint:
    """Fingerprint the base (once) and refuse any decode model this host serves (its
    ``role``'s) not trained against it, or whose tokenizer, special tokens, chat template
    or stop ids differ (``LaunchError``)."""
    base_dir = topology.base_model
    if base_dir is None or not Path(base_dir).is_dir():
        raise LaunchError(f"base model {base_dir} is not a directory")
    try:
        base = fingerprint_of(base_dir)
        base_tokens = token_sequence_of(base_dir)
    except Exception as error:  # any unreadable config/tokenizer/weights: say which model
        raise LaunchError(f"cannot fingerprint base model {base_dir}: {error}") from error
    for spec in topology.local_decode_models():
        try:
            record = DecodeModuleRecord.load(spec.path)
        except (DecodeModuleRecordError, OSError, ValueError) as error:
            raise LaunchError(f"decode model '{spec.name}' refused: {error}") from error
        result = check_compatible(base, record, base_tokens)
        if not result.ok:
            raise LaunchError(f"decode model '{spec.name}' refused: {result.reason}")
    return base


def child_env(host: str, transfer_timeout_s: float, kv_secret: str, force_tcp: bool = False) -> dict[str, str]:
    """Environment added to every server: the KV hand-off deadline, the deployment's KV
    secret (``zmq`` engines refuse KV writes from peers without it), TCP between ``zmq``
    engines even on one host with ``force_tcp`` (``FORCE_TCP_ENV``), and the address SGLang's
    PD side channels (bootstrap registration, ZMQ sockets) and our KV engine listen on and
    advertise: loopback when the servers bind it, the server host when it is one IP
    address; on a wildcard (0.0.0.0) SGLang's own choice (``SGLANG_HOST_IP`` from the
    launcher's environment, else this host's first non-loopback address).

    The deadline bounds each batch of KV writes (our engine) and SGLang's own waits: a
    prefill request whose decode half never comes, and a decode request whose KV never
    lands, fail after it instead of after SGLang's 300 s defaults.
    """
    whole_seconds = str(max(1, int(transfer_timeout_s)))
    env = {
        TRANSFER_TIMEOUT_ENV: str(transfer_timeout_s),
        KV_SECRET_ENV: kv_secret,
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": whole_seconds,
        "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": whole_seconds,
    }
    if force_tcp:
        env[FORCE_TCP_ENV] = "1"
    if is_loopback(host):
        env["SGLANG_HOST_IP"] = "127.0.0.1"
    elif _is_ip_address(host) and not ipaddress.ip_address(host).is_unspecified:
        env["SGLANG_HOST_IP"] = host
    return env


def is_loopback(host: str) -> bool:
    """Only this machine reaches ``host``."""
    return host == "localhost" or (_is_ip_address(host) and ipaddress.ip_address(host).is_loopback)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name
    return True


@dataclass
class PlannedServer:
    """One server of the deployment: what it decodes (None: a prefill server), ports and process."""

    decode_server: DecodeServerSpec | None
    child: ManagedProcess
    ports: ServerPorts | None = None
    unified: bool = False  # a unified server: the base and every adapter, no disaggregation

    @property
    def name(self) -> str:
        return self.child.name


def default_startup_timeout_s(topology: Topology, placements: dict[str, ServerPlacement]) -> float:
    """Start-up deadline scaled to what starts: on CPU the servers' imports share the cores
    (``CPU_SERVER_START_S`` per server on 2 cores, a wide margin over docs/benchmarks.md), on GPUs
    the servers that share a GPU start one after another (``GPU_SERVER_START_S`` each)."""
    if topology.role.kind == "router":  # the servers start on their own hosts, at once
        return STARTUP_BASE_S + GPU_SERVER_START_S
    if topology.device == "cpu":
        return STARTUP_BASE_S + CPU_SERVER_START_S * len(placements) * 2 / max(2, os.cpu_count() or 1)
    one_after_another = 1 + max((len(placement.after) for placement in placements.values()), default=0)
    return STARTUP_BASE_S + GPU_SERVER_START_S * one_after_another


def base_vocab_size(base_model: Path | None) -> int | None:
    """The base's vocab size (the router checks token-id prompts against it); None where this
    host has no copy of the base (a router role needs no weights)."""
    if base_model is None or not (Path(base_model) / "config.json").is_file():
        return None
    return json.loads((Path(base_model) / "config.json").read_text()).get("vocab_size")


def _remote_servers(topology: Topology) -> list[RemoteServer]:
    """The servers a router role awaits: each URL of ``external_servers`` once."""
    if topology.role.kind != "router":
        return []
    external = topology.external_servers
    urls = [*(("prefill", s.url) for s in external.prefill),
            *(("decode", url) for pool in external.decode for url in pool.urls)]
    return [RemoteServer(f"{role} {url}", url) for role, url in dict.fromkeys(urls)]


class Deployment:
    def __init__(self, topology: Topology, on_startup: Callable[[StartupEvent], None] | None = None,
                 on_supervision: Callable[[SupervisionEvent], None] | None = None):
        topology.validate()
        self.topology = topology
        self.placements = plan_placement(topology)
        self.log_dir = Path(topology.log_dir or tempfile.mkdtemp(prefix="pfs_sglang-"))
        self.on_startup = on_startup or (lambda event: None)
        self.on_supervision = on_supervision or (lambda event: None)
        self._supervisor: Supervisor | None = None
        given_secret = topology.kv_secret or os.environ.get(KV_SECRET_ENV)
        if not given_secret and topology.role.serves_alone and topology.transfer_backend == "zmq":
            raise LaunchError(f"--role {topology.role}: the servers of every host must share one KV secret (the "
                              "zmq engines refuse KV from peers without it): set kv_secret in the YAML topology or "
                              f"{KV_SECRET_ENV} in the environment, the same on every host")
        self.kv_secret = given_secret or secrets.token_hex(16)  # handed to this deployment's servers only
        self._kv_secret_shown = "<given>" if given_secret else "<made at launch>"
        self.servers: list[PlannedServer] = []
        self.remote_servers = _remote_servers(topology)
        self.decode_limits: dict[str, PlannedDecodeLimit] = {}  # PD decode server name -> its context length
        self.pools: ServerPools | None = None  # each kind of server's KV pool on this host (planned in _plan)
        self._router_server: uvicorn.Server | None = None
        self._router_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The router's (with a server role, which runs none, where it would listen)."""
        return f"http://{self.topology.host}:{self.topology.port}"

    @property
    def model_names(self) -> list[str]:
        t = self.topology
        return t.external_servers.models if t.role.kind == "router" else [spec.name for spec in t.decode_models]

    @property
    def children(self) -> list[ManagedProcess]:
        return [server.child for server in self.servers]

    @property
    def startup_timeout_s(self) -> float:
        if self.topology.startup_timeout_s is not None:
            return self.topology.startup_timeout_s
        return default_startup_timeout_s(self.topology, self.placements)

    @property
    def startup_concurrency(self) -> int:
        """How many servers may be starting at once; by default all (``after`` still orders
        servers sharing a GPU): on a small CPU box bounding it only lengthened start-up
        (docs/benchmarks.md, "Start-up")."""
        if self.remote_servers:  # awaited, not started here: all at once
            return len(self.remote_servers)
        return self.topology.startup_concurrency or len(self.placements)

    def check(self) -> Path:
        """Refuse what cannot be served (guards, identities); write the base's fingerprint
        for the servers and return that file."""
        check_guards(self.topology)
        self.decode_limits = check_decode_limits(self.topology)
        base = check_decode_models(self.topology)
        if self.topology.api_key:
            write_server_auth(self.topology.api_key, self.log_dir / SERVER_AUTH_FILE)
        return write_fingerprint_handoff(self.topology.base_model, base, self.log_dir / FINGERPRINT_HANDOFF_FILE)

    def _plan(self, fingerprint_file: Path) -> None:
        """Choose every server's ports and build its command line and environment."""
        t = self.topology
        self.pools = plan_server_pools(t)
        threads = cpu_server_env(len(self.placements)) if t.device == "cpu" else {}
        handoff = {FINGERPRINT_FILE_ENV: str(fingerprint_file)}
        unified = t.deployment_mode().unified
        if unified:
            spec = t.unified_server()
            planned = [(f"{spec.name}-{index}", spec) for index in range(t.replicas)]
        else:
            planned = [(f"prefill-{index}", None) for index in range(t.prefill_replicas)] if t.role.runs_prefill else []
            planned += [(f"decode-{spec.name}-{index}", spec) for spec in t.local_decode_servers()
                        for index in range(t.decode_replicas)]
        self.servers = []
        for name, spec in planned:
            env = {**child_env(t.server_host, t.transfer_timeout_s, self.kv_secret, t.transfer_force_tcp), **threads,
                   **self.placements[name].env, **handoff}
            child = ManagedProcess(name=name, command=[], log_path=self.log_dir / f"{name}.log", url="", env=env)
            server = PlannedServer(spec, child, unified=unified)
            self._choose_ports(server)
            self.servers.append(server)

    def _choose_ports(self, server: PlannedServer) -> None:
        """Fresh ports for ``server`` (at planning, and again after a port collision); a
        server role's HTTP and bootstrap ports are the topology's (other hosts are told them)."""
        t, placement = self.topology, self.placements[server.name]
        prefill, fixed = server.decode_server is None, t.role.serves_alone
        free = free_ports((0 if fixed else 1 + prefill) + (t.device == "cuda"), t.server_host)
        http = t.port if fixed else free.pop(0)
        bootstrap = (t.prefill_bootstrap_port if fixed else free.pop(0)) if prefill else None
        server.ports = ServerPorts(http=http, bootstrap=bootstrap, nccl=free.pop(0) if t.device == "cuda" else None)
        auth_file = self.log_dir / SERVER_AUTH_FILE if t.api_key else None
        pools = self.pools
        if server.unified:
            spec = server.decode_server
            server.child.command = unified_server_command(
                t.base_model, t.server_host, server.ports, t.device, pools.unified_tokens,
                tuple((model.name, model.path) for model in spec.models), t.decode_args_of(spec), placement, auth_file)
        elif prefill:
            server.child.command = prefill_server_command(t.base_model, t.server_host, server.ports, t.transfer_backend,
                                                          t.device, pools.prefill_tokens, t.prefill_args, placement,
                                                          auth_file)
        else:
            spec = server.decode_server
            adapters = tuple((model.name, model.path) for model in spec.models) if spec.lora else ()
            plan = self.decode_limits.get(spec.name)
            extra = (*t.decode_args_of(spec), *(plan.context_args if plan is not None else ()))
            server.child.command = decode_server_command(spec.name, t.base_model if spec.lora else spec.models[0].path,
                                                         t.server_host, server.ports, t.transfer_backend, t.device,
                                                         pools.decode_tokens, extra, placement, auth_file, adapters,
                                                         decode_cache=t.decode_cache)
        server.child.url = f"http://{t.server_host}:{server.ports.http}"

    def _describe(self, server: PlannedServer) -> str:
        bootstrap = f", bootstrap port {server.ports.bootstrap}" if server.ports.bootstrap else ""
        return f"{server.child.url}{bootstrap}; log {server.child.log_path}{self._limit_note(server)}"

    def _limit_note(self, server: PlannedServer) -> str:
        """``; <context length and why>; <decode cache>`` for a PD decode server, else nothing."""
        if server.unified or server.decode_server is None:
            return ""
        name = server.decode_server.name
        limit = f"; {self.decode_limits[name].describe()}" if name in self.decode_limits else ""
        cache = ("decode prefix cache of base KV on (--no-decode-cache to turn it off)" if self.topology.decode_cache
                 else "no decode prefix cache (--no-decode-cache): every request moves its whole prompt KV")
        return f"{limit}; {cache}"

    def _router_config(self) -> RouterConfig:
        """The router's view of the servers: this host's at their current ports, or (``--role
        router``) the external ones."""
        t = self.topology
        prefill_workers, pools = self._external_pools() if t.role.kind == "router" else self._local_pools()
        return RouterConfig(prefill_workers=prefill_workers, decode_pools=pools, default_model=t.default_model,
                            vocab_size=base_vocab_size(t.base_model))

    def _local_pools(self) -> tuple[list[PrefillWorker], dict[str, DecodePool]]:
        t = self.topology
        if t.deployment_mode().unified:  # every model's pool: every unified server, with the model's adapter
            servers = [Worker(url=s.child.url) for s in self.servers]
            return [], {spec.name: DecodePool(spec.name, servers, lora_adapter=spec.name) for spec in t.decode_models}
        prefill_workers = [PrefillWorker(url=s.child.url, bootstrap_host=t.server_host, bootstrap_port=s.ports.bootstrap)
                           for s in self.servers if s.decode_server is None]
        workers = {s.name: Worker(url=s.child.url) for s in self.servers if s.decode_server is not None}
        pools = {}
        for spec in t.decode_models:  # a co-located LoRA server's Worker is in each of its models' pools
            serving = [s for s in self.servers if s.decode_server is not None and spec in s.decode_server.models]
            pools[spec.name] = DecodePool(spec.name, [workers[s.name] for s in serving],
                                          lora_adapter=spec.name if serving[0].decode_server.lora else None)
        return prefill_workers, pools

    def _external_pools(self) -> tuple[list[PrefillWorker], dict[str, DecodePool]]:
        external = self.topology.external_servers
        prefill_workers = [PrefillWorker(url=s.url, bootstrap_host=s.bootstrap_host, bootstrap_port=s.bootstrap_port)
                           for s in external.prefill]
        # a server listed under several models (co-located LoRA adapters) is one Worker in each of their pools
        workers = {url: Worker(url=url) for pool in external.decode for url in pool.urls}
        pools = {pool.model: DecodePool(pool.model, [workers[url] for url in pool.urls],
                                        lora_adapter=pool.model if pool.lora else None) for pool in external.decode}
        return prefill_workers, pools

    def dry_run(self) -> str:
        """Check everything ``start`` checks and describe every server and the router; start nothing."""
        t = self.topology
        if t.role.kind != "router":
            self._plan(self.check())
        lines = [f"# KV pools: {self.pools.rule}"] if t.role.kind != "router" and t.device == "cpu" else []
        for child in self.children:
            server = next(s for s in self.servers if s.child is child)
            lines.append(f"# {child.name}: {self.placements[child.name].describe()}; log {child.log_path}"
                         f"{self._limit_note(server)}")
            env = {**child.env, KV_SECRET_ENV: self._kv_secret_shown}
            lines.append(" ".join([*(f"{key}={shlex.quote(value)}" for key, value in env.items()),
                                   shlex.join(child.command)]))
        if not t.role.runs_router:
            lines.append(f"# no router on this host (--role {t.role}): list its server under the router's "
                         "external_servers")
            return "\n".join(lines)
        config = self._router_config()
        pools = "; ".join(f"{name} -> {', '.join(worker.url for worker in pool.workers)}"
                          for name, pool in config.decode_pools.items())
        wait = f"waits up to {self.startup_timeout_s:.0f} s for their /health" if self.remote_servers else \
            f"servers start {self.startup_concurrency} at a time, deadline {self.startup_timeout_s:.0f} s"
        if config.unified:
            lines.append(f"# router (in the launcher process): {self.url}; unified servers (no prefill pool, "
                         f"no KV transfer): {pools}; {wait}")
        else:
            lines.append(f"# router (in the launcher process): {self.url}; prefill pool "
                         f"{', '.join(worker.url for worker in config.prefill_workers)}; decode pools {pools}; {wait}")
        return "\n".join(lines)

    def bring_up(self) -> BringUp:
        """The start-up of the planned servers (``startup.py``): order, concurrency, retries,
        deadline; with ``--role router``, the wait for the external servers."""
        fixed_ports = self.topology.role.serves_alone
        launches = [ServerLaunch(server.child, describe=partial(self._describe, server),
                                 new_ports=None if fixed_ports else partial(self._choose_ports, server),
                                 after=self.placements[server.name].after) for server in self.servers]
        launches += [ServerLaunch(remote, describe=lambda: "waiting until its /health answers")
                     for remote in self.remote_servers]
        return BringUp(launches, self.startup_concurrency, self.startup_timeout_s, self.on_startup)

    def _check_fixed_ports(self) -> None:
        """A server role's ports are fixed (other hosts are told them): refuse at once when one is taken."""
        t = self.topology
        for port in (t.port, *([t.prefill_bootstrap_port] if t.role.runs_prefill else [])):
            listening_socket(t.server_host, port).close()

    def start(self) -> str:
        """Check, start the router (answering 503 while starting) and this host's servers (or
        await the external ones), then route; return the router URL."""
        t = self.topology
        servers_here = t.role.kind != "router"
        fingerprint_file = self.check() if servers_here else None
        if t.role.serves_alone:
            self._check_fixed_ports()
        router_socket = listening_socket(t.host, t.port) if t.role.runs_router else None
        if servers_here:
            self._plan(fingerprint_file)
        bring_up = self.bring_up()
        try:
            if router_socket is not None:
                router_app = build_router_app(still_starting=bring_up.not_healthy, api_key=t.api_key)
                self._start_router(router_app, router_socket)
            bring_up.run()
            if router_socket is not None:
                router_app.state.serve(self._router_config())
        except BaseException:
            if router_socket is not None:
                router_socket.close()
            self.stop()
            raise
        return self.url

    def _start_router(self, app: FastAPI | RequireApiKey, sock: socket.socket) -> None:
        self._router_server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                            timeout_keep_alive=ROUTER_KEEPALIVE_S))
        self._router_thread = threading.Thread(target=self._router_server.run, kwargs={"sockets": [sock]},
                                               name="pfs-router", daemon=True)
        self._router_thread.start()
        deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
        while not self._router_server.started:
            if not self._router_thread.is_alive() or time.monotonic() > deadline:
                raise LaunchError(f"the router could not listen on {self.topology.host}:{self.topology.port}")
            time.sleep(0.1)

    def supervise(self) -> ManagedProcess | None:
        """One supervision pass while serving: restarts what is due (with ``restart_on_failure``);
        returns a server that exited and will not be restarted (the deployment must end)."""
        if self._supervisor is None:
            policy = RestartPolicy(self.topology.max_restarts) if self.topology.restart_on_failure else None
            self._supervisor = Supervisor(self.children, policy, lambda event: self.on_supervision(event))
        return self._supervisor.check()

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
