"""Test helper: run one stock ``sglang.launch_server`` process on CPU for a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

CPU_SERVER_ARGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--max-total-tokens", "4096",
    "--skip-server-warmup",
    "--dtype", "float32",  # SGLang's auto would serve the float32 demo models in float16
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def sglang_server(model_path: Path, log_path: Path, extra_args: list[str] = (), timeout_s: float = 180):
    """Start stock SGLang on CPU, wait for /health, yield its base URL, stop it."""
    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--host", "127.0.0.1", "--port", str(port), *CPU_SERVER_ARGS, *extra_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"sglang exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not up yet, or too busy to answer in time
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sglang not healthy after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, 9)
