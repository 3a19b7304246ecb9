"""The load generator: closed-loop agent sessions over streamed ``/generate`` (asyncio + httpx).

Why not NVIDIA's ``aiperf`` (checked, release 0.13.0 on PyPI): its multi-turn replay
threads the live replies back only as chat-message *text* for the OpenAI endpoints,
re-tokenised by the server's chat template; its exact token-id replay over SGLang's
``/generate`` (``sglang_generate``) exists only on its unreleased main branch. The
benchmark needs the exact token ids of every prompt (the prefill floor is a trie over
them, and ``pfs`` / ``pfs-noshare`` must see identical prompts for the same-output
check), per-turn model routing plus per-request extra fields (``extra_key``), and each
reply's ``meta_info`` (``cached_tokens``) per request. It would also add a
multi-process ZMQ service stack (controller, workers, record processors) and ~40
dependencies (kubernetes, dash, optuna, pyarrow, ...) competing for the two CPU cores the
measured servers run on. What it would have given (streamed TTFT, percentiles) is a few
lines here.

Each session runs its steps in order (its next prompt holds the previous reply's real
output ids); sessions start at their ``start_s`` (all at once: closed loop with as many
concurrent sessions; or Poisson arrivals). Requests are greedy with ``ignore_eos`` so
every system generates the same number of tokens. A failed request is recorded with its
error and its session goes on without its output. A progress bar counts finished
requests; a poller records peak KV pool occupancy meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from pfs_sglang.bench.metrics import RequestRecord, metric_sum, parse_prometheus
from pfs_sglang.bench.systems import Target
from pfs_sglang.bench.workloads import Session, Step, Vocabulary

REQUEST_TIMEOUT_S = 900.0
POLL_INTERVAL_S = 1.0


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    prompts: list[list[int]]  # every prompt sent, for the floor
    duration_s: float
    peak_kv_tokens: float = 0.0
    peak_active_kv_tokens: float = 0.0


@dataclass
class _Peak:
    occupied: float = 0.0
    active: float = 0.0
    samples: int = field(default=0)


async def _stream_generate(client: httpx.AsyncClient, target: Target, prompt: list[int], max_tokens: int,
                           record: RequestRecord, t0: float) -> None:
    body = {"input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
            **target.fields}
    start = time.perf_counter()
    record.start_s = start - t0
    last: dict | None = None
    pieces: list[int] = []
    try:
        async with client.stream("POST", f"{target.url}/generate", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = str(event["error"])[:300]
                    return
                ids = event.get("output_ids") or []
                if ids and record.ttft_s is None:
                    record.ttft_s = time.perf_counter() - start
                pieces.extend(ids)
                last = event
    except (httpx.HTTPError, ValueError) as error:
        record.error = f"{type(error).__name__}: {error}"[:300]
        return
    record.e2e_s = time.perf_counter() - start
    if last is None:
        record.error = "the stream ended without a reply"
        return
    meta = last.get("meta_info") or {}
    record.completion_tokens = int(meta.get("completion_tokens") or 0)
    final = list(last.get("output_ids") or [])
    # SGLang streams cumulative output ids unless --incremental-streaming-output is set
    record.output_ids = final if len(final) == record.completion_tokens else pieces
    record.prompt_tokens = int(meta.get("prompt_tokens") or len(prompt))
    record.cached_tokens = int(meta.get("cached_tokens") or 0)


async def _run_session(client: httpx.AsyncClient, system: str, session: Session, targets: Callable[[str], Target],
                       t0: float, records: list[RequestRecord], prompts: list[list[int]], bar: tqdm) -> None:
    await asyncio.sleep(max(0.0, t0 + session.start_s - time.perf_counter()))
    context = list(session.context)
    for index, step in enumerate(session.steps):
        await asyncio.sleep(max(0.0, t0 + step.not_before_s - time.perf_counter()))
        prompt = list(step.prefix) if step.reset else context + list(step.prefix)
        record = RequestRecord(system=system, session_id=session.session_id, step=index, model=step.model,
                               prompt_len=len(prompt))
        records.append(record)
        prompts.append(prompt)
        await _stream_generate(client, targets(step.model), prompt, step.max_tokens, record, t0)
        if not step.reset:
            context = prompt + (record.output_ids if step.keep_output else [])
        bar.update(1)


async def _poll_kv(client: httpx.AsyncClient, urls: list[str], peak: _Peak, stop: asyncio.Event) -> None:
    while not stop.is_set():
        pages = await asyncio.gather(*(client.get(f"{url}/metrics", timeout=10) for url in urls),
                                     return_exceptions=True)
        samples = [parse_prometheus(page.text) for page in pages if isinstance(page, httpx.Response)]
        if len(samples) == len(urls):
            active = sum(metric_sum(s, "sglang:kv_used_tokens") for s in samples)
            cached = sum(metric_sum(s, "sglang:kv_evictable_tokens") for s in samples)
            peak.active = max(peak.active, active)
            peak.occupied = max(peak.occupied, active + cached)
            peak.samples += 1
        try:
            await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def _run(system: str, sessions: list[Session], targets: Callable[[str], Target], metrics_urls: list[str],
               progress: bool) -> RunOutcome:
    records: list[RequestRecord] = []
    prompts: list[list[int]] = []
    total = sum(len(session.steps) for session in sessions)
    limits = httpx.Limits(max_connections=max(64, 4 * len(sessions)), max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0), limits=limits) as client:
        peak, stop = _Peak(), asyncio.Event()
        poller = asyncio.create_task(_poll_kv(client, metrics_urls, peak, stop))
        with tqdm(total=total, desc=system, unit="req", disable=not progress, mininterval=1.0) as bar:
            t0 = time.perf_counter()
            await asyncio.gather(*(_run_session(client, system, session, targets, t0, records, prompts, bar)
                                   for session in sessions))
            duration = time.perf_counter() - t0
        stop.set()
        await poller
    return RunOutcome(records, prompts, duration, peak.occupied, peak.active)


def run_sessions(system: str, sessions: list[Session], targets: Callable[[str], Target], metrics_urls: list[str],
                 progress: bool = True) -> RunOutcome:
    """Run every session against ``targets``; per-request records, prompts, wall time, peak KV use."""
    return asyncio.run(_run(system, sessions, targets, metrics_urls, progress))


def warm_up(targets: Callable[[str], Target], models: list[str], vocab: Vocabulary, tokens: int = 16) -> None:
    """One short request per model, so first-request costs stay out of the measurement."""
    rng = random.Random("warm-up")
    sessions = [Session(f"warm-up-{model}", 0.0, vocab.draw(rng, tokens), (Step(model, (), 2, keep_output=False),))
                for model in models]
    outcome = run_sessions("warm-up", sessions, targets, [], progress=False)
    failed = [record for record in outcome.records if record.error]
    if failed:
        raise RuntimeError(f"warm-up request to {failed[0].model} failed: {failed[0].error}")

