"""Batches, ``n > 1`` and the SGLang endpoints of the router, against stand-in servers.

The stand-ins of ``test_router.py`` echo each prompt, so every check can tell which
sub-request a reply answers: one PD hand-off per prompt and sample (own bootstrap
room, ``n`` taken out), SGLang's order (prompt-major) and shapes (a list for
``/generate``, indexed choices and per-prompt usage for OpenAI), merged streams, a
failing sub-request failing the whole request at once with every lease released,
the samples of one prompt held back until its prefill has answered, ``/abort_request``
reaching the sub-requests (of the request named, not another whose rid begins the same;
every sub-request of a list-rid batch when its client leaves), ``/health_generate``
through every server, and OpenAI 404s for paths the router does not serve. Shapes against a real SGLang server:
``test_router_sglang_shapes.py``.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_router import Cluster, chat, cluster

MAX_PENDING_S = 5.0


def hand_offs(c: Cluster, path: str) -> list[dict]:
    """The bodies the decode stand-ins received on ``path``, checked to pair with a prefill body."""
    decode = [body for pool in c.decode.values() for s in pool for p, body in s.bodies if p == path]
    deadline = time.monotonic() + MAX_PENDING_S  # a prefill body may land after the decode reply
    while True:
        prefill_rooms = {body["bootstrap_room"] for s in c.prefill for p, body in s.bodies if p == path}
        if {body["bootstrap_room"] for body in decode} <= prefill_rooms or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert {body["bootstrap_room"] for body in decode} <= prefill_rooms
    return decode


def wait_idle(c: Cluster) -> list[dict]:
    """Wait until the router holds no lease on any server; the /workers rows."""
    deadline = time.monotonic() + MAX_PENDING_S
    while True:
        rows = httpx.get(c.router + "/workers", timeout=5).json()["workers"]
        if all(row["in_flight"] == 0 for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def sse_events(reply: httpx.Response) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in reply.iter_lines() if line.startswith("data: ")]


# ----- /generate -----

def test_generate_batch_with_n_is_one_hand_off_per_prompt_and_sample_in_sglang_order():
    with cluster(decode_counts={"coder": 2}) as c:
        body = {"model": "coder", "text": ["p0", "p1"], "rid": "job",
                "sampling_params": [{"n": 2, "max_new_tokens": 3}, {"n": 2, "max_new_tokens": 5}],
                "return_logprob": [True, False], "logprob_start_len": 4, "top_logprobs_num": 2}
        reply = c.post("/generate", body)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert isinstance(answer, list)
        assert [item["echo"] for item in answer] == ["p0", "p0", "p1", "p1"]  # each prompt's samples together
        assert [item["meta_info"]["id"] for item in answer] == ["job_0", "job_1", "job_2", "job_3"]
        sent = sorted(hand_offs(c, "/generate"), key=lambda b: b["rid"])
        assert len(sent) == 4 and len({b["bootstrap_room"] for b in sent}) == 4
        assert [b["text"] for b in sent] == ["p0", "p0", "p1", "p1"]
        assert [b["sampling_params"] for b in sent] == [{"max_new_tokens": 3}] * 2 + [{"max_new_tokens": 5}] * 2
        assert [b["return_logprob"] for b in sent] == [True, True, False, False]
        assert all(b["logprob_start_len"] == 4 and b["top_logprobs_num"] == 2 and "model" not in b for b in sent)
        # sub-requests spread over replicas (least requests in flight: on a loaded box one may finish
        # before the next is placed, so 1 + 3 is as right as 2 + 2; a suite run on the 2-core box saw it)
        per_replica = [len(s.bodies) for s in c.decode["coder"]]
        assert sum(per_replica) == 4 and min(per_replica) >= 1, per_replica


def test_generate_shapes_single_batch_of_one_n_and_input_ids():
    with cluster() as c:
        single = c.post("/generate", {"text": "a"}).json()
        assert isinstance(single, dict) and single["echo"] == "a"
        batch_of_one = c.post("/generate", {"text": ["a"]}).json()
        assert isinstance(batch_of_one, list) and [item["echo"] for item in batch_of_one] == ["a"]
        n_of_one_prompt = c.post("/generate", {"input_ids": [5, 6, 7], "sampling_params": {"n": 3}}).json()
        assert [item["echo"] for item in n_of_one_prompt] == [[5, 6, 7]] * 3
        ids_batch = c.post("/generate", {"input_ids": [[1, 2], [3]], "token_ids_logprob": [[9], [8]]}).json()
        assert [item["echo"] for item in ids_batch] == [[1, 2], [3]]
        sent = hand_offs(c, "/generate")
        assert [b.get("token_ids_logprob") for b in sent[-2:]] == [[9], [8]]
        assert all("n" not in b.get("sampling_params", {}) for b in sent)


def test_generate_batch_stream_gives_every_event_its_index_and_one_done():
    with cluster() as c:
        body = {"text": ["x", "y"], "sampling_params": {"n": 2}, "stream": True}
        with httpx.stream("POST", c.router + "/generate", json=body, timeout=20) as reply:
            assert reply.status_code == 200
            events = sse_events(reply)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        by_index: dict[int, list[str]] = {}
        for event in events[:-1]:
            by_index.setdefault(event["index"], []).append(event["text"])
            assert event["echo"] == ["x", "x", "y", "y"][event["index"]]
        assert by_index == {k: ["one", "one two"] for k in range(4)}
        assert wait_idle(c) and all(row["in_flight"] == 0 for row in wait_idle(c))


# ----- OpenAI -----

def test_completions_prompt_list_with_n_indexes_choices_prompt_major_and_counts_each_prompt_once():
    with cluster() as c:
        c.decode["coder"][0].cached_tokens = 4
        reply = c.post("/v1/completions", {"model": "coder", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 3})
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert [choice["index"] for choice in answer["choices"]] == list(range(6))
        assert [choice["echo"] for choice in answer["choices"]] == ["a", "a", "b", "b", "c", "c"]
        # SGLang's UsageProcessor: prompt (and cached) tokens once per prompt, completion tokens of all samples
        assert answer["usage"]["prompt_tokens"] == 3 * 10 and answer["usage"]["completion_tokens"] == 6 * 3
        assert answer["usage"]["total_tokens"] == 30 + 18
        assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 3 * 4}
        sent = hand_offs(c, "/v1/completions")
        assert sorted(b["prompt"] for b in sent) == ["a", "a", "b", "b", "c", "c"]
        assert all("n" not in b and b["model"] == "coder" for b in sent)
        token_prompts = c.post("/v1/completions", {"model": "coder", "prompt": [[1, 2], [3]]}).json()
        assert [choice["echo"] for choice in token_prompts["choices"]] == [[1, 2], [3]]


def test_chat_n_streams_every_choice_with_its_index_and_one_merged_usage():
    with cluster() as c:
        body = chat("coder", "hi", n=3, stream=True, stream_options={"include_usage": True})
        with httpx.stream("POST", c.router + "/v1/chat/completions", json=body, timeout=20) as reply:
            assert reply.status_code == 200
            events = sse_events(reply)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        words: dict[int, list[str]] = {}
        for event in events[:-2]:
            (choice,) = event["choices"]
            words.setdefault(choice["index"], []).append(choice["delta"]["content"])
        assert words == {k: ["one", "two", "three"] for k in range(3)}
        usage_events = [e for e in events[:-1] if e.get("usage")]
        assert usage_events == [events[-2]]  # the per-sample usage events became one, at the end
        assert events[-2]["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19,
                                       "prompt_tokens_details": {"cached_tokens": 0}}
        plain = c.post("/v1/chat/completions", chat("coder", "hi", n=2)).json()
        assert [choice["index"] for choice in plain["choices"]] == [0, 1]


# ----- failures, concurrency, abort -----

def test_one_failing_sample_fails_the_request_at_once_and_releases_every_lease():
    with cluster(decode_counts={"coder": 1}) as c:
        decode = c.decode["coder"][0]
        decode.delay_s, decode.fail_status = 3, 503
        decode.fails = lambda body: body["text"] == "bad"
        for stream in (False, True):
            started = time.monotonic()
            reply = c.post("/generate", {"text": ["good", "bad", "good too"], "stream": stream})
            assert time.monotonic() - started < 3 + 1.5  # did not wait for anything after the failure
            assert reply.status_code == 503 and "coder-0 failed" in reply.json()["error"]["message"]
            rows = wait_idle(c)
            assert all(row["in_flight"] == 0 for row in rows), rows


def test_a_sub_stream_error_ends_the_merged_stream_with_that_error():
    with cluster() as c:
        decode = c.decode["coder"][0]
        decode.stream_gap_s = 0.3
        with ThreadPoolExecutor(1) as pool:
            body = {"text": ["a", "b"], "stream": True}
            opened = pool.submit(lambda: httpx.post(c.router + "/generate", json=body, timeout=20))
            deadline = time.monotonic() + 10
            while len([path for path, _ in decode.bodies if path == "/generate"]) < 2:  # both sub-streams opened
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.05)  # and their first events sent; now their server fails them mid-stream
            decode.fail_status = 500
            reply = opened.result()
        assert reply.status_code == 200
        events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "coder-0 failed mid-stream" in events[-2]
        assert len(events) == 2 + 2  # the first event of each sub-stream, the error, [DONE]
        assert wait_idle(c) and all(row["in_flight"] == 0 for row in wait_idle(c))


def test_samples_of_one_prompt_wait_for_its_prefill_while_other_prompts_start_at_once():
    with cluster() as c:
        prefill = c.prefill[0]
        prefill.delay_s = 0.6
        reply = c.post("/generate", {"text": ["shared", "other"], "sampling_params": {"n": 3}})
        assert reply.status_code == 200
        deadline = time.monotonic() + MAX_PENDING_S
        while len(prefill.bodies) < 6:  # the last prefill bodies may land after the decode replies
            assert time.monotonic() < deadline
            time.sleep(0.02)
        arrivals = {}
        for (_, body), at in zip(prefill.bodies, prefill.arrivals):
            arrivals.setdefault(body["text"], []).append(at)
        for text in ("shared", "other"):
            leader, *followers = sorted(arrivals[text])
            assert len(followers) == 2 and min(followers) - leader >= 0.55, (text, arrivals)
        assert abs(min(arrivals["shared"]) - min(arrivals["other"])) < 0.3  # distinct prompts: no waiting


def test_abort_by_client_rid_reaches_every_server_and_every_sub_request():
    with cluster(decode_counts={"coder": 1, "critic": 1}) as c:
        c.decode["coder"][0].delay_s = 1.5
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(c.post, "/generate", {"model": "coder", "text": "long", "rid": "job",
                                                        "sampling_params": {"n": 2}})
            deadline = time.monotonic() + MAX_PENDING_S
            while len(c.decode["coder"][0].bodies) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert c.post("/abort_request", {"rid": "job"}).status_code == 200
            running.result()
        servers = [*c.prefill, *c.decode["coder"], *c.decode["critic"]]
        for server in servers:
            aborted = sorted(body["rid"] for path, body in server.bodies if path == "/abort_request")
            assert aborted == ["job", "job_0", "job_1"], (server.name, aborted)
        assert c.post("/abort_request", {"abort_all": True}).status_code == 200
        assert all(("/abort_request", {"abort_all": True}) in s.bodies for s in servers)
        assert c.post("/abort_request", {}).status_code == 400


def aborted_rids(c: Cluster) -> dict[str, list[str]]:
    """The rids each server was asked to abort, by server name."""
    servers = [*c.prefill, *(s for pool in c.decode.values() for s in pool)]
    return {s.name: sorted(body["rid"] for path, body in s.bodies if path == "/abort_request") for s in servers}


def wait_for_hand_offs(c: Cluster, count: int) -> None:
    deadline = time.monotonic() + MAX_PENDING_S
    while len([p for p, _ in c.decode["coder"][0].bodies if p == "/generate"]) < count:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_abort_by_client_rid_spares_another_clients_request_whose_rid_extends_it():
    with cluster() as c:
        c.decode["coder"][0].delay_s = 1.5
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(c.post, "/generate", {"model": "coder", "text": "long", "rid": rid,
                                                         "sampling_params": {"n": 2}}) for rid in ("job", "job_2")]
            wait_for_hand_offs(c, 4)
            assert c.post("/abort_request", {"rid": "job"}).status_code == 200
            for reply in running:
                reply.result()
        assert all(rids == ["job", "job_0", "job_1"] for rids in aborted_rids(c).values()), aborted_rids(c)


def test_a_client_that_leaves_a_batch_with_list_rids_has_every_sub_request_aborted():
    with cluster() as c:
        c.decode["coder"][0].delay_s = 1.5
        body = {"model": "coder", "text": ["first", "second"], "rid": ["a", "b"], "sampling_params": {"n": 2}}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(c.router + "/generate", json=body, timeout=0.5)  # the client leaves
        deadline = time.monotonic() + MAX_PENDING_S
        while any(len(rids) < 4 for rids in aborted_rids(c).values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(rids == ["a_0", "a_1", "b_0", "b_1"] for rids in aborted_rids(c).values()), aborted_rids(c)


# ----- SGLang endpoints -----

def test_health_generate_is_a_one_token_hand_off_reaching_every_server():
    with cluster(prefill_count=2, decode_counts={"coder": 2, "critic": 1}) as c:
        assert httpx.get(c.router + "/health_generate", timeout=30).status_code == 200
        sent = hand_offs(c, "/generate")
        assert len(sent) == 3 and all(body["sampling_params"]["max_new_tokens"] == 1 for body in sent)
        assert all(len(server.bodies) == 1 for server in [*c.decode["coder"], *c.decode["critic"]])
        assert all(server.bodies for server in c.prefill)  # 3 hand-offs over 2 prefill servers
        c.decode["critic"][0].fail_status = 500
        failed = httpx.get(c.router + "/health_generate", timeout=30)
        assert failed.status_code == 503 and c.decode["critic"][0].url in failed.json()["error"]["message"]


def test_sglang_info_endpoints_and_unknown_paths():
    with cluster(decode_counts={"coder": 1}) as c:
        for path in ("/get_model_info", "/model_info"):
            assert httpx.get(c.router + path, timeout=5).json() == {"model_path": "/models/coder-0"}
        for method, path in (("GET", "/get_load"), ("POST", "/update_weights_from_disk"), ("GET", "/version")):
            reply = httpx.request(method, c.router + path, timeout=5)
            assert reply.status_code == 404, path
            assert reply.json()["error"]["type"] == "invalid_request_error" and path in reply.json()["error"]["message"]
