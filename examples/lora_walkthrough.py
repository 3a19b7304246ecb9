"""Train a LoRA decode module for a new task and serve it next to the demo decode models.

1. Write a small dataset for a task the demo models were not trained on, one that needs
   two hops over the record: "Which is larger, qty or size?" (answer: the field name).
2. Train a LoRA adapter against the frozen base with cache-conditioned fine-tuning
   (``python -m pfs_sglang.train finetune --mode lora``): the base computes the prompt's
   KV, the adapter learns to answer from it.
3. Measure its held-out accuracy (``python -m pfs_sglang.train eval``).
4. Serve it as the decode model ``larger`` next to ``extract``, ``compute`` and
   ``transform`` (``python -m pfs_sglang.launch_server``; the adapter runs on a decode
   server holding the base's weights, with SGLang's multi-LoRA), and ask it questions
   over the ``openai`` client. ``--dry-run`` prints the launch plan instead.

    python examples/lora_walkthrough.py --out out/larger-lora
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import openai

from pfs_sglang.bench.load import demo_deployment
from pfs_sglang.models import load_demo_models, write_demo_models
from pfs_sglang.train.corpus import chat_row, random_record, render_record, write_jsonl

QUESTION = "Which is larger, qty or size?"
DEMO_DIR = Path("~/.cache/pfs_sglang/demo_models").expanduser()  # where the launcher writes them


def untied_record(rng: random.Random) -> dict[str, str]:
    while (record := random_record(rng))["qty"] == record["size"]:
        pass
    return record


def larger(record: dict[str, str]) -> str:
    return "qty" if int(record["qty"]) > int(record["size"]) else "size"


def larger_rows(count: int, rng: random.Random) -> list[dict]:
    return [chat_row(record, QUESTION, larger(record)) for record in (untied_record(rng) for _ in range(count))]


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def ask(url: str, model: str, record: dict[str, str], question: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    reply = client.chat.completions.create(model=model, temperature=0, max_tokens=4, messages=[
        {"role": "user", "content": f"{render_record(record)}\n{question}"}])
    return reply.choices[0].message.content


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the adapter (and its data) are written")
    parser.add_argument("--demo-dir", type=Path, default=DEMO_DIR, help="the demo models (written if missing)")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--dry-run", action="store_true", help="print the launch plan instead of serving")
    args = parser.parse_args()

    demo = load_demo_models(args.demo_dir) if (args.demo_dir / "demo_models.json").is_file() else \
        write_demo_models(args.demo_dir)
    rng = random.Random(0)
    data = args.out.parent / f"{args.out.name}-data"
    train, test = write_jsonl(larger_rows(600, rng), data / "train.jsonl"), write_jsonl(larger_rows(60, rng),
                                                                                       data / "test.jsonl")
    # One torch thread: a model this small gains nothing from a second, and two threads beside a busy
    # core ran ~300x slower here (3-4 s a step against 11 s for all 300 steps).
    run([sys.executable, "-m", "pfs_sglang.train", "finetune", "--base", str(demo.base), "--data", str(train),
         "--out", str(args.out), "--mode", "lora", "--max-steps", str(args.steps), "--lr", "3e-3",
         "--batch-size", "16", "--logging-steps", "50", "--threads", "1"])
    run([sys.executable, "-m", "pfs_sglang.train", "eval", str(test), "--model", str(args.out),
         "--prefill", str(demo.base), "--threads", "1"])

    models = [f"--decode-model={name}={path}" for name, path in demo.decode.items()]
    launch = ["--base-model", str(demo.base), *models, f"--decode-model=larger={args.out}"]
    if args.dry_run:
        run([sys.executable, "-m", "pfs_sglang.launch_server", *launch, "--dry-run"])
        return 0
    with tempfile.TemporaryDirectory() as logs, demo_deployment(Path(logs), 8192, launch, timeout_s=600) as (url, _):
        for record in (untied_record(rng) for _ in range(3)):
            print(f"{render_record(record)}\n  larger: {ask(url, 'larger', record, QUESTION)!r} "
                  f"(right: {larger(record)!r})   extract, the city: {ask(url, 'extract', record, 'What is the city?')!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
