"""The PrefillShare router: one OpenAI/SGLang endpoint over a shared prefill pool.

Why our own router: the PyPI routers (sglang-router, smg) keep one prefix tree *per
model* and cannot share one prefill worker across model ids (smg keeps only a worker's
first model; static PD wants prefill and decode to report the same model). PrefillShare
needs the opposite (invariant 3): one prefill pool and one prefix map for every model.
This router is thin: it speaks SGLang's PD protocol (``pd.py``) and adds model routing,
prefix locality across models (``pools.py``), OpenAI-style errors and per-model
metrics (``metrics.py``).

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions`` (streaming or not),
``/generate`` (with a ``model`` field, or the default model for SGLang frontend
programs), ``/flush_cache`` (every server); ``GET /v1/models``, ``/v1/models/{id}``,
``/get_model_info``, ``/get_server_info``, ``/server_info`` (the default model's decode
server), ``/health`` (200 when every server is), ``/metrics`` (Prometheus), ``/workers``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pfs_sglang.router.metrics import CONTENT_TYPE, RouterMetrics
from pfs_sglang.router.openai_errors import error_response
from pfs_sglang.router.pd import PrefillDecodeClient, UpstreamError, pd_body
from pfs_sglang.router.pools import DecodePool, PrefillWorker, PrefixLocality, Worker
from pfs_sglang.router.request_body import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    RequestRejected,
    RoutedRequest,
    parse_request,
)
from pfs_sglang.router.usage import Usage, ensure_cached_tokens, kv_transfer_of, usage_of


@dataclass(frozen=True)
class RouterConfig:
    """The servers a router fronts. ``default_model`` answers requests that name none (``/generate``)."""

    prefill_workers: list[PrefillWorker]
    decode_pools: dict[str, DecodePool]
    default_model: str | None = None
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    health_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.prefill_workers or not self.decode_pools:
            raise ValueError("a router needs at least one prefill worker and one decode pool")
        if self.default_model is not None and self.default_model not in self.decode_pools:
            raise ValueError(f"default model {self.default_model!r} is not served: {sorted(self.decode_pools)}")

    @property
    def fallback_model(self) -> str:
        return self.default_model or next(iter(self.decode_pools))


class PrefillShareRouter:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient):
        self.config = config
        self.client = client
        self.metrics = RouterMetrics()
        self.locality = PrefixLocality(config.prefill_workers)
        self.pd = PrefillDecodeClient(client)

    def all_workers(self) -> list[Worker]:
        return [*self.config.prefill_workers, *(w for pool in self.config.decode_pools.values() for w in pool.workers)]

    async def route(self, request: Request, endpoint: str) -> Response:
        try:
            routed = parse_request(endpoint, await request.body(), self.config.decode_pools,
                                   self.config.fallback_model)
        except RequestRejected as rejected:
            return error_response(rejected.status, rejected.message, param=rejected.param, code=rejected.code)
        prefill = self.locality.acquire(routed.prompt_text)
        decode = self.config.decode_pools[routed.model].acquire()
        body = pd_body(routed, prefill.worker)
        try:
            if routed.stream:
                lines = await self.pd.stream(prefill, decode, endpoint, body)
                return StreamingResponse(self._relay(routed, lines), media_type="text/event-stream")
            reply, prefill_reply = await self.pd.complete(prefill, decode, endpoint, body)
        except UpstreamError as error:
            self.metrics.record_request(routed.model, endpoint, error.status)
            return error_response(error.status, error.message)
        ensure_cached_tokens(reply)
        self._record_reply(routed, reply)
        transfer = kv_transfer_of(reply) or kv_transfer_of(prefill_reply)
        if transfer is not None:
            self.metrics.record_kv_transfer(routed.model, transfer)
        return JSONResponse(reply)

    def _record_reply(self, routed: RoutedRequest, reply: dict | None, status: int = 200) -> None:
        self.metrics.record_request(routed.model, routed.endpoint, status)
        usage: Usage | None = usage_of(reply) if reply else None
        if usage is not None:
            self.metrics.record_usage(routed.model, usage)

    async def _relay(self, routed: RoutedRequest, lines: AsyncIterator[str]) -> AsyncIterator[bytes]:
        """Pass the decode server's SSE lines through, filling in ``cached_tokens`` where usage comes."""
        last_with_usage: dict | None = None
        status = 200
        try:
            async for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        event = json.loads(line[len("data: "):])
                    except ValueError:
                        event = None
                    if isinstance(event, dict) and usage_of(event) is not None:
                        last_with_usage = event
                        if ensure_cached_tokens(event):
                            line = "data: " + json.dumps(event)
                yield (line + "\n").encode()
        except UpstreamError as error:  # the decode server broke off mid-stream: say so in the stream
            status = error.status
            payload = {"error": {"message": error.message, "type": "server_error", "code": str(error.status)}}
            yield f"data: {json.dumps(payload)}\n\n".encode()
        finally:
            await lines.aclose()
            self._record_reply(routed, last_with_usage, status)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card(name) for name in self.config.decode_pools]}

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "pfs_sglang",
                "root": name}

    def workers(self) -> dict:
        rows = [{"url": w.url, "role": "prefill", "bootstrap_port": w.bootstrap_port, "in_flight": w.in_flight}
                for w in self.config.prefill_workers]
        rows += [{"url": w.url, "role": "decode", "model": name, "in_flight": w.in_flight}
                 for name, pool in self.config.decode_pools.items() for w in pool.workers]
        return {"workers": rows}

    async def _on_every_worker(self, method: str, path: str) -> Response:
        """Send ``method path`` to every server; 200 when all answer 200, else 503 naming the others."""

        async def ok(worker: Worker) -> bool:
            try:
                reply = await self.client.request(method, worker.url + path, timeout=self.config.health_timeout_s)
                return reply.status_code == 200
            except httpx.HTTPError:
                return False

        workers = self.all_workers()
        results = await asyncio.gather(*(ok(worker) for worker in workers))
        failed = [worker.url for worker, good in zip(workers, results) if not good]
        if failed:
            return error_response(503, f"{path} failed on: {failed}")
        return Response(status_code=200)

    async def health(self) -> Response:
        return await self._on_every_worker("GET", "/health")

    async def flush_cache(self) -> Response:
        return await self._on_every_worker("POST", "/flush_cache")

    async def default_model_get(self, path: str) -> Response:
        """A GET answered by a decode server of the default model (what frontend programs read)."""
        worker = self.config.decode_pools[self.config.fallback_model].workers[0]
        try:
            reply = await self.client.get(worker.url + path, timeout=self.config.health_timeout_s)
        except httpx.HTTPError as error:
            return error_response(503, f"decode server {worker.url} is unreachable: {error!r}")
        return Response(reply.content, status_code=reply.status_code,
                        media_type=reply.headers.get("content-type", "application/json"))


