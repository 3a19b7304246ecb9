"""The PrefillShare router: one OpenAI/SGLang endpoint over a shared prefill pool.

Why our own router: sglang-router and smg (PyPI) keep one prefix tree *per model* and
cannot share one prefill worker across model ids, the opposite of invariant 3 (see
SGLANG_NOTES). This router is thin: it speaks SGLang's PD protocol (the same JSON goes
to a prefill and a decode server with ``bootstrap_host/port/room`` added; the decode
server's reply is the answer) and adds model routing, prefix locality across models,
OpenAI-style errors and per-model metrics.

Endpoints: ``/v1/chat/completions``, ``/v1/completions`` (streaming or not),
``/generate`` (with a ``model`` field, or the default model for SGLang frontend
programs), ``/v1/models``, ``/get_model_info``, ``/get_server_info``, ``/health``,
``/metrics`` (Prometheus), ``/workers`` (the deployment's servers).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pfs_sglang.router.metrics import CONTENT_TYPE, RouterMetrics
from pfs_sglang.router.openai_errors import error_response, from_upstream
from pfs_sglang.router.pools import DecodePool, PrefillWorker, PrefixLocality, Worker

PREFILL_REPLY_WAIT_S = 10.0


@dataclass(frozen=True)
class RouterConfig:
    prefill_workers: list[PrefillWorker]
    decode_pools: dict[str, DecodePool]
    default_model: str
    kv_bytes_per_token: int
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class UsageRecord:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


def prompt_text(body: dict[str, Any]) -> str:
    """The request's prompt as text, for prefix locality (the exact tokens do not matter)."""
    if "messages" in body:
        parts = []
        for message in body["messages"] or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            parts.append(f"{message.get('role', '') if isinstance(message, dict) else ''}:{content or ''}\n")
        return "".join(parts)
    for key in ("prompt", "text", "input_ids"):
        if key in body:
            return body[key] if isinstance(body[key], str) else json.dumps(body[key])
    return ""


def _is_batch(body: dict[str, Any]) -> bool:
    prompt = body.get("prompt", body.get("text"))
    ids = body.get("input_ids")
    return (isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)) or (
        isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
    )


def usage_of(payload: dict[str, Any]) -> UsageRecord | None:
    """Token counts from an OpenAI ``usage`` block or an SGLang ``meta_info``."""
    if isinstance(payload.get("usage"), dict):
        usage = payload["usage"]
        details = usage.get("prompt_tokens_details") or {}
        return UsageRecord(usage.get("prompt_tokens", 0), details.get("cached_tokens") or 0,
                           usage.get("completion_tokens", 0))
    meta = payload.get("meta_info")
    if isinstance(meta, dict) and "prompt_tokens" in meta:
        return UsageRecord(meta["prompt_tokens"], meta.get("cached_tokens") or 0, meta.get("completion_tokens", 0))
    return None


def ensure_cached_tokens(payload: dict[str, Any]) -> None:
    """OpenAI replies always carry ``usage.prompt_tokens_details.cached_tokens``."""
    usage = payload.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details") or {}
        details.setdefault("cached_tokens", 0)
        usage["prompt_tokens_details"] = details


