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
programs); batches and ``n > 1`` become one hand-off per prompt and sample
(``fanout.py``). ``/flush_cache`` (every server), ``/abort_request`` (SGLang's body, sent
to every server, for the client's ``rid`` and the running sub-requests made for it);
``GET /v1/models``, ``/v1/models/{id}`` (each PD model's ``max_model_len``: what its
decode pool admits, ``decode_limits.py``), ``/get_model_info``, ``/model_info``,
``/get_server_info``, ``/server_info`` (the default model's decode server), ``/health``
(200 when every server is), ``/health_generate`` (a one-token generation through the
PD path that reaches every server), ``/metrics`` (Prometheus), ``/workers`` (each with
its load and whether it is in rotation). Under ``/models/{model}/`` the same generation
and model-info endpoints serve that one model (a request naming another is a 400), so
SGLang's own ``RuntimeEndpoint`` pointed there runs a frontend program on that model
(``pfs_sglang.frontend``). A LoRA decode model's adapter goes to its decode server only,
as ``lora_path``. Any other path is a 404 with an OpenAI error body. While the
deployment starts every endpoint answers 503 at once (``/health`` naming the servers
still starting). A client that disconnects has its request aborted
on every server. A server whose process is gone is out of rotation until its health
check passes again (``worker_health.py``); a request whose pool has no server in
rotation gets 503 at once. With ``--api-key`` every request but ``/health*`` and
``/metrics`` needs the key (``api_key.py``). A token-id prompt longer than its model's
decode servers admit is refused with 400 before any hand-off (``decode_limits.py``; a
text prompt is refused by the decode server, with SGLang's 400, as soon as it is tokenized).

A unified deployment (``RouterConfig`` with no prefill workers: every decode pool's
servers hold the base and every LoRA decode module, ``pfs_sglang.unified``) routes each
request whole to one of those servers, chosen by prefix locality across models (so a
session's turns meet the tree that holds its context), with the model's adapter as
``lora_path``; everything else above holds unchanged.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from pfs_sglang.router.api_key import RequireApiKey
from pfs_sglang.router.decode_limits import DecodeLimits
from pfs_sglang.router.fanout import FanOut, RunningSubRequests, StreamMerger, SubRequest, combine, plan_fan_out, sse
from pfs_sglang.router.metrics import CONTENT_TYPE, RouterMetrics
from pfs_sglang.router.openai_errors import error_response
from pfs_sglang.router.pd import DecodeLines, PrefillDecodeClient, UpstreamError, one_server_body, pd_body
from pfs_sglang.router.pools import DecodePool, Lease, NoHealthyWorker, PrefillWorker, PrefixLocality, Worker
from pfs_sglang.router.request_body import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    RequestRejected,
    RoutedRequest,
    parse_request,
)
from pfs_sglang.router.usage import Usage, decode_prefix_tokens_of, ensure_cached_tokens, kv_transfer_of, usage_of
from pfs_sglang.router.worker_health import HealthCheckSettings, WorkerHealthChecker

T = TypeVar("T")

# What a request whose client went away is counted as (nginx's "client closed request").
CLIENT_CLOSED_REQUEST = 499
# SGLang's own /health_generate waits this long for its one-token generation (HEALTH_CHECK_TIMEOUT).
HEALTH_GENERATE_TIMEOUT_S = 20.0
# Every upstream request opens its own connection (none is kept idle): under load, with
# the router's event loop seconds behind, reusing idle connections reset a request now and
# then (3 in 2000 in the 200-session load run); one connection per request on loopback
# costs less than a millisecond, and that run went from 15 to 25 requests/s without reuse.
UPSTREAM_IDLE_CONNECTIONS = 0
# Where one model's endpoints live (``RuntimeEndpoint(router + "/models/NAME")``).
MODEL_PREFIX = "/models/{model}"


@dataclass(frozen=True)
class RouterConfig:
    """The servers a router fronts. ``default_model`` answers requests that name none (``/generate``).

    No ``prefill_workers``: a unified deployment (each request whole on one of the pools' servers)."""

    prefill_workers: list[PrefillWorker]
    decode_pools: dict[str, DecodePool]
    default_model: str | None = None
    vocab_size: int | None = None  # the prefill module's: token-id prompts are checked against it
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    health_timeout_s: float = 10.0  # of the /health, /flush_cache, /abort_request fan-outs
    health_checks: HealthCheckSettings = HealthCheckSettings()

    def __post_init__(self) -> None:
        if not self.decode_pools:
            raise ValueError("a router needs at least one decode pool")
        if self.default_model is not None and self.default_model not in self.decode_pools:
            raise ValueError(f"default model {self.default_model!r} is not served: {sorted(self.decode_pools)}")

    @property
    def unified(self) -> bool:
        return not self.prefill_workers

    @property
    def fallback_model(self) -> str:
        return self.default_model or next(iter(self.decode_pools))


class PrefillShareRouter:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient):
        self.config = config
        self.client = client
        self.metrics = RouterMetrics()
        # each set of decode servers once: co-located LoRA adapters' pools hold the same servers
        decode = {tuple(map(id, pool.workers)): pool.workers for pool in config.decode_pools.values()}
        unified_servers = list({id(w): w for workers in decode.values() for w in workers}.values())
        self.locality = PrefixLocality(config.prefill_workers) if not config.unified else \
            PrefixLocality(unified_servers, pool_name="unified")
        self.health_checker = WorkerHealthChecker([config.prefill_workers, *decode.values()], client,
                                                  config.health_checks)
        self.pd = PrefillDecodeClient(client, self.health_checker.connection_failed)
        # what each PD model's decode pool admits (a unified server admits as stock SGLang does)
        self.decode_limits = None if config.unified else DecodeLimits(config.decode_pools, client,
                                                                      config.health_timeout_s)
        self._running_subs = RunningSubRequests()  # what a client's abort by its rid must reach

    def all_workers(self) -> list[Worker]:
        """Every server once (a co-located LoRA server is in several pools)."""
        workers = [*self.config.prefill_workers, *(w for pool in self.config.decode_pools.values() for w in pool.workers)]
        return list({id(worker): worker for worker in workers}.values())

    async def route(self, request: Request, endpoint: str, path_model: str | None = None) -> Response:
        """Answer one generation request; ``path_model`` is the model a ``/models/{model}/`` path names."""
        try:
            body = await request.body()
        except ClientDisconnect:  # gone before its body came: nothing was routed
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        try:
            routed = parse_request(endpoint, body, self.config.decode_pools,
                                   self.config.fallback_model, self.config.vocab_size, path_model)
            routed.body.setdefault("rid", uuid.uuid4().hex)  # what an abort names if the client leaves
            if self.decode_limits is not None:
                self.decode_limits.check(routed.model, endpoint, routed.body)
            plan = plan_fan_out(endpoint, routed.body)
        except RequestRejected as rejected:
            return error_response(rejected.status, rejected.message, param=rejected.param, code=rejected.code)
        return await self._unless_client_leaves(request, routed, plan, self._answer(routed, plan))

    async def _unless_client_leaves(self, request: Request, routed: RoutedRequest, plan: FanOut | None,
                                    answer: Awaitable[Response]) -> Response:
        """``answer``, or, when the client disconnects before it is ready, nothing: the
        hand-off is cancelled (its upstream requests closed), the request counted as 499,
        and aborted on every server (SGLang's ``/abort_request`` by the rid of each request
        it made: its own, or its sub-requests', which frees its KV slots). A stream that has begun ends the same
        way when its client leaves (``_end_stream``)."""
        answering = asyncio.ensure_future(answer)
        client_gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answering, client_gone}, return_when=asyncio.FIRST_COMPLETED)
            if not answering.done():
                rids = [sub.body["rid"] for sub in plan.subs] if plan is not None else [routed.body["rid"]]
                answering.cancel()
                await asyncio.gather(answering, return_exceptions=True)
                self.metrics.client_disconnects.labels(routed.model).inc()
                self.metrics.record_request(routed.model, routed.endpoint, CLIENT_CLOSED_REQUEST)
                await self._send_aborts([{"rid": rid} for rid in rids])
        finally:
            client_gone.cancel()
            if not answering.done():
                answering.cancel()
                await asyncio.gather(answering, return_exceptions=True)
                self.metrics.record_request(routed.model, routed.endpoint, CLIENT_CLOSED_REQUEST)
        if answering.cancelled():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return answering.result()

    async def _end_stream(self, model: str, streams: list[DecodeLines], rids: list[str]) -> None:
        """After a streamed response: close the decode streams; if one had not ended (the
        client left mid-stream), abort its request (``rids``: every sub-request's) on every server."""
        await _close_all(streams)
        if not all(lines.finished for lines in streams):
            self.metrics.client_disconnects.labels(model).inc()
            await self._send_aborts([{"rid": rid} for rid in rids])

    async def _answer(self, routed: RoutedRequest, plan: FanOut | None) -> Response:
        endpoint = routed.endpoint
        if plan is not None:
            return await self._route_fan_out(routed, plan)
        try:
            if routed.stream:
                lines = await self._open_stream(routed.model, endpoint, routed.body, routed.prompt_text)
                return StreamingResponse(self._relay(routed, lines), media_type="text/event-stream",
                                         background=BackgroundTask(self._end_stream, routed.model, [lines],
                                                                   [routed.body["rid"]]))
            reply = await self._hand_off(routed.model, endpoint, routed.body, routed.prompt_text)
        except UpstreamError as error:
            self.metrics.record_request(routed.model, endpoint, error.status)
            return error_response(error.status, error.message)
        self._record_reply(routed, reply)
        return JSONResponse(reply)

    def _unified_lease(self, prompt: str) -> Lease[Worker]:
        """A unified server in rotation, by prefix locality, or 503 at once when none is."""
        try:
            return self.locality.acquire(prompt)
        except NoHealthyWorker as error:
            raise UpstreamError(503, str(error)) from error

    def _leases(self, model: str, prompt: str) -> tuple[Lease[PrefillWorker], Lease[Worker]]:
        """A prefill and a decode server in rotation, or 503 at once when a pool has none."""
        try:
            prefill = self.locality.acquire(prompt)
        except NoHealthyWorker as error:
            raise UpstreamError(503, str(error)) from error
        try:
            return prefill, self.config.decode_pools[model].acquire()
        except NoHealthyWorker as error:
            prefill.release()
            raise UpstreamError(503, str(error)) from error

    async def _hand_off(self, model: str, endpoint: str, body: dict, prompt: str,
                        on_prefill_done: Callable[[], None] | None = None) -> dict:
        """One prompt, one sample: the decode server's reply (``cached_tokens`` filled in, transfer counted)."""
        if self.config.unified:
            reply = await self.pd.complete_one(self._unified_lease(prompt), endpoint,
                                               {**one_server_body(endpoint, body), **self._decode_fields(model)},
                                               on_prefill_done)
            ensure_cached_tokens(reply)
            return reply
        prefill, decode = self._leases(model, prompt)
        reply, prefill_reply = await self.pd.complete(prefill, decode, endpoint,
                                                      pd_body(endpoint, body, prefill.worker), on_prefill_done,
                                                      self._decode_fields(model))
        ensure_cached_tokens(reply)
        transfer = kv_transfer_of(reply) or kv_transfer_of(prefill_reply)
        if transfer is not None:
            self.metrics.record_kv_transfer(model, transfer)
        decode_prefix = decode_prefix_tokens_of(reply)
        if decode_prefix is not None:
            self.metrics.record_decode_prefix(model, decode_prefix)
        return reply

    async def _open_stream(self, model: str, endpoint: str, body: dict, prompt: str,
                           on_prefill_done: Callable[[], None] | None = None) -> DecodeLines:
        if self.config.unified:
            return await self.pd.stream_one(self._unified_lease(prompt), endpoint,
                                            {**one_server_body(endpoint, body), **self._decode_fields(model)},
                                            on_prefill_done)
        prefill, decode = self._leases(model, prompt)
        return await self.pd.stream(prefill, decode, endpoint, pd_body(endpoint, body, prefill.worker),
                                    on_prefill_done, self._decode_fields(model))

    def _decode_fields(self, model: str) -> dict[str, str]:
        """What only ``model``'s decode server gets: its LoRA adapter, when it is one."""
        adapter = self.config.decode_pools[model].lora_adapter
        return {"lora_path": adapter} if adapter is not None else {}

    def _record_reply(self, routed: RoutedRequest, reply: dict | None, status: int = 200) -> None:
        self.metrics.record_request(routed.model, routed.endpoint, status)
        self._record_usage(routed.model, reply)

    def _record_usage(self, model: str, reply: dict | None) -> None:
        usage: Usage | None = usage_of(reply) if reply else None
        if usage is not None:
            self.metrics.record_usage(model, usage)

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
                    if isinstance(event, dict) and "error" in event:  # SGLang's event for a request failing mid-stream
                        status = _error_status(event)
                    if isinstance(event, dict) and usage_of(event) is not None:
                        last_with_usage = event
                        if ensure_cached_tokens(event):
                            line = "data: " + json.dumps(event)
                yield (line + "\n").encode()
        except UpstreamError as error:  # the decode server broke off mid-stream: say so in the stream
            status = error.status
            yield sse(_error_event(error))
        finally:
            await lines.aclose()
            self._record_reply(routed, last_with_usage, status)

    # ----- batches and n > 1: one hand-off per prompt and sample (fanout.py) -----

    async def _route_fan_out(self, routed: RoutedRequest, plan: FanOut) -> Response:
        self._running_subs.add(plan.subs)
        merging = False
        try:
            if routed.stream:
                streams = await self._each_sub(plan, lambda sub, done: self._open_stream(
                    routed.model, routed.endpoint, sub.body, sub.prompt_text, done), close=DecodeLines.aclose)
                merging = True
                return StreamingResponse(self._merge(routed, plan, streams), media_type="text/event-stream",
                                         background=BackgroundTask(self._end_stream, routed.model, streams,
                                                                   [sub.body["rid"] for sub in plan.subs]))
            replies = await self._each_sub(plan, lambda sub, done: self._hand_off(
                routed.model, routed.endpoint, sub.body, sub.prompt_text, done))
        except UpstreamError as error:
            self.metrics.record_request(routed.model, routed.endpoint, error.status)
            return error_response(error.status, error.message)
        finally:
            if not merging:
                self._running_subs.remove(plan.subs)
        self.metrics.record_request(routed.model, routed.endpoint, 200)
        for reply in replies:
            self._record_usage(routed.model, reply)
        return JSONResponse(combine(plan, replies))

    async def _each_sub(self, plan: FanOut, start: Callable[[SubRequest, Callable[[], None]], Awaitable[T]],
                        close: Callable[[T], Awaitable[None]] | None = None) -> list[T]:
        """``start`` for every sub-request at once; the first failure cancels (and closes) the others.

        The first sub-request of each distinct prompt leads; the others of that prompt
        start when its prefill server has answered, so they hit the prompt's KV in the
        prefill tree instead of prefilling it again side by side.
        """
        prefilled: dict[str, asyncio.Event] = {}
        leaders: set[int] = set()
        for sub in plan.subs:
            if sub.prompt_text not in prefilled:
                prefilled[sub.prompt_text] = asyncio.Event()
                leaders.add(sub.index)

        async def run(sub: SubRequest) -> T:
            event = prefilled[sub.prompt_text]
            if sub.index not in leaders:
                await event.wait()
            return await start(sub, event.set)

        tasks = [asyncio.ensure_future(run(sub)) for sub in plan.subs]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((task for task in tasks if task.done() and not task.cancelled()
                           and task.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            return [task.result() for task in tasks]
        except BaseException:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if close is not None:
                for result in results:
                    if not isinstance(result, BaseException):
                        await close(result)
            raise

    async def _merge(self, routed: RoutedRequest, plan: FanOut, streams: list[DecodeLines]) -> AsyncIterator[bytes]:
        """One SSE stream from the sub-streams, in arrival order (``fanout.StreamMerger`` shapes it).

        A sub-stream that fails or sends an error event ends the stream with that error
        (the other sub-streams are closed, which cancels them on their servers).
        """
        merger = StreamMerger(plan)
        queue: asyncio.Queue[tuple[SubRequest, str | UpstreamError | None]] = asyncio.Queue()

        async def pump(sub: SubRequest, lines: DecodeLines) -> None:
            try:
                async for line in lines:
                    if line.startswith("data: ") and line != "data: [DONE]":
                        queue.put_nowait((sub, line[len("data: "):]))
                queue.put_nowait((sub, None))
            except UpstreamError as error:
                queue.put_nowait((sub, error))
            finally:
                await lines.aclose()

        pumps = [asyncio.ensure_future(pump(sub, lines)) for sub, lines in zip(plan.subs, streams)]
        last_usage: dict[int, dict] = {}
        status, running = 200, len(pumps)
        try:
            while running:
                sub, data = await queue.get()
                if data is None:
                    running -= 1
                    continue
                if isinstance(data, UpstreamError):
                    status = data.status
                    yield sse(_error_event(data))
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    yield sse(data)
                    continue
                if isinstance(event, dict) and "error" in event:  # a sub-request failed: so does the request
                    status = 500
                    yield sse(event)
                    break
                if usage_of(event) is not None:
                    ensure_cached_tokens(event)
                    last_usage[sub.index] = event
                merged = merger.event(sub, event)
                if merged is not None:
                    yield sse(merged)
            else:
                for event in merger.final_events():
                    yield sse(event)
            yield sse("[DONE]")
        finally:
            for pumped in pumps:
                pumped.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await _close_all(streams)  # also the ones whose pump was cancelled before it started
            self._running_subs.remove(plan.subs)
            self.metrics.record_request(routed.model, routed.endpoint, status)
            for event in last_usage.values():
                self._record_usage(routed.model, event)

    async def models(self) -> dict:
        if self.decode_limits is not None:
            await self.decode_limits.learned()
        return {"object": "list", "data": [self.model_card(name) for name in self.config.decode_pools]}

    def model_card(self, name: str) -> dict:
        """The model's card; ``max_model_len``: the context its decode pool admits (once its servers said)."""
        card = {"id": name, "object": "model", "created": 0, "owned_by": "pfs_sglang", "root": name}
        limit = self.decode_limits.of_model(name) if self.decode_limits is not None else None
        if limit is not None:
            card["max_model_len"] = limit.context_length
        return card

    def workers(self) -> dict:
        rows = [{"url": w.url, "role": "prefill", "bootstrap_port": w.bootstrap_port, "in_flight": w.in_flight,
                 "healthy": w.healthy} for w in self.config.prefill_workers]
        rows += [{"url": w.url, "role": "decode", "model": name, "in_flight": w.in_flight, "healthy": w.healthy}
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

    async def health_generate(self) -> Response:
        """A one-token generation through the PD path for every server, like SGLang's ``/health_generate``.

        Hand-off ``i`` pairs prefill server ``i mod P`` with decode server ``i mod D``,
        so every prefill server, KV hand-off path and decode model is exercised (a
        server's own ``/health_generate`` uses SGLang's fake transfer and would not).
        """
        prefills = self.config.prefill_workers
        decodes = [(name, worker) for name, pool in self.config.decode_pools.items() for worker in pool.workers]
        body = {"text": "health", "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "log_metrics": False}
        if self.config.unified:
            return await self._health_generate_unified(decodes, body)

        async def one(index: int) -> str | None:
            prefill, (model, decode) = prefills[index % len(prefills)], decodes[index % len(decodes)]
            pair = {**body, "rid": f"pfs-health-{uuid.uuid4().hex}"}
            try:
                await asyncio.wait_for(self.pd.complete(Lease(prefill), Lease(decode), GENERATE,
                                                        pd_body(GENERATE, pair, prefill)), HEALTH_GENERATE_TIMEOUT_S)
                return None
            except UpstreamError as error:
                return f"{prefill.url} -> {decode.url} ({model}): {error.message}"
            except asyncio.TimeoutError:
                return f"{prefill.url} -> {decode.url} ({model}): no token in {HEALTH_GENERATE_TIMEOUT_S:.0f} s"

        failures = [f for f in await asyncio.gather(*(one(i) for i in range(max(len(prefills), len(decodes)))))
                    if f is not None]
        if failures:
            return error_response(503, "generation through the PD path failed: " + "; ".join(failures))
        return Response(status_code=200)

    async def _health_generate_unified(self, served: list[tuple[str, Worker]], body: dict) -> Response:
        """A one-token generation of every model on every unified server that serves it."""
        async def one(model: str, server: Worker) -> str | None:
            request = {**body, "rid": f"pfs-health-{uuid.uuid4().hex}", **self._decode_fields(model)}
            try:
                await asyncio.wait_for(self.pd.complete_one(Lease(server), GENERATE, request), HEALTH_GENERATE_TIMEOUT_S)
                return None
            except UpstreamError as error:
                return f"{server.url} ({model}): {error.message}"
            except asyncio.TimeoutError:
                return f"{server.url} ({model}): no token in {HEALTH_GENERATE_TIMEOUT_S:.0f} s"

        failures = [f for f in await asyncio.gather(*(one(model, server) for model, server in served)) if f is not None]
        if failures:
            return error_response(503, "generation on the unified servers failed: " + "; ".join(failures))
        return Response(status_code=200)

    async def abort_request(self, body: dict[str, Any]) -> Response:
        """SGLang's ``/abort_request`` on every server, for the rid and the running sub-requests made for it."""
        if body.get("abort_all"):
            return await self._send_aborts([body])
        rid = body["rid"]
        subs = self._running_subs.of(rid) if isinstance(rid, str) else []
        return await self._send_aborts([{**body, "rid": r} for r in [rid, *subs]])

    async def _send_aborts(self, bodies: list[dict[str, Any]]) -> Response:
        async def send(worker: Worker, abort: dict) -> str | None:
            try:
                reply = await self.client.post(worker.url + "/abort_request", json=abort,
                                               timeout=self.config.health_timeout_s)
            except httpx.HTTPError as error:
                return f"{worker.url}: {error!r}"
            return None if reply.status_code == 200 else f"{worker.url}: {reply.status_code}"

        failures = [f for f in await asyncio.gather(*(send(w, b) for w in self.all_workers() for b in bodies))
                    if f is not None]
        if failures:
            return error_response(503, f"/abort_request failed on: {failures}")
        return Response(status_code=200)

    async def flush_cache(self) -> Response:
        return await self._on_every_worker("POST", "/flush_cache")

    async def model_get(self, model: str | None, path: str) -> Response:
        """A GET answered by a decode server of ``model`` (the default model when None): what
        frontend programs read (``/get_model_info``, ``/get_server_info``)."""
        if model is not None and model not in self.config.decode_pools:
            return _unknown_model(model)
        workers = self.config.decode_pools[model or self.config.fallback_model].workers
        worker = next((w for w in workers if w.healthy), workers[0])
        try:
            reply = await self.client.get(worker.url + path, timeout=self.config.health_timeout_s)
        except httpx.HTTPError as error:
            return error_response(503, f"decode server {worker.url} is unreachable: {error!r}")
        return Response(reply.content, status_code=reply.status_code,
                        media_type=reply.headers.get("content-type", "application/json"))


class DeploymentStarting(Exception):
    """A request arrived before the router was given its servers (the deployment is starting)."""


def build_router_app(config: RouterConfig | None = None, still_starting: Callable[[], list[str]] = list,
                     api_key: str | None = None) -> FastAPI | RequireApiKey:
    """The router as an ASGI app; it owns one ``httpx.AsyncClient`` for the app's lifetime.

    Without ``config`` the router is *starting*: it answers at once, every endpoint with
    503 ``deployment is starting`` (``/health`` also names the servers ``still_starting``
    returns), until the launcher calls ``app.state.serve(config)`` with the servers'
    final addresses. It never holds a connection while servers start. With ``api_key``
    every request must carry it (``api_key.py``), and the router sends it to its servers.
    """
    state: dict[str, Any] = {"config": config}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if "router" in state:
            await state["router"].health_checker.stop()
            await state["router"].client.aclose()

    app = FastAPI(title="pfs_sglang router", lifespan=lifespan)
    app.state.serve = lambda ready: state.update(config=ready)

    def router() -> PrefillShareRouter:
        if "router" not in state:  # built in the event loop, on the first request after serve()
            ready: RouterConfig | None = state["config"]
            if ready is None:
                raise DeploymentStarting
            timeout = httpx.Timeout(ready.request_timeout_s, connect=ready.connect_timeout_s)
            limits = httpx.Limits(max_connections=1024, max_keepalive_connections=UPSTREAM_IDLE_CONNECTIONS)
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else None  # the servers need it too
            state["router"] = PrefillShareRouter(ready, httpx.AsyncClient(timeout=timeout, limits=limits,
                                                                          headers=headers))
            state["router"].health_checker.start()
        return state["router"]

    @app.exception_handler(DeploymentStarting)
    async def starting(request: Request, _error: DeploymentStarting) -> Response:
        servers = still_starting()
        response = error_response(503, "deployment is starting" + (
            f"; servers not yet healthy: {', '.join(servers)}" if servers else ""), code="starting")
        if request.url.path == "/health":
            response = JSONResponse(status_code=503, content={**json.loads(response.body), "starting": servers})
        return response

    def routed(endpoint: str):
        async def handler(request: Request) -> Response:
            return await router().route(request, endpoint, request.path_params.get("model"))

        return handler

    for endpoint in (CHAT, COMPLETIONS, GENERATE):
        app.add_api_route(endpoint, routed(endpoint), methods=["POST"])
        app.add_api_route(MODEL_PREFIX + endpoint, routed(endpoint), methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return await router().models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model not in router().config.decode_pools:
            return _unknown_model(model)
        if router().decode_limits is not None:
            await router().decode_limits.learned()
        return router().model_card(model)

    @app.get("/workers")
    async def workers():
        return router().workers()

    @app.get("/health")
    async def health():
        return await router().health()

    @app.get("/health_generate")
    async def health_generate():
        return await router().health_generate()

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    @app.api_route(MODEL_PREFIX + "/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return await router().flush_cache()

    @app.post("/abort_request")
    @app.post(MODEL_PREFIX + "/abort_request")
    async def abort_request(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as error:
            return error_response(400, f"request body is not valid JSON: {error}")
        if not isinstance(body, dict) or not (body.get("rid") or body.get("abort_all")):
            return error_response(400, "/abort_request needs a 'rid' or \"abort_all\": true", param="rid")
        return await router().abort_request(body)

    @app.get("/metrics")
    async def metrics():
        return Response(router().metrics.render(), media_type=CONTENT_TYPE)

    def proxied(path: str):
        async def handler(request: Request) -> Response:
            return await router().model_get(request.path_params.get("model"), path)

        return handler

    for path in ("/get_model_info", "/model_info", "/get_server_info", "/server_info"):
        app.add_api_route(path, proxied(path), methods=["GET"])
        app.add_api_route(MODEL_PREFIX + path, proxied(path), methods=["GET"])

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def not_served(path: str):
        return error_response(404, f"the PrefillShare router does not serve /{path}", code="not_found")

    if api_key:
        return RequireApiKey(app, api_key)
    return app


def _unknown_model(model: str) -> Response:
    return error_response(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


async def _disconnected(request: Request) -> None:
    """Returns when the client has disconnected (the body has been read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_status(event: dict) -> int:
    """The HTTP status an SGLang error event stands for (500 when it names none)."""
    error = event["error"]
    code = error.get("code") if isinstance(error, dict) else None
    try:
        return int(code) if 400 <= int(code) < 600 else 500
    except (TypeError, ValueError):
        return 500


def _error_event(error: UpstreamError) -> dict:
    return {"error": {"message": error.message, "type": "server_error", "code": str(error.status)}}


async def _close_all(streams: list[DecodeLines]) -> None:
    await asyncio.gather(*(lines.aclose() for lines in streams), return_exceptions=True)
