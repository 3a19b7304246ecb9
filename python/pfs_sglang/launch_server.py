"""``python -m pfs_sglang.launch_server``: start a whole PrefillShare deployment.

With no model it serves the embedded demo models. Examples:

    python -m pfs_sglang.launch_server
    python -m pfs_sglang.launch_server --base-model BASE --decode-model coder=CODER --decode-model critic=CRITIC
    python -m pfs_sglang.launch_server --config topology.yaml --port 8000

Stays in the foreground; Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from pfs_sglang.launch import Deployment, LaunchError, Topology
from pfs_sglang.launch.topology import (
    TRANSFER_BACKENDS,
    default_device,
    load_yaml_topology,
    parse_decode_model,
    with_demo_models,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.launch_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML topology (same keys as the flags)")
    parser.add_argument("--base-model", type=Path, help="the prefill module (frozen base model)")
    parser.add_argument("--decode-model", action="append", default=None, metavar="NAME=PATH",
                        help="a decode module served as model NAME (repeatable)")
    parser.add_argument("--prefill-replicas", type=int)
    parser.add_argument("--decode-replicas", type=int, help="replicas per decode model")
    parser.add_argument("--transfer-backend", choices=TRANSFER_BACKENDS)
    parser.add_argument("--host", help="router host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="router port (default 30000)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--max-total-tokens", type=int, help="KV pool size per server on CPU")
    parser.add_argument("--prefill-args", help="extra SGLang arguments for prefill servers (one string)")
    parser.add_argument("--decode-args", help="extra SGLang arguments for decode servers (one string)")
    parser.add_argument("--log-dir", type=Path, help="where each server's log goes")
    parser.add_argument("--startup-timeout", type=float, dest="startup_timeout_s")
    parser.add_argument("--transfer-timeout", type=float, dest="transfer_timeout_s",
                        help="deadline in seconds of one KV hand-off (default 120)")
    return parser


def topology_from_args(args: argparse.Namespace) -> Topology:
    settings = load_yaml_topology(args.config) if args.config else {}
    flags = {
        "base_model": args.base_model,
        "decode_models": tuple(parse_decode_model(text) for text in args.decode_model) if args.decode_model else None,
        "prefill_replicas": args.prefill_replicas,
        "decode_replicas": args.decode_replicas,
        "transfer_backend": args.transfer_backend,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "max_total_tokens": args.max_total_tokens,
        "prefill_args": tuple(shlex.split(args.prefill_args)) if args.prefill_args else None,
        "decode_args": tuple(shlex.split(args.decode_args)) if args.decode_args else None,
        "log_dir": args.log_dir,
        "startup_timeout_s": args.startup_timeout_s,
        "transfer_timeout_s": args.transfer_timeout_s,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    settings.setdefault("device", default_device())
    topology = Topology(**{"base_model": None, **settings})
    if topology.base_model is None:
        if topology.decode_models:
            raise LaunchError("--decode-model needs --base-model (the prefill module it was trained against)")
        topology = with_demo_models(topology)
    return topology


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        topology = topology_from_args(args)
        deployment = Deployment(topology)
        print(f"pfs_sglang: starting prefill module {topology.base_model} and decode models "
              f"{[spec.name for spec in topology.decode_models]} (logs in {deployment.log_dir})", flush=True)
        deployment.start()
    except (LaunchError, ValueError) as error:
        print(f"pfs_sglang: launch failed: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"pfs_sglang: serving on {deployment.url} (OpenAI API at {deployment.url}/v1)", flush=True)
    print(f"pfs_sglang: models: {', '.join(spec.name for spec in topology.decode_models)}", flush=True)
    try:
        while not stop.wait(1.0):
            dead = deployment.dead_children()
            if dead:
                print(f"pfs_sglang: {dead[0].name} exited with code {dead[0].exited()}; stopping. "
                      f"Log tail:\n{dead[0].log_tail()}", file=sys.stderr, flush=True)
                return 1
    finally:
        print("pfs_sglang: stopping", flush=True)
        deployment.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
