"""The launcher: refuses foreign decode models before starting anything, fails fast when
a child dies at start-up; topology and command lines. (Hashing the base's weights once
per launch is checked on the deployment of ``test_startup.py``, stopping every child on
SIGTERM on the launchers of ``test_multi_host.py``.)

The process tests start real SGLang servers on 127.0.0.1 (CPU), one deployment at a time.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import replace

import psutil
import pytest

from pfs_sglang.identity import fingerprint_of, write_decode_module_record
from pfs_sglang.launch import DecodeModelSpec, Deployment, LaunchError, Topology
from pfs_sglang.launch.cli import build_parser, topology_from_args
from pfs_sglang.launch.server_commands import (
    RADIX_CACHE_BACKEND,
    ServerPorts,
    decode_server_command,
    prefill_server_command,
)
from pfs_sglang.models.demo import write_perturbed_decode_module
from pfs_sglang.launch.placement import ServerPlacement
from pfs_sglang.launch.processes import free_port


def launch(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pfs_sglang.launch_server", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def sglang_processes_with(argument: str) -> set[int]:
    """SGLang servers whose command line names ``argument`` (other tests may run servers too)."""
    return {
        p.pid for p in psutil.process_iter(["cmdline"])
        if "sglang.launch_server" in " ".join(p.info["cmdline"] or []) and argument in " ".join(p.info["cmdline"])
    }


@pytest.mark.slow  # a fresh process that imports SGLang: seconds of CPU, so make test runs it, not make test-fast
def test_foreign_decode_model_is_refused_before_anything_starts(demo_models, tmp_path):
    retrained_base = write_perturbed_decode_module(demo_models.base, tmp_path / "retrained_base", seed=11)
    foreign = write_perturbed_decode_module(demo_models.base, tmp_path / "foreign", seed=12)
    write_decode_module_record(foreign, fingerprint_of(retrained_base))
    log_dir = tmp_path / "logs"
    process = launch(["--base-model", str(demo_models.base), "--decode-model", f"extract={demo_models.decode['extract']}",
                      "--decode-model", f"foreign={foreign}", "--port", str(free_port()), "--log-dir", str(log_dir)])
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "decode model 'foreign' refused" in output
    assert "weights_hash differs: prefill module has" in output
    assert not sglang_processes_with(str(foreign)) and not sglang_processes_with(str(log_dir))
    assert not log_dir.exists() or not any(log_dir.iterdir())  # no server was started


def test_deployment_api_checks_before_it_starts_anything(demo_models, tmp_path):
    foreign = write_perturbed_decode_module(demo_models.base, tmp_path / "foreign", seed=13)
    write_decode_module_record(foreign, fingerprint_of(write_perturbed_decode_module(demo_models.base,
                                                                                     tmp_path / "other", seed=14)))
    refused = Deployment(Topology(base_model=demo_models.base, decode_models=(DecodeModelSpec("f", foreign),),
                                  port=free_port(), device="cpu"))
    with pytest.raises(LaunchError, match="decode model 'f' refused: .*weights_hash differs"):
        refused.start()
    assert refused.children == []
    no_record = Deployment(Topology(base_model=demo_models.base, decode_models=(DecodeModelSpec("b", demo_models.base),),
                                    port=free_port(), device="cpu"))
    with pytest.raises(LaunchError, match="decode model 'b' refused: .* is not a decode module"):
        no_record.start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = Deployment(Topology(base_model=demo_models.base, port=taken.getsockname()[1], device="cpu",
                                   decode_models=(DecodeModelSpec("extract", demo_models.decode["extract"]),)))
        with pytest.raises(LaunchError, match="cannot listen on 127.0.0.1"):
            busy.start()
        assert busy.children == []


@pytest.mark.server
def test_child_that_dies_at_startup_fails_the_launch_with_its_error(demo_models, tmp_path):
    started = time.monotonic()
    process = launch(["--base-model", str(demo_models.base), "--decode-model", f"extract={demo_models.decode['extract']}",
                      "--decode-args=--no-such-sglang-flag", "--port", str(free_port()),
                      "--log-dir", str(tmp_path)])
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2  # the child's own exit code (SGLang's argument error)
    assert "decode-extract-0 exited with code 2 during start-up" in output
    assert "--no-such-sglang-flag" in output  # the child's own error, from its log
    assert time.monotonic() - started < 240
    time.sleep(2)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


def test_yaml_topology_and_flags_override(tmp_path, demo_models):
    config = tmp_path / "topology.yaml"
    config.write_text(
        f"base_model: {demo_models.base}\n"
        f"decode_models:\n  extract: {demo_models.decode['extract']}\n  compute: {demo_models.decode['compute']}\n"
        "port: 8123\ndecode_replicas: 2\nprefill_args: --chunked-prefill-size 256\ndefault_model: compute\n"
    )
    args = ["--config", str(config), "--port", "9000", "--decode-args", "--mem-fraction-static 0.5", "--device", "cpu"]
    topology = topology_from_args(build_parser().parse_args(args))
    assert [spec.name for spec in topology.decode_models] == ["extract", "compute"]
    assert (topology.port, topology.decode_replicas, topology.default_model) == (9000, 2, "compute")
    assert topology.prefill_args == ("--chunked-prefill-size", "256")
    assert topology.decode_args == ("--mem-fraction-static", "0.5")
    assert (topology.transfer_backend, topology.host, topology.prefill_replicas) == ("zmq", "127.0.0.1", 1)
    with pytest.raises(ValueError, match="unknown topology keys"):
        config.write_text("base_model: x\nreplica: 3\n")  # a typo of replicas
        topology_from_args(build_parser().parse_args(["--config", str(config)]))


def test_no_model_given_serves_the_demo_models_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PFS_SGLANG_HOME", str(tmp_path))
    topology = topology_from_args(build_parser().parse_args(["--device", "cpu"]))
    demo_json = tmp_path / "demo_models" / "demo_models.json"
    assert demo_json.is_file() and topology.base_model.parent == demo_json.parent
    assert [spec.name for spec in topology.decode_models] == ["extract", "compute", "transform"]
    # the demo's LoRA decode modules, served unified; --mode pd serves the full-weight ones
    assert all(spec.is_lora_adapter for spec in topology.decode_models) and topology.deployment_mode().unified
    written = demo_json.stat().st_mtime_ns
    assert topology_from_args(build_parser().parse_args(["--device", "cpu"])) == topology
    assert demo_json.stat().st_mtime_ns == written  # not rewritten
    pd = topology_from_args(build_parser().parse_args(["--device", "cpu", "--mode", "pd"]))
    assert not any(spec.is_lora_adapter for spec in pd.decode_models) and pd.base_model == topology.base_model
    assert pd.deployment_mode().mode == "pd"


def test_the_mode_is_chosen_and_said_and_a_forced_unified_mode_is_refused_with_its_reason(demo_models, tmp_path):
    from pfs_sglang.models import write_demo_lora_adapters

    adapters = write_demo_lora_adapters(tmp_path / "lora")
    lora = tuple(DecodeModelSpec(name, path) for name, path in adapters.decode.items())
    full = DecodeModelSpec("extract-full", demo_models.decode["extract"])
    unified = Topology(base_model=adapters.base, decode_models=lora, replicas=2)
    assert unified.deployment_mode().unified and "LoRA adapter" in unified.deployment_mode().reason
    mixed = Topology(base_model=adapters.base, decode_models=(*lora, full))
    assert mixed.deployment_mode().mode == "pd" and "'extract-full'" in mixed.deployment_mode().reason
    with pytest.raises(ValueError, match="--mode unified cannot hold: .*'extract-full' are full-weight"):
        Topology(base_model=adapters.base, decode_models=(*lora, full), mode="unified").validate()
    with pytest.raises(ValueError, match="--replicas counts unified servers"):
        Topology(base_model=adapters.base, decode_models=lora, mode="pd", replicas=2).validate()
    dry = Deployment(replace(unified, log_dir=tmp_path / "logs")).dry_run()
    assert dry.count("# unified-") == 2 and "--disaggregation-mode" not in dry and "prefill-0" not in dry
    assert "--max-loras-per-batch 4" in dry  # three adapters and the base


def test_server_command_lines(tmp_path):
    from pfs_sglang.cache.prefill_module_cache import RADIX_CACHE_BACKEND as REGISTERED

    assert RADIX_CACHE_BACKEND == REGISTERED
    prefill = prefill_server_command(tmp_path / "base", "127.0.0.1", ServerPorts(http=1, bootstrap=2), "zmq", "cpu",
                                     4096, ("--chunked-prefill-size", "256"))
    text = " ".join(prefill)
    for flags in ("--disaggregation-mode prefill", "--disaggregation-transfer-backend zmq",
                  "--disaggregation-bootstrap-port 2", "--radix-cache-backend pfs", "--device cpu",
                  "--attention-backend torch_native", "--max-total-tokens 4096", "--skip-server-warmup",
                  "--disable-overlap-schedule"):
        assert flags in text, flags
    assert prefill[-2:] == ["--chunked-prefill-size", "256"]  # pass-through last, so it wins
    decode = " ".join(decode_server_command("coder", tmp_path / "coder", "127.0.0.1", ServerPorts(http=3), "nixl",
                                            "cuda", 4096))
    assert "--disaggregation-mode decode" in decode and "--served-model-name coder" in decode
    assert "--disaggregation-transfer-backend nixl" in decode
    assert "--device" not in decode and "retraction-backup" not in decode  # GPU: SGLang's own defaults
    assert "--tp-size" not in decode and "--mem-fraction-static" not in decode and "--nccl-port" not in decode
    placed = decode_server_command("coder", tmp_path / "coder", "127.0.0.1", ServerPorts(http=3, nccl=4), "zmq", "cuda",
                                   4096, ("--max-running-requests", "8"),
                                   ServerPlacement("decode-coder-0", tp=2, gpus=("2", "3"), share=0.3,
                                                   mem_fraction_static=0.5))
    text = " ".join(placed)
    assert "--nccl-port 4" in text and "--tp-size 2" in text and "--mem-fraction-static 0.5" in text
    assert placed[-2:] == ["--max-running-requests", "8"]  # pass-through still last


def test_free_ports_come_from_below_the_ephemeral_range_and_skip_taken_ones(monkeypatch):
    """Ports the kernel can hand to bind(0) or a client connection while a server loads are
    never chosen, and a port already bound is skipped (the CI failure this guards against:
    a port given to stock SGLang was taken by another listener before its HTTP server bound)."""
    from pfs_sglang.launch import processes

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken_port = taken.getsockname()[1]
    # free_ports tries candidates from the end of the list: the taken port first.
    monkeypatch.setattr(processes, "_ports_below_ephemeral", lambda: [taken_port - 1, taken_port])
    try:
        assert processes.free_ports(1) == [taken_port - 1]
    finally:
        taken.close()
    monkeypatch.undo()
    ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = processes.free_ports(20)
    assert len(set(ports)) == 20
    assert all(processes.PORT_RANGE[0] <= port < min(processes.PORT_RANGE[1] + 1, ephemeral_low) for port in ports)


def test_unified_mode_refuses_dp_attention(tmp_path):
    from pfs_sglang.launch.guards import check_guards
    from pfs_sglang.models import write_demo_lora_adapters

    adapters = write_demo_lora_adapters(tmp_path / "lora", names=("extract",))
    topology = Topology(base_model=adapters.base, decode_models=(DecodeModelSpec("extract", adapters.decode["extract"]),),
                        decode_args=("--enable-dp-attention",))
    with pytest.raises(LaunchError, match="--enable-dp-attention is not supported in the unified mode"):
        check_guards(topology)


def test_decode_servers_keep_a_prefix_cache_of_base_kv_unless_told_not_to(demo_models, tmp_path):
    """On by default (the pfs tree on every PD decode server), --no-decode-cache or YAML
    ``decode_cache: false`` turns it off, and --dry-run says which."""
    cache_flags = "--disaggregation-decode-enable-radix-cache --radix-cache-backend pfs"
    decode = " ".join(decode_server_command("coder", tmp_path / "coder", "127.0.0.1", ServerPorts(http=3), "zmq",
                                            "cpu", 4096, decode_cache=True))
    assert cache_flags in decode
    assert "--radix-cache-backend" not in " ".join(
        decode_server_command("coder", tmp_path / "coder", "127.0.0.1", ServerPorts(http=3), "zmq", "cpu", 4096))
    models = ["--base-model", str(demo_models.base), "--decode-model", f"extract={demo_models.decode['extract']}",
              "--device", "cpu"]

    def dry_run(*flags: str) -> str:
        topology = topology_from_args(build_parser().parse_args([*models, *flags, "--log-dir", str(tmp_path / "l")]))
        return Deployment(topology).dry_run()

    on = dry_run()
    decode_line = next(line for line in on.splitlines() if "--disaggregation-mode decode" in line)
    assert cache_flags in decode_line and "decode prefix cache of base KV on" in on
    prefill_line = next(line for line in on.splitlines() if "--disaggregation-mode prefill" in line)
    assert "--disaggregation-decode-enable-radix-cache" not in prefill_line
    off = dry_run("--no-decode-cache")
    assert "--disaggregation-decode-enable-radix-cache" not in off and "no decode prefix cache" in off
    assert topology_from_args(build_parser().parse_args([*models, "--decode-cache"])).decode_cache
    config = tmp_path / "topology.yaml"
    config.write_text("decode_cache: false\n")
    assert not topology_from_args(build_parser().parse_args([*models, "--config", str(config)])).decode_cache
    assert topology_from_args(build_parser().parse_args([*models, "--config", str(config), "--decode-cache"])).decode_cache
