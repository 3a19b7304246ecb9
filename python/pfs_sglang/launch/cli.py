"""The command line of ``python -m pfs_sglang.launch_server``: flags, YAML, foreground life.

Flags override the YAML topology (``--config``); with no model given the embedded demo
models are served. Per-model settings take ``NAME=VALUE`` (``--decode-args coder="..."``,
``--decode-tp coder=2``, ``--decode-mem-fraction coder=0.3``) beside the decode-wide
value. ``--dry-run`` runs every check and prints each server's environment and command
line (and the router's pools) without starting anything. While starting, the launcher
prints a line per server started (its address and log file), restarted and healthy,
under a progress bar on a terminal. The process stays in the foreground: Ctrl-C or
SIGTERM (also during start-up) stops every child it started; a server that dies while
serving stops the deployment with that server's log tail, unless
``--restart-on-failure`` restarts it (a line when it exits, restarts, serves again;
``--max-restarts`` exits stop the deployment as before). Exit status: 0 after a
requested stop, the child's own code when a server dies during start-up, 1 for any
other launch failure. ``--api-key`` can also come from the YAML (``api_key:``), which
keeps it out of ``ps``.

``--mode`` chooses the shape (``Topology.deployment_mode()``): ``auto`` (the default) serves
LoRA decode modules on one host unified (one server holds the base and every adapter;
``--replicas`` such servers) and anything else PD; the launcher prints which and why.
``--mode unified`` where one server cannot hold the models is refused with the reason.

Across hosts (``docs/multi_host.md``) each host runs one launcher with ``--role``:
``prefill`` or ``decode:NAME`` starts that one server on ``--port`` (and the prefill's
``--bootstrap-port``) at ``--server-host``, ``router`` only the router, over the servers
the YAML lists under ``external_servers``; ``all`` (the default) is the whole deployment.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pfs_sglang.launch.deployment import Deployment, is_loopback
from pfs_sglang.launch.processes import LaunchError
from pfs_sglang.launch.startup import StartupEvent, StartupStep
from pfs_sglang.launch.supervision import SupervisionEvent, SupervisionStep
from pfs_sglang.launch.topology import (
    SGLANG_BOOTSTRAP_PORT,
    MODES,
    TRANSFER_BACKENDS,
    Role,
    Topology,
    default_device,
    load_yaml_topology,
    parse_decode_model,
    parse_gpus,
    split_per_model,
    with_demo_models,
)

EXAMPLES = """examples:
  python -m pfs_sglang.launch_server                      # the embedded demo models
  python -m pfs_sglang.launch_server --base-model BASE --decode-model coder=CODER --decode-model critic=CRITIC
  python -m pfs_sglang.launch_server --config topology.yaml --port 8000 --decode-args "--max-running-requests 64"
  python -m pfs_sglang.launch_server --base-model BASE --decode-model coder=CODER --decode-model critic=CRITIC \
      --gpus 0-3 --prefill-tp 2 --decode-args critic="--chunked-prefill-size 4096" --dry-run
  python -m pfs_sglang.launch_server ... --gpus 0 --pack --prefill-mem-fraction 0.4 --decode-mem-fraction 0.2
  # one deployment on three hosts (docs/multi_host.md); topology.yaml holds kv_secret and external_servers:
  python -m pfs_sglang.launch_server --config topology.yaml --role prefill --server-host 0.0.0.0 --port 30001 \
      --bootstrap-port 30002
  python -m pfs_sglang.launch_server --config topology.yaml --role decode:coder --server-host 0.0.0.0 --port 30001
  python -m pfs_sglang.launch_server --config topology.yaml --role router --host 0.0.0.0 --port 8000
