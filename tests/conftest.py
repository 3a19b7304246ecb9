"""Shared fixtures and the suite's tiers.

Fixtures: the demo models (written once per session), two LoRA decode modules trained
against the demo base, and the three servers several modules use: stock SGLang serving
the base; a PrefillShare demo deployment started from the command line (the three
demo decode models, the two adapters co-located on one decode server, and ``compute``
once more as ``compute-tight``, with a decode KV pool too small for its load, for
``test_decode_memory_pressure.py``); and one unified server (``unified_deployment``:
the demo's LoRA decode modules and two random-weight adapters, page size 4, 32-token
prefill chunks, SGLang's retraction test switch) for ``test_unified_serving.py`` and
the unified half of ``test_decode_paged_overlap.py``.

Tiers (markers registered in ``pyproject.toml``):

- ``server``: the test runs an SGLang server (a real ``sglang.launch_server`` process).
  A test that uses one of the shared servers is marked here; a module or test that
  starts its own marks itself (``pytestmark = pytest.mark.server``). Every other test
  is checked while it runs: one that has an SGLang server running under it fails,
  naming the server, so a new test that starts one cannot slip into the fast tier.
- ``slow``: starts no server but takes many seconds of CPU (training, a command in a fresh
  process that imports SGLang).
- ``make test-fast`` runs the rest (``-m "not server and not slow"``); ``make test``
  runs everything but the ``scenario`` tests: the fast and slow tests first, several
  at a time, then the ``server`` tests one at a time (two deployments starting at once
  on 2 cores would slow each other); ``make test-scenarios`` runs the long scenario runs.

Starting an SGLang server costs ~25 s of CPU on the 2-core CI box (its HTTP process
imports SGLang; on CPU its scheduler and detokenizer fork from it), so each shared
deployment starts once per session.
Tests that use them run last (the hook below orders them after every other test), so
no other test shares the CPU with them, and they stop when the session ends.

Every server the suite starts inherits ``SGLANG_PYSPY_DUMP_BEFORE_CRASH=0`` and
``SGLANG_CUDA_COREDUMP_BEFORE_CRASH=0``: stopping a deployment ends its schedulers, which
SGLang's HTTP process takes for a crash and, with those on, sleeps 5 s before dumping
diagnostics (no py-spy, no CUDA here), once per server stop.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import psutil
import pytest
import torch

from pfs_sglang.bench import load
from pfs_sglang.launch import DecodeModelSpec, Deployment, Topology
from pfs_sglang.launch.processes import free_port
from pfs_sglang.models import DemoModels, write_demo_lora_adapters, write_demo_models
from pfs_sglang.models.random_lora import random_lora_adapter
from pfs_sglang.train.corpus import CorpusFiles, CorpusSizes, write_corpus
from pfs_sglang.train.trainer import FinetuneConfig, finetune
from sglang_process import sglang_server

for _diagnostics in ("SGLANG_PYSPY_DUMP_BEFORE_CRASH", "SGLANG_CUDA_COREDUMP_BEFORE_CRASH"):
    os.environ.setdefault(_diagnostics, "0")

SHARED_SERVERS = ("stock_base", "demo_deployment")
# The demo deployment's decode server under memory pressure: ``compute`` with a KV pool of 160
# tokens, overlap scheduling off and a small per-request decode reserve (test_decode_memory_pressure.py).
TIGHT_MODEL = "compute-tight"
TIGHT_POOL_TOKENS = 160
TIGHT_DECODE_ARGS = f"--max-total-tokens {TIGHT_POOL_TOKENS} --num-reserved-decode-tokens 4 --disable-overlap-schedule"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(uses(item, name) for name in SHARED_SERVERS):
            item.add_marker(pytest.mark.server)
    # Tests without a server first, then the server tests, the shared servers' users last
    # (the stock server's users, then the deployment's), so those run alone on the CPU and
    # no other deployment starts while theirs is up.
    items.sort(key=lambda item: (item.get_closest_marker("server") is not None,
                                 *(uses(item, name) for name in reversed(SHARED_SERVERS))))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def uses(item, shared_server: str) -> bool:
    """Whether a test uses one of the shared servers: as a fixture, or through a parameter marked
    ``pytest.mark.shared_server(NAME)`` (a fixture that picks a deployment by its parameter)."""
    return shared_server in item.fixturenames or any(
        shared_server in marker.args for marker in item.iter_markers("shared_server"))


def running_sglang_servers() -> list[str]:
    """``sglang.launch_server`` processes under this one (however deep: launchers start them)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(a == "-m" and b == "sglang.launch_server" for a, b in zip(command, command[1:])):
            found.append(f"pid {process.pid}: {' '.join(command)[:300]}")
    return found


@pytest.fixture(autouse=True)
def servers_only_in_server_tests(request):
    """A test not marked ``server`` must have no SGLang server running under it (checked every
    half second while it runs: a server takes tens of seconds to start, so none slips by)."""
    if request.node.get_closest_marker("server"):
        yield
        return
    seen = running_sglang_servers()
    done = threading.Event()

    def watch() -> None:
        while not seen and not done.wait(0.5):
            seen.extend(running_sglang_servers())

    watcher = threading.Thread(target=watch, daemon=True, name="sglang-server-watch")
    watcher.start()
    yield
    done.set()
    watcher.join()
    assert not seen, ("an SGLang server ran under this test, which is not marked `server`: mark it (or its module) "
                      f"with pytest.mark.server so `make test-fast` leaves it out; {seen[0]}")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> DemoModels:
    return write_demo_models(tmp_path_factory.mktemp("demo_models"))


