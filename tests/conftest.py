"""Shared fixtures: the demo models (written once per session) and the GPU marker."""

from __future__ import annotations

import pytest
import torch

from pfs_sglang.models import DemoModels, write_demo_models


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> DemoModels:
    return write_demo_models(tmp_path_factory.mktemp("demo_models"))
