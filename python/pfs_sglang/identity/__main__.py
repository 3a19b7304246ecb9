"""CLI: print a model's prefill-module fingerprint, or check a decode module against a base.

    python -m pfs_sglang.identity fingerprint MODEL_DIR
    python -m pfs_sglang.identity check BASE_DIR DECODE_DIR   (exit 1 with the reason)
"""

from __future__ import annotations

import argparse
import json
import sys

from pfs_sglang.identity import DecodeModuleRecord, check_compatible, fingerprint_of, token_sequence_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfs_sglang.identity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("fingerprint", help="print the fingerprint of a model dir as JSON")
    show.add_argument("model_dir")
    check = commands.add_parser("check", help="check a decode module against a prefill module")
    check.add_argument("base_dir")
    check.add_argument("decode_dir")
    args = parser.parse_args(argv)

    if args.command == "fingerprint":
        print(json.dumps(fingerprint_of(args.model_dir).to_dict(), indent=2, sort_keys=True))
        return 0
    result = check_compatible(fingerprint_of(args.base_dir), DecodeModuleRecord.load(args.decode_dir),
                              token_sequence_of(args.base_dir))
    print("compatible" if result.ok else f"incompatible: {result.reason}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