def train_lora_adapter(base: Path, data: Path, out_dir: Path, steps: int = 40) -> Path:
    """A LoRA decode module of ``base`` (a few steps: enough to change what the base says)."""
    finetune(FinetuneConfig(base=base, data=data, out_dir=out_dir, mode="lora", max_steps=steps, batch_size=16,
                            learning_rate=3e-3, logging_steps=1000, save_steps=1000))
    return out_dir


@pytest.fixture(scope="session")
def lora_corpus(tmp_path_factory) -> CorpusFiles:
    return write_corpus(tmp_path_factory.mktemp("lora_corpus"), seed=3, sizes=CorpusSizes(16, 400, 20))


@pytest.fixture(scope="session")
def lora_adapters(demo_models, lora_corpus, tmp_path_factory) -> dict[str, Path]:
    """``extract-lora`` and ``compute-lora``: LoRA adapters of the demo base, by model name."""
    root = tmp_path_factory.mktemp("lora_adapters")
    return {f"{task}-lora": train_lora_adapter(demo_models.base, lora_corpus.train[task], root / task)
            for task in ("extract", "compute")}


@pytest.fixture(scope="session")
def stock_base(demo_models, tmp_path_factory) -> str:
    """Stock (non-PD) ``sglang.launch_server`` serving the base on CPU; its URL."""
    log = tmp_path_factory.mktemp("stock_base") / "sglang.log"
    with sglang_server(demo_models.base, log, ["--enable-cache-report", "--sleep-on-idle"]) as url:
        yield url


@dataclass(frozen=True)
class RunningDeployment:
    url: str
    log_dir: Path  # the launcher's log and every server's
    launcher: Popen

    def launcher_alive(self) -> bool:
        """The launcher exits when one of its servers dies, so alive means every server is."""
        return self.launcher.poll() is None


@pytest.fixture(scope="session")
def demo_deployment(demo_models, lora_adapters, tmp_path_factory) -> RunningDeployment:
    """``python -m pfs_sglang.launch_server`` with the base, the three demo decode models
    (``decode-NAME-0``), the two LoRA adapters (both on ``decode-lora-0``) and ``TIGHT_MODEL``
    (``decode-compute-tight-0``; tests that rotate over every served model name theirs instead)."""
    log_dir = tmp_path_factory.mktemp("demo_deployment")
    decode = {**demo_models.decode, **lora_adapters, TIGHT_MODEL: demo_models.decode["compute"]}
    args = ["--base-model", str(demo_models.base), *(f"--decode-model={name}={path}" for name, path in decode.items()),
            f"--decode-args={TIGHT_MODEL}={TIGHT_DECODE_ARGS}"]
    with load.demo_deployment(log_dir, Topology.max_total_tokens, args, timeout_s=600) as (url, launcher):
        yield RunningDeployment(url, log_dir, launcher)


UNIFIED_PAGE_SIZE = 4
RANDOM_ADAPTERS = {"alpha": 1, "beta": 2}  # name -> seed: large random weights, so adapter KV differs visibly
UNIFIED_DEMO_LORA = ("compute", "extract")


@dataclass(frozen=True)
class UnifiedDeployment:
    deployment: Deployment
    models: DemoModels  # the base and every adapter it serves, by model name


@pytest.fixture(scope="session")
def unified_deployment(tmp_path_factory) -> UnifiedDeployment:
    """One unified server (``python -m pfs_sglang.launch_server``'s ``Deployment``) with the
    demo's LoRA decode modules (``UNIFIED_DEMO_LORA``) and ``RANDOM_ADAPTERS``: page size 4,
    32-token prefill chunks (prompts straddle chunks and pages at ``k``), compact JSON for
    the constrained-decoding tests, overlap scheduling (SGLang's default) and SGLang's
    retraction test switch (``SGLANG_TEST_RETRACT``: every third decode step retracts all
    but one running request), set for this server's start only."""
    root = tmp_path_factory.mktemp("unified_models")
    lora = write_demo_lora_adapters(root, names=UNIFIED_DEMO_LORA)
    models = DemoModels(base=lora.base, decode={
        **lora.decode, **{name: random_lora_adapter(lora.base, root / name, seed) for name, seed in RANDOM_ADAPTERS.items()}})
    decode_args = ("--page-size", str(UNIFIED_PAGE_SIZE), "--chunked-prefill-size", "32",
                   "--constrained-json-disable-any-whitespace")  # JSON a tiny model ends within a few tokens
    topology = Topology(base_model=models.base, port=free_port(), max_total_tokens=4096,
                        decode_models=tuple(DecodeModelSpec(name, path) for name, path in models.decode.items()),
                        decode_args=decode_args, log_dir=tmp_path_factory.mktemp("unified_logs"))
    assert topology.deployment_mode().unified
    deployment = Deployment(topology)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SGLANG_TEST_RETRACT", "1")  # read by the server's scheduler at start-up
            deployment.start()
        yield UnifiedDeployment(deployment, models)
    finally:
        deployment.stop()
