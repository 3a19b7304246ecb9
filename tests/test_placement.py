"""GPU placement and ``--dry-run`` on a CPU box: which GPUs, TP size and memory share every
server gets, for several topologies; GPUs that cannot hold a topology are an error
before anything starts; servers that share a GPU start one after another.

No GPU is needed: ``--dry-run`` only plans and prints (``--device cuda --gpus ...``).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pfs_sglang.launch import DecodeModelSpec, Deployment, Topology
from pfs_sglang.launch import startup as startup_module
from pfs_sglang.launch.cli import build_parser, main, topology_from_args
from pfs_sglang.launch.placement import PlacementError, ServerPlacement, plan_placement
from pfs_sglang.launch.processes import ManagedProcess


@pytest.fixture(autouse=True)
def no_server_may_start(monkeypatch):
    def refuse(self):
        raise AssertionError(f"{self.name} was started")

    monkeypatch.setattr(ManagedProcess, "start", refuse)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def topology(models=("a", "b", "c"), **settings) -> Topology:
    return Topology(base_model=Path("/m/base"), decode_models=tuple(DecodeModelSpec(n, Path(f"/m/{n}")) for n in models),
                    device="cuda", **settings)


def gpus_of(plan: dict[str, ServerPlacement]) -> dict[str, tuple[str, ...]]:
    return {name: placement.gpus for name, placement in plan.items()}


def test_one_prefill_and_three_decode_models_on_four_gpus():
    plan = plan_placement(topology(gpus=(0, 1, 2, 3)))
    assert gpus_of(plan) == {"prefill-0": ("0",), "decode-a-0": ("1",), "decode-b-0": ("2",), "decode-c-0": ("3",)}
    assert all(p.tp == 1 and p.mem_fraction_static is None and p.after == () for p in plan.values())
    assert plan["decode-b-0"].env == {"CUDA_VISIBLE_DEVICES": "2"}


def test_replicas_and_tp_get_gpus_of_their_own():
    plan = plan_placement(topology(models=("a", "b"), gpus=tuple(range(8)), prefill_replicas=2, decode_replicas=2,
                                   prefill_tp=2, decode_tp=1))
    assert gpus_of(plan) == {"prefill-0": ("0", "1"), "prefill-1": ("2", "3"), "decode-a-0": ("4",),
                             "decode-a-1": ("5",), "decode-b-0": ("6",), "decode-b-1": ("7",)}
    assert plan["prefill-1"].tp == 2 and plan["decode-b-1"].tp == 1
    per_model = (DecodeModelSpec("a", Path("/m/a"), tp=2), DecodeModelSpec("b", Path("/m/b")))
    plan = plan_placement(replace_models(topology(models=(), gpus=(0, 1, 2, 3)), per_model))
    assert gpus_of(plan) == {"prefill-0": ("0",), "decode-a-0": ("1", "2"), "decode-b-0": ("3",)}
    with pytest.raises(PlacementError, match=r"needs 4 GPUs.*prefill: 1 x TP 1; decode 'a': 1 x TP 2; "
                                             r"decode 'b': 1 x TP 1.*gives 3"):
        plan_placement(replace_models(topology(models=(), gpus=(0, 1, 2)), per_model))


def replace_models(t: Topology, models) -> Topology:
    return replace(t, decode_models=tuple(models))


def test_packed_onto_one_gpu_with_memory_shares():
    plan = plan_placement(topology(gpus=(0,), pack=True, prefill_mem_fraction=0.3, decode_mem_fraction=0.2))
    assert set(gpus_of(plan).values()) == {("0",)}
    # SGLang's fraction is of the memory free when a server starts: after 0.3, 0.5 and 0.7 are taken.
    assert [plan[n].mem_fraction_static for n in ("prefill-0", "decode-a-0", "decode-b-0", "decode-c-0")] == \
        [0.3, round(0.2 / 0.7, 4), 0.4, round(0.2 / 0.3, 4)]
    assert plan["decode-c-0"].after == ("prefill-0", "decode-a-0", "decode-b-0")
    spread = plan_placement(topology(gpus=(0, 1), pack=True, prefill_mem_fraction=0.5, decode_mem_fraction=0.4))
    assert gpus_of(spread) == {"prefill-0": ("0",), "decode-a-0": ("1",), "decode-b-0": ("1",), "decode-c-0": ("0",)}
    assert spread["decode-c-0"].after == ("prefill-0",)


def test_gpus_that_cannot_hold_the_topology_are_an_error():
    with pytest.raises(PlacementError, match="needs 4 GPUs, one set per server .* gives 3 "):
        plan_placement(topology(gpus=(0, 1, 2)))
    with pytest.raises(PlacementError, match="prefill needs TP 4, but --gpus gives 2"):
        plan_placement(topology(gpus=(0, 1), pack=True, prefill_tp=4, prefill_mem_fraction=0.1,
                                decode_mem_fraction=0.1))
    with pytest.raises(PlacementError, match=r"decode-c-0 \(decode 'c', TP 1, memory share 0.3\) fits on no 1 GPU"):
        plan_placement(topology(gpus=(0,), pack=True, prefill_mem_fraction=0.3, decode_mem_fraction=0.3))
    with pytest.raises(PlacementError, match="--pack needs a memory fraction for every pool; none for decode 'a'"):
        plan_placement(replace_models(topology(gpus=(0,), pack=True, prefill_mem_fraction=0.3),
                                      [DecodeModelSpec("a", Path("/m/a")), DecodeModelSpec("b", Path("/m/b"), mem_fraction=0.2)]))


def test_gpu_indices_count_within_the_launchers_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    plan = plan_placement(topology(models=("a",), gpus=(1, 3)))
    assert gpus_of(plan) == {"prefill-0": ("5",), "decode-a-0": ("7",)}
    assert gpus_of(plan_placement(topology(models=("a",)))) == {"prefill-0": ("4",), "decode-a-0": ("5",)}
    with pytest.raises(PlacementError, match="--gpus names GPU 4, but only 4 are visible"):
        plan_placement(topology(models=("a",), gpus=(0, 4)))


def dry_run(argv: list[str], capsys) -> tuple[int, list[list[str]], str]:
    """``main(argv + --dry-run)``: exit code, each printed server line (shell-split), stderr."""
    code = main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    servers = [shlex.split(line) for line in out.splitlines() if "sglang.launch_server" in line]
    return code, servers, err


def env_and_args(line: list[str]) -> tuple[dict[str, str], str]:
    start = next(i for i, word in enumerate(line) if "=" not in word)
    return dict(word.split("=", 1) for word in line[:start]), " ".join(line[start:])


def demo_flags(demo_models, tmp_path, *names) -> list[str]:
    flags = ["--base-model", str(demo_models.base), "--log-dir", str(tmp_path / "logs")]
    for name in names:
        flags += ["--decode-model", f"{name}={demo_models.decode[name]}"]
    return flags


def test_dry_run_one_prefill_three_decode_on_four_gpus(demo_models, tmp_path, capsys):
    code, servers, _ = dry_run([*demo_flags(demo_models, tmp_path, "extract", "compute", "transform"),
                                "--gpus", "0-3", "--decode-args", "--max-running-requests 8",
                                "--decode-args", "compute=--chunked-prefill-size 256"], capsys)
    assert code == 0 and len(servers) == 4
    placed = {}
    for line in servers:
        env, args = env_and_args(line)
        placed[env["CUDA_VISIBLE_DEVICES"]] = args
        assert env["PFS_PREFILL_FINGERPRINT_FILE"] == str(tmp_path / "logs" / "prefill_fingerprint.json")
        assert "--tp-size" not in args and "--mem-fraction-static" not in args and "--device cpu" not in args
        assert "--nccl-port" in args
    assert sorted(placed) == ["0", "1", "2", "3"]
    assert "--disaggregation-mode prefill" in placed["0"]
    assert "--served-model-name compute" in placed["2"]
    assert placed["2"].endswith("--max-running-requests 8 --chunked-prefill-size 256")  # per-model args last
    assert placed["1"].endswith("--served-model-name extract --disaggregation-decode-enable-radix-cache "
                                "--radix-cache-backend pfs --max-running-requests 8")  # the decode cache's flags
    assert not list((tmp_path / "logs").glob("*.log"))  # nothing started


def test_dry_run_replicas_with_tp_2(demo_models, tmp_path, capsys):
    code, servers, _ = dry_run([*demo_flags(demo_models, tmp_path, "extract", "compute"), "--gpus", "0-7",
                                "--prefill-tp", "2", "--decode-replicas", "2", "--decode-tp", "compute=2"], capsys)
    assert code == 0
    devices = [env_and_args(line)[0]["CUDA_VISIBLE_DEVICES"] for line in servers]
    assert devices == ["0,1", "2", "3", "4,5", "6,7"]
    args = [env_and_args(line)[1] for line in servers]
    assert ["--tp-size 2" in a for a in args] == [True, False, False, True, True]
    assert [re.search(r"--served-model-name (\w+)", a)[1] for a in args[1:]] == ["extract"] * 2 + ["compute"] * 2


def test_dry_run_packed_onto_one_gpu(demo_models, tmp_path, capsys):
    code, servers, _ = dry_run([*demo_flags(demo_models, tmp_path, "extract", "compute"), "--gpus", "0", "--pack",
                                "--prefill-mem-fraction", "0.4", "--decode-mem-fraction", "0.2",
                                "--decode-mem-fraction", "compute=0.25"], capsys)
    assert code == 0
    assert [env_and_args(line)[0]["CUDA_VISIBLE_DEVICES"] for line in servers] == ["0", "0", "0"]
    fractions = [re.search(r"--mem-fraction-static ([\d.]+)", env_and_args(line)[1])[1] for line in servers]
    assert fractions == ["0.4", f"{0.2 / 0.6:.4g}", f"{0.25 / 0.4:.4g}"]


def test_dry_run_too_few_gpus_is_an_error(demo_models, tmp_path, capsys):
    code, servers, err = dry_run([*demo_flags(demo_models, tmp_path, "extract", "compute"), "--gpus", "0,1",
                                  "--decode-replicas", "2"], capsys)
    assert code == 1 and servers == []
    assert "launch failed: the topology needs 5 GPUs" in err and "gives 2 (0,1)" in err


def test_dry_run_on_cpu_is_todays_deployment(demo_models, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    code, servers, _ = dry_run([*demo_flags(demo_models, tmp_path, "extract"), "--device", "cpu"], capsys)
    assert code == 0 and len(servers) == 2
    for line in servers:
        env, args = env_and_args(line)
        assert "CUDA_VISIBLE_DEVICES" not in env and "--device cpu" in args and "--nccl-port" not in args
        assert env.get("OMP_NUM_THREADS") == "4"  # 8 cores shared by 2 servers
    with pytest.raises(ValueError, match="need --device cuda"):
        topology_from_args(build_parser().parse_args([*demo_flags(demo_models, tmp_path, "extract"),
                                                      "--device", "cpu", "--gpus", "0"]))


def test_cpu_servers_share_the_cores_and_use_huge_pages_unless_the_user_set_them(monkeypatch):
    from pfs_sglang.launch.server_commands import cpu_server_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert cpu_server_env(4) == {"OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1"}
    assert cpu_server_env(1)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert cpu_server_env(4) == {}


def test_yaml_placement_and_per_model_settings(demo_models, tmp_path):
    config = tmp_path / "topology.yaml"
    config.write_text(
        f"base_model: {demo_models.base}\n"
        f"decode_models:\n  extract: {demo_models.decode['extract']}\n"
        f"  compute: {{path: {demo_models.decode['compute']}, tp: 2, mem_fraction: 0.3, args: --page-size 1}}\n"
        "gpus: 0-3\nprefill_tp: 2\ndecode_args: --max-running-requests 8\npack: true\n"
        "prefill_mem_fraction: 0.4\ndecode_mem_fraction: 0.2\n")
    t = topology_from_args(build_parser().parse_args(["--config", str(config), "--decode-tp", "extract=2"]))
    assert (t.device, t.gpus, t.pack, t.prefill_tp) == ("cuda", (0, 1, 2, 3), True, 2)
    extract, compute = t.decode_models
    assert (t.decode_tp_of(extract), t.decode_tp_of(compute), t.decode_mem_fraction_of(compute)) == (2, 2, 0.3)
    assert t.decode_args_of(compute) == ("--max-running-requests", "8", "--page-size", "1")
    with pytest.raises(ValueError, match="--decode-tp names 'coder', which is not one of the decode models"):
        topology_from_args(build_parser().parse_args(["--config", str(config), "--decode-tp", "coder=2"]))


def test_servers_sharing_a_gpu_start_one_after_another(demo_models, tmp_path, monkeypatch):
    events, healthy = [], set()
    monkeypatch.setattr(ManagedProcess, "start", lambda self: events.append(f"start {self.name}"))
    monkeypatch.setattr(ManagedProcess, "exit_code", lambda self: None)
    monkeypatch.setattr(ManagedProcess, "healthy", lambda self: self.name in healthy or healthy.add(self.name))
    monkeypatch.setattr(startup_module, "POLL_S", 0.0)
    t = Topology(base_model=demo_models.base, device="cuda", gpus=(0, 1), pack=True, prefill_mem_fraction=0.5,
                 decode_mem_fraction=0.3, log_dir=tmp_path,
                 decode_models=tuple(DecodeModelSpec(n, demo_models.decode[n]) for n in ("extract", "compute")))
    deployment = Deployment(t, on_startup=lambda event: events.append(f"{event.step.value} {event.server}"))
    deployment._plan(tmp_path / "fingerprint.json")
    deployment.bring_up().run()
    # Each server answers healthy on its second check; decode-compute-0 shares GPU 1 with decode-extract-0.
    assert events == ["start prefill-0", "started prefill-0", "start decode-extract-0", "started decode-extract-0",
                      "healthy prefill-0", "healthy decode-extract-0",
                      "start decode-compute-0", "started decode-compute-0", "healthy decode-compute-0"]


@pytest.mark.slow  # a fresh process that imports SGLang: seconds of CPU, so make test runs it, not make test-fast
def test_cli_dry_run_prints_and_starts_nothing(demo_models, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pfs_sglang.launch_server",
                             *demo_flags(demo_models, tmp_path, "extract"), "--gpus", "0,1", "--dry-run"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "CUDA_VISIBLE_DEVICES=1 " in result.stdout and "--served-model-name extract" in result.stdout
    assert "# router (in the launcher process)" in result.stdout and "dry run: nothing was started" in result.stdout
    assert "PFS_KV_SECRET='<made at launch>'" in result.stdout  # the secret is never printed
    assert not list((tmp_path / "logs").glob("*.log"))


def test_demo_models_share_one_gpu_unless_placed_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("PFS_SGLANG_HOME", str(tmp_path))
    demo = topology_from_args(build_parser().parse_args(["--device", "cuda"]))
    assert (demo.pack, demo.prefill_mem_fraction, demo.decode_mem_fraction) == (True, 0.15, 0.15)
    assert set(gpus_of(plan_placement(demo, visible=["0"])).values()) == {("0",)}
    assert list(plan_placement(demo, visible=["0", "1"])) == ["unified-0"]  # the demo is one unified server
    pd = topology_from_args(build_parser().parse_args(["--device", "cuda", "--mode", "pd"]))
    spread = plan_placement(pd, visible=["0", "1", "2", "3"])
    assert sorted(gpus_of(spread).values()) == [("0",), ("1",), ("2",), ("3",)]
    placed = topology_from_args(build_parser().parse_args(["--gpus", "0-3"]))
    assert not placed.pack and placed.prefill_mem_fraction is None
    assert topology_from_args(build_parser().parse_args(["--device", "cpu"])).pack is False


def test_servers_bind_loopback_whatever_host_the_router_binds(demo_models, tmp_path, capsys):
    code, servers, _ = dry_run([*demo_flags(demo_models, tmp_path, "extract"), "--device", "cpu",
                                "--host", "0.0.0.0"], capsys)
    assert code == 0 and len(servers) == 2
    for line in servers:
        env, args = env_and_args(line)
        assert "--host 127.0.0.1" in args and env["SGLANG_HOST_IP"] == "127.0.0.1"
    code, servers, _ = dry_run([*demo_flags(demo_models, tmp_path, "extract"), "--device", "cpu",
                                "--server-host", "0.0.0.0"], capsys)
    assert code == 0 and all("--host 0.0.0.0" in env_and_args(line)[1] for line in servers)
