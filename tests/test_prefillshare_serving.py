"""End to end: one prefill module, three decode models, one OpenAI endpoint (issue 3).

A real deployment (``python -m pfs_sglang.launch_server``: router, prefill server with
the ``pfs`` prefix tree, one decode server per demo model and one for two LoRA adapters,
``zmq`` KV transfer; the session's ``demo_deployment``, shared with other modules, whose
``compute-tight`` server is ``test_decode_memory_pressure.py``'s) runs
on 127.0.0.1. Checks: the greedy oracle of invariant 5 for every
decode model (single turn, two turns whose second prompt holds the first answer, and a
cache hit), cross-model prefix sharing (invariant 3), streaming, 3 models x 20
concurrent requests leaving every KV pool idle, a client that leaves (streaming or
not) getting its request aborted and its KV slots freed, and, last, a short closed-loop
load run (``python -m pfs_sglang.bench load --url``: 12 sessions for 15 s) passing its
own checks (exactly-once answers, only injected errors, no KV slot held, bounded RSS,
no traceback in a server log; the full 200-session run is in ``docs/bench/load``).
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import time
from pathlib import Path

import pytest
import requests

from conftest import TIGHT_MODEL
from pfs_sglang.bench import load
from pfs_sglang.oracle import first_real_divergence, load_tokenizer, prefillshare_greedy
from sglang_process import generate_greedy, metric_total, wait_deployment_idle

MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def deployment(demo_deployment) -> str:
    return demo_deployment.url


@pytest.fixture(scope="module")
def deployment_dir(demo_deployment):
    """The launcher's log and every server's log."""
    return demo_deployment.log_dir


def generate(url: str, model: str, prompt_ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    return generate_greedy(url, model, prompt_ids, max_new_tokens)


def chat(url: str, model: str, messages: list[dict], **extra) -> dict:
    reply = requests.post(f"{url}/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": MAX_NEW_TOKENS, "temperature": 0, **extra,
    }, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def chat_prompt_ids(model_path, messages) -> list[int]:
    tokenizer = load_tokenizer(str(model_path))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def assert_matches_oracle(served_ids, demo_models, model, prompt_ids):
    reference = prefillshare_greedy(demo_models.base, demo_models.decode[model], prompt_ids, len(served_ids) or 1)
    divergence = first_real_divergence(served_ids, reference)
    assert divergence is None, (
        f"{model}: served {served_ids} != reference {reference.output_ids} at {divergence} "
        f"(margin {reference.top2_margins[divergence]:.4f})"
    )


def assert_chat_matches_oracle(content, demo_models, model, messages, max_tokens=MAX_NEW_TOKENS):
    prompt_ids = chat_prompt_ids(demo_models.base, messages)
    reference = prefillshare_greedy(
        demo_models.base, demo_models.decode[model], prompt_ids, max_tokens,
        stop_token_ids=(load_tokenizer(str(demo_models.base)).eos_token_id,),
    )
    tokenizer = load_tokenizer(str(demo_models.base))
    if content != tokenizer.decode(reference.output_ids, skip_special_tokens=True):
        assert min(reference.top2_margins) < 1e-3, f"{model}: {content!r} != {tokenizer.decode(reference.output_ids)!r}"


def test_lists_every_decode_model(deployment, demo_models, lora_adapters):
    served = {entry["id"] for entry in requests.get(f"{deployment}/v1/models", timeout=10).json()["data"]}
    assert served == {*demo_models.decode, *lora_adapters, TIGHT_MODEL}


def test_greedy_oracle_for_every_decode_model(deployment, demo_models):
    rng = random.Random(0)
    for model in demo_models.decode:
        for length in (1, 2, 17, 60):
            prompt_ids = [rng.randrange(8, 500) for _ in range(length)]
            served = generate(deployment, model, prompt_ids)
            assert_matches_oracle(served["output_ids"], demo_models, model, prompt_ids)


def test_decode_servers_read_the_prefill_pool_in_place(deployment, deployment_dir, demo_models):
    """On one CPU host the KV crosses by the ``map`` transport: the prefill pool in shared memory."""
    generate(deployment, next(iter(demo_models.decode)), list(range(20, 60)))
    prefill_logs = "".join(log.read_text(errors="replace") for log in sorted(Path(deployment_dir).glob("prefill-*.log")))
    assert "KV pool in shared memory" in prefill_logs
    connections = re.findall(r"pfs zmq KV engine: connected to .* transport (\S+)", prefill_logs)
    assert connections and all(transport.startswith("map+") for transport in connections), connections


def test_every_cpu_server_forks_its_scheduler_and_detokenizer(deployment_dir):
    """``server_startup/fork_on_cpu.py``: every server of the deployment (each served the oracle
    tests above and below) started its subprocesses by fork, not by SGLang's spawn."""
    logs = sorted(Path(deployment_dir).glob("*-*.log"))
    assert logs
    for log in logs:
        assert "scheduler and detokenizer start by fork" in log.read_text(errors="replace"), log.name


