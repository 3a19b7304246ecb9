"""The PD hand-off of one request, as SGLang's own router does it.

The same JSON body, with ``bootstrap_host``/``bootstrap_port`` (the prefill server's
KV bootstrap address) and a random 63-bit ``bootstrap_room`` added, is POSTed to a
prefill server and to a decode server at once. The decode server fetches the prompt KV
from the prefill server and its reply is the answer; for streaming, its SSE lines pass
through. The prefill reply is read and dropped, except that a prefill failure that
comes before the decode server has answered (non-200, unreachable, timed out) cancels
the decode request and becomes the answer, so a broken prefill never leaves a client
waiting. A decode failure cancels the prefill request. Every upstream call has a
timeout (the client's ``httpx.Timeout``). A server that fails at the connection
(refused, reset, gone mid-answer) fails the request it was serving with 503 and is
reported (``on_connection_failure``, awaited before the error is answered: the router
takes it out of rotation if its port refuses connections, ``worker_health.py``). A
caller may ask to hear when the prefill server has answered (``on_prefill_done``): the
prompt's KV is then in its prefix tree.

A unified deployment (one server holds the base and every LoRA decode module:
``pfs_sglang.unified``) has no hand-off: ``complete_one`` and ``stream_one`` send the
client's body to that one server, with the same timeouts, errors and connection-failure
reports; ``on_prefill_done`` comes with the reply (or the stream's first line), when the
prompt's base KV is in that server's tree.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any, Awaitable, Callable, TypeVar

import httpx

from pfs_sglang.router.openai_errors import upstream_message
from pfs_sglang.router.pools import Lease, PrefillWorker, Worker
from pfs_sglang.router.request_body import GENERATE
from pfs_sglang.router.worker_health import is_connection_failure

T = TypeVar("T")


class UpstreamError(Exception):
    """A prefill or decode server failed the request; ``status`` is what the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def pd_body(endpoint: str, client_body: dict[str, Any], prefill: PrefillWorker) -> dict[str, Any]:
    """The body both servers receive: the client's (one prompt, one sample), plus the bootstrap fields.

    ``/generate`` loses ``model``: SGLang's ``GenerateReqInput`` has no such field.
    """
    body = {**client_body, "bootstrap_host": prefill.bootstrap_host, "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": secrets.randbits(63)}
    if endpoint == GENERATE:
        body.pop("model", None)
    return body


def one_server_body(endpoint: str, client_body: dict[str, Any]) -> dict[str, Any]:
    """The body a unified server receives: the client's (one prompt, one sample); ``/generate`` loses ``model``."""
    body = dict(client_body)
    if endpoint == GENERATE:
        body.pop("model", None)
    return body


def _with_cause(error: BaseException) -> str:
    """``error`` and the first exception under it that says something (httpx's ``ReadError('')`` says nothing)."""
    def under(exception: BaseException) -> BaseException | None:
        return exception.__cause__ or (None if exception.__suppress_context__ else exception.__context__)

    cause = under(error)
    while cause is not None and not str(cause) and under(cause) is not None:
        cause = under(cause)
    return f"{error!r} ({cause!r})" if cause is not None else repr(error)


