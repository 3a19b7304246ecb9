"""``python -m pfs_sglang.bench load``: a closed-loop load run with exactly-once, KV and memory checks.

``--sessions`` agent sessions run at once, each closed-loop (its next request waits for
its last answer) for ``--duration`` seconds, then finish the request they have in flight.
A session is an agent conversation over one growing context, in the demo models' chat
format: a system message every session shares (records on file), then the session's own
record and, turn after turn, a question for the next decode model in rotation (with the
demo models: ``extract``, ``compute``, ``transform``) followed by that model's answer.
When the context passes ``--max-context-tokens`` the session starts a new conversation,
so contexts (and the KV they need) stay bounded. Requests are OpenAI
``/v1/chat/completions`` (most), streamed chat (``--stream-share``) and ``/v1/completions``
over the same conversation rendered as text (``--completions-share``), greedy,
``--max-tokens`` each. A session whose request failed unplanned waits a second before
its next one (a closed loop would otherwise turn one outage into a burst of errors).

Errors are injected on purpose every ``--inject-every`` requests, alternating: a request
naming a model that is not served (must get 404; the router counts no routed request)
and a request the client abandons after ``--abandon-after`` seconds (its KV must be freed
on every server; the router counts it, as 499 or, when it had finished, 200).

Exactly-once: every request carries a unique ``rid``, which the router passes to the
servers and SGLang answers as the reply's ``id``. The client counts each request's one
outcome (answered, or an error of a named kind) and checks every answer's id against its
rid; at the end the router's ``pfs_router_requests_total`` must have risen by exactly the
number of routed requests sent (less any abandoned before the router read them), its
status-200 count by the answers (plus abandoned requests it had finished). The router
counts an abandoned request as 499, or as 200 when it had finished.

Afterwards the deployment must go idle (``server_state.wait_deployment_idle``) with no KV
slot held on any server, and memory must be bounded: RSS of the router (the launcher
process) and of each server's process tree, sampled every second (``rss.py``), may grow by
at most ``--rss-growth-limit`` MiB from the post-warm-up sample (``--warmup`` s into the
run) to the end. When the run starts the deployment itself, no server log may hold a
traceback. Exit status 0 when every check passes, 1 otherwise.

Without ``--url`` the run starts the demo deployment (``python -m pfs_sglang.launch_server``,
i.e. ``Deployment(with_demo_models(Topology))``, with ``--max-total-tokens``; extra
launcher flags after ``--``) as its own process, so the router's memory is its own and
does not share a GIL with the load generator; its logs go to ``DIR/logs``. With
``--url`` it drives a running router (its servers must run on this machine for the
memory figures; other traffic to that router breaks the exact count).

Writes ``DIR/summary.json``, ``DIR/report.md``, ``DIR/load.png`` (latency and RSS over
time) and ``DIR/errors.jsonl`` (every failed or injected request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import requests
from tqdm import tqdm

from pfs_sglang.bench.metrics import parse_prometheus, percentile
from pfs_sglang.bench.rss import MIB, RssSampler, Tracked, listening_pids, port_of
from pfs_sglang.bench.server_state import held_by_workers, wait_deployment_idle
from pfs_sglang.train.corpus import TASKS, random_record, render_record, task_question

ROUTER_REQUESTS = "pfs_router_requests_total"
UNKNOWN_MODEL = "pfs-load-no-such-model"
INJECTED_UNKNOWN, INJECTED_ABANDON = "unknown-model", "abandoned"
SHARED_RECORDS = 12  # records in the system message every session shares
ERROR_BACKOFF_S = 1.0  # a session waits this long after an unplanned error
CLIENT_KEEPALIVE_S = 2.0


@dataclass(frozen=True)
class LoadConfig:
    sessions: int = 200
    duration_s: float = 120.0
    warmup_s: float | None = None  # None: a quarter of the duration, at most 30 s
    max_tokens: int = 8
    max_context_tokens: int = 512
    stream_share: float = 0.3
    completions_share: float = 0.2
    inject_every: int = 50
    abandon_after_s: float = 0.3
    request_timeout_s: float = 300.0
    idle_timeout_s: float = 120.0
    rss_growth_limit_mib: float = 128.0
    seed: int = 0
    progress: bool = True

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(30.0, self.duration_s / 4)

    def validate(self) -> None:
        if self.sessions < 1 or self.duration_s <= 0 or self.max_tokens < 1:
            raise ValueError("--sessions, --duration and --max-tokens must be positive")
        if not 0 <= self.stream_share + self.completions_share <= 1:
            raise ValueError("--stream-share plus --completions-share must lie between 0 and 1")
        if not 0 <= self.warmup < self.duration_s:
            raise ValueError("--warmup must be shorter than --duration")


@dataclass
class RequestRecord:
    """One request's single outcome, from the client's side."""

    rid: str
    session: int
    turn: int
    model: str
    kind: str  # chat, chat-stream, completion
    injected: str | None = None  # unknown-model, abandoned
    start_s: float = 0.0
    latency_s: float | None = None
    ttft_s: float | None = None
    answered: bool = False
    error_kind: str | None = None
    error: str | None = None
    reply_ids: list[str] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def fail(self, kind: str, message: str) -> None:
        self.error_kind, self.error = kind, message[:300]


# ----- the conversation a session carries -----

def render_chat(messages: list[dict]) -> str:
    """The demo chat template as text (for ``/v1/completions`` over the same conversation)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"


