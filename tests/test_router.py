"""The router against small real HTTP servers standing in for SGLang (no SGLang here).

Each stand-in is a tiny FastAPI app on 127.0.0.1 that records the bodies it receives
(bootstrap fields included) and answers like an SGLang prefill or decode server. The
router runs under uvicorn too, so every check goes over real HTTP: model -> pool,
prefix locality across models, least-loaded decode, the PD fields, 400/404/503 bodies,
prefill failures that must not hang, streaming pass-through, and the metrics text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pfs_sglang.router import DecodePool, PrefillWorker, RouterConfig, Worker, build_router_app
from pfs_sglang.router.pools import PrefixLocality
from pfs_sglang.router.worker_health import HealthCheckSettings
from pfs_sglang.launch.processes import free_port

USAGE = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


@dataclass
class StandIn:
    """A stand-in SGLang server; tests change ``delay_s``/``fail_status``/``cached_tokens`` while it runs.

    Replies name the server and echo the prompt (``echo``), so a test can tell which
    sub-request a reply answers; ``fails(body)`` picks requests that fail with ``fail_status``.
    """

    name: str
    url: str = ""
    bodies: list[tuple[str, dict]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each body
    delay_s: float = 0.0
    fail_status: int | None = None
    fails: Callable[[dict], bool] | None = None
    cached_tokens: int | None = None  # None: SGLang's null
    stream_gap_s: float = 0.0
    health_status: int = 200

    def paths(self) -> list[str]:
        return [path for path, _ in self.bodies]

    def app(self) -> FastAPI:
        app = FastAPI()

        def usage() -> dict:
            return {**USAGE, "prompt_tokens_details": None if self.cached_tokens is None
                    else {"cached_tokens": self.cached_tokens}}

        async def answer(request: Request, path: str) -> Response:
            body = await request.json()
            self.bodies.append((path, body))
            self.arrivals.append(time.monotonic())
            await asyncio.sleep(self.delay_s)
            if self.fail_status and (self.fails is None or self.fails(body)):
                return JSONResponse({"object": "error", "message": f"{self.name} failed", "code": self.fail_status},
                                    status_code=self.fail_status)
            echo = body.get("text", body.get("input_ids", body.get("prompt", body.get("messages"))))
            if path == "/generate":
                meta = {"id": body.get("rid"), "prompt_tokens": 8, "cached_tokens": 5, "completion_tokens": 2,
                        "pfs_kv_transfer": {"bytes": 4096, "seconds": 0.25}, "pfs_decode_prefix_tokens": [64]}
                if body.get("stream"):
                    return StreamingResponse(generate_events(echo, meta), media_type="text/event-stream")
                return JSONResponse({"text": self.name, "echo": echo, "meta_info": meta})
            if body.get("stream"):
                return StreamingResponse(events(echo), media_type="text/event-stream")
            return JSONResponse({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": self.name},
                                              "echo": echo}],
                                 "usage": usage()})

        async def events(echo: Any) -> Any:
            for index, word in enumerate(("one", "two", "three")):
                if index:
                    await asyncio.sleep(self.stream_gap_s)
                chunk = {"choices": [{"index": 0, "delta": {"content": word}, "echo": echo}], "usage": None}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        async def generate_events(echo: Any, meta: dict) -> Any:
            for index, text in enumerate(("one", "one two")):
                if index:
                    await asyncio.sleep(self.stream_gap_s)
                    if self.fail_status:  # SGLang's error event for a request that fails mid-stream
                        yield f"data: {json.dumps({'error': {'message': f'{self.name} failed mid-stream'}})}\n\n"
                        break
                yield f"data: {json.dumps({'text': text, 'echo': echo, 'meta_info': meta})}\n\n"
            yield "data: [DONE]\n\n"

        def handler(path: str):
            async def handle(request: Request) -> Response:
                return await answer(request, path)

            return handle

        for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            app.add_api_route(path, handler(path), methods=["POST"])

        @app.get("/health")
        async def health():
            return Response(status_code=self.health_status)

        @app.post("/abort_request")
        async def abort(request: Request):
            self.bodies.append(("/abort_request", await request.json()))
            return Response(status_code=200)

        @app.get("/get_model_info")
        @app.get("/model_info")
        async def model_info():
            return {"model_path": f"/models/{self.name}"}

        return app


@contextmanager
def serving(app: FastAPI, port: int | None = None) -> Iterator[str]:
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = server.force_exit = True  # do not wait for stand-ins still sleeping
        thread.join(timeout=10)


@dataclass
class Cluster:
    router: str
    prefill: list[StandIn]
    decode: dict[str, list[StandIn]]

    def post(self, path: str, body: Any, timeout: float = 20) -> httpx.Response:
        return httpx.post(self.router + path, json=body, timeout=timeout)


@contextmanager
def cluster(prefill_count: int = 1, decode_counts: dict[str, int] | None = None,
            default_model: str | None = None, request_timeout_s: float = 20,
            vocab_size: int | None = None, health_checks: HealthCheckSettings = HealthCheckSettings()
            ) -> Iterator[Cluster]:
    decode_counts = decode_counts or {"coder": 1}
    prefill = [StandIn(f"prefill-{i}") for i in range(prefill_count)]
    decode = {model: [StandIn(f"{model}-{i}") for i in range(count)] for model, count in decode_counts.items()}
    stand_ins = [*prefill, *(s for pool in decode.values() for s in pool)]
    with _serve_all(stand_ins):
        config = RouterConfig(
            prefill_workers=[PrefillWorker(url=s.url, bootstrap_port=7000 + i) for i, s in enumerate(prefill)],
            decode_pools={model: DecodePool(model, [Worker(s.url) for s in pool]) for model, pool in decode.items()},
            default_model=default_model, request_timeout_s=request_timeout_s, health_timeout_s=2,
            vocab_size=vocab_size, health_checks=health_checks,
        )
        with serving(build_router_app(config)) as router_url:
            yield Cluster(router_url, prefill, decode)


@contextmanager
def _serve_all(stand_ins: list[StandIn]) -> Iterator[None]:
    if not stand_ins:
        yield
        return
    with serving(stand_ins[0].app()) as url:
        stand_ins[0].url = url
        with _serve_all(stand_ins[1:]):
            yield


def chat(model: str, content: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def who_prefilled(c: Cluster, content_marker: str) -> list[str]:
    """Names of the prefill stand-ins that received a body whose prompt contains ``content_marker``."""
    return [s.name for s in c.prefill for _, body in s.bodies if content_marker in json.dumps(body)]


# ----- PD protocol -----

def test_both_servers_get_the_body_with_bootstrap_fields_and_decode_answers():
    with cluster(prefill_count=1, decode_counts={"coder": 1}) as c:
        reply = c.post("/v1/chat/completions", chat("coder", "hello"))
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == "coder-0"  # the decode server's reply
        assert reply.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # SGLang's null filled in
        time.sleep(0.1)
        (p_path, p_body), = c.prefill[0].bodies
        (d_path, d_body), = c.decode["coder"][0].bodies
        assert p_path == d_path == "/v1/chat/completions"
        assert p_body == d_body
        assert d_body["bootstrap_host"] == "127.0.0.1" and d_body["bootstrap_port"] == 7000
        assert 0 <= d_body["bootstrap_room"] < 2**63
        assert d_body["model"] == "coder" and d_body["messages"][0]["content"] == "hello"
        second = c.post("/v1/completions", {"model": "coder", "prompt": "hi", "max_tokens": 2})
        assert second.status_code == 200
        assert c.decode["coder"][0].bodies[1][1]["bootstrap_room"] != d_body["bootstrap_room"]


def test_generate_drops_model_and_uses_the_default_model_when_none_is_named():
    with cluster(decode_counts={"planner": 1, "coder": 1}, default_model="coder") as c:
        named = c.post("/generate", {"model": "planner", "text": "a", "sampling_params": {"max_new_tokens": 2}})
        assert named.status_code == 200 and named.json()["text"] == "planner-0"
        assert "model" not in c.decode["planner"][0].bodies[0][1]
        unnamed = c.post("/generate", {"text": "b", "sampling_params": {"max_new_tokens": 2}})
        assert unnamed.status_code == 200 and unnamed.json()["text"] == "coder-0"
        info = httpx.get(c.router + "/get_model_info", timeout=5)
        assert info.json() == {"model_path": "/models/coder-0"}  # what SGLang frontend programs read


def test_a_models_path_prefix_serves_that_model_and_refuses_another():
    with cluster(decode_counts={"planner": 1, "coder": 1}, default_model="coder") as c:
        prefix = "/models/planner"
        for endpoint, body in (("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 2}}),
                               ("/v1/completions", {"prompt": "a", "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
            reply = c.post(prefix + endpoint, body)
            assert reply.status_code == 200, (endpoint, reply.text)
        assert len(c.decode["planner"][0].bodies) == 3 and not c.decode["coder"][0].bodies
        info = httpx.get(c.router + prefix + "/get_model_info", timeout=5)
        assert info.json() == {"model_path": "/models/planner-0"}
        other = c.post(prefix + "/generate", {"model": "coder", "text": "a"})
        assert other.status_code == 400 and "names the model 'planner'" in other.json()["error"]["message"]
        unknown = httpx.get(c.router + "/models/nobody/get_model_info", timeout=5)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert c.post("/models/nobody/generate", {"text": "a"}).status_code == 404
        own_adapter = c.post("/generate", {"model": "planner", "text": "a", "lora_path": "x"})
        assert own_adapter.status_code == 400 and own_adapter.json()["error"]["param"] == "lora_path"


# ----- choice of servers -----

def test_each_model_goes_to_its_own_pool_and_idle_replicas_share_work():
    with cluster(decode_counts={"planner": 2, "coder": 1}) as c:
        for index in range(4):
            assert c.post("/v1/chat/completions", chat("planner", f"p{index}")).status_code == 200
        assert c.post("/v1/chat/completions", chat("coder", "c")).status_code == 200
        assert [len(s.bodies) for s in c.decode["planner"]] == [2, 2]
        assert len(c.decode["coder"][0].bodies) == 1
        models = httpx.get(c.router + "/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["planner", "coder"]


def test_prompts_sharing_a_prefix_meet_one_prefill_replica_whichever_model_they_name():
    with cluster(prefill_count=2, decode_counts={"planner": 1, "coder": 1, "critic": 1}) as c:
        contexts = [f"shared agent context number {i}: " + "observation and tool output. " * 12 for i in range(4)]
        for context in contexts:
            for model, question in (("planner", "plan it"), ("coder", "write it"), ("critic", "judge it")):
                assert c.post("/v1/chat/completions", chat(model, context + question)).status_code == 200
            for model in ("planner", "critic"):  # SGLang frontend programs: raw text, also shared across models
                assert c.post("/generate", {"model": model, "text": "<s>" + context + model}).status_code == 200
        time.sleep(0.1)
        owners = [set(who_prefilled(c, f'"user", "content": "{context[:40]}')) for context in contexts]
        owners += [set(who_prefilled(c, f'"text": "<s>{context[:40]}')) for context in contexts]
        assert all(len(owner) == 1 for owner in owners), owners  # one replica per shared context
        assert {name for owner in owners for name in owner} == {"prefill-0", "prefill-1"}  # contexts spread


def test_prefix_owner_loses_the_prompt_when_overloaded():
    workers = [PrefillWorker(url=f"http://p{i}", bootstrap_port=i) for i in range(2)]
    locality = PrefixLocality(workers, block_chars=16, max_imbalance=4)
    context = "shared agent context " * 20
    first = locality.acquire(context + "for the planner").worker
    first.in_flight = 4  # busy, but within the imbalance allowed
    assert locality.acquire(context + "for the coder").worker is first
    first.in_flight = 10
    assert locality.acquire(context + "for the critic").worker is not first


def test_decode_replica_with_fewest_requests_in_flight_wins():
    with cluster(decode_counts={"coder": 2}) as c:
        slow, fast = c.decode["coder"]
        slow.delay_s = 1.5
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(c.post, "/v1/chat/completions", chat("coder", "long one"))
            deadline = time.monotonic() + 5
            while not slow.bodies and not fast.bodies:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            busy, idle = (slow, fast) if slow.bodies else (fast, slow)
            for index in range(3):
                assert c.post("/v1/chat/completions", chat("coder", f"short {index}")).status_code == 200
            assert len(idle.bodies) == 3 and len(busy.bodies) == 1
            assert held.result().status_code == 200


# ----- errors -----

def test_bad_requests_get_openai_error_bodies():
    with cluster(decode_counts={"coder": 1}) as c:
        unknown = c.post("/v1/chat/completions", chat("nope", "x"))
        assert unknown.status_code == 404
        error = unknown.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
        assert "nope" in error["message"] and "coder" in error["message"]
        bad_json = httpx.post(c.router + "/v1/completions", content=b"{not json",
                              headers={"content-type": "application/json"}, timeout=5)
        assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
        for body, param in (({"prompt": "hi"}, "model"), ({"model": "coder"}, "prompt")):
            reply = c.post("/v1/completions", body)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param
        assert c.post("/v1/chat/completions", {"model": "coder", "messages": "hi"}).status_code == 400
        for n in (0, -1, "2", 1.5):
            reply = c.post("/v1/completions", {"model": "coder", "prompt": "a", "n": n})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"
        reply = c.post("/generate", {"model": "coder", "text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 1}]})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "sampling_params"
        reply = c.post("/generate", {"model": "coder", "text": ["a", "b"], "return_logprob": [True]})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "return_logprob"
        assert c.post("/generate", {"model": "coder"}).status_code == 400
        assert not c.prefill[0].bodies and not c.decode["coder"][0].bodies  # nothing reached a server


def test_token_ids_outside_the_vocabulary_are_400_before_any_server_sees_them():
    with cluster(decode_counts={"coder": 1}, vocab_size=100) as c:
        for path, body, param in (
            ("/generate", {"model": "coder", "input_ids": [1, 2, 100]}, "input_ids"),
            ("/generate", {"model": "coder", "input_ids": [[1, 2], [3, -1]]}, "input_ids"),
            ("/generate", {"model": "coder", "input_ids": [1, "2"]}, "input_ids"),
            ("/v1/completions", {"model": "coder", "prompt": [5, 100_000]}, "prompt"),
            ("/v1/completions", {"model": "coder", "prompt": [[5], [6, 101]]}, "prompt"),
        ):
            reply = c.post(path, body)
            assert reply.status_code == 400, (body, reply.text)
            assert reply.json()["error"]["param"] == param and "vocabulary" in reply.json()["error"]["message"]
        assert not c.prefill[0].bodies and not c.decode["coder"][0].bodies
        assert c.post("/generate", {"model": "coder", "input_ids": [0, 99]}).status_code == 200
        assert c.post("/v1/completions", {"model": "coder", "prompt": ["the record", "x"]}).status_code == 200


def test_a_decode_server_that_is_down_is_503():
    dead = f"http://127.0.0.1:{free_port()}"
    with cluster(decode_counts={"coder": 1}) as c:
        app_config = RouterConfig(prefill_workers=[PrefillWorker(url=c.prefill[0].url, bootstrap_port=1)],
                                  decode_pools={"coder": DecodePool("coder", [Worker(dead)])},
                                  request_timeout_s=5, health_timeout_s=2)
        with serving(build_router_app(app_config)) as router:
            started = time.monotonic()
            reply = httpx.post(router + "/v1/chat/completions", json=chat("coder", "x"), timeout=20)
            assert reply.status_code == 503 and time.monotonic() - started < 5
            assert reply.json()["error"]["type"] == "service_unavailable"
            assert "unreachable" in reply.json()["error"]["message"]
            assert httpx.get(router + "/health", timeout=10).status_code == 503
            assert httpx.get(c.router + "/health", timeout=10).status_code == 200


FAST_CHECKS = HealthCheckSettings(interval_s=0.2, recheck_s=0.2, timeout_s=2, failures_to_exclude=2)


def _in_rotation(router: str) -> dict[str, bool]:
    return {w["url"]: w["healthy"] for w in httpx.get(router + "/workers", timeout=10).json()["workers"]}


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_dead_decode_replica_is_taken_out_the_other_serves_and_it_rejoins():
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    with cluster(decode_counts={"coder": 1}) as c:
        live = c.decode["coder"][0]
        config = RouterConfig(prefill_workers=[PrefillWorker(url=c.prefill[0].url, bootstrap_port=1)],
                              decode_pools={"coder": DecodePool("coder", [Worker(dead), Worker(live.url)])},
                              request_timeout_s=5, health_checks=FAST_CHECKS)
        with serving(build_router_app(config)) as router:
            statuses = [httpx.post(router + "/v1/chat/completions", json=chat("coder", f"q{i}"), timeout=10
                                   ).status_code for i in range(6)]
            assert statuses.count(503) <= 1 and statuses.count(200) >= 5  # at most the request that found it dead
            assert _in_rotation(router) == {c.prefill[0].url: True, dead: False, live.url: True}
            assert [httpx.post(router + "/v1/chat/completions", json=chat("coder", f"r{i}"), timeout=10).status_code
                    for i in range(4)] == [200] * 4
            back = StandIn("coder-back")
            with serving(back.app(), port):  # the replica restarts on its port: it rejoins
                _wait_for(lambda: _in_rotation(router)[dead])
                for i in range(4):
                    assert httpx.post(router + "/v1/chat/completions", json=chat("coder", f"s{i}"),
                                      timeout=10).status_code == 200
                assert back.bodies  # least-loaded with ties rotating: it gets its share again


def test_a_failing_health_check_takes_a_worker_out_only_after_repeated_failures():
    with cluster(decode_counts={"coder": 2}, health_checks=FAST_CHECKS) as c:
        sick, well = c.decode["coder"]
        c.post("/v1/chat/completions", chat("coder", "start the checker"))
        sick.health_status = 503
        _wait_for(lambda: not _in_rotation(c.router)[sick.url])
        sick.bodies.clear()
        for i in range(4):
            assert c.post("/v1/chat/completions", chat("coder", f"q{i}")).status_code == 200
        assert not sick.bodies and len([p for p in well.paths() if p != "/abort_request"]) >= 4
        sick.health_status = 200
        _wait_for(lambda: _in_rotation(c.router)[sick.url])


def test_a_pool_whose_only_server_is_gone_is_503_at_once():
    dead = f"http://127.0.0.1:{free_port()}"
    with cluster(decode_counts={"coder": 1}) as c:
        config = RouterConfig(prefill_workers=[PrefillWorker(url=dead, bootstrap_port=1)],
                              decode_pools={"coder": DecodePool("coder", [Worker(c.decode["coder"][0].url)])},
                              request_timeout_s=5, health_checks=FAST_CHECKS)
        with serving(build_router_app(config)) as router:
            assert httpx.post(router + "/v1/chat/completions", json=chat("coder", "w"), timeout=10).status_code == 503
            _wait_for(lambda: not _in_rotation(router)[dead])
            c.decode["coder"][0].bodies.clear()
            for body in (chat("coder", "x"), chat("coder", "y", stream=True), chat("coder", "z", n=2)):
                started = time.monotonic()
                reply = httpx.post(router + "/v1/chat/completions", json=body, timeout=10)
                assert reply.status_code == 503 and time.monotonic() - started < 1
                assert reply.json()["error"]["type"] == "service_unavailable"
                assert "no prefill server is healthy" in reply.json()["error"]["message"]
            assert not c.decode["coder"][0].bodies  # nothing was sent anywhere
            assert all(w["in_flight"] == 0 for w in httpx.get(router + "/workers", timeout=10).json()["workers"])


def test_failing_health_checks_never_take_out_the_last_server_of_a_pool():
    with cluster(decode_counts={"coder": 1}, health_checks=FAST_CHECKS) as c:
        c.post("/v1/chat/completions", chat("coder", "start the checker"))
        c.prefill[0].health_status = 503  # slow or stuck, but its process is there: keep routing to it
        time.sleep(FAST_CHECKS.interval_s * (FAST_CHECKS.failures_to_exclude + 3))
        assert _in_rotation(c.router)[c.prefill[0].url]
        assert c.post("/v1/chat/completions", chat("coder", "still served")).status_code == 200


def test_a_failing_prefill_answers_at_once_instead_of_a_waiting_decode():
    with cluster(decode_counts={"coder": 1}) as c:
        c.prefill[0].fail_status = 500
        c.decode["coder"][0].delay_s = 30  # a decode server that would wait for KV that never comes
        for body in (chat("coder", "x"), chat("coder", "y", stream=True)):
            started = time.monotonic()
            reply = c.post("/v1/chat/completions", body)
            assert time.monotonic() - started < 5
            assert reply.status_code == 500
            assert "prefill-0 failed" in reply.json()["error"]["message"]


def test_an_unreachable_prefill_is_503_not_a_hang():
    dead = f"http://127.0.0.1:{free_port()}"
    with cluster(decode_counts={"coder": 1}) as c:
        c.decode["coder"][0].delay_s = 30
        config = RouterConfig(prefill_workers=[PrefillWorker(url=dead, bootstrap_port=1)],
                              decode_pools={"coder": DecodePool("coder", [Worker(c.decode["coder"][0].url)])},
                              request_timeout_s=20)
        with serving(build_router_app(config)) as router:
            started = time.monotonic()
            reply = httpx.post(router + "/v1/chat/completions", json=chat("coder", "x"), timeout=20)
            assert reply.status_code == 503 and time.monotonic() - started < 5
            assert "prefill server" in reply.json()["error"]["message"]


# ----- streaming and metrics -----

def test_streaming_passes_the_decode_sse_through_as_it_comes():
    with cluster(decode_counts={"coder": 1}) as c:
        decode = c.decode["coder"][0]
        decode.stream_gap_s, decode.cached_tokens = 0.5, None
        body = chat("coder", "stream please", stream=True, stream_options={"include_usage": True})
        started, arrivals, events = time.monotonic(), [], []
        with httpx.stream("POST", c.router + "/v1/chat/completions", json=body, timeout=20) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic() - started)
                    events.append(line[len("data: "):])
        assert events[-1] == "[DONE]"
        words = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1] if json.loads(e)["choices"]]
        assert words == ["one", "two", "three"]
        assert arrivals[0] < arrivals[2] - 0.8  # the first token arrived before the last was sent
        assert json.loads(events[-2])["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert c.prefill[0].bodies[0][1]["bootstrap_room"] == decode.bodies[0][1]["bootstrap_room"]


def test_metrics_count_requests_tokens_cache_hits_and_kv_transfers_per_model():
    with cluster(decode_counts={"planner": 1, "coder": 1}) as c:
        c.decode["planner"][0].cached_tokens = 4
        assert c.post("/v1/chat/completions", chat("planner", "x")).status_code == 200
        assert c.post("/generate", {"model": "coder", "text": "y"}).status_code == 200
        assert c.post("/v1/chat/completions", chat("ghost", "x")).status_code == 404
        text = httpx.get(c.router + "/metrics", timeout=5).text
        expected = [
            'pfs_router_requests_total{endpoint="/v1/chat/completions",model="planner",status="200"} 1.0',
            'pfs_router_requests_total{endpoint="/generate",model="coder",status="200"} 1.0',
            'pfs_router_prompt_tokens_total{model="planner"} 10.0',
            'pfs_router_cached_tokens_total{model="planner"} 4.0',
            'pfs_router_prefilled_tokens_total{model="planner"} 6.0',
            'pfs_router_completion_tokens_total{model="planner"} 3.0',
            'pfs_router_prompt_tokens_total{model="coder"} 8.0',
            'pfs_router_cached_tokens_total{model="coder"} 5.0',
            'pfs_router_kv_transfers_total{model="coder"} 1.0',
            'pfs_router_kv_transfer_bytes_total{model="coder"} 4096.0',
            'pfs_router_kv_transfer_seconds_total{model="coder"} 0.25',
            'pfs_router_kv_decode_prefix_tokens_total{model="coder"} 64.0',
        ]
        for line in expected:
            assert line in text, line
        assert "ghost" not in text  # unknown names do not become label values
        assert 'pfs_router_kv_transfers_total{model="planner"}' not in text  # chat replies carry no transfer record


def test_a_connection_failure_takes_a_worker_out_only_when_its_port_refuses():
    import socket

    from pfs_sglang.router.worker_health import WorkerHealthChecker

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    alive = Worker(f"http://127.0.0.1:{listening.getsockname()[1]}")  # reset a connection, but still there
    gone = Worker(f"http://127.0.0.1:{free_port()}")

    async def report_both() -> None:
        async with httpx.AsyncClient() as client:
            checker = WorkerHealthChecker([[alive, gone]], client, FAST_CHECKS)
            for worker in (alive, gone):
                await checker.connection_failed(worker, httpx.ReadError(""))

    try:
        asyncio.run(report_both())
        assert alive.healthy and not gone.healthy
    finally:
        listening.close()


def test_a_stream_that_fails_midway_is_counted_by_its_error_not_as_200():
    with cluster(decode_counts={"coder": 1}) as c:
        decode = c.decode["coder"][0]
        decode.fail_status, decode.fails = 500, lambda body: False  # the stream opens, then fails
        with httpx.stream("POST", c.router + "/generate", json={"model": "coder", "text": "x", "stream": True},
                          timeout=20) as reply:
            lines = list(reply.iter_lines())
        assert any("coder-0 failed mid-stream" in line for line in lines)
        metrics = httpx.get(c.router + "/metrics", timeout=10).text
        assert 'pfs_router_requests_total{endpoint="/generate",model="coder",status="500"} 1.0' in metrics
        assert 'status="200"' not in metrics


def test_a_client_gone_before_its_body_came_is_499_and_nothing_is_routed():
    """At the ASGI level: the body's first part, then the disconnect (no exception escapes the app)."""
    config = RouterConfig(prefill_workers=[PrefillWorker(url="http://127.0.0.1:9", bootstrap_port=1)],
                          decode_pools={"coder": DecodePool("coder", [Worker("http://127.0.0.1:9")])})
    app = build_router_app(config)
    messages = iter([{"type": "http.request", "body": b'{"model": ', "more_body": True},
                     {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "server": ("127.0.0.1", 1),
             "client": ("127.0.0.1", 2), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
