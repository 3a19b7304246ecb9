"""The serving oracle and cross-model sharing on a GPU with SGLang's defaults (issue 8). ``gpu``-marked.

A deployment of the demo models with ``device="cuda"``: every server on the visible
GPUs with SGLang's own defaults (overlap scheduling, its default attention backend and
CUDA graphs; the demo models pack onto the visible GPUs), the ``zmq`` backend moving
KV between GPU pools. Checks: the greedy oracle for every decode model (the demo
models are float32 and served in float32, so the comparison is exact except at
near-ties), the same with ``--page-size 16`` on both pools, and a context prefilled
once for two models. Skipped without a CUDA GPU (``conftest.py``); not run on the CPU
box this project is developed on.
"""

from __future__ import annotations

import random

import pytest
import requests

from pfs_sglang.launch.deployment import Deployment
from pfs_sglang.launch.processes import free_port
from pfs_sglang.launch.topology import DEMO_GPU_SHARE, DecodeModelSpec, Topology
from pfs_sglang.oracle import first_real_divergence, load_tokenizer, prefillshare_greedy
from sglang_process import generate_greedy, wait_deployment_idle

pytestmark = [pytest.mark.gpu, pytest.mark.server]


@pytest.fixture(scope="module", params=[(), ("--page-size", "16")], ids=["page-1", "page-16"])
def deployment(request, demo_models, tmp_path_factory):
    topology = Topology(
        base_model=demo_models.base, device="cuda", port=free_port(), log_dir=tmp_path_factory.mktemp("gpu"),
        decode_models=tuple(DecodeModelSpec(name, path) for name, path in demo_models.decode.items()),
        prefill_args=request.param, decode_args=request.param,
        pack=True, prefill_mem_fraction=DEMO_GPU_SHARE, decode_mem_fraction=DEMO_GPU_SHARE,  # all on one GPU
    )
    with Deployment(topology) as running:
        yield running


def test_greedy_oracle_for_every_decode_model_on_gpu(deployment, demo_models):
    rng = random.Random(0)
    for model in demo_models.decode:
        for length in (1, 2, 17, 16, 33, 200):
            prompt = [rng.randrange(8, 500) for _ in range(length)]
            served = generate_greedy(deployment.url, model, prompt, 10)["output_ids"]
            reference = prefillshare_greedy(demo_models.base, demo_models.decode[model], prompt, len(served))
            assert first_real_divergence(served, reference) is None, (model, length, served, reference.output_ids)
    wait_deployment_idle(deployment.url)


def test_a_context_is_prefilled_once_for_two_models_on_gpu(deployment, demo_models):
    context = "\n".join(f"record {i}: city C{i}, price {i * 7}, status open" for i in range(40))
    tokenizer = load_tokenizer(str(demo_models.base))
    context_tokens = len(tokenizer.encode(context, add_special_tokens=False))

    def ask(model: str, question: str) -> dict:
        reply = requests.post(f"{deployment.url}/generate", json={
            "model": model, "text": context + "\n" + question,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()["meta_info"]

    ask("extract", "what is the city of record 3?")
    second = ask("compute", "what is the total price?")
    assert second["cached_tokens"] >= context_tokens - 16, (second["cached_tokens"], context_tokens)
    wait_deployment_idle(deployment.url)