class Conversation:
    """One session's growing context: the shared system message, its record, questions and answers."""

    def __init__(self, system: str, rng: random.Random):
        self.system, self.rng = system, rng
        self.episodes = 0
        self.restart()

    def restart(self) -> None:
        self.record = random_record(self.rng)
        self.messages = [{"role": "system", "content": self.system}]
        self.episodes += 1

    def question_for(self, model: str) -> dict:
        task = model if model in TASKS else self.rng.choice(TASKS)
        question, _ = task_question(task, self.record, self.rng)
        if len(self.messages) == 1:  # the first question carries the record
            question = f"{render_record(self.record)}\n{question}"
        return {"role": "user", "content": question}


# ----- one request -----

def _classify(error: BaseException) -> str:
    if isinstance(error, httpx.TimeoutException):
        return "timeout"
    if isinstance(error, httpx.HTTPError):
        return f"transport:{type(error).__name__}"
    return f"bad-reply:{type(error).__name__}"


def _take_reply(record: RequestRecord, reply: dict) -> None:
    record.reply_ids.append(str(reply.get("id")))
    choice = (reply.get("choices") or [{}])[0]
    record.text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
    usage = reply.get("usage") or {}
    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    record.completion_tokens = int(usage.get("completion_tokens") or 0)


async def _post(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord) -> None:
    reply = await client.post(url, json=body)
    if reply.status_code != 200:
        record.fail(f"http-{reply.status_code}", reply.text)
        return
    _take_reply(record, reply.json())
    record.answered = True


async def _stream(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord, start: float) -> None:
    pieces: list[str] = []
    done = False
    async with client.stream("POST", url, json=body) as reply:
        if reply.status_code != 200:
            record.fail(f"http-{reply.status_code}", (await reply.aread()).decode(errors="replace"))
            return
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                record.fail("stream-error", json.dumps(event["error"]))
                return
            if event.get("id") is not None and str(event["id"]) not in record.reply_ids:
                record.reply_ids.append(str(event["id"]))
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and record.ttft_s is None:
                    record.ttft_s = time.perf_counter() - start
                pieces.append(piece)
            if event.get("usage"):
                record.prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
                record.completion_tokens = int(event["usage"].get("completion_tokens") or 0)
    if not done:
        record.fail("stream-error", "the stream ended without [DONE]")
        return
    record.text = "".join(pieces)
    record.answered = True


async def send(client: httpx.AsyncClient, base_url: str, record: RequestRecord, messages: list[dict],
               config: LoadConfig, t0: float) -> None:
    """Send ``record``'s request over ``messages``; fill in its one outcome."""
    common = {"model": record.model, "rid": record.rid, "max_tokens": config.max_tokens, "temperature": 0}
    if record.kind == "completion":
        url, body = f"{base_url}/v1/completions", {**common, "prompt": render_chat(messages)}
    else:
        url, body = f"{base_url}/v1/chat/completions", {**common, "messages": messages}
    if record.kind == "chat-stream":
        body.update(stream=True, stream_options={"include_usage": True})
    if record.injected == INJECTED_ABANDON:  # long enough that the client leaves first
        body.update(max_tokens=64, ignore_eos=True)
    start = time.perf_counter()
    record.start_s = start - t0
    try:
        if record.kind == "chat-stream":
            await _stream(client, url, body, record, start)
        elif record.injected == INJECTED_ABANDON:
            try:
                await asyncio.wait_for(_post(client, url, body, record), config.abandon_after_s)
            except asyncio.TimeoutError:
                record.fail(INJECTED_ABANDON, f"the client left after {config.abandon_after_s} s")
        else:
            await _post(client, url, body, record)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        record.fail(_classify(error), f"{type(error).__name__}: {error}")
    record.latency_s = time.perf_counter() - start
    if record.answered and record.reply_ids != [record.rid]:
        record.answered = False
        record.fail("id-mismatch", f"sent rid {record.rid}, the reply named {record.reply_ids}")


