"""LoRA decode modules served by SGLang's multi-LoRA (issue 11), on real servers (CPU).

Two adapters are trained here with ``pfs_sglang.train --mode lora`` (a few steps, enough
to change the output). Deployment 1: the base's prefill server, the full-weight
``transform`` demo decode module, and one decode server holding the base's weights once
for both adapters (``decode-lora-0``, ``--enable-lora``, the ``torch_native`` LoRA
backend). Deployment 2: one adapter alone. Each adapter passes the greedy oracle of
invariant 5 with the prompt's KV from the base (``prompt[:-1]``, no adapter: invariant
1) and the adapter from ``prompt[-1]`` on, also with requests to both adapters and the
full-weight module in one batch. An adapter trained against another base, and a plain
PEFT adapter without its ``prefillshare.json``, are refused at launch with the reason.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from pfs_sglang.identity import DECODE_MODULE_RECORD
from pfs_sglang.launch import DecodeModelSpec, Deployment, LaunchError, Topology
from pfs_sglang.launch.processes import free_port
from pfs_sglang.models.demo import write_perturbed_decode_module
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from pfs_sglang.train.corpus import CorpusSizes, write_corpus
from pfs_sglang.train.trainer import FinetuneConfig, finetune
from sglang_process import generate_greedy, wait_deployment_idle

PROMPTS = [[21, 48, 95, 130, 77, 64, 33], [301, 12, 7], [55] * 40 + [9, 18]]
MAX_NEW_TOKENS = 6


def train_adapter(base: Path, data: Path, out_dir: Path, steps: int = 40) -> Path:
    finetune(FinetuneConfig(base=base, data=data, out_dir=out_dir, mode="lora", max_steps=steps, batch_size=16,
                            learning_rate=3e-3, logging_steps=1000, save_steps=1000))
    return out_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lora_corpus"), seed=3, sizes=CorpusSizes(16, 400, 20))


@pytest.fixture(scope="module")
def adapters(demo_models, corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {f"{task}-lora": train_adapter(demo_models.base, corpus.train[task], root / task)
            for task in ("extract", "compute")}


def lora_topology(demo_models, models: tuple[DecodeModelSpec, ...], log_dir: Path) -> Topology:
    return Topology(base_model=demo_models.base, decode_models=models, port=free_port(), log_dir=log_dir,
                    max_total_tokens=2048)


@pytest.fixture(scope="module")
def colocated(demo_models, adapters, tmp_path_factory):
    models = (DecodeModelSpec("transform", demo_models.decode["transform"]),
              *(DecodeModelSpec(name, path) for name, path in adapters.items()))
    with Deployment(lora_topology(demo_models, models, tmp_path_factory.mktemp("colocated"))) as running:
        yield running


def assert_oracle(url: str, base: Path, model: str, model_dir: Path, prompt: list[int]) -> list[int]:
    served = generate_greedy(url, model, prompt, MAX_NEW_TOKENS)["output_ids"]
    reference = prefillshare_greedy(base, model_dir, prompt, MAX_NEW_TOKENS)
    assert first_real_divergence(served, reference) is None, (model, prompt, served, reference.output_ids)
    return served


def test_colocated_adapters_and_a_full_weight_module_pass_the_oracle(colocated, demo_models, adapters):
    served_by_adapter = {}
    for name, path in adapters.items():
        served_by_adapter[name] = [assert_oracle(colocated.url, demo_models.base, name, path, p) for p in PROMPTS]
    for prompt in PROMPTS:
        assert_oracle(colocated.url, demo_models.base, "transform", demo_models.decode["transform"], prompt)
    # The adapters change what the base would say (so the oracle above tested them, not the base).
    base_outputs = [prefillshare_greedy(demo_models.base, demo_models.base, p, MAX_NEW_TOKENS).output_ids
                    for p in PROMPTS]
    assert any(served != base_outputs for served in served_by_adapter.values())
    wait_deployment_idle(colocated.url)


def test_both_adapters_and_the_full_module_in_one_batch(colocated, demo_models, adapters):
    jobs = [(name, path, prompt) for name, path in [*adapters.items(), ("transform", demo_models.decode["transform"])]
            for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(assert_oracle, colocated.url, demo_models.base, *job) for job in jobs]:
            future.result()
    wait_deployment_idle(colocated.url)


def test_one_decode_server_holds_the_base_once_for_every_adapter(colocated, adapters):
    names = [server.name for server in colocated.servers]
    assert names == ["prefill-0", "decode-transform-0", "decode-lora-0"]
    lora = colocated.servers[2].child
    assert lora.command[lora.command.index("--model-path") + 1] == str(colocated.topology.base_model)
    rows = requests.get(f"{colocated.url}/workers", timeout=10).json()["workers"]
    assert {row["url"] for row in rows if row.get("model") in adapters} == {lora.url}

    def tree_rss_mib(pid: int) -> float:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20

    weights = {name: sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
               for name, path in adapters.items()}
    print(f"\nmemory: decode-lora-0 (base + {len(adapters)} adapters) {tree_rss_mib(lora.process.pid):.0f} MiB RSS; "
          f"decode-transform-0 (one full-weight module) {tree_rss_mib(colocated.servers[1].child.process.pid):.0f} "
          f"MiB RSS; adapter weights {weights} MiB")


def test_chat_streams_from_an_adapter(colocated):
    reply = requests.post(f"{colocated.url}/v1/chat/completions", timeout=120, json={
        "model": "compute-lora", "messages": [{"role": "user", "content": "qty: 3; price: 7"}], "max_tokens": 4,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status_code == 200, reply.text
    events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"completion_tokens":4' in events[-2]


def test_an_adapter_served_alone(demo_models, adapters, tmp_path):
    name, path = "extract-lora", adapters["extract-lora"]
    with Deployment(lora_topology(demo_models, (DecodeModelSpec(name, path),), tmp_path)) as alone:
        assert [server.name for server in alone.servers] == ["prefill-0", f"decode-{name}-0"]
        for prompt in PROMPTS:
            assert_oracle(alone.url, demo_models.base, name, path, prompt)


def test_foreign_and_plain_adapters_are_refused_at_launch(demo_models, corpus, tmp_path):
    other_base = write_perturbed_decode_module(demo_models.base, tmp_path / "other_base", seed=5)
    foreign = train_adapter(other_base, corpus.train["extract"], tmp_path / "foreign", steps=1)
    with pytest.raises(LaunchError, match="decode model 'foreign' refused: .*weights_hash differs: prefill module has"):
        Deployment(lora_topology(demo_models, (DecodeModelSpec("foreign", foreign),), tmp_path / "a")).check()

    plain = tmp_path / "plain"
    shutil.copytree(train_adapter(demo_models.base, corpus.train["extract"], tmp_path / "ours", steps=1), plain)
    (plain / DECODE_MODULE_RECORD).unlink()
    with pytest.raises(LaunchError, match="decode model 'plain' refused"):
        Deployment(lora_topology(demo_models, (DecodeModelSpec("plain", plain),), tmp_path / "b")).check()
