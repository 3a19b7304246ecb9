"""Router logic without SGLang: prefix locality across models, least-loaded, error bodies."""

from __future__ import annotations

from fastapi.testclient import TestClient

from pfs_sglang.router import RouterConfig, build_router_app
from pfs_sglang.router.pools import DecodePool, PrefillWorker, PrefixLocality, Worker
from sglang_process import free_port


def test_prefix_locality_sends_a_shared_prefix_to_one_replica():
    workers = [PrefillWorker(url=f"http://p{i}", bootstrap_port=i) for i in range(3)]
    locality = PrefixLocality(workers, block_chars=16)
    context = "shared agent context " * 20
    first = locality.choose(context + "question for the planner")
    workers[workers.index(first)].in_flight = 50  # busiest replica still wins on a long shared prefix
    assert locality.choose(context + "question for the coder") is first
    other = locality.choose("an unrelated conversation " * 10)
    assert other is not first  # no shared prefix: least loaded


def test_decode_pool_picks_least_loaded():
    pool = DecodePool("m", [Worker("http://a", in_flight=3), Worker("http://b", in_flight=1)])
    assert pool.least_loaded().url == "http://b"


def _client(decode_url: str) -> TestClient:
    config = RouterConfig(
        prefill_workers=[PrefillWorker(url=decode_url, bootstrap_port=1)],
        decode_pools={"coder": DecodePool("coder", [Worker(decode_url)])},
        default_model="coder", kv_bytes_per_token=256, request_timeout_s=5,
    )
    return TestClient(build_router_app(config))


def test_bad_requests_get_openai_errors():
    with _client(f"http://127.0.0.1:{free_port()}") as client:
        unknown = client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        assert unknown.json()["error"]["param"] == "model"
        bad_json = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
        no_model = client.post("/v1/completions", json={"prompt": "hi"})
        assert no_model.status_code == 400 and "'model'" in no_model.json()["error"]["message"]
        many = client.post("/v1/completions", json={"model": "coder", "prompt": "hi", "n": 2})
        assert many.status_code == 400


def test_unreachable_backend_is_503_not_a_hang():
    with _client(f"http://127.0.0.1:{free_port()}") as client:
        reply = client.post("/v1/chat/completions", json={"model": "coder", "messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 503
        assert "unreachable" in reply.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["coder"]
