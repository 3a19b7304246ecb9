"""A failed or late KV hand-off fails that request with a clear error and leaks no slot.

Three cases against a real deployment (prefill server + one decode server, zmq backend):
a decode server whose model was trained against another prefill module is refused at
the hand-off (invariant 4), a decode request whose prefill half never arrives fails by
its deadline, and a prefill whose KV write is held past the decode side's deadline (the
engine's fault-injection knob, for one bootstrap room) has that late write refused.
Afterwards every server's KV pool holds no request's slots.
"""

from __future__ import annotations

import concurrent.futures
import random
import time

import pytest
import requests

from pfs_sglang.identity import fingerprint_of, write_decode_module_record
from pfs_sglang.launch import Deployment, DecodeModelSpec, Topology
from pfs_sglang.launch.processes import ManagedProcess, free_port, wait_until_healthy
from pfs_sglang.launch.server_commands import ServerPorts, decode_server_command
from pfs_sglang.launch.deployment import child_env
from pfs_sglang.models.demo import write_perturbed_decode_module
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from pfs_sglang.transfer import FAULT_STALL_ENV
from sglang_process import generate_greedy, used_kv_tokens

TRANSFER_TIMEOUT_S = 8
# Fault injection: the prefill server holds its KV writes for this one room past the decode
# side's deadline (the decode server gives the request up and frees its slots meanwhile).
STALLED_ROOM = 4_242_424_242
STALL_S = TRANSFER_TIMEOUT_S + 6
LATE_WRITE_REFUSED = "is no longer receiving (late write refused)"


def assert_pools_idle(urls: list[str]) -> None:
    deadline = time.monotonic() + 30
    while any(used_kv_tokens(url) for url in urls):
        assert time.monotonic() < deadline, {url: used_kv_tokens(url) for url in urls}
        time.sleep(1)


@pytest.fixture(scope="module")
def deployment(demo_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("failure_logs")
    topology = Topology(
        base_model=demo_models.base, decode_models=(DecodeModelSpec("extract", demo_models.decode["extract"]),),
        port=free_port(), log_dir=logs, transfer_timeout_s=TRANSFER_TIMEOUT_S,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAULT_STALL_ENV, f"{STALLED_ROOM}:{STALL_S}")  # inherited by the servers
        with Deployment(topology) as running:
            yield running


@pytest.fixture(scope="module")
def foreign_decode_server(deployment, demo_models, tmp_path_factory):
    """A decode server (started by hand: the launcher would refuse it) for a foreign decode module."""
    root = tmp_path_factory.mktemp("foreign")
    other_base = write_perturbed_decode_module(demo_models.base, root / "other_base", seed=21)
    foreign = write_perturbed_decode_module(demo_models.base, root / "foreign", seed=22)
    write_decode_module_record(foreign, fingerprint_of(other_base))
    port = free_port()
    t = deployment.topology
    server = ManagedProcess(
        name="foreign-decode", log_path=root / "foreign-decode.log", url=f"http://127.0.0.1:{port}",
        command=decode_server_command("foreign", foreign, t.server_host, ServerPorts(http=port), t.transfer_backend,
                                      t.device, t.max_total_tokens),
        env=child_env(t.server_host, TRANSFER_TIMEOUT_S, deployment.kv_secret),
    )
    server.start()
    try:
        wait_until_healthy([server], 300)
        yield server.url
    finally:
        server.stop()


def _pd_body(deployment: Deployment) -> dict:
    prefill = requests.get(f"{deployment.url}/workers", timeout=10).json()["workers"][0]
    return {"input_ids": list(range(20, 60)), "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill["bootstrap_port"],
            "bootstrap_room": random.getrandbits(63)}, prefill["url"]


def test_foreign_prefill_module_is_refused_at_the_handoff(deployment, foreign_decode_server):
    body, prefill_url = _pd_body(deployment)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        prefill = pool.submit(requests.post, f"{prefill_url}/generate", json=body, timeout=120)
        decode = pool.submit(requests.post, f"{foreign_decode_server}/generate", json=body, timeout=120)
        decode_reply, prefill_reply = decode.result(), prefill.result()
    assert decode_reply.status_code >= 400 and prefill_reply.status_code >= 400
    assert "KV hand-off refused: prefill_fingerprint differs" in decode_reply.text
    assert_pools_idle([prefill_url, foreign_decode_server])


def test_missing_prefill_half_fails_by_the_deadline(deployment):
    body, prefill_url = _pd_body(deployment)
    decode_url = next(w["url"] for w in requests.get(f"{deployment.url}/workers", timeout=10).json()["workers"]
                      if w["role"] == "decode")
    started = time.monotonic()
    reply = requests.post(f"{decode_url}/generate", json=body, timeout=120)  # the prefill half is never sent
    assert reply.status_code >= 400
    assert time.monotonic() - started < TRANSFER_TIMEOUT_S + 30
    assert_pools_idle([prefill_url, decode_url])
    # and the deployment still serves
    ok = requests.post(f"{deployment.url}/generate", json={
        "model": "extract", "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}},
        timeout=60)
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 3


def test_a_kv_write_after_the_decode_deadline_is_refused_and_the_deployment_serves_on(deployment, demo_models):
    body, prefill_url = _pd_body(deployment)
    body["bootstrap_room"] = STALLED_ROOM
    decode_url = next(w["url"] for w in requests.get(f"{deployment.url}/workers", timeout=10).json()["workers"]
                      if w["role"] == "decode")
    decode_log = deployment.log_dir / "decode-extract-0.log"
    refusals_before = decode_log.read_text(errors="replace").count(LATE_WRITE_REFUSED)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        prefill = pool.submit(requests.post, f"{prefill_url}/generate", json=body, timeout=120)
        decode = pool.submit(requests.post, f"{decode_url}/generate", json=body, timeout=120)
        decode_reply = decode.result()
        decode_s = time.monotonic() - started
        prefill_reply = prefill.result()
    # the decode side gave up by its deadline, before the held write went out
    assert decode_reply.status_code >= 400 and decode_s < TRANSFER_TIMEOUT_S + 30, (decode_s, decode_reply.text)
    assert prefill_reply.status_code >= 400, prefill_reply.text
    # the held write goes out after both halves failed, and is refused: it never lands in the
    # freed (maybe reused) slots
    deadline = time.monotonic() + STALL_S + 30
    while decode_log.read_text(errors="replace").count(LATE_WRITE_REFUSED) == refusals_before:
        assert time.monotonic() < deadline, "the held KV write was never refused"
        time.sleep(0.5)
    assert decode_log.read_text(errors="replace").count(LATE_WRITE_REFUSED) == refusals_before + 1
    assert_pools_idle([prefill_url, decode_url])
    # the refusal failed that request only: the decode server is not marked dead, greedy output is exact
    prompt_ids = list(range(20, 60))
    served = generate_greedy(deployment.url, "extract", prompt_ids, 6)["output_ids"]
    reference = prefillshare_greedy(demo_models.base, demo_models.decode["extract"], prompt_ids, 6)
    assert first_real_divergence(served, reference) is None, (served, reference.output_ids)