# ----- the sessions -----

@dataclass
class LoadState:
    records: list[RequestRecord] = field(default_factory=list)
    sequence: int = 0  # requests started, for the injection schedule
    in_flight: int = 0
    episodes: int = 0


async def _session(index: int, client: httpx.AsyncClient, base_url: str, models: list[str], system: str,
                   config: LoadConfig, state: LoadState, run_id: str, t0: float) -> None:
    rng = random.Random(f"{config.seed}-{index}")
    conversation = Conversation(system, rng)
    turn = 0
    await asyncio.sleep(rng.random() * min(2.0, config.duration_s / 10))  # a staggered start
    while time.perf_counter() - t0 < config.duration_s:
        state.sequence += 1
        injected = None
        if config.inject_every and state.sequence % config.inject_every == 0:
            injected = (INJECTED_UNKNOWN, INJECTED_ABANDON)[(state.sequence // config.inject_every) % 2]
        model = models[(index + turn) % len(models)]
        draw = rng.random()
        kind = ("chat-stream" if draw < config.stream_share else
                "completion" if draw < config.stream_share + config.completions_share else "chat")
        question = conversation.question_for(model)
        record = RequestRecord(rid=f"load-{run_id}-{index}-{turn}", session=index, turn=turn,
                               model=UNKNOWN_MODEL if injected == INJECTED_UNKNOWN else model,
                               kind="chat" if injected else kind, injected=injected)
        state.records.append(record)
        state.in_flight += 1
        try:
            await send(client, base_url, record, [*conversation.messages, question], config, t0)
        finally:
            state.in_flight -= 1
        turn += 1
        if not _as_planned(record):  # as a client would: wait a little before trying again
            await asyncio.sleep(ERROR_BACKOFF_S)
        if injected or not record.answered:
            continue
        conversation.messages += [question, {"role": "assistant", "content": record.text}]
        if record.prompt_tokens + 2 * config.max_tokens + 64 > config.max_context_tokens:
            conversation.restart()
    state.episodes += conversation.episodes


async def _progress(state: LoadState, config: LoadConfig, t0: float, stop: asyncio.Event) -> None:
    with tqdm(total=int(config.duration_s), desc="load", unit="s", disable=not config.progress,
              mininterval=1.0, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}") as bar:
        while not stop.is_set():
            elapsed = min(int(time.perf_counter() - t0), bar.total)
            bar.update(elapsed - bar.n)
            answered = sum(r.answered for r in state.records)
            errors = sum(r.error_kind is not None for r in state.records)
            bar.set_postfix_str(f"answered {answered}, errors {errors}, in flight {state.in_flight}"
                                + (" (draining)" if elapsed >= bar.total else ""), refresh=False)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


async def _run_sessions(base_url: str, models: list[str], config: LoadConfig, t0: float) -> tuple[LoadState, float]:
    state = LoadState()
    system = "Records on file:\n" + "\n".join(render_record(random_record(random.Random(f"{config.seed}-shared-{i}")))
                                             for i in range(SHARED_RECORDS))
    run_id = uuid.uuid4().hex[:8]
    # idle connections are dropped well before the router's server closes them (uvicorn: 5 s), so
    # no request is sent on a connection the server is closing (it would fail with a ReadError)
    limits = httpx.Limits(max_connections=config.sessions + 16, max_keepalive_connections=config.sessions + 16,
                          keepalive_expiry=CLIENT_KEEPALIVE_S)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        stop = asyncio.Event()
        ticker = asyncio.create_task(_progress(state, config, t0, stop))
        await asyncio.gather(*(_session(index, client, base_url, models, system, config, state, run_id, t0)
                               for index in range(config.sessions)))
        ended = time.perf_counter() - t0
        stop.set()
        await ticker
    return state, ended


def warm_up(base_url: str, models: list[str], max_tokens: int) -> None:
    """One request per model before the run, so first-request costs stay out of it."""
    for model in models:
        reply = requests.post(f"{base_url}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": "name: tom; city: oslo\nWhat is the city?"}],
            "max_tokens": max_tokens, "temperature": 0})
        if reply.status_code != 200:
            raise RuntimeError(f"warm-up request to {model} failed: HTTP {reply.status_code} {reply.text[:300]}")


