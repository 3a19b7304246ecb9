"""Admission that never stalls (issue 23, item 0): what a PD decode pool can take, advertised and enforced.

SGLang's decode admission needs a request's prompt plus ``num_reserved_decode_tokens``
(512) free in the decode pool; a prompt over ``pool - reserve`` was never admitted and
blocked every request behind it (``pfs_sglang.decode.admission``). Without a server: the
limit's arithmetic against SGLang's admission and retraction conditions, the decode
server's cap (its hook, on a stand-in scheduler), the launcher's plan and refusals, the
router's learned limits and its refusal of token-id prompts before any hand-off (stand-in
servers), the benchmark's decode pool sizing.

With servers (``server``): one PD deployment of the demo models whose two decode servers
have 768-token pools (default reserve 512: context 256, prompts up to 249 tokens):
``compute`` as the launcher plans it (``--context-length 256``), ``extract`` as if its
pool were sized when it starts (a GPU's memory share: no ``--context-length``, the
decode server's own cap decides). Prompts at, just under and just over the limit
(token ids and text, both models), and a burst of long prompts with over-limit ones
among them: each answered or refused, the refusals at once while the pool is busy, every
server healthy and every pool idle afterwards.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from enum import Enum
from types import SimpleNamespace

import httpx
import pytest
import requests
from fastapi import FastAPI

from pfs_sglang.bench.workloads import WorkloadConfig, context_needed_by
from pfs_sglang.decode.admission import (
    SGLANG_INPUT_MARGIN,
    DecodePoolLimit,
    cap_request_length_to_decode_pool,
    context_needed,
    pool_tokens_for,
)
from pfs_sglang.launch.decode_limits import check_decode_limits
from pfs_sglang.launch.deployment import Deployment
from pfs_sglang.launch.processes import LaunchError, free_port
from pfs_sglang.launch.topology import DecodeModelSpec, Topology
from pfs_sglang.router import DecodePool, PrefillWorker, RouterConfig, Worker, build_router_app
from pfs_sglang.router.decode_limits import ServedLimit, token_prompts
from test_router import StandIn, serving

POOL, RESERVE = 768, 512
CONTEXT = POOL - RESERVE  # 256
MAX_PROMPT = CONTEXT - 2 - SGLANG_INPUT_MARGIN  # 249: SGLang refuses a prompt of max_req_input_len (C - 6) or more
CLIP_MAX_NEW_TOKENS = 4096  # SGLang's SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION


def ceil_page(tokens: int, page: int) -> int:
    return -(-tokens // page) * page


# ----- the limit, against SGLang 0.5.23's decode admission (disaggregation/decode.py) -----

def test_the_issue_s_pool_cannot_take_a_2k_prompt_and_says_what_it_can():
    limit = DecodePoolLimit(pool_tokens=2048, model_context=32768)
    assert limit.admissible_tokens == 1536 and limit.context_length == 1536 and limit.pool_bound
    assert limit.max_prompt_tokens == 1529 and not limit.fits(2000, 8) and limit.fits(1500, 34)
    assert not limit.fits(1500, 35)  # SGLang would cap max_new_tokens at 34
    assert "context length 1536 tokens (prompts up to 1529)" in limit.describe()
    assert DecodePoolLimit(pool_tokens=8192, model_context=2048).context_length == 2048  # the model's, not the pool's
    assert DecodePoolLimit(pool_tokens=512).admissible_tokens == 0 and "admits no request" in \
        DecodePoolLimit(pool_tokens=512).describe()


@pytest.mark.parametrize("page", [1, 4, 16, 64])
@pytest.mark.parametrize("reserve", [4, 100, 512])
def test_every_request_the_limit_lets_in_is_admitted_by_an_idle_pool_and_resumed_after_retraction(page, reserve):
    """SGLang admits a request on an idle pool when ceil_page(prompt) + reserve and
    prompt + min(max_new, clip) fit the pool's free pages, and resumes a retracted one
    when ceil_page(its KV) + reserve does; a longer prompt is refused by its scheduler."""
    for pool in (reserve + 8 * page + 7, 777, 2048, 3001):
        limit = DecodePoolLimit(pool_tokens=pool, reserved_decode_tokens=reserve, page_size=page)
        free = pool // page * page  # an idle paged pool's available_size()
        assert limit.admissible_tokens % page == 0
        for prompt in range(1, limit.max_prompt_tokens + 1):
            max_new = limit.max_new_tokens_for(prompt)
            assert max_new >= 1
            assert ceil_page(prompt, page) + reserve <= free  # pre-allocation
            assert prompt + min(max_new, CLIP_MAX_NEW_TOKENS) <= free
            assert ceil_page(prompt + max_new - 1, page) + reserve <= free  # a retracted request at its longest
        max_req_input_len = limit.context_length - 1 - SGLANG_INPUT_MARGIN
        assert limit.max_prompt_tokens + 1 >= max_req_input_len  # the next prompt is SGLang's refusal


def test_pool_tokens_for_is_the_smallest_pool_of_a_context():
    for context, reserve, page in ((256, 512, 1), (1287, 512, 1), (100, 64, 16), (1, 512, 64)):
        pool = pool_tokens_for(context, reserve, page)
        assert DecodePoolLimit(pool, reserve, page).context_length >= context
        assert DecodePoolLimit(pool - page, reserve, page).context_length < context
    assert context_needed(MAX_PROMPT, 5) == CONTEXT and context_needed(10, 0) == 17


# ----- the decode server's own cap (the plugin's hook on Scheduler.init_disaggregation) -----

class Mode(Enum):  # stands in for SGLang's DisaggregationMode
    NULL = "null"
    PREFILL = "prefill"
    DECODE = "decode"


def stand_in_scheduler(mode: Mode, pool: int, context: int, reserve: int = RESERVE, page: int = 1):
    max_req_len = min(context - 1, pool - 1)  # TpModelWorker.get_worker_info
    return SimpleNamespace(disaggregation_mode=mode, max_total_num_tokens=pool, page_size=page,
                           max_req_len=max_req_len, max_req_input_len=max_req_len - 5,
                           disagg_decode_prealloc_queue=SimpleNamespace(num_reserved_decode_tokens=reserve))


def test_a_decode_server_caps_its_requests_to_what_its_pool_admits():
    scheduler = stand_in_scheduler(Mode.DECODE, POOL, 2048)
    assert cap_request_length_to_decode_pool(lambda s: "set up", scheduler) == "set up"
    assert (scheduler.max_req_len, scheduler.max_req_input_len) == (CONTEXT - 1, MAX_PROMPT + 1)
    for unchanged in (stand_in_scheduler(Mode.DECODE, POOL, 200),  # the model's context is the tighter
                      stand_in_scheduler(Mode.PREFILL, POOL, 2048), stand_in_scheduler(Mode.NULL, POOL, 2048)):
        before = (unchanged.max_req_len, unchanged.max_req_input_len)
        cap_request_length_to_decode_pool(lambda s: None, unchanged)
        assert (unchanged.max_req_len, unchanged.max_req_input_len) == before
    paged = stand_in_scheduler(Mode.DECODE, 1000, 4096, reserve=100, page=64)
    cap_request_length_to_decode_pool(lambda s: None, paged)
    assert paged.max_req_len == 832 - 1  # floor_page(floor_page(1000) - 100) = 832


# ----- the launcher -----

def pd_topology(demo_models, decode_args: tuple[str, ...] = (), device: str = "cpu", **extra) -> Topology:
    return Topology(base_model=demo_models.base, device=device, mode="pd", decode_args=decode_args,
                    decode_models=(DecodeModelSpec("compute", demo_models.decode["compute"]),), **extra)


def test_the_launcher_sets_the_context_a_decode_pool_admits_and_refuses_a_pool_that_admits_nothing(demo_models):
    plan = check_decode_limits(pd_topology(demo_models, ("--max-total-tokens", str(POOL))))["compute"]
    assert plan.limit.context_length == CONTEXT and plan.context_args == ("--context-length", str(CONTEXT))
    assert "context length 256 tokens (prompts up to 249)" in plan.describe()
    roomy = check_decode_limits(pd_topology(demo_models))["compute"]  # 8192 tokens: the model's 2048 fits
    assert roomy.limit.context_length == 2048 and roomy.context_args == ()
    smaller_reserve = check_decode_limits(pd_topology(demo_models, ("--max-total-tokens", "512",
                                                                    "--num-reserved-decode-tokens", "128")))
    assert smaller_reserve["compute"].limit.context_length == 384
    with pytest.raises(LaunchError, match=r"KV pool of 512 tokens admits no request.*reserves 512.*at least 520"):
        check_decode_limits(pd_topology(demo_models, ("--max-total-tokens", "512")))
    with pytest.raises(LaunchError, match=r"--context-length 300 cannot be served.*admits 256 at most.*812 tokens"):
        check_decode_limits(pd_topology(demo_models, ("--max-total-tokens", str(POOL), "--context-length", "300")))
    asked = check_decode_limits(pd_topology(demo_models, ("--max-total-tokens", str(POOL), "--context-length", "200")))
    assert asked["compute"].limit.context_length == 200 and asked["compute"].context_args == ()
    on_gpu = check_decode_limits(pd_topology(demo_models, device="cuda"))["compute"]  # pool sized at start
    assert on_gpu.limit is None and "sized when it starts" in on_gpu.describe()
    assert check_decode_limits(Topology(base_model=demo_models.base, mode="unified")) == {}  # stock admission


def test_the_dry_run_prints_each_decode_server_s_context_and_passes_it(demo_models, tmp_path):
    dry = Deployment(pd_topology(demo_models, ("--max-total-tokens", str(POOL)), log_dir=tmp_path)).dry_run()
    line = next(line for line in dry.splitlines() if line.startswith("# decode-compute-0"))
    assert "context length 256 tokens (prompts up to 249): KV pool 768 tokens, 512 reserved per request" in line
    command = next(line for line in dry.splitlines() if "--disaggregation-mode decode" in line)
    assert command.endswith("--max-total-tokens 768 --context-length 256")


def test_a_kv_budget_is_split_by_the_stated_rule_and_the_dry_run_says_how(demo_models, lora_adapters, tmp_path):
    """--kv-budget: each decode pool one context plus the reserve, the prefill pool the rest
    (launch/pool_sizing.py); without --context-length the decode pools take at most half."""
    two = (DecodeModelSpec("compute", demo_models.decode["compute"]), DecodeModelSpec("extract", demo_models.decode["extract"]))
    asked = Topology(base_model=demo_models.base, mode="pd", decode_models=two, kv_budget=12000, log_dir=tmp_path,
                     decode_args=("--context-length", "1500"))
    dry = Deployment(asked).dry_run().splitlines()
    assert dry[0] == ("# KV pools: KV budget 12000 tokens: 2 decode pool(s) of 2012 (one 1500-token context plus "
                      "SGLang's decode reserve; requests over one context share it there), 1 prefill pool(s) of 7976 "
                      "(the rest: the shared tree)")
    commands = [line for line in dry if not line.startswith("#")]
    prefill = next(line for line in commands if "--disaggregation-mode prefill" in line)
    assert "--max-total-tokens 7976" in prefill
    for command in (line for line in commands if "--disaggregation-mode decode" in line):
        assert "--max-total-tokens 2012" in command and command.endswith("--context-length 1500")
    halves = Deployment(replace(asked, decode_args=(), kv_budget=8000)).dry_run().splitlines()[0]
    assert "2 decode pool(s) of 2000 (one 1488-token context" in halves and "prefill pool(s) of 4000" in halves
    capped = Deployment(replace(asked, decode_args=())).dry_run().splitlines()[0]  # at most the model's 2048
    assert "2 decode pool(s) of 2560 (one 2048-token context" in capped and "prefill pool(s) of 6880" in capped
    with pytest.raises(LaunchError, match="cannot serve a context of 1500.*at least 5524"):
        Deployment(replace(asked, kv_budget=5000)).dry_run()
    unified = Topology(base_model=demo_models.base, kv_budget=12000, log_dir=tmp_path, replicas=2,
                       decode_models=(DecodeModelSpec("extract-lora", lora_adapters["extract-lora"]),))
    assert Deployment(unified).dry_run().splitlines()[0] == "# KV pools: KV budget 12000 tokens: 2 unified pool(s) of 6000"
    with pytest.raises(ValueError, match="--kv-budget"):
        replace(asked, device="cuda").validate()


# ----- the router -----

SERVER_INFO = {"max_total_num_tokens": POOL, "num_reserved_decode_tokens": RESERVE, "page_size": 1,
               "max_req_input_len": MAX_PROMPT + 1}


def test_the_router_reads_a_decode_server_s_limit_from_what_it_serves():
    planned = ServedLimit.of_server({**SERVER_INFO, "context_length": CONTEXT}, CONTEXT)
    capped_by_itself = ServedLimit.of_server({**SERVER_INFO, "context_length": None}, 2048)  # no --context-length
    for limit in (planned, capped_by_itself):
        assert (limit.context_length, limit.max_prompt_tokens) == (CONTEXT, MAX_PROMPT)
    assert planned.refusal("m", MAX_PROMPT, 5, "input_ids") is None
    over = planned.refusal("m", MAX_PROMPT + 1, None, "input_ids")
    assert over.status == 400 and over.code == "context_length_exceeded" and over.param == "input_ids"
    assert over.message == ("The input (250 tokens) is too long for model 'm': it serves a context of 256 tokens "
                            "(prompts of at most 249 tokens); its decode pool holds 768 KV tokens and SGLang's decode "
                            "admission reserves 512 of them per request")
    assert "200 input + 57 new" in planned.refusal("m", 200, 57, "prompt").message
    assert capped_by_itself.refusal("m", 200, 57, "prompt") is not None  # past the context advertised


def test_token_prompts_are_read_as_sglang_reads_them():
    assert token_prompts("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}) == \
        [(3, 4, "input_ids")]
    assert token_prompts("/generate", {"input_ids": [[1], [1, 2]], "sampling_params": [{}, {"max_new_tokens": 2}]}) \
        == [(1, None, "input_ids"), (2, 2, "input_ids")]
    assert token_prompts("/v1/completions", {"prompt": [[1, 2], [3]], "max_tokens": 9}) == \
        [(2, 9, "prompt"), (1, 9, "prompt")]
    for text in ({"text": "abc"}, {"prompt": "abc"}, {"prompt": ["a", "b"]}, {"messages": []}):
        assert token_prompts("/v1/completions", text) == [] and token_prompts("/generate", text) == []


def decode_stand_in(name: str, tells_limit: bool) -> tuple[StandIn, FastAPI]:
    stand_in = StandIn(name)
    app = stand_in.app()
    if tells_limit:
        app.add_api_route("/server_info", lambda: {**SERVER_INFO, "context_length": CONTEXT}, methods=["GET"])
        app.add_api_route("/v1/models", lambda: {"data": [{"id": name, "max_model_len": CONTEXT}]}, methods=["GET"])
    return stand_in, app


def test_the_router_advertises_each_model_s_limit_and_refuses_token_prompts_over_it_before_any_hand_off():
    prefill = StandIn("prefill-0")
    compute, compute_app = decode_stand_in("compute-0", tells_limit=True)
    silent, silent_app = decode_stand_in("silent-0", tells_limit=False)
    with serving(prefill.app()) as prefill.url, serving(compute_app) as compute.url, serving(silent_app) as silent.url:
        config = RouterConfig(prefill_workers=[PrefillWorker(url=prefill.url, bootstrap_port=7000)],
                              decode_pools={"compute": DecodePool("compute", [Worker(compute.url)]),
                                            "silent": DecodePool("silent", [Worker(silent.url)])},
                              health_timeout_s=2)
        with serving(build_router_app(config)) as router:
            cards = {card["id"]: card for card in httpx.get(router + "/v1/models", timeout=10).json()["data"]}
            assert cards["compute"]["max_model_len"] == CONTEXT and "max_model_len" not in cards["silent"]
            assert httpx.get(router + "/v1/models/compute", timeout=10).json()["max_model_len"] == CONTEXT

            def generate(model: str, prompt_tokens: int, max_new: int | None) -> httpx.Response:
                params = {} if max_new is None else {"max_new_tokens": max_new}
                return httpx.post(router + "/generate", json={"model": model, "input_ids": [5] * prompt_tokens,
                                                               "sampling_params": params}, timeout=10)

            for prompt_tokens, max_new in ((MAX_PROMPT + 1, None), (MAX_PROMPT, CONTEXT - MAX_PROMPT + 1)):
                refused = generate("compute", prompt_tokens, max_new)
                assert refused.status_code == 400, refused.text
                assert refused.json()["error"]["code"] == "context_length_exceeded"
            batch = httpx.post(router + "/v1/completions", json={"model": "compute", "prompt": [[5] * 10, [5] * 300]},
                               timeout=10)
            assert batch.status_code == 400 and batch.json()["error"]["param"] == "prompt"
            assert not prefill.bodies and not compute.bodies  # refused before any hand-off
            assert generate("compute", MAX_PROMPT, 5).status_code == 200
            assert generate("silent", 5000, None).status_code == 200  # no limit known: the server decides
            assert httpx.post(router + "/generate", json={"model": "compute", "text": "x " * 400},
                              timeout=10).status_code == 200  # text: the decode server tokenizes and decides


# ----- the benchmark -----

def test_the_benchmark_sizes_its_decode_pools_so_its_workload_fits():
    from pfs_sglang.bench.__main__ import decode_context_tokens

    small = dict(kind="react", sessions=2, models=("a", "b", "c"), system_tokens=1024, task_tokens=128,
                 observation_tokens=64, output_tokens=8)
    two_rounds, eight_rounds = WorkloadConfig(rounds=2, **small), WorkloadConfig(rounds=8, **small)
    assert decode_context_tokens(two_rounds, None, 1536) == 1536  # 1287 tokens at most: the shape's holds it
    needed = context_needed_by(eight_rounds)
    grown = decode_context_tokens(eight_rounds, None, 1536)
    assert needed > 1536 and grown == needed
    assert DecodePoolLimit(pool_tokens_for(grown), model_context=None).context_length >= needed
    with pytest.raises(ValueError, match=rf"--decode-context-tokens 1536 cannot serve.*context of {needed}"):
        decode_context_tokens(eight_rounds, 1536, 1536)
    assert context_needed_by(WorkloadConfig(kind="trace", sessions=1, rounds=1, models=("a",), trace="t")) is None


# ----- on real servers -----

PLANNED, UNPLANNED = "compute", "extract"  # the launcher sets --context-length / the decode server caps itself


@pytest.fixture(scope="module")
def deployment(demo_models, tmp_path_factory):
    from pfs_sglang.launch import deployment as deployment_module

    planned = deployment_module.check_decode_limits

    def as_if_sized_at_start(topology):  # UNPLANNED's pool as a GPU's memory share would size it
        plans = planned(topology)
        del plans[UNPLANNED]
        return plans

    topology = Topology(base_model=demo_models.base, mode="pd", port=free_port(),
                        decode_models=tuple(DecodeModelSpec(name, demo_models.decode[name])
                                            for name in (PLANNED, UNPLANNED)),
                        decode_args=("--max-total-tokens", str(POOL)), transfer_timeout_s=60,
                        log_dir=tmp_path_factory.mktemp("pd_admission"), startup_timeout_s=900)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deployment_module, "check_decode_limits", as_if_sized_at_start)
        with Deployment(topology) as running:
            yield running


def decode_url(deployment: Deployment, model: str) -> str:
    return next(child.url for child in deployment.children if child.name == f"decode-{model}-0")


def generate_ids(url: str, model: str, prompt_tokens: int, max_new: int, timeout: float = 300) -> requests.Response:
    ids = [(17 * i) % 200 + 20 for i in range(prompt_tokens)]
    return requests.post(f"{url}/generate", json={"model": model, "input_ids": ids, "sampling_params": {
        "max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}, timeout=timeout)


# chat prompts of the demo tokenizer: 40 words are 117 tokens, 130 words 367 (over the limit, but under
# the 762 a 768-token pool took before: the requests that never got admitted)
SHORT_CHAT_WORDS, LONG_CHAT_WORDS = 40, 130


def chat_of(url: str, model: str, words: int, timeout: float = 300) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json={
        "model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": " ".join(f"w{i % 50}" for i in range(words))}]}, timeout=timeout)


def assert_idle_and_healthy(deployment: Deployment) -> None:
    from sglang_process import wait_deployment_idle

    wait_deployment_idle(deployment.url, timeout_s=120)
    for child in deployment.children:
        assert requests.get(child.url + "/health", timeout=60).status_code == 200, child.name
    assert requests.get(deployment.url + "/health", timeout=60).status_code == 200


@pytest.mark.server
def test_the_deployment_advertises_what_each_decode_pool_admits(deployment):
    cards = {card["id"]: card for card in requests.get(deployment.url + "/v1/models", timeout=30).json()["data"]}
    assert cards[PLANNED]["max_model_len"] == CONTEXT and cards[UNPLANNED]["max_model_len"] == CONTEXT
    planned = requests.get(decode_url(deployment, PLANNED) + "/v1/models", timeout=30).json()["data"][0]
    assert planned["max_model_len"] == CONTEXT  # SGLang's own card: the launcher's --context-length
    for model in (PLANNED, UNPLANNED):  # the scheduler's cap: SGLang refuses a prompt of this many tokens or more
        info = requests.get(decode_url(deployment, model) + "/server_info", timeout=30).json()
        assert (info["max_total_num_tokens"], info["max_req_input_len"]) == (POOL, MAX_PROMPT + 1), model
    log = (deployment.log_dir / f"decode-{UNPLANNED}-0.log").read_text(errors="replace")
    assert "requests limited to 256 tokens" in log  # the decode server capped itself


@pytest.mark.server
@pytest.mark.parametrize("model", [PLANNED, UNPLANNED])
def test_prompts_at_just_under_and_just_over_the_limit(deployment, model):
    requests.get(deployment.url + "/v1/models", timeout=30)  # the router has learned the limits
    for prompt_tokens, max_new in ((MAX_PROMPT, CONTEXT - 2 - MAX_PROMPT), (MAX_PROMPT - 1, 4)):
        served = generate_ids(deployment.url, model, prompt_tokens, max_new)
        assert served.status_code == 200, served.text
        assert len(served.json()["output_ids"]) == max_new
    for prompt_tokens, max_new in ((MAX_PROMPT + 1, 1), (MAX_PROMPT, CONTEXT - MAX_PROMPT + 1), (2000, 1)):
        started = time.monotonic()
        refused = generate_ids(deployment.url, model, prompt_tokens, max_new)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"  # the router's, before any hand-off
        assert "256 tokens" in refused.json()["error"]["message"] and time.monotonic() - started < 5
    # text: the decode server counts the tokens and refuses at once (SGLang's own 400 naming its limit)
    assert chat_of(deployment.url, model, SHORT_CHAT_WORDS).status_code == 200
    started = time.monotonic()
    refused = chat_of(deployment.url, model, LONG_CHAT_WORDS)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert ("context length (256 tokens)" in message if model == PLANNED else
            f"maximum allowed length ({MAX_PROMPT + 1} tokens)" in message), message
    assert time.monotonic() - started < 30
    assert_idle_and_healthy(deployment)


@pytest.mark.server
def test_a_burst_of_long_prompts_over_a_small_decode_pool_is_each_answered_or_refused(deployment):
    """Each long request needs the whole pool (prompt + 512 reserved, then its tokens): they
    are served one at a time; the over-limit ones among them are refused at once, not
    queued behind them, and the short ones are served."""
    long_prompt = 120
    new_tokens = CONTEXT - 2 - long_prompt  # the most SGLang lets it generate
    jobs = [("long", lambda m=model: generate_ids(deployment.url, m, long_prompt, new_tokens))
            for _ in range(3) for model in (PLANNED, UNPLANNED)]
    jobs += [("over", lambda m=model: chat_of(deployment.url, m, LONG_CHAT_WORDS)) for model in (PLANNED, UNPLANNED)]
    jobs += [("over", lambda m=model: generate_ids(deployment.url, m, 3 * CONTEXT, 4))
             for model in (PLANNED, UNPLANNED)]
    jobs += [("short", lambda m=model: generate_ids(deployment.url, m, 16, 4)) for model in (PLANNED, UNPLANNED)]

    def timed(job):
        started = time.monotonic()
        reply = job()
        return reply, time.monotonic() - started

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(timed, [job for _, job in jobs]))
    print("burst:", [(kind, reply.status_code, round(seconds, 2))
                     for (kind, _), (reply, seconds) in zip(jobs, results)])
    last_long_s = max(seconds for (kind, _), (_, seconds) in zip(jobs, results) if kind == "long")
    for (kind, _), (reply, seconds) in zip(jobs, results):
        if kind == "over":
            assert reply.status_code == 400, reply.text
            assert seconds < min(30.0, last_long_s), \
                f"an over-limit request waited {seconds:.1f} s behind the burst (last long one: {last_long_s:.1f} s)"
        else:
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["output_ids"]) == (new_tokens if kind == "long" else 4)
    assert_idle_and_healthy(deployment)