class PrefillDecodeClient:
    """Runs PD hand-offs over one shared ``httpx.AsyncClient``."""

    def __init__(self, client: httpx.AsyncClient,
                 on_connection_failure: Callable[[Worker, httpx.HTTPError], Awaitable[None]] | None = None):
        self.client = client
        self.on_connection_failure = on_connection_failure
        self._background: set[asyncio.Task] = set()

    async def _transport_error(self, role: str, worker: Worker, error: httpx.HTTPError) -> UpstreamError:
        if is_connection_failure(error) and self.on_connection_failure is not None:
            await self.on_connection_failure(worker, error)
        if isinstance(error, httpx.TimeoutException):
            return UpstreamError(504, f"{role} server {worker.url} did not answer in time")
        return UpstreamError(503, f"{role} server {worker.url} is unreachable: {_with_cause(error)}")

    async def _post_json(self, role: str, lease: Lease, endpoint: str, body: dict) -> dict | None:
        try:
            reply = await self.client.post(lease.worker.url + endpoint, json=body)
        except httpx.HTTPError as error:
            raise await self._transport_error(role, lease.worker, error) from error
        finally:
            lease.release()
        if reply.status_code != 200:
            raise UpstreamError(reply.status_code, f"{role} server: {upstream_message(reply.content)}")
        try:
            return reply.json()
        except ValueError:
            if role == "decode":
                raise UpstreamError(502, f"decode server {lease.worker.url} sent a reply that is not JSON")
            return None  # a streamed prefill reply: read, not needed

    def _start(self, coroutine: Awaitable[T], lease: Lease, on_done: Callable[[], None] | None = None
               ) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coroutine)
        task.add_done_callback(lambda _: lease.release())  # also when cancelled before it ran
        if on_done is not None:
            task.add_done_callback(lambda _: on_done())
        return task

    def _finish_in_background(self, prefill: asyncio.Task) -> None:
        """Let the prefill reply be read to its end without holding the client's answer."""
        if prefill.done():
            self._forget(prefill)
        else:
            self._background.add(prefill)
            prefill.add_done_callback(self._forget)

    def _forget(self, prefill: asyncio.Task) -> None:
        self._background.discard(prefill)
        if not prefill.cancelled():
            prefill.exception()  # a late prefill failure: the decode server has answered already

    async def _unless_prefill_fails(self, prefill: asyncio.Task, answer: asyncio.Task[T]) -> T:
        """``answer``'s result, or the prefill's error if the prefill fails before it."""
        try:
            done, _ = await asyncio.wait({prefill, answer}, return_when=asyncio.FIRST_COMPLETED)
            if answer not in done and prefill.exception() is not None:
                raise prefill.exception()
            return await answer
        except BaseException:
            for task in (prefill, answer):
                task.cancel()
            with suppress(BaseException):
                await asyncio.gather(prefill, answer, return_exceptions=True)
            raise

    async def complete(self, prefill: Lease[PrefillWorker], decode: Lease[Worker], endpoint: str,
                       body: dict, on_prefill_done: Callable[[], None] | None = None,
                       decode_fields: dict | None = None) -> tuple[dict, dict | None]:
        """The decode server's JSON reply, and the prefill server's if it has already come.

        ``decode_fields`` go to the decode server only (a LoRA adapter's ``lora_path``:
        the prefill module computes the prompt's KV without it, invariant 1)."""
        prefill_task = self._start(self._post_json("prefill", prefill, endpoint, body), prefill, on_prefill_done)
        decode_task = self._start(self._post_json("decode", decode, endpoint, {**body, **(decode_fields or {})}),
                                  decode)
        reply = await self._unless_prefill_fails(prefill_task, decode_task)
        finished = prefill_task.done() and prefill_task.exception() is None
        self._finish_in_background(prefill_task)
        return reply, prefill_task.result() if finished else None

    async def stream(self, prefill: Lease[PrefillWorker], decode: Lease[Worker], endpoint: str,
                     body: dict, on_prefill_done: Callable[[], None] | None = None,
                     decode_fields: dict | None = None) -> "DecodeLines":
        """The decode server's SSE lines; opening it fails with the prefill's error if that comes first.

        The decode lease is released when the lines end (or fail, or are closed).
        ``decode_fields`` as in ``complete``.
        """
        prefill_task = self._start(self._post_json("prefill", prefill, endpoint, body), prefill, on_prefill_done)
        lines = self._decode_lines(decode, endpoint, {**body, **(decode_fields or {})})
        first_task = asyncio.ensure_future(self._first_line(decode.worker, lines))
        try:
            first = await self._unless_prefill_fails(prefill_task, first_task)
        except BaseException:
            await lines.aclose()
            decode.release()
            raise
        self._finish_in_background(prefill_task)
        return DecodeLines(first, lines)

    async def complete_one(self, server: Lease[Worker], endpoint: str, body: dict,
                           on_prefill_done: Callable[[], None] | None = None) -> dict:
        """A unified server's JSON reply (``body`` as ``one_server_body`` makes it, plus the model's fields)."""
        return await self._start(self._post_json("decode", server, endpoint, body), server, on_prefill_done)

    async def stream_one(self, server: Lease[Worker], endpoint: str, body: dict,
                         on_prefill_done: Callable[[], None] | None = None) -> "DecodeLines":
        """A unified server's SSE lines; the lease is released when they end, as in ``stream``."""
        lines = self._decode_lines(server, endpoint, body)
        try:
            first = await self._first_line(server.worker, lines)
        except BaseException:
            await lines.aclose()
            server.release()
            raise
        if on_prefill_done is not None:
            on_prefill_done()
        return DecodeLines(first, lines)

    @staticmethod
    async def _first_line(worker: Worker, lines: AsyncIterator[str]) -> str:
        try:
            return await anext(lines)
        except StopAsyncIteration:
            raise UpstreamError(502, f"decode server {worker.url} closed the stream without sending anything")

    async def _decode_lines(self, decode: Lease[Worker], endpoint: str, body: dict) -> AsyncIterator[str]:
        request = self.client.build_request("POST", decode.worker.url + endpoint, json=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as error:
            raise await self._transport_error("decode", decode.worker, error) from error
        try:
            if response.status_code != 200:
                raise UpstreamError(response.status_code, f"decode server: {upstream_message(await response.aread())}")
            async for line in response.aiter_lines():
                yield line
        except httpx.HTTPError as error:
            raise await self._transport_error("decode", decode.worker, error) from error
        finally:
            await response.aclose()
            decode.release()


class DecodeLines:
    """A decode server's SSE lines whose first line was read already (to see that the stream opened).

    ``aclose()`` ends the decode request and releases its lease, also when the lines
    were never iterated (closing an unstarted async generator would not).
    """

    def __init__(self, first: str, rest: AsyncIterator[str]):
        self._first: str | None = first
        self._rest = rest
        self.finished = False  # the decode server ended the stream (not closed early)

    def __aiter__(self) -> "DecodeLines":
        return self

    async def __anext__(self) -> str:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            return await anext(self._rest)
        except StopAsyncIteration:
            self.finished = True
            raise

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()
