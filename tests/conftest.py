"""Shared fixtures: the demo models (written once per session), the GPU marker, and the
two servers several modules use: stock SGLang serving the base, and a PrefillShare
demo deployment started from the command line.

Starting an SGLang server costs ~40 s of CPU on the 2-core CI box (its three
processes import SGLang), so each of the two shared servers starts once per session.
Tests that use them run last (the hook below orders them after every other test), so
no other test shares the CPU with them, and they stop when the session ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import pytest
import torch

from pfs_sglang.bench import load
from pfs_sglang.launch import Topology
from pfs_sglang.models import DemoModels, write_demo_models
from sglang_process import sglang_server

SHARED_SERVERS = ("stock_base", "demo_deployment")


def pytest_collection_modifyitems(config, items):
    # Users of the shared servers last: the stock server's users, then the deployment's.
    items.sort(key=lambda item: tuple(name in item.fixturenames for name in reversed(SHARED_SERVERS)))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> DemoModels:
    return write_demo_models(tmp_path_factory.mktemp("demo_models"))


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
def demo_deployment(demo_models, tmp_path_factory) -> RunningDeployment:
    """``python -m pfs_sglang.launch_server`` with the base and the three demo decode models."""
    log_dir = tmp_path_factory.mktemp("demo_deployment")
    models = [f"--decode-model={name}={path}" for name, path in demo_models.decode.items()]
    with load.demo_deployment(log_dir, Topology.max_total_tokens, ["--base-model", str(demo_models.base), *models],
                              timeout_s=300) as (url, launcher):
        yield RunningDeployment(url, log_dir, launcher)
