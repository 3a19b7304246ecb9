"""LoRA decode modules served by SGLang's multi-LoRA (issue 11), on real servers (CPU).

The session's demo deployment (``tests/conftest.py``) serves the full-weight demo decode
modules and two LoRA adapters (``extract-lora``, ``compute-lora``, trained against the
demo base with ``pfs_sglang.train --mode lora``) on one decode server holding the base's
weights once (``decode-lora-0``: ``--enable-lora``, the ``torch_native`` LoRA backend).
Each adapter passes the greedy oracle of invariant 5 with the prompt's KV from the base
(``prompt[:-1]``, no adapter: invariant 1) and the adapter from ``prompt[-1]`` on, also
with requests to both adapters and a full-weight module in one batch; a chat streams
from an adapter. An adapter trained against another base, and a plain PEFT adapter
without its ``prefillshare.json``, are refused at launch with the reason. (An adapter
served alone, on a decode server of its own: ``test_multi_host.py``.)
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from conftest import train_lora_adapter
from pfs_sglang.identity import DECODE_MODULE_RECORD
from pfs_sglang.launch import DecodeModelSpec, Deployment, LaunchError, Topology
from pfs_sglang.launch.processes import free_port
from pfs_sglang.models.demo import write_perturbed_decode_module
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from sglang_process import generate_greedy, wait_deployment_idle

PROMPTS = [[21, 48, 95, 130, 77, 64, 33], [301, 12, 7], [55] * 40 + [9, 18]]
MAX_NEW_TOKENS = 6


def assert_oracle(url: str, base: Path, model: str, model_dir: Path, prompt: list[int]) -> list[int]:
    served = generate_greedy(url, model, prompt, MAX_NEW_TOKENS)["output_ids"]
    reference = prefillshare_greedy(base, model_dir, prompt, MAX_NEW_TOKENS)
    assert first_real_divergence(served, reference) is None, (model, prompt, served, reference.output_ids)
    return served


def test_colocated_adapters_and_a_full_weight_module_pass_the_oracle(demo_deployment, demo_models, lora_adapters):
    served_by_adapter = {}
    for name, path in lora_adapters.items():
        served_by_adapter[name] = [assert_oracle(demo_deployment.url, demo_models.base, name, path, p) for p in PROMPTS]
    for prompt in PROMPTS:
        assert_oracle(demo_deployment.url, demo_models.base, "transform", demo_models.decode["transform"], prompt)
    # The adapters change what the base would say (so the oracle above tested them, not the base).
    base_outputs = [prefillshare_greedy(demo_models.base, demo_models.base, p, MAX_NEW_TOKENS).output_ids
                    for p in PROMPTS]
    assert any(served != base_outputs for served in served_by_adapter.values())
    wait_deployment_idle(demo_deployment.url)


def test_both_adapters_and_the_full_module_in_one_batch(demo_deployment, demo_models, lora_adapters):
    jobs = [(name, path, prompt) for name, path in [*lora_adapters.items(), ("transform", demo_models.decode["transform"])]
            for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(assert_oracle, demo_deployment.url, demo_models.base, *job) for job in jobs]:
            future.result()
    wait_deployment_idle(demo_deployment.url)


def test_one_decode_server_holds_the_base_once_for_every_adapter(demo_deployment, demo_models, lora_adapters):
    launcher = (demo_deployment.log_dir / "launcher.log").read_text()
    assert "decode-lora-0 started" in launcher and "decode-extract-lora" not in launcher
    lora_log = (demo_deployment.log_dir / "decode-lora-0.log").read_text()
    assert f"'model_path': '{demo_models.base}'" in lora_log and "'enable_lora': True" in lora_log
    rows = requests.get(f"{demo_deployment.url}/workers", timeout=10).json()["workers"]
    lora_urls = {row["url"] for row in rows if row.get("model") in lora_adapters}
    transform_url = next(row["url"] for row in rows if row.get("model") == "transform")
    assert len(lora_urls) == 1

    def tree_rss_mib(url: str) -> float:
        port = int(url.rsplit(":", 1)[1])
        pid = next(c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port)
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20

    weights = {name: round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20, 2)
               for name, path in lora_adapters.items()}
    print(f"\nmemory: decode-lora-0 (base + {len(lora_adapters)} adapters) {tree_rss_mib(lora_urls.pop()):.0f} MiB RSS; "
          f"decode-transform-0 (one full-weight module) {tree_rss_mib(transform_url):.0f} MiB RSS; "
          f"adapter weights {weights} MiB")


def test_chat_streams_from_an_adapter(demo_deployment):
    reply = requests.post(f"{demo_deployment.url}/v1/chat/completions", timeout=120, json={
        "model": "compute-lora", "messages": [{"role": "user", "content": "qty: 3; price: 7"}], "max_tokens": 4,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status_code == 200, reply.text
    events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"completion_tokens":4' in events[-2]


def lora_topology(demo_models, models: tuple[DecodeModelSpec, ...], log_dir: Path) -> Topology:
    return Topology(base_model=demo_models.base, decode_models=models, port=free_port(), log_dir=log_dir)


def test_foreign_and_plain_adapters_are_refused_at_launch(demo_models, lora_corpus, tmp_path):
    other_base = write_perturbed_decode_module(demo_models.base, tmp_path / "other_base", seed=5)
    foreign = train_lora_adapter(other_base, lora_corpus.train["extract"], tmp_path / "foreign", steps=1)
    with pytest.raises(LaunchError, match="decode model 'foreign' refused: .*weights_hash differs: prefill module has"):
        Deployment(lora_topology(demo_models, (DecodeModelSpec("foreign", foreign),), tmp_path / "a")).check()

    plain = tmp_path / "plain"
    shutil.copytree(train_lora_adapter(demo_models.base, lora_corpus.train["extract"], tmp_path / "ours", steps=1), plain)
    (plain / DECODE_MODULE_RECORD).unlink()
    with pytest.raises(LaunchError, match="decode model 'plain' refused"):
        Deployment(lora_topology(demo_models, (DecodeModelSpec("plain", plain),), tmp_path / "b")).check()
