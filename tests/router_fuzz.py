"""Hostile request bodies for the router's endpoints (hypothesis strategies) and the
property every answer must have: a client mistake is a 4xx with an OpenAI error body,
never a 5xx, never a hang.

Bodies are mostly-valid requests with fields replaced by arbitrary JSON (wrong types,
huge numbers, unicode, deep nesting), unknown fields added, or whole bodies that are
arbitrary JSON or not JSON at all. Generation stays short (``max_tokens`` and ``n`` are
either tiny or absurd), so a run is quick against real servers.
"""

from __future__ import annotations

import json

import httpx
from hypothesis import strategies as st

CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"

json_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=16)
# Numbers a client may send for a count or a length: tiny and valid, or absurd.
counts = st.sampled_from([0, 1, 2, -1, 2 ** 31, 2 ** 63, 10 ** 30, 1.5, "3", None, True])


def valid_body(endpoint: str, model: str) -> dict:
    if endpoint == CHAT:
        return {"model": model, "messages": [{"role": "user", "content": "name: tom"}], "max_tokens": 2}
    if endpoint == COMPLETIONS:
        return {"model": model, "prompt": "name: tom", "max_tokens": 2}
    return {"model": model, "text": "name: tom", "sampling_params": {"max_new_tokens": 2}}


FIELDS = {
    CHAT: ["model", "messages", "max_tokens", "n", "temperature", "top_p", "stop", "stream", "logprobs",
           "top_logprobs", "response_format", "tools", "seed", "rid", "stream_options"],
    COMPLETIONS: ["model", "prompt", "max_tokens", "n", "temperature", "stop", "stream", "logprobs", "echo",
                  "rid", "suffix", "regex"],
    GENERATE: ["model", "text", "input_ids", "sampling_params", "stream", "return_logprob", "logprob_start_len",
               "top_logprobs_num", "rid", "lora_path"],
}
SAMPLING = ["max_new_tokens", "n", "temperature", "top_k", "stop", "regex", "json_schema", "min_new_tokens"]


@st.composite
def hostile_requests(draw, model: str) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from([CHAT, COMPLETIONS, GENERATE]))
    kind = draw(st.sampled_from(["field", "field", "field", "counts", "unknown", "whole", "bytes"]))
    body = valid_body(endpoint, model)
    if kind == "field":
        for field in draw(st.lists(st.sampled_from(FIELDS[endpoint]), min_size=1, max_size=3, unique=True)):
            body[field] = draw(json_values)
    elif kind == "counts":
        if endpoint == GENERATE:
            body["sampling_params"] = {name: draw(counts) for name in draw(st.lists(
                st.sampled_from(SAMPLING), min_size=1, max_size=3, unique=True))}
        else:
            body.update({name: draw(counts) for name in ("max_tokens", "n") if draw(st.booleans())})
    elif kind == "unknown":
        body[draw(st.text(min_size=1, max_size=20))] = draw(json_values)
    elif kind == "whole":
        return endpoint, json.dumps(draw(json_values)).encode()
    else:
        return endpoint, draw(st.binary(max_size=200))
    return endpoint, json.dumps(body).encode()


def check_answer(client: httpx.Client, url: str, endpoint: str, raw: bytes) -> httpx.Response:
    """Send one body; a 5xx, a hang (past the client's timeout) or a 4xx without an
    OpenAI error body fails."""
    reply = client.post(url + endpoint, content=raw, headers={"content-type": "application/json"})
    assert reply.status_code < 500, (endpoint, raw[:300], reply.status_code, reply.text[:500])
    if reply.status_code >= 400:
        error = reply.json().get("error")
        assert isinstance(error, dict) and error.get("message"), (endpoint, raw[:300], reply.text[:500])
    return reply