"""


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.launch_server", epilog=EXAMPLES,
                                     description="Start a PrefillShare deployment: one shared prefill pool, "
                                                 "a decode pool per model, and the router.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML topology (same keys as the flags; flags win)")
    parser.add_argument("--role", help="what this host runs: all (default), prefill, decode:NAME (a decode model's "
                                       "server, or 'lora' for co-located LoRA adapters) or router (over the YAML's "
                                       "external_servers); see docs/multi_host.md")
    parser.add_argument("--base-model", type=Path, help="the prefill module (frozen base model directory)")
    parser.add_argument("--decode-model", action="append", metavar="NAME=PATH",
                        help="a decode module served as model NAME (repeatable)")
    parser.add_argument("--default-model", help="model for requests that name none (default: the first)")
    parser.add_argument("--mode", choices=MODES,
                        help="auto (default): unified when every decode model is a LoRA adapter of the base served "
                             "on one host (one server holds the base and every adapter; no KV is copied), else pd "
                             "(a prefill server and decode servers, the KV handed over)")
    parser.add_argument("--replicas", type=int, help="unified mode: how many whole unified servers (default 1)")
    parser.add_argument("--prefill-replicas", type=int)
    parser.add_argument("--decode-replicas", type=int, help="replicas per decode model")
    parser.add_argument("--transfer-backend", choices=TRANSFER_BACKENDS, help="KV transfer (default zmq)")
    parser.add_argument("--transfer-timeout", type=float, dest="transfer_timeout_s",
                        help="seconds one KV hand-off may take before the request fails (zmq; default 120)")
    parser.add_argument("--transfer-force-tcp", action="store_true", default=None,
                        help="zmq: KV moves over TCP sockets even between servers on one host (as between hosts), "
                             "not IPC or shared memory: to try the cross-host path on one machine")
    parser.add_argument("--host", help="router host (default 127.0.0.1)")
    parser.add_argument("--server-host", help="host every SGLang server binds (HTTP, KV bootstrap, KV engine; default "
                                              "127.0.0.1: only this machine, the router included, reaches them); "
                                              "across hosts 0.0.0.0 or an address of this host that the others reach")
    parser.add_argument("--port", type=int, help="router port (default 30000); with --role prefill or decode:NAME, "
                                                 "the port of this host's server")
    parser.add_argument("--bootstrap-port", type=int,
                        help=f"with --role prefill, the prefill server's KV bootstrap port (default "
                             f"{SGLANG_BOOTSTRAP_PORT}, SGLang's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--max-total-tokens", type=int, help="KV pool size of each server on CPU (default 8192)")
    parser.add_argument("--kv-budget", type=int, metavar="TOKENS",
                        help="on CPU, the KV tokens of all servers together, split by a stated rule (docs/launcher.md: "
                             "PD decode pools hold one context of the decode --context-length, the prefill pool the "
                             "rest; unified servers share it evenly); --dry-run prints the split")
    parser.add_argument("--prefill-args", help='extra SGLang arguments for prefill servers, e.g. "--chunked-prefill-size 512"')
    parser.add_argument("--decode-args", action="append", metavar="[NAME=]ARGS",
                        help="extra SGLang arguments for every decode server, or NAME=ARGS for one model's (repeatable)")
    parser.add_argument("--gpus", help="GPUs to place servers on, e.g. 0-7 or 0,2,4 (default with --device cuda: all "
                                       "visible); each server gets its own unless --pack")
    parser.add_argument("--pack", action="store_true", default=None,
                        help="let servers share GPUs; every pool then needs a memory fraction")
    parser.add_argument("--prefill-tp", type=int, help="tensor-parallel size of each prefill server (default 1)")
    parser.add_argument("--decode-tp", action="append", metavar="[NAME=]N",
                        help="tensor-parallel size of each decode server, or NAME=N for one model's (default 1)")
    parser.add_argument("--prefill-mem-fraction", type=float, metavar="F",
                        help="share of each of its GPUs' memory a prefill server may hold (default: SGLang's)")
    parser.add_argument("--decode-mem-fraction", action="append", metavar="[NAME=]F",
                        help="the same for decode servers, or NAME=F for one model's")
    parser.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (not /health, /metrics); "
                                           "the servers are started with it too, so only the router reaches them")
    parser.add_argument("--restart-on-failure", action="store_true", default=None,
                        help="restart a server that exits while serving, on its ports, with a doubling backoff "
                             "(1 s, 2 s, ... 60 s); without it a dead server stops the deployment")
    parser.add_argument("--max-restarts", type=int, metavar="N",
                        help="restarts per server with --restart-on-failure (default 5); one more exit stops "
                             "the deployment")
    parser.add_argument("--colocate-lora", action=argparse.BooleanOptionalAction, default=None,
                        help="serve every LoRA-adapter decode model from one decode server holding the base's "
                             "weights once (default); --no-colocate-lora: one such server per adapter")
    parser.add_argument("--decode-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="PD decode servers keep a prefix cache of base KV (SGLang's decode radix cache as the "
                             "pfs tree, capped at the prompt KV the prefill module computed), so a prompt prefix they "
                             "hold is not moved again (default); --no-decode-cache: every request moves its whole "
                             "prompt KV")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print every server's environment and command line; start nothing")
    parser.add_argument("--log-dir", type=Path, help="where each server's log goes (default: a new temp dir)")
    parser.add_argument("--startup-timeout", type=float, dest="startup_timeout_s",
                        help="seconds until every server is healthy (default: scaled to the servers started)")
    parser.add_argument("--startup-concurrency", type=int, metavar="N",
                        help="servers starting at once (default: all; servers sharing a GPU always start one "
                             "after another)")
    return parser


def _split_values(values: list[str] | None, flag: str, parse: Any, accumulate: bool = False) -> tuple[Any, dict[str, Any]]:
    """Repeated ``[NAME=]VALUE`` flags -> (the value for every model, {name: value}); with
    ``accumulate`` repeated values (argument tuples) add up, otherwise the last one wins."""
    shared, per_model = None, {}
    for text in values or ():
        name, value = split_per_model(text)
        try:
            parsed = parse(value)
        except ValueError as error:
            raise ValueError(f"{flag} {text!r}: {error}") from error
        if name is None:
            shared = (*(shared or ()), *parsed) if accumulate else parsed
        else:
            per_model[name] = (*per_model.get(name, ()), *parsed) if accumulate else parsed
    return shared, per_model


def _with_per_model(topology: Topology, flag: str, field: str, values: dict[str, Any]) -> Topology:
    names = [spec.name for spec in topology.decode_models]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{flag} names {unknown[0]!r}, which is not one of the decode models {names}")
    models = tuple(replace(spec, **{field: values[spec.name]}) if spec.name in values else spec
                   for spec in topology.decode_models)
    return replace(topology, decode_models=models)


def topology_from_args(args: argparse.Namespace) -> Topology:
    settings: dict[str, Any] = load_yaml_topology(args.config) if args.config else {}
    decode_args, model_args = _split_values(args.decode_args, "--decode-args", lambda text: tuple(shlex.split(text)),
                                            accumulate=True)
    decode_tp, model_tp = _split_values(args.decode_tp, "--decode-tp", int)
    decode_share, model_share = _split_values(args.decode_mem_fraction, "--decode-mem-fraction", float)
    flags = {
        "base_model": args.base_model,
        "decode_models": tuple(parse_decode_model(text) for text in args.decode_model) if args.decode_model else None,
        "default_model": args.default_model,
        "mode": args.mode,
        "replicas": args.replicas,
        "prefill_replicas": args.prefill_replicas,
        "decode_replicas": args.decode_replicas,
        "transfer_backend": args.transfer_backend,
        "transfer_timeout_s": args.transfer_timeout_s,
        "transfer_force_tcp": args.transfer_force_tcp,
        "role": Role.parse(args.role) if args.role is not None else None,
        "bootstrap_port": args.bootstrap_port,
        "host": args.host,
        "server_host": args.server_host,
        "restart_on_failure": args.restart_on_failure,
        "max_restarts": args.max_restarts,
        "port": args.port,
        "device": args.device,
        "max_total_tokens": args.max_total_tokens,
        "kv_budget": args.kv_budget,
        "prefill_args": tuple(shlex.split(args.prefill_args)) if args.prefill_args is not None else None,
        "decode_args": decode_args,
        "log_dir": args.log_dir,
        "startup_timeout_s": args.startup_timeout_s,
        "startup_concurrency": args.startup_concurrency,
        "colocate_lora": args.colocate_lora,
        "decode_cache": args.decode_cache,
        "api_key": args.api_key,
        "gpus": parse_gpus(args.gpus) if args.gpus is not None else None,
        "pack": args.pack,
        "prefill_tp": args.prefill_tp,
        "decode_tp": decode_tp,
        "prefill_mem_fraction": args.prefill_mem_fraction,
        "decode_mem_fraction": decode_share,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    if settings.get("kv_budget") is not None and settings.get("max_total_tokens") is not None:
        raise ValueError("--kv-budget splits one budget among the servers; --max-total-tokens gives each the same "
                         "pool: give one of them")
    if "device" not in settings:  # GPUs named: place on them; else cuda where there is one
        settings["device"] = "cuda" if settings.get("gpus") is not None or settings.get("pack") else default_device()
    topology = Topology(**{"base_model": None, **settings})
    if topology.base_model is None and topology.role.kind != "router":  # a router needs no model
        if topology.decode_models:
            raise LaunchError("--decode-model needs --base-model (the prefill module it was trained against)")
        topology = with_demo_models(topology)
    for flag, field, values in (("--decode-args", "args", model_args), ("--decode-tp", "tp", model_tp),
                                ("--decode-mem-fraction", "mem_fraction", model_share)):
        topology = _with_per_model(topology, flag, field, values)
    topology.validate()
    return topology


def _raise_stop(signum: int, _frame: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # one stop at a time: later signals wait for it
        signal.signal(sig, signal.SIG_IGN)
    raise StopRequested(signal.Signals(signum).name)


def _say(message: str, error: bool = False) -> None:
    print(f"pfs_sglang: {message}", file=sys.stderr if error else sys.stdout, flush=True)


class StartupProgress:
    """The launcher's start-up output: a line per server started, restarted and healthy
    (with its address and log), under a progress bar when stdout is a terminal."""

    def __init__(self, servers: int):
        self.bar = tqdm(total=servers, desc="pfs_sglang: servers healthy", unit="server",
                        disable=not sys.stdout.isatty(), leave=False)

    def __call__(self, event: StartupEvent) -> None:
        line = f"pfs_sglang: {event.server} {event.step.value} at {event.elapsed_s:.0f} s" + (
            f": {event.detail}" if event.detail else "")
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)
        if event.step is StartupStep.HEALTHY:
            self.bar.update()
            if self.bar.n == self.bar.total:
                self.close()

    def close(self) -> None:
        self.bar.close()


def serve(deployment: Deployment) -> int:
    """Start the deployment and keep it up until a signal or a dead server; always stop it."""
    try:
        deployment.start()
        _say_serving(deployment)
        while True:
            time.sleep(1.0)
            dead = deployment.supervise()
            if dead is not None:
                _say(f"{dead.name} exited with code {dead.exit_code()} while serving; stopping. "
                     f"Its log ends:\n{dead.log_tail()}", error=True)
                return 1
    except StopRequested as stop:
        _say(f"{stop}: stopping")
        return 0
    except LaunchError as error:
        _say(f"launch failed: {error}", error=True)
        return error.exit_code
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deployment.stop()


def _say_serving(deployment: Deployment) -> None:
    role = deployment.topology.role
    if role.runs_router:
        _say(f"serving on {deployment.url} (OpenAI API at {deployment.url}/v1)")
        _say(f"models: {', '.join(deployment.model_names)}")
        return
    for server in deployment.servers:
        bootstrap = f", KV bootstrap port {server.ports.bootstrap}" if server.ports.bootstrap else ""
        _say(f"{server.name} serving on {server.child.url}{bootstrap} (--role {role}: no router on this host; "
             "the router's external_servers list this server at an address of this host it reaches)")


def _describe_launch(topology: Topology, deployment: Deployment) -> str:
    t = topology
    models = ", ".join(f"{s.name}={s.path}" for s in (t.decode_models if t.role.kind == "all" else
                                                       t.local_decode_models()))
    if t.role.kind == "router":
        decode = "; ".join(f"{pool.model} -> {', '.join(pool.urls)}" for pool in t.external_servers.decode)
        return (f"--role router: prefill servers {', '.join(s.url for s in t.external_servers.prefill)}; "
                f"decode servers {decode}")
    if t.role.kind == "prefill":
        return f"--role prefill: prefill module {t.base_model}; logs in {deployment.log_dir}"
    role = f"--role {t.role}: " if t.role.serves_alone else ""
    mode = t.deployment_mode()
    return (f"{role}mode {mode.mode} ({mode.reason}); prefill module {t.base_model}; decode models {models}; "
            f"logs in {deployment.log_dir}")


def say_supervision(event: SupervisionEvent) -> None:
    _say(f"{event.server} {event.step.value}: {event.detail}",
         error=event.step in (SupervisionStep.EXITED, SupervisionStep.GIVEN_UP))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        topology = topology_from_args(args)
        deployment = Deployment(topology)
    except (LaunchError, ValueError, OSError) as error:
        _say(f"launch failed: {error}", error=True)
        return 1
    _say(_describe_launch(topology, deployment))
    if topology.role.serves_alone and is_loopback(topology.server_host):
        _say(f"--server-host {topology.server_host}: only this machine reaches this server; for other hosts give "
             "0.0.0.0 or an address of this host they reach")
    if args.dry_run:
        try:
            print(deployment.dry_run(), flush=True)
        except LaunchError as error:
            _say(f"launch failed: {error}", error=True)
            return 1
        _say("dry run: nothing was started")
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    deployment.on_startup = progress = StartupProgress(servers=len(deployment.placements)
                                                       + len(deployment.remote_servers))
    deployment.on_supervision = say_supervision
    try:
        return serve(deployment)
    finally:
        progress.close()