def build_router_app(config: RouterConfig) -> FastAPI:
    """The router as an ASGI app; it owns one ``httpx.AsyncClient`` for the app's lifetime."""
    state: dict[str, PrefillShareRouter] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        timeout = httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            state["router"] = PrefillShareRouter(config, client)
            _app.state.router = state["router"]
            yield

    app = FastAPI(title="pfs_sglang router", lifespan=lifespan)

    def router() -> PrefillShareRouter:
        return state["router"]

    def routed(endpoint: str):
        async def handler(request: Request) -> Response:
            return await router().route(request, endpoint)

        return handler

    for endpoint in (CHAT, COMPLETIONS, GENERATE):
        app.add_api_route(endpoint, routed(endpoint), methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return router().models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model not in config.decode_pools:
            return error_response(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return router().model_card(model)

    @app.get("/workers")
    async def workers():
        return router().workers()

    @app.get("/health")
    async def health():
        return await router().health()

    @app.post("/flush_cache")
    async def flush_cache():
        return await router().flush_cache()

    @app.get("/metrics")
    async def metrics():
        return Response(router().metrics.render(), media_type=CONTENT_TYPE)

    def proxied(path: str):
        async def handler() -> Response:
            return await router().default_model_get(path)

        return handler

    for path in ("/get_model_info", "/get_server_info", "/server_info"):
        app.add_api_route(path, proxied(path), methods=["GET"])

    return app
