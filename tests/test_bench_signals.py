"""``python -m pfs_sglang.bench`` stopped by a signal stops every server it started.

The command runs in a subprocess against a stand-in system: the stock-SGLang system with
each server's command replaced by a shell that never answers ``/health`` and holds a
child of its own, as an SGLang server holds its scheduler processes (the launcher's
parent-death signal reaches the shell, not its children). The command is sent SIGTERM
while it waits for that server, and no process of the server may be left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

DRIVER = '''
import os, runpy, sys
from pfs_sglang.bench import runner
from pfs_sglang.bench.systems import StockSGLangSystem

MARK = os.environ["PFS_TEST_MARK"]


class Stalled(StockSGLangSystem):
    def __init__(self, *args):
        super().__init__(*args)
        for process in self.processes.values():
            process.command = ["sh", "-c", f"sleep {MARK} & sleep {MARK}; true"]


runner.make_group = lambda group, models, budget, device, log_dir, startup_timeout_s, *pd_options: [
    Stalled(models, budget, device, log_dir, startup_timeout_s)]
sys.argv = ["pfs_sglang.bench", *sys.argv[1:]]
runpy.run_module("pfs_sglang.bench", run_name="__main__", alter_sys=True)
'''


def _sleeps(mark: str) -> list[int]:
    """Pids of the stand-in server's ``sleep MARK`` processes."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", mark.encode()]:
                pids.append(int(entry.name))
        except OSError:
            pass  # gone meanwhile
    return pids


def test_sigterm_stops_every_server_the_bench_command_started(tmp_path):
    mark = f"299.{random.randrange(10**8, 10**9)}"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, str(driver), "run", "--shape", "tiny", "--systems", "sglang", "--models", "extract",
               "--sessions", "1", "--rounds", "1", "--models-dir", str(tmp_path / "models"), "--no-progress",
               "--out", str(tmp_path / "out")]
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PFS_TEST_MARK": mark})
    try:
        deadline = time.monotonic() + 120
        while len(_sleeps(mark)) < 2:  # the server is up (and will never be healthy)
            assert bench.poll() is None and time.monotonic() < deadline, bench.stdout.read() if bench.poll() else ""
            time.sleep(0.2)
        bench.send_signal(signal.SIGTERM)
        output = bench.communicate(timeout=60)[0]
        assert _sleeps(mark) == [], output[-3000:]
        assert bench.returncode == 128 + signal.SIGTERM, output[-3000:]
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in _sleeps(mark):
            os.kill(pid, signal.SIGKILL)
