"""CLI: ``python -m pfs_sglang.models demo DIR [--seed N]`` writes the demo models."""

from __future__ import annotations

import argparse

from pfs_sglang.identity import fingerprint_of
from pfs_sglang.models.demo import write_demo_models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.models")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="write the base model and the demo decode modules")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    models = write_demo_models(args.out_dir, seed=args.seed)
    print(f"base (prefill module): {models.base}  fingerprint {fingerprint_of(models.base).digest}")
    for name, path in models.decode.items():
        print(f"decode module {name}: {path}")


if __name__ == "__main__":
    main()
