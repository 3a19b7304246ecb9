"""The launcher: refuses foreign decode models before starting anything, fails fast when
a child dies at start-up, and stops every child on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from pfs_sglang.identity import fingerprint_of, write_decode_module_record
from pfs_sglang.launch_server import build_parser, topology_from_args
from pfs_sglang.models.demo import write_perturbed_decode_module
from sglang_process import free_port


def launch(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pfs_sglang.launch_server", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def sglang_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "sglang.launch_server" in " ".join(p.info["cmdline"] or [])}


def test_foreign_decode_model_is_refused_before_anything_starts(demo_models, tmp_path):
    retrained_base = write_perturbed_decode_module(demo_models.base, tmp_path / "retrained_base", seed=11)
    foreign = write_perturbed_decode_module(demo_models.base, tmp_path / "foreign", seed=12)
    write_decode_module_record(foreign, fingerprint_of(retrained_base))
    before = sglang_processes()
    process = launch(["--base-model", str(demo_models.base), "--decode-model", f"extract={demo_models.decode['extract']}",
                      "--decode-model", f"foreign={foreign}", "--port", str(free_port())])
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "decode model 'foreign' refused" in output
    assert "weights_hash differs: prefill module has" in output
    assert sglang_processes() <= before


def test_child_that_dies_at_startup_fails_the_launch_with_its_error(demo_models, tmp_path):
    started = time.monotonic()
    process = launch(["--base-model", str(demo_models.base), "--decode-model", f"extract={demo_models.decode['extract']}",
                      "--decode-args=--no-such-sglang-flag", "--port", str(free_port()),
                      "--log-dir", str(tmp_path)])
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "decode-extract-0 exited with code" in output
    assert "--no-such-sglang-flag" in output  # the child's own error, from its log
    assert time.monotonic() - started < 240
    time.sleep(2)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


def test_sigterm_stops_every_child(demo_models, tmp_path):
    port = free_port()
    process = launch(["--base-model", str(demo_models.base), "--decode-model", f"compute={demo_models.decode['compute']}",
                      "--port", str(port), "--log-dir", str(tmp_path)])
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=10).ok:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline
        time.sleep(1)
    children = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    assert len(children) >= 2
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=90)
    time.sleep(1)
    assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_yaml_topology_and_flags_override(tmp_path, demo_models):
    config = tmp_path / "topology.yaml"
    config.write_text(
        f"base_model: {demo_models.base}\n"
        f"decode_models:\n  extract: {demo_models.decode['extract']}\n  compute: {demo_models.decode['compute']}\n"
        "port: 8123\ndecode_replicas: 2\nprefill_args: --chunked-prefill-size 256\n"
    )
    topology = topology_from_args(build_parser().parse_args(["--config", str(config), "--port", "9000"]))
    assert [spec.name for spec in topology.decode_models] == ["extract", "compute"]
    assert (topology.port, topology.decode_replicas) == (9000, 2)
    assert topology.prefill_args == ("--chunked-prefill-size", "256")
    with pytest.raises(ValueError, match="unknown topology keys"):
        config.write_text("base_model: x\nreplicas: 3\n")
        topology_from_args(build_parser().parse_args(["--config", str(config)]))