class PrefillShareRouter:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.metrics = RouterMetrics()
        self.locality = PrefixLocality(config.prefill_workers)
        self.client: httpx.AsyncClient | None = None

    # ----- helpers -----
    def _record(self, model: str, endpoint: str, status: int, payload: dict | None) -> None:
        self.metrics.requests.labels(model, endpoint, str(status)).inc()
        usage = usage_of(payload) if payload else None
        if usage is not None:
            self.metrics.record_usage(model, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
                                      self.config.kv_bytes_per_token)

    def _record_transfer_time(self, model: str, prefill_payload: dict | None, decode_payload: dict) -> None:
        prefill_meta = (prefill_payload or {}).get("meta_info") or {}
        decode_meta = decode_payload.get("meta_info") or {}
        started, landed = prefill_meta.get("prefill_finished_time"), decode_meta.get("prefill_finished_time")
        if started and landed and landed >= started:
            self.metrics.kv_seconds.labels(model).inc(landed - started)

    async def _post_prefill(self, worker: PrefillWorker, endpoint: str, body: dict) -> dict | None:
        worker.in_flight += 1
        try:
            reply = await self.client.post(worker.url + endpoint, json=body)
            if reply.status_code != 200 or body.get("stream"):
                return None
            return reply.json()
        except (httpx.HTTPError, ValueError):
            return None
        finally:
            worker.in_flight -= 1

    async def _prefill_reply(self, task: asyncio.Task) -> dict | None:
        try:
            return await asyncio.wait_for(asyncio.shield(task), PREFILL_REPLY_WAIT_S)
        except asyncio.TimeoutError:
            return None

    # ----- the PD hand-off -----
    async def route(self, request: Request, endpoint: str) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object")
        model = body.get("model") if endpoint != "/generate" else (body.get("model") or self.config.default_model)
        if not model:
            return error_response(400, "the 'model' field is required", param="model")
        pool = self.config.decode_pools.get(model)
        if pool is None:
            self.metrics.requests.labels(str(model), endpoint, "404").inc()
            return error_response(404, f"The model '{model}' does not exist. Served models: "
                                  f"{sorted(self.config.decode_pools)}", code="model_not_found", param="model")
        if _is_batch(body) or (body.get("n") or 1) > 1:
            return error_response(400, "batched prompts and n > 1 are not supported; send one request per prompt")

        prefill = self.locality.choose(prompt_text(body))
        decode = pool.least_loaded()
        pd_body = {**body, "bootstrap_host": prefill.bootstrap_host, "bootstrap_port": prefill.bootstrap_port,
                   "bootstrap_room": secrets.randbits(63)}
        if endpoint == "/generate":
            pd_body.pop("model", None)
        prefill_task = asyncio.create_task(self._post_prefill(prefill, endpoint, pd_body))
        if body.get("stream"):
            return await self._stream(model, endpoint, decode, pd_body, prefill_task)

        decode.in_flight += 1
        try:
            reply = await self.client.post(decode.url + endpoint, json=pd_body)
        except httpx.TimeoutException:
            return error_response(504, f"decode server for '{model}' did not answer in time")
        except httpx.TransportError as error:
            return error_response(503, f"decode server for '{model}' is unreachable: {error}")
        finally:
            decode.in_flight -= 1
        if reply.status_code != 200:
            self._record(model, endpoint, reply.status_code, None)
            return from_upstream(reply.status_code, reply.content)
        payload = reply.json()
        ensure_cached_tokens(payload)
        self._record(model, endpoint, 200, payload)
        if endpoint == "/generate":
            self._record_transfer_time(model, await self._prefill_reply(prefill_task), payload)
        return JSONResponse(payload)

    async def _stream(self, model: str, endpoint: str, decode: Worker, pd_body: dict,
                      prefill_task: asyncio.Task) -> Response:
        decode.in_flight += 1
        try:
            upstream = await self.client.send(
                self.client.build_request("POST", decode.url + endpoint, json=pd_body), stream=True
            )
        except httpx.TransportError as error:
            decode.in_flight -= 1
            return error_response(503, f"decode server for '{model}' is unreachable: {error}")
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            decode.in_flight -= 1
            self._record(model, endpoint, upstream.status_code, None)
            return from_upstream(upstream.status_code, content)

        async def relay() -> AsyncIterator[bytes]:
            last_payload: dict | None = None
            try:
                async for line in upstream.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        try:
                            event = json.loads(line[len("data: "):])
                            if usage_of(event) is not None:
                                ensure_cached_tokens(event)
                                last_payload = event
                                line = "data: " + json.dumps(event)
                        except ValueError:
                            pass
                    yield (line + "\n").encode()
            finally:
                await upstream.aclose()
                decode.in_flight -= 1
                self._record(model, endpoint, 200, last_payload)

        return StreamingResponse(relay(), media_type=upstream.headers.get("content-type", "text/event-stream"))

    # ----- plain endpoints -----
    def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pfs_sglang", "root": name}
            for name in self.config.decode_pools
        ]}

    def workers(self) -> dict:
        rows = [{"url": w.url, "role": "prefill", "bootstrap_port": w.bootstrap_port}
                for w in self.config.prefill_workers]
        rows += [{"url": w.url, "role": "decode", "model": name}
                 for name, pool in self.config.decode_pools.items() for w in pool.workers]
        return {"workers": rows}

    async def health(self) -> Response:
        urls = [row["url"] for row in self.workers()["workers"]]

        async def ok(url: str) -> bool:
            try:
                return (await self.client.get(url + "/health", timeout=10)).status_code == 200
            except httpx.HTTPError:
                return False

        results = await asyncio.gather(*(ok(url) for url in urls))
        down = [url for url, good in zip(urls, results) if not good]
        if down:
            return error_response(503, f"unhealthy servers: {down}")
        return Response(status_code=200)

    async def proxy_get(self, path: str) -> Response:
        worker = self.config.decode_pools[self.config.default_model].least_loaded()
        try:
            reply = await self.client.get(worker.url + path, timeout=30)
        except httpx.HTTPError as error:
            return error_response(503, f"decode server unreachable: {error}")
        return Response(reply.content, status_code=reply.status_code, media_type="application/json")


def build_router_app(config: RouterConfig) -> FastAPI:
    router = PrefillShareRouter(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        router.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )
        yield
        await router.client.aclose()

    app = FastAPI(title="pfs_sglang router", lifespan=lifespan)
    app.state.router = router

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await router.route(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await router.route(request, "/v1/completions")

    @app.post("/generate")
    async def generate(request: Request):
        return await router.route(request, "/generate")

    @app.get("/v1/models")
    async def models():
        return router.models()

    @app.get("/workers")
    async def workers():
        return router.workers()

    @app.get("/health")
    async def health():
        return await router.health()

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/get_model_info")
    async def get_model_info():
        return await router.proxy_get("/get_model_info")

    @app.get("/get_server_info")
    async def get_server_info():
        return await router.proxy_get("/get_server_info")

    return app