def test_two_turn_conversation_prefills_the_first_answer_with_the_base(deployment, demo_models):
    first = [{"role": "user", "content": "record 7: city Oslo, price 120. what is the city of record 7?"}]
    answer = chat(deployment, "extract", first)["choices"][0]["message"]["content"]
    assert_chat_matches_oracle(answer, demo_models, "extract", first)
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "and its price?"}]
    for model in ("extract", "compute"):
        reply = chat(deployment, model, second)
        assert_chat_matches_oracle(reply["choices"][0]["message"]["content"], demo_models, model, second)
        # the first turn's prompt is a cache hit in the shared tree
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(chat_prompt_ids(demo_models.base, first)) - 2


def test_cache_hit_gives_the_same_greedy_output(deployment, demo_models):
    prompt_ids = list(range(100, 180))
    cold = generate(deployment, "transform", prompt_ids)
    warm = generate(deployment, "transform", prompt_ids)
    assert warm["meta_info"]["cached_tokens"] >= len(prompt_ids) - 2
    assert warm["output_ids"] == cold["output_ids"]
    assert_matches_oracle(warm["output_ids"], demo_models, "transform", prompt_ids)


def _prometheus_value(text: str, name: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_context_prefilled_once_is_shared_across_models(deployment, demo_models):
    context = "\n".join(f"record {i}: city C{i}, price {i * 7}, status open" for i in range(40))
    metrics_before = requests.get(f"{deployment}/metrics", timeout=10).text
    first = chat(deployment, "extract", [{"role": "user", "content": context + "\nwhat is the city of record 3?"}])
    second = chat(deployment, "compute", [{"role": "user", "content": context + "\nwhat is the total price?"}])
    metrics_after = requests.get(f"{deployment}/metrics", timeout=10).text
    context_tokens = len(chat_prompt_ids(demo_models.base, [{"role": "user", "content": context}])) - 4
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    prefilled = second["usage"]["prompt_tokens"] - cached
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < context_tokens
    assert cached >= context_tokens, (cached, context_tokens)
    assert prefilled <= second["usage"]["prompt_tokens"] - context_tokens
    counted = (_prometheus_value(metrics_after, "pfs_router_prefilled_tokens_total", "compute")
               - _prometheus_value(metrics_before, "pfs_router_prefilled_tokens_total", "compute"))
    assert counted == prefilled
    print(f"\nsharing: compute prompt {second['usage']['prompt_tokens']} tokens, "
          f"{cached} served from the shared cache, {prefilled} prefilled")


def test_streaming_equals_non_streaming(deployment):
    messages = [{"role": "user", "content": "transform: blue small item 42"}]
    whole = chat(deployment, "transform", messages)["choices"][0]["message"]["content"]
    with requests.post(f"{deployment}/v1/chat/completions", json={
        "model": "transform", "messages": messages, "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }, stream=True, timeout=120) as reply:
        assert reply.status_code == 200
        events = [line[len(b"data: "):] for line in reply.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert streamed == whole


def test_unknown_model_is_404_with_openai_error(deployment):
    reply = requests.post(f"{deployment}/v1/chat/completions", json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


def test_three_models_twenty_concurrent_requests_each(deployment, demo_models):
    rng = random.Random(1)
    jobs = [(model, [rng.randrange(8, 500) for _ in range(rng.randint(1, 50))])
            for model in demo_models.decode for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        replies = list(pool.map(lambda job: generate(deployment, *job, max_new_tokens=6), jobs))
    assert all(len(reply["output_ids"]) == 6 for reply in replies)
    for (model, prompt_ids), reply in list(zip(jobs, replies))[::10]:
        assert_matches_oracle(reply["output_ids"], demo_models, model, prompt_ids)
    wait_deployment_idle(deployment, timeout_s=30)  # no KV slot held by a request, on any server


def test_sglang_frontend_program_runs_on_the_default_model(deployment, demo_models):
    import sglang as sgl

    @sgl.function
    def answer(s, question):
        s += question
        s += sgl.gen("answer", max_tokens=MAX_NEW_TOKENS, temperature=0, ignore_eos=True)

    state = answer.run(question="record 1: city Oslo. city of record 1?", backend=sgl.RuntimeEndpoint(deployment))
    prompt_ids = load_tokenizer(str(demo_models.base)).encode("record 1: city Oslo. city of record 1?",
                                                              add_special_tokens=False)
    reference = prefillshare_greedy(demo_models.base, demo_models.decode["extract"], prompt_ids, MAX_NEW_TOKENS)
    expected = load_tokenizer(str(demo_models.base)).decode(reference.output_ids, skip_special_tokens=True)
    assert state["answer"] == expected or min(reference.top2_margins) < 1e-3


def greedy_text_or_near_tie(demo_models, model: str, text: str, served: str, max_new_tokens: int) -> bool:
    """``served`` is the oracle's greedy continuation of ``text`` by ``model`` (or the oracle had a near-tie)."""
    tokenizer = load_tokenizer(str(demo_models.base))
    reference = prefillshare_greedy(demo_models.base, demo_models.decode[model],
                                    tokenizer.encode(text, add_special_tokens=False), max_new_tokens)
    return served == tokenizer.decode(reference.output_ids, skip_special_tokens=True) or \
        min(reference.top2_margins) < 1e-3


def test_one_frontend_program_over_three_models_prefills_its_context_once(deployment, demo_models):
    import sglang as sgl

    from pfs_sglang.frontend import PrefillShareBackend

    pfs = PrefillShareBackend(deployment)
    context = "\n".join(f"record {i}: city C{i}, qty {i % 5}, price {i * 7}" for i in range(30)) + "\n"
    greedy = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}

    @sgl.function
    def pipeline(s):
        s += context + "city of record 3:"
        pfs.use(s, "extract")
        s += sgl.gen("city", **greedy)
        pfs.use(s, "compute")
        s += "\nqty plus price of record 3:" + sgl.gen("total", **greedy)
        s += "\nopen? " + sgl.select("open", choices=["yes", "no"])
        forks = s.fork(2)
        for fork, model in zip(forks, ("extract", "transform")):
            pfs.use(fork, model)
            fork += "\nnext:" + sgl.gen("next", **greedy)
        forks.join()

    requests_before = requests.get(f"{deployment}/metrics", timeout=10).text
    state = pipeline.run(backend=pfs.endpoint("extract"))
    requests_after = requests.get(f"{deployment}/metrics", timeout=10).text
    assert not state.error(), state.error()

    city_prompt = context + "city of record 3:"
    total_prompt = city_prompt + state["city"] + "\nqty plus price of record 3:"
    assert greedy_text_or_near_tie(demo_models, "extract", city_prompt, state["city"], 4)
    assert greedy_text_or_near_tie(demo_models, "compute", total_prompt, state["total"], 4)
    fork_prompt = total_prompt + state["total"] + "\nopen? " + state["open"] + "\nnext:"
    for fork, model in zip(state["next"], ("extract", "transform")):
        assert greedy_text_or_near_tie(demo_models, model, fork_prompt, fork, 4), model

    # The context was prefilled once: the second model read it from the shared tree.
    context_tokens = len(load_tokenizer(str(demo_models.base)).encode(context, add_special_tokens=False))
    assert state.get_meta_info("total")["cached_tokens"] >= context_tokens - 1
    for model in ("extract", "compute", "transform"):  # every model was asked, through the router
        sent = sum(value for name, value in _prometheus_samples(requests_after, "pfs_router_requests_total", model)) \
            - sum(value for name, value in _prometheus_samples(requests_before, "pfs_router_requests_total", model))
        assert sent >= 1, model

    streamed = pipeline.run(backend=pfs.endpoint("extract"), stream=True)
    assert "".join(streamed.text_iter()) and streamed["total"] == state["total"]

    with pytest.raises(RuntimeError, match="does not exist"):
        pfs.endpoint("no-such-model")
    wait_deployment_idle(deployment)


def _prometheus_samples(text: str, name: str, model: str) -> list[tuple[str, float]]:
    return [(line.split(" ", 1)[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
            if line.startswith(name + "{") and f'model="{model}"' in line]


def client_disconnects(router_url: str, model: str) -> float:
    return metric_total(router_url, f'pfs_router_client_disconnects_total{{model="{model}"}}')


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_has_its_request_aborted_and_its_kv_freed(deployment, stream):
    before = client_disconnects(deployment, "compute")
    body = {"model": "compute", "input_ids": list(range(30, 60)), "stream": stream,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0}}
    if stream:
        with requests.post(f"{deployment}/generate", json=body, stream=True, timeout=60) as reply:
            assert reply.status_code == 200
            assert next(line for line in reply.iter_lines() if line.startswith(b"data: "))  # generating; leave
    else:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{deployment}/generate", json=body, timeout=(5, 3))  # leaves after 3 s
    left = time.monotonic()
    wait_deployment_idle(deployment, timeout_s=20)  # no router lease, no KV slot held, on any server
    assert time.monotonic() - left < 20
    assert client_disconnects(deployment, "compute") == before + 1  # the router aborted it on its servers


def test_short_load_run_passes_its_checks(deployment, deployment_dir, demo_models, lora_adapters, tmp_path):
    models = [*demo_models.decode, *lora_adapters]  # not TIGHT_MODEL: its 160-token pool is for one test's load
    summary = load.run_load(deployment, load.LoadConfig(sessions=12, duration_s=15, inject_every=10, progress=False),
                            tmp_path / "load", models, log_dir=deployment_dir)
    failed = [name for name, ok in summary["checks"].items() if not ok]
    assert summary["passed"] and not failed, (failed, (tmp_path / "load" / "report.md").read_text())
    counted = summary["requests"]
    assert counted["answered"] > 12  # every session got past its first turn
    assert set(counted["injected"]) == {load.INJECTED_UNKNOWN, load.INJECTED_ABANDON}
    assert set(counted["by_model"]) == {*demo_models.decode, *lora_adapters}  # the LoRA adapters too
    assert set(counted["by_kind"]) == {"chat", "chat-stream", "completion"}
    assert counted["router_requests_delta_by_status"]["200"] >= counted["answered"]
    assert summary["server_log_tracebacks"] and not any(summary["server_log_tracebacks"].values())
    assert {"router", "prefill", "decode-extract", "decode-compute", "decode-transform"} <= set(summary["memory"])
    assert (tmp_path / "load" / "load.png").stat().st_size > 0