# ----- the deployment -----

def router_requests_by_status(base_url: str) -> dict[str, float]:
    """``pfs_router_requests_total`` summed per ``status`` label."""
    samples = parse_prometheus(requests.get(f"{base_url}/metrics", timeout=10).text)
    totals: Counter = Counter()
    for key, value in samples.items():
        if key.startswith(ROUTER_REQUESTS + "{"):
            status = key.split('status="', 1)[1].split('"', 1)[0] if 'status="' in key else "?"
            totals[status] += value
    return dict(totals)


@contextmanager
def demo_deployment(log_dir: Path, max_total_tokens: int, launcher_args: list[str],
                    timeout_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m pfs_sglang.launch_server`` (the demo models unless ``launcher_args`` name
    others) as its own process group; yields its URL once it serves; stops it after."""
    from pfs_sglang.launch.processes import free_port

    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "pfs_sglang.launch_server", "--host", "127.0.0.1", "--port", str(port),
               "--log-dir", str(log_dir), "--max-total-tokens", str(max_total_tokens), *launcher_args]
    log_path = log_dir / "launcher.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"launch_server exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/v1/models", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the deployment did not serve within {timeout_s:.0f} s; see {log_path}")
            time.sleep(1)
        yield url, process
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=90)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def tracked_processes(base_url: str) -> list[Tracked]:
    """The router's process and each server's process tree (those on this machine), plus this one."""
    rows = requests.get(f"{base_url}/workers", timeout=10).json()["workers"]
    names: dict[int, str] = {}
    for row in rows:
        name = "prefill" if row["role"] == "prefill" else f"decode-{row['model']}"
        names[port_of(row["url"])] = name if name not in names.values() else f"{name}-{port_of(row['url'])}"
    pids = listening_pids({port_of(base_url), *names})
    tracked = [Tracked("router", pids[port_of(base_url)], tree=False)] if port_of(base_url) in pids else []
    tracked += [Tracked(name, pids[port], tree=True) for port, name in names.items() if port in pids]
    return [*tracked, Tracked("load-generator", os.getpid(), tree=False)]


# ----- checks, summary, report -----

def _stats(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)} | {"max": max(values, default=None)}


def _as_planned(record: RequestRecord) -> bool:
    """Answered, or failed the way its injection planned (an abandoned request may still be answered in time)."""
    if record.injected == INJECTED_UNKNOWN:
        return record.error_kind == "http-404"
    if record.injected == INJECTED_ABANDON:
        return record.answered or record.error_kind == INJECTED_ABANDON
    return record.answered


def summarize(config: LoadConfig, models: list[str], state: LoadState, ended_s: float,
              router_delta: dict[str, float], kv_held: dict[str, float], idle_error: str | None,
              sampler: RssSampler, tracebacks: dict[str, int] | None, deployment_alive: bool | None) -> dict:
    records = state.records
    regular = [r for r in records if not r.injected]
    answered = [r for r in regular if r.answered]
    injected = [r for r in records if r.injected]
    unexpected = [r for r in records if not _as_planned(r)]
    rids = Counter(r.rid for r in records)
    last_answer = max((r.start_s + r.latency_s for r in answered), default=ended_s)
    window = max(last_answer, 1e-9)
    abandoned = [r for r in injected if r.injected == INJECTED_ABANDON]
    abandoned_left = sum(r.error_kind == INJECTED_ABANDON for r in abandoned)
    answered_all = sum(r.answered for r in records)
    # the router counts every request it routes, but not those it rejects (400, 404) before routing
    rejected = sum(1 for r in records if r.error_kind in ("http-400", "http-404"))
    routed_sent = len(records) - rejected
    router_200 = router_delta.get("200", 0.0)

    memory = {}
    for name in sampler.samples:
        base, end = sampler.at(name, config.warmup), sampler.end(name)
        growth = None if base is None or end is None else (end - base) / MIB
        memory[name] = {"peak_mib": _mib(sampler.peak(name)), "post_warmup_mib": _mib(base), "end_mib": _mib(end),
                        "growth_mib": growth,
                        "bounded": None if name == "load-generator" or growth is None
                        else growth <= config.rss_growth_limit_mib}
    checks = {
        "each request one outcome": all(n == 1 for n in rids.values())
                                    and all(r.answered != (r.error_kind is not None) for r in records),
        "every answer names its own rid": not any(r.error_kind == "id-mismatch" for r in records),
        # every routed request once; a request abandoned before the router read it is not counted.
        # Its 200s: every answer, plus abandoned requests it had finished when the client left
        "router counted each request once": routed_sent - abandoned_left <= sum(router_delta.values()) <= routed_sent
                                            and answered_all <= router_200 <= answered_all + abandoned_left,
        "no errors beyond those injected": not unexpected,
        "no KV slot held after the run": idle_error is None and not any(kv_held.values()),
        f"RSS growth after warm-up under {config.rss_growth_limit_mib:.0f} MiB":
            bool(memory) and all(row["bounded"] is not False for row in memory.values())
            and any(row["bounded"] for row in memory.values()),
    }
    if tracebacks is not None:
        checks["no traceback in a server log"] = not any(tracebacks.values())
    if deployment_alive is not None:
        checks["deployment alive at the end"] = deployment_alive
    latencies = [r.latency_s for r in answered]
    return {
        "config": asdict(config) | {"warmup_s": config.warmup},
        "models": models,
        "duration_s": ended_s,
        "requests": {
            "sent": len(records), "routed": routed_sent, "answered": len(answered), "errors": len(unexpected),
            "injected": dict(Counter(r.injected for r in injected)),
            "injected_outcomes": dict(Counter(f"{r.injected}: {r.error_kind or 'answered'}" for r in injected)),
            "by_kind": dict(Counter(r.kind for r in regular)), "by_model": dict(Counter(r.model for r in regular)),
            "errors_by_kind": dict(Counter(r.error_kind for r in unexpected)),
            "episodes": state.episodes,
            "router_requests_delta_by_status": router_delta,
        },
        "latency_s": _stats(latencies),
        "ttft_s_streamed": _stats([r.ttft_s for r in answered if r.ttft_s is not None]),
        "throughput": {"requests_per_s": len(answered) / window,
                       "completion_tokens_per_s": sum(r.completion_tokens for r in answered) / window,
                       "mean_prompt_tokens": (sum(r.prompt_tokens for r in answered) / len(answered)) if answered
                       else None},
        "kv_tokens_held_after": kv_held,
        "idle_error": idle_error,
        "memory": memory,
        "server_log_tracebacks": tracebacks,
        "checks": checks,
        "passed": all(checks.values()),
    }


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def report_text(summary: dict) -> str:
    c, r, lat = summary["config"], summary["requests"], summary["latency_s"]
    lines = [
        f"# Load run: {c['sessions']} closed-loop sessions for {c['duration_s']:.0f} s over "
        f"{len(summary['models'])} decode models ({', '.join(summary['models'])})", "",
        f"- requests: {r['sent']} sent ({r['routed']} routed), {r['answered']} answered, {r['errors']} errors "
        f"beyond the injected ({r['errors_by_kind'] or 'none'}); injected {r['injected_outcomes'] or 'none'}",
        f"- by kind: {r['by_kind']}; by model: {r['by_model']}; conversations: {r['episodes']}",
        f"- router `{ROUTER_REQUESTS}` rose by {r['router_requests_delta_by_status']} (by status)",
        f"- latency (answered): p50 {_fmt(lat['p50'], ' s')}, p95 {_fmt(lat['p95'], ' s')}, "
        f"p99 {_fmt(lat['p99'], ' s')}, max {_fmt(lat['max'], ' s')}; streamed TTFT p50 "
        f"{_fmt(summary['ttft_s_streamed']['p50'], ' s')}, p95 {_fmt(summary['ttft_s_streamed']['p95'], ' s')}",
        f"- throughput: {summary['throughput']['requests_per_s']:.2f} requests/s, "
        f"{summary['throughput']['completion_tokens_per_s']:.1f} completion tokens/s "
        f"(mean prompt {_fmt(summary['throughput']['mean_prompt_tokens'], ' tokens', 0)}); "
        f"run {summary['duration_s']:.0f} s including the drain",
        f"- KV slots held after the run: {summary['kv_tokens_held_after']}"
        + (f" ({summary['idle_error']})" if summary["idle_error"] else ""),
        "", f"Memory (RSS; server = its process tree; bounded = end - post-warm-up ({c['warmup_s']:.0f} s into the "
            f"run) <= {c['rss_growth_limit_mib']:.0f} MiB):", "",
        "| process | peak MiB | post-warm-up MiB | end MiB | growth MiB | bounded |", "|---|---|---|---|---|---|"]
    for name, row in summary["memory"].items():
        bounded = "-" if row["bounded"] is None else ("yes" if row["bounded"] else "NO")
        lines.append(f"| {name} | {_fmt(row['peak_mib'], '', 0)} | {_fmt(row['post_warmup_mib'], '', 0)} | "
                     f"{_fmt(row['end_mib'], '', 0)} | {_fmt(row['growth_mib'], '', 1)} | {bounded} |")
    if summary["server_log_tracebacks"] is not None:
        lines += ["", f"Tracebacks in the deployment's logs: {summary['server_log_tracebacks']}"]
    lines += ["", "Checks:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in summary["checks"].items()]
    return "\n".join(lines) + "\n"


def plot(records: list[RequestRecord], sampler: RssSampler, config: LoadConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for kind, color in (("chat", "tab:blue"), ("chat-stream", "tab:green"), ("completion", "tab:orange")):
        points = [(r.start_s + r.latency_s, r.latency_s) for r in records if r.answered and not r.injected
                  and r.kind == kind]
        if points:
            top.scatter(*zip(*points), s=4, alpha=0.4, color=color, label=kind)
    failed = [(r.start_s + (r.latency_s or 0), r.latency_s or 0) for r in records if r.error_kind]
    if failed:
        top.scatter(*zip(*failed), s=16, marker="x", color="tab:red", label="injected / error")
    answered = sorted((r.start_s + r.latency_s, r.latency_s) for r in records if r.answered and not r.injected)
    if answered:
        step = 5.0
        edges = [step * i for i in range(int(answered[-1][0] // step) + 2)]
        for q, style in ((50, "-"), (95, "--")):
            xs, ys = [], []
            for low in edges:
                window = [lat for when, lat in answered if low <= when < low + step]
                if window:
                    xs.append(low + step / 2)
                    ys.append(percentile(window, q))
            top.plot(xs, ys, style, color="black", label=f"p{q} per {step:.0f} s")
    top.set_ylabel("latency (s), by time answered")
    top.legend(loc="upper left", fontsize=8, markerscale=3)
    for name, series in sampler.samples.items():
        base = sampler.at(name, config.warmup)
        if series and base is not None and name != "load-generator":
            bottom.plot([t for t, _ in series], [(rss - base) / MIB for _, rss in series],
                        label=f"{name} ({base / MIB:.0f} MiB after warm-up)")
    bottom.axhline(config.rss_growth_limit_mib, color="tab:red", linestyle="--", label="growth limit")
    bottom.set_ylabel("RSS change from the post-warm-up sample (MiB)")
    bottom.set_xlabel("seconds from the start of the run")
    bottom.legend(loc="upper left", fontsize=8)
    for axis in (top, bottom):
        axis.axvline(config.warmup, color="gray", linestyle=":")
        axis.axvline(config.duration_s, color="gray", linestyle="--")
    top.set_title(f"{config.sessions} closed-loop sessions, {config.duration_s:.0f} s "
                  "(dotted: end of warm-up; dashed: last new request)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----- the whole run -----

def run_load(base_url: str, config: LoadConfig, out: Path, models: list[str] | None = None,
             log_dir: Path | None = None, deployment: subprocess.Popen | None = None) -> dict:
    """Drive ``base_url`` with ``config``'s sessions; check, write DIR/summary.json, report.md, load.png."""
    out.mkdir(parents=True, exist_ok=True)
    served = [card["id"] for card in requests.get(f"{base_url}/v1/models", timeout=10).json()["data"]]
    models = models or served
    missing = sorted(set(models) - set(served))
    if missing:
        raise ValueError(f"models {missing} are not served by {base_url} (it serves {served})")
    warm_up(base_url, models, config.max_tokens)
    before = router_requests_by_status(base_url)
    t0 = time.perf_counter()
    with RssSampler(tracked_processes(base_url), t0) as sampler:
        state, ended = asyncio.run(_run_sessions(base_url, models, config, t0))
        idle_error = None
        try:
            wait_deployment_idle(base_url, config.idle_timeout_s)
        except TimeoutError as error:
            idle_error = str(error)
        kv_held = {url: tokens for url, (_, tokens) in held_by_workers(base_url).items()}
    after = router_requests_by_status(base_url)
    delta = {status: after.get(status, 0.0) - before.get(status, 0.0) for status in sorted({*before, *after})}
    delta = {status: value for status, value in delta.items() if value}
    tracebacks = None
    if log_dir is not None:
        tracebacks = {log.name: log.read_text(errors="replace").count("Traceback")
                      for log in sorted(log_dir.glob("*.log"))}
    alive = None if deployment is None else deployment.poll() is None
    summary = summarize(config, models, state, ended, delta, kv_held, idle_error, sampler, tracebacks, alive)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report_text(summary))
    with open(out / "errors.jsonl", "w") as errors:
        for record in state.records:
            if record.error_kind:
                errors.write(json.dumps(asdict(record)) + "\n")
    plot(state.records, sampler, config, out / "load.png")
    return summary


