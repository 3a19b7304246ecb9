"""The demo: serve the embedded demo models and show them answering.

Writes the demo models (once) under ``.demo_models/``, starts stock SGLang on CPU for
the base model, asks it a chat question through the OpenAI API, and stops it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from pfs_sglang.models import load_demo_models, write_demo_models

ROOT = Path(__file__).resolve().parent.parent / ".demo_models"
PORT = 30100


def main() -> None:
    models = load_demo_models(ROOT) if (ROOT / "demo_models.json").exists() else write_demo_models(ROOT)
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(models.base),
               "--device", "cpu", "--attention-backend", "torch_native", "--max-total-tokens", "4096",
               "--skip-server-warmup", "--host", "127.0.0.1", "--port", str(PORT)]
    server = subprocess.Popen(command)
    try:
        for _ in range(240):
            try:
                if requests.get(f"http://127.0.0.1:{PORT}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        reply = requests.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "name the city of record 7"}],
            "max_tokens": 16, "temperature": 0,
        }, timeout=60).json()
        print("\nbase model answered:", repr(reply["choices"][0]["message"]["content"]))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
