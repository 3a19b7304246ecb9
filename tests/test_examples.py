"""The programs in ``examples/`` run as a user runs them and show what they claim.

The two client programs run as subprocesses against the session's ``demo_deployment``
(base + ``extract``, ``compute``, ``transform``): each exits 0, and the context one
model read is served from the shared prefill cache to the next. ``topology.yaml``
passes the launcher's ``--dry-run`` (nothing starts), with ``~`` pointing at the
session's demo models. ``lora_walkthrough.py`` trains its adapter and evaluates it for
real, then stops at the launcher's ``--dry-run`` (serving adapters is
``test_lora_serving.py``'s, on deployments of their own).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pfs_sglang.launch.cli import main as launcher_main
from pfs_sglang.launch.processes import free_port
from pfs_sglang.oracle import load_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout_s)


def test_react_pipeline_shares_its_growing_context_across_three_models(demo_deployment):
    done = run_example("react_pipeline.py", "--url", demo_deployment.url, "--steps", "4")
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^step (\d+) \[(\w+)\] '.*': prompt_tokens (\d+), cached_tokens (\d+)$", done.stdout, re.M)
    assert [(int(step), model) for step, model, _, _ in steps] == [
        (1, "extract"), (2, "compute"), (3, "transform"), (4, "extract")], done.stdout
    prompts = [int(prompt) for _, _, prompt, _ in steps]
    cached = [int(hit) for _, _, _, hit in steps]
    for step in range(1, len(steps)):  # each model read all but (at most) the last token of the previous prompt
        assert prompts[step] > prompts[step - 1] and cached[step] >= prompts[step - 1] - 1, done.stdout


def test_react_pipeline_says_when_the_router_is_unreachable():
    done = run_example("react_pipeline.py", "--url", f"http://127.0.0.1:{free_port()}", "--steps", "1")
    assert done.returncode == 1 and "cannot reach the router" in done.stderr, (done.stdout, done.stderr)


def test_frontend_program_prefills_its_context_once_for_two_models(demo_deployment, demo_models):
    done = run_example("frontend_two_models.py", "--url", demo_deployment.url)
    assert done.returncode == 0, done.stderr
    context = ast.literal_eval(re.search(r"^shared context: (.*)$", done.stdout, re.M)[1])
    calls = dict(re.findall(r"^\[(\w+)\] .* -> '.*': prompt_tokens \d+, cached_tokens (\d+)$", done.stdout, re.M))
    assert set(calls) == {"extract", "compute"}, done.stdout
    context_tokens = len(load_tokenizer(str(demo_models.base)).encode(context, add_special_tokens=False))
    assert int(calls["compute"]) >= context_tokens - 1, done.stdout  # read from what extract's call prefilled


def test_topology_yaml_passes_the_launchers_dry_run(demo_models, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    (home / ".cache" / "pfs_sglang").mkdir(parents=True)
    (home / ".cache" / "pfs_sglang" / "demo_models").symlink_to(demo_models.base.parent)
    monkeypatch.setenv("HOME", str(home))  # the YAML's ~/.cache/pfs_sglang/demo_models/...
    code = launcher_main(["--config", str(EXAMPLES / "topology.yaml"), "--device", "cpu", "--dry-run",
                          "--log-dir", str(tmp_path / "logs")])
    out = capsys.readouterr().out
    assert code == 0, out
    for server in ("prefill-0", "decode-extract-0", "decode-compute-0", "decode-transform-0"):
        assert f"# {server}: CPU" in out
    assert "--served-model-name transform --disaggregation-decode-retraction-backup cpu_tensor " \
           "--disaggregation-decode-enable-radix-cache --radix-cache-backend pfs --max-running-requests 16" in out
    assert "dry run: nothing was started" in out


@pytest.mark.slow  # trains an adapter for 300 steps on one thread (about a minute)
def test_lora_walkthrough_trains_an_adapter_that_learns_its_task_and_plans_it_next_to_the_demo_models(
        demo_models, tmp_path):
    adapter = tmp_path / "larger-lora"
    done = run_example("lora_walkthrough.py", "--out", str(adapter), "--demo-dir", str(demo_models.base.parent),
                       "--dry-run", timeout_s=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evaluation = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"setting"')))
    assert evaluation["accuracy"] >= 0.75, evaluation  # a two-hop question the demo models were never taught
    assert (adapter / "adapter_config.json").is_file() and (adapter / "prefillshare.json").is_file()
    plan = done.stdout[done.stdout.index("# decode-larger-0: CPU"):]
    assert f"--model-path {demo_models.base} " in plan.splitlines()[1]
    assert f"--enable-lora --max-loras-per-batch 1 --lora-paths larger={adapter}" in plan
    assert "dry run: nothing was started" in done.stdout
