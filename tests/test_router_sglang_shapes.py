"""Batches, ``n > 1`` and SGLang's endpoints through a real deployment, with stock SGLang as the contract.

The same requests go first to a stock (non-PD) ``sglang.launch_server`` serving the
base, then through the router of the session's PrefillShare demo deployment (base and
the three demo decode models; the requests name ``extract``, which shares the base's
architecture and tokenizer). The answers must have the same shape key by key (lists and their
lengths, ``index`` values, ``choices`` order, the token counts of ``usage`` and
``meta_info``); only values that depend on the serving mode are left out (timings,
``decode_throughput``, cache details). Streams are compared by what a client reads:
every event's keys, every index present, one usage event last, one ``[DONE]``.

Then, on the deployment only: a batch whose one prompt is refused fails as a whole
at once and every server goes back to idle; an abort by the client's rid ends a
long ``n = 2`` generation; ``/health_generate`` is a real hand-off; ``max_new_tokens:
0`` batches (what SGLang's frontend sends to cache a prefix) answer; hostile bodies
(hypothesis, ``router_fuzz.py``) and the classic client mistakes (a prompt longer than
the context, ``max_tokens`` past what is left, ``n = 10**9``, deep nesting, a misspelled
parameter) get a 4xx with an OpenAI error body, never a 5xx or a hang, and every
server stays up and idle.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from router_fuzz import check_answer, hostile_requests
from sglang_process import wait_deployment_idle

MODEL = "extract"
GREEDY = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
PROMPTS = ["the record of city", "order 42"]
OPENAI = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
STREAM = {"stream": True, "stream_options": {"include_usage": True}}
REQUESTS = {
    "generate_n": ("/generate", {"text": PROMPTS[0], "sampling_params": {**GREEDY, "n": 2}}),
    "generate_batch_n": ("/generate", {"text": PROMPTS, "sampling_params": {**GREEDY, "n": 2}}),
    "generate_ids_batch": ("/generate", {"input_ids": [[11, 12, 13], [14, 15]], "sampling_params": GREEDY}),
    "generate_cache_prefix": ("/generate", {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 0}}),
    "generate_stream": ("/generate", {"text": PROMPTS, "sampling_params": {**GREEDY, "n": 2}, "stream": True}),
    "completions": ("/v1/completions", {"prompt": PROMPTS, "n": 2, **OPENAI}),
    "completions_stream": ("/v1/completions", {"prompt": PROMPTS, "n": 2, **OPENAI, **STREAM}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2, **OPENAI}),
    "chat_stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2, **OPENAI,
                                             **STREAM}),
}
# Values that depend on how a request was served, not on the API's shape.
MODE_KEYS = {"decode_throughput", "cached_tokens_details", "cached_tokens", "pfs_kv_transfer",
             "pfs_decode_prefix_tokens", "id", "created",
             "model", "weight_versions", "dp_rank"}


def ask(url: str, model: str, path: str, body: dict) -> object:
    body = {**body, "model": model} if path != "/generate" else body
    reply = httpx.post(url + path, json=body, timeout=120)
    assert reply.status_code == 200, (path, reply.text)
    if body.get("stream"):
        return [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
    return reply.json()


def ask_all(url: str, model: str) -> dict[str, object]:
    answers = {name: ask(url, model, path, body) for name, (path, body) in REQUESTS.items()}
    answers["model_info"] = httpx.get(url + "/get_model_info", timeout=30).json()
    return answers


@pytest.fixture(scope="module")
def stock(stock_base) -> dict[str, object]:
    return ask_all(stock_base, "default")


@pytest.fixture(scope="module")
def deployment(demo_deployment):
    return demo_deployment


@pytest.fixture(scope="module")
def routed(deployment) -> dict[str, object]:
    return ask_all(deployment.url, MODEL)


def shape(value: object) -> object:
    """Keys, list lengths, ``index`` values and token counts; other scalars by type."""
    if isinstance(value, dict):
        return {key: (item if key in ("index", "prompt_tokens", "completion_tokens", "total_tokens") else shape(item))
                for key, item in value.items() if key not in MODE_KEYS and not key.endswith(("_ts", "_time", "_latency"))}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


@pytest.mark.parametrize("name", [name for name, (_, body) in REQUESTS.items() if not body.get("stream")])
def test_replies_have_stock_sglang_shape(stock, routed, name):
    assert shape(routed[name]) == shape(stock[name])


@pytest.mark.parametrize("name", [name for name, (_, body) in REQUESTS.items() if body.get("stream")])
def test_streams_have_stock_sglang_shape(stock, routed, name):
    def summary(lines: list[str]) -> dict:
        assert lines[-1] == "[DONE]" and lines.count("[DONE]") == 1
        events = [json.loads(line) for line in lines[:-1]]
        if "choices" not in events[0]:  # /generate: every event has its index
            return {"keys": {frozenset(e) for e in events}, "indices": {e["index"] for e in events}}
        *chunks, usage = events
        return {"choice_keys": {frozenset(c) for e in chunks for c in e["choices"]},
                "indices": {c["index"] for e in chunks for c in e["choices"]},
                "finished": sorted(c["index"] for e in chunks for c in e["choices"] if c["finish_reason"]),
                "usage_last": (usage["choices"], shape(usage["usage"]))}

    assert summary(routed[name]) == summary(stock[name])


def test_model_info_is_what_sglang_clients_read(stock, routed):
    assert set(stock["model_info"]) <= set(routed["model_info"])
    assert routed["model_info"]["is_generation"] is True and routed["model_info"]["model_path"]


# ----- on the deployment only -----

def test_a_refused_prompt_fails_the_whole_batch_and_nothing_is_left_behind(deployment):
    body = {"input_ids": [[11, 12, 13, 14], [11, 12, 100_000], [15, 16, 17]], "sampling_params": {**GREEDY, "n": 2}}
    started = time.monotonic()
    reply = httpx.post(deployment.url + "/generate", json=body, timeout=120)
    assert 400 <= reply.status_code < 600 and reply.json()["error"]["message"]
    assert time.monotonic() - started < 30
    wait_deployment_idle(deployment.url)
    assert httpx.post(deployment.url + "/generate", json={"text": PROMPTS, "sampling_params": GREEDY},
                      timeout=120).status_code == 200  # the servers still serve


def test_abort_by_rid_ends_every_sample_of_a_long_generation(deployment):
    body = {"text": PROMPTS[0], "rid": "long-job", "sampling_params": {"n": 2, "max_new_tokens": 1900,
                                                                       "temperature": 0, "ignore_eos": True}}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, deployment.url + "/generate", json=body, timeout=300)
        time.sleep(3)
        assert not running.done()
        aborted_at = time.monotonic()
        assert httpx.post(deployment.url + "/abort_request", json={"rid": "long-job"}, timeout=30).status_code == 200
        reply = running.result()
    assert time.monotonic() - aborted_at < 20
    answers = reply.json()
    if reply.status_code == 200:  # SGLang answers an aborted request with finish_reason abort
        assert [a["meta_info"]["finish_reason"]["type"] for a in answers] == ["abort", "abort"]
        assert all(len(a["output_ids"]) < 1900 for a in answers)
    else:
        assert "abort" in json.dumps(answers).lower()
    wait_deployment_idle(deployment.url)


def test_health_generate_and_cache_prefix_batches(deployment):
    assert httpx.get(deployment.url + "/health_generate", timeout=60).status_code == 200
    reply = httpx.post(deployment.url + "/generate", json={"text": PROMPTS, "sampling_params": {"max_new_tokens": 0}},
                       timeout=120)
    assert reply.status_code == 200
    assert [(a["output_ids"], a["meta_info"]["completion_tokens"]) for a in reply.json()] == [([], 0), ([], 0)]
    assert httpx.get(deployment.url + "/no_such_endpoint", timeout=10).json()["error"]["code"] == "not_found"
    wait_deployment_idle(deployment.url)


FUZZ_CLIENT = httpx.Client(timeout=60)  # a hang fails the example


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=hostile_requests(MODEL))
def test_hostile_bodies_get_a_4xx_never_a_5xx(deployment, request):
    endpoint, raw = request
    check_answer(FUZZ_CLIENT, deployment.url, endpoint, raw)


@pytest.mark.parametrize("endpoint, body, message", [
    ("/v1/completions", {"prompt": "x " * 3000, "max_tokens": 2}, "longer than the model's context length"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "exceeds the model's maximum context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 10 ** 9},
     "generations one request may ask for"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": 10 ** 30}}, "outside the 64-bit range"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": None}}, "must be a number"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_token": 4},
     "Unrecognized request argument supplied: 'max_token'; did you mean 'max_tokens'?"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_token": 4}}, "did you mean 'sampling_params.max_new_tokens'"),
])
def test_client_mistakes_get_a_clear_4xx_and_every_server_stays_up(deployment, endpoint, body, message):
    reply = check_answer(FUZZ_CLIENT, deployment.url, endpoint, json.dumps({**body, "model": MODEL}).encode())
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
    nested = FUZZ_CLIENT.post(deployment.url + endpoint, content=b"[" * 100_000 + b"]" * 100_000)
    assert nested.status_code == 400 and "nested too deeply" in nested.json()["error"]["message"]
    assert deployment.launcher_alive()
    wait_deployment_idle(deployment.url, timeout_s=30)

