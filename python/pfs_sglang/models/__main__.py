"""CLI: ``python -m pfs_sglang.models demo DIR [--seed N] [--lora]`` writes the demo models.

With ``--lora`` the LoRA decode modules of the same tasks are written too, beside them
(``DIR/lora-<task>``, PEFT adapters of ``DIR/base``).
"""

from __future__ import annotations

import argparse

from pfs_sglang.identity import fingerprint_of
from pfs_sglang.models.demo import write_demo_lora_adapters, write_demo_models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.models")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="write the base model and the demo decode modules")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lora", action="store_true",
                      help="also write the demo LoRA decode modules (adapters of the base) to OUT_DIR/lora-<task>")
    args = parser.parse_args(argv)
    models = write_demo_models(args.out_dir, seed=args.seed)
    print(f"base (prefill module): {models.base}  fingerprint {fingerprint_of(models.base).digest}")
    for name, path in models.decode.items():
        print(f"decode module {name}: {path}")
    if args.lora:
        for name, path in write_demo_lora_adapters(args.out_dir, write_base=False).decode.items():
            print(f"LoRA decode module {name}: {path}")


if __name__ == "__main__":
    main()
