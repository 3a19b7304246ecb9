"""The command line of ``python -m pfs_sglang.launch_server``: flags, YAML, foreground life.

Flags override the YAML topology (``--config``); with no model given the embedded demo
models are served. The process stays in the foreground: Ctrl-C or SIGTERM (also during
start-up) stops every child it started; a server that dies while serving stops the
deployment with that server's log tail. Exit status: 0 after a requested stop, the
child's own code when a server dies during start-up, 1 for any other launch failure.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pfs_sglang.launch.deployment import Deployment
from pfs_sglang.launch.processes import LaunchError
from pfs_sglang.launch.topology import (
    TRANSFER_BACKENDS,
    Topology,
    default_device,
    load_yaml_topology,
    parse_decode_model,
    with_demo_models,
)

EXAMPLES = """examples:
  python -m pfs_sglang.launch_server                      # the embedded demo models
  python -m pfs_sglang.launch_server --base-model BASE --decode-model coder=CODER --decode-model critic=CRITIC
  python -m pfs_sglang.launch_server --config topology.yaml --port 8000 --decode-args "--mem-fraction-static 0.8"
"""


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.launch_server", epilog=EXAMPLES,
                                     description="Start a PrefillShare deployment: one shared prefill pool, "
                                                 "a decode pool per model, and the router.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML topology (same keys as the flags; flags win)")
    parser.add_argument("--base-model", type=Path, help="the prefill module (frozen base model directory)")
    parser.add_argument("--decode-model", action="append", metavar="NAME=PATH",
                        help="a decode module served as model NAME (repeatable)")
    parser.add_argument("--default-model", help="model for requests that name none (default: the first)")
    parser.add_argument("--prefill-replicas", type=int)
    parser.add_argument("--decode-replicas", type=int, help="replicas per decode model")
    parser.add_argument("--transfer-backend", choices=TRANSFER_BACKENDS, help="KV transfer (default zmq)")
    parser.add_argument("--transfer-timeout", type=float, dest="transfer_timeout_s",
                        help="seconds one KV hand-off may take before the request fails (zmq; default 120)")
    parser.add_argument("--host", help="router host (default 127.0.0.1; servers bind here too)")
    parser.add_argument("--port", type=int, help="router port (default 30000)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--max-total-tokens", type=int, help="KV pool size of each server on CPU")
    parser.add_argument("--prefill-args", help='extra SGLang arguments for prefill servers, e.g. "--chunked-prefill-size 512"')
    parser.add_argument("--decode-args", help="extra SGLang arguments for decode servers (one string)")
    parser.add_argument("--log-dir", type=Path, help="where each server's log goes (default: a new temp dir)")
    parser.add_argument("--startup-timeout", type=float, dest="startup_timeout_s", help="seconds (default 300)")
    return parser


def topology_from_args(args: argparse.Namespace) -> Topology:
    settings: dict[str, Any] = load_yaml_topology(args.config) if args.config else {}
    flags = {
        "base_model": args.base_model,
        "decode_models": tuple(parse_decode_model(text) for text in args.decode_model) if args.decode_model else None,
        "default_model": args.default_model,
        "prefill_replicas": args.prefill_replicas,
        "decode_replicas": args.decode_replicas,
        "transfer_backend": args.transfer_backend,
        "transfer_timeout_s": args.transfer_timeout_s,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "max_total_tokens": args.max_total_tokens,
        "prefill_args": tuple(shlex.split(args.prefill_args)) if args.prefill_args is not None else None,
        "decode_args": tuple(shlex.split(args.decode_args)) if args.decode_args is not None else None,
        "log_dir": args.log_dir,
        "startup_timeout_s": args.startup_timeout_s,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    if "device" not in settings:
        settings["device"] = default_device()
    topology = Topology(**{"base_model": None, **settings})
    if topology.base_model is None:
        if topology.decode_models:
            raise LaunchError("--decode-model needs --base-model (the prefill module it was trained against)")
        topology = with_demo_models(topology)
    topology.validate()
    return topology


def _raise_stop(signum: int, _frame: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # one stop at a time: later signals wait for it
        signal.signal(sig, signal.SIG_IGN)
    raise StopRequested(signal.Signals(signum).name)


def _say(message: str, error: bool = False) -> None:
    print(f"pfs_sglang: {message}", file=sys.stderr if error else sys.stdout, flush=True)


def serve(deployment: Deployment) -> int:
    """Start the deployment and keep it up until a signal or a dead server; always stop it."""
    try:
        deployment.start()
        _say(f"serving on {deployment.url} (OpenAI API at {deployment.url}/v1)")
        _say(f"models: {', '.join(deployment.model_names)}")
        while True:
            time.sleep(1.0)
            dead = deployment.dead_children()
            if dead:
                _say(f"{dead[0].name} exited with code {dead[0].exit_code()} while serving; stopping. "
                     f"Its log ends:\n{dead[0].log_tail()}", error=True)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        topology = topology_from_args(args)
        deployment = Deployment(topology)
    except (LaunchError, ValueError, OSError) as error:
        _say(f"launch failed: {error}", error=True)
        return 1
    _say(f"prefill module {topology.base_model}; decode models "
         f"{', '.join(f'{s.name}={s.path}' for s in topology.decode_models)}; logs in {deployment.log_dir}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    return serve(deployment)