def build_parser() -> argparse.ArgumentParser:
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(
        prog="python -m pfs_sglang.bench load",
        description="Closed-loop agent sessions against a PrefillShare router; checks exactly-once answers, "
                    "no leaked KV slot and bounded memory. Launcher flags for the started deployment go after --.")
    parser.add_argument("--sessions", type=int, default=defaults.sessions)
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds new requests are sent")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--url", help="a running router (default: start the demo deployment)")
    parser.add_argument("--models", help="comma-separated decode models to rotate over (default: every served one)")
    parser.add_argument("--max-total-tokens", type=int, default=131072,
                        help="KV pool of each server of the started deployment")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--log-dir", type=Path, help="the started deployment's logs (default DIR/logs)")
    parser.add_argument("--warmup", type=float, help="seconds into the run of the post-warm-up RSS sample "
                                                     "(default a quarter of --duration, at most 30)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--max-context-tokens", type=int, default=defaults.max_context_tokens,
                        help="a session whose prompt comes near this starts a new conversation")
    parser.add_argument("--stream-share", type=float, default=defaults.stream_share)
    parser.add_argument("--completions-share", type=float, default=defaults.completions_share)
    parser.add_argument("--inject-every", type=int, default=defaults.inject_every,
                        help="every Nth request is an injected error (0: none)")
    parser.add_argument("--abandon-after", type=float, default=defaults.abandon_after_s)
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s)
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s)
    parser.add_argument("--rss-growth-limit", type=float, default=defaults.rss_growth_limit_mib, metavar="MIB")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    config = LoadConfig(
        sessions=args.sessions, duration_s=args.duration, warmup_s=args.warmup, max_tokens=args.max_tokens,
        max_context_tokens=args.max_context_tokens, stream_share=args.stream_share,
        completions_share=args.completions_share, inject_every=args.inject_every,
        abandon_after_s=args.abandon_after, request_timeout_s=args.request_timeout, idle_timeout_s=args.idle_timeout,
        rss_growth_limit_mib=args.rss_growth_limit, seed=args.seed, progress=not args.no_progress)
    models = [name for name in args.models.split(",") if name] if args.models else None
    try:
        config.validate()
        if args.url:
            summary = run_load(args.url.rstrip("/"), config, args.out, models)
        else:
            log_dir = args.log_dir or args.out / "logs"
            print(f"pfs_sglang.bench load: starting the deployment (logs in {log_dir})", flush=True)
            with demo_deployment(log_dir, args.max_total_tokens, launcher_args, args.startup_timeout) as (url, process):
                print(f"pfs_sglang.bench load: serving on {url}", flush=True)
                summary = run_load(url, config, args.out, models, log_dir, process)
    except (ValueError, RuntimeError) as error:
        print(f"pfs_sglang.bench load: {error}", file=sys.stderr)
        return 2
    print(report_text(summary))
    print(f"pfs_sglang.bench load: wrote {args.out}/summary.json, report.md, load.png, errors.jsonl")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    from pfs_sglang.launch.processes import exit_on_stop_signals

    exit_on_stop_signals()  # SIGTERM stops what the command started, as Ctrl-C does
    sys.exit(main())
