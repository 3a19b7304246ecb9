"""Faults on real processes, all on one deployment: failed or late KV hand-offs, and
servers killed while serving (issue 10, item 1).

The deployment (``Deployment``, as the launcher runs it with ``--restart-on-failure``:
a thread here calls ``supervise()`` every half second, as the launcher's loop does every
second) serves the demo ``extract`` model with one prefill server and two decode
replicas, a KV hand-off deadline of 8 s, and the engine's fault-injection knob holding
the prefill's KV writes for one bootstrap room past that deadline. In file order:

- a decode server whose model was trained against another prefill module is refused at
  the hand-off (invariant 4);
- a decode request whose prefill half never arrives fails by its deadline;
- a KV write held past the decode side's deadline is refused when it comes, so it never
  lands in the freed (maybe reused) slots, and the deployment serves on, exact;
- a decode replica killed (SIGKILL, its whole process group) mid-request: that request
  fails within seconds, the other replica's finishes, new requests go to the other
  replica, the dead one is restarted and rejoins the rotation;
- the prefill server killed: every request gets 503 with an OpenAI error body at once;
  after its restart service resumes, exact, with the same decode processes.

After each, every server's KV pool holds no request's slots.
"""

from __future__ import annotations

import concurrent.futures
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pfs_sglang.identity import fingerprint_of, write_decode_module_record
from pfs_sglang.launch import Deployment, DecodeModelSpec, Topology
from pfs_sglang.launch.deployment import child_env
from pfs_sglang.launch.processes import ManagedProcess, free_port, wait_until_healthy
from pfs_sglang.launch.server_commands import ServerPorts, decode_server_command
from pfs_sglang.launch.supervision import SupervisionStep
from pfs_sglang.models.demo import write_perturbed_decode_module
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from pfs_sglang.transfer import FAULT_STALL_ENV
from sglang_process import Supervised, generate_greedy, used_kv_tokens, wait_deployment_idle

pytestmark = pytest.mark.server

MODEL = "extract"
TRANSFER_TIMEOUT_S = 8
# Fault injection: the prefill server holds its KV writes for this one room past the decode
# side's deadline (the decode server gives the request up and frees its slots meanwhile).
STALLED_ROOM = 4_242_424_242
STALL_S = TRANSFER_TIMEOUT_S + 6
LATE_WRITE_REFUSED = "is no longer receiving (late write refused)"
PROMPT = [(7 * i) % 150 + 20 for i in range(48)]


def assert_pools_idle(urls: list[str]) -> None:
    deadline = time.monotonic() + 30
    while any(used_kv_tokens(url) for url in urls):
        assert time.monotonic() < deadline, {url: used_kv_tokens(url) for url in urls}
        time.sleep(1)


def foreign_decode_process(deployment: Deployment, demo_models, root) -> ManagedProcess:
    """A decode server (started by hand: the launcher would refuse it) for a foreign decode module."""
    other_base = write_perturbed_decode_module(demo_models.base, root / "other_base", seed=21)
    foreign = write_perturbed_decode_module(demo_models.base, root / "foreign", seed=22)
    write_decode_module_record(foreign, fingerprint_of(other_base))
    port = free_port()
    t = deployment.topology
    return ManagedProcess(
        name="foreign-decode", log_path=root / "foreign-decode.log", url=f"http://127.0.0.1:{port}",
        command=decode_server_command("foreign", foreign, t.server_host, ServerPorts(http=port), t.transfer_backend,
                                      t.device, t.max_total_tokens),
        env=child_env(t.server_host, TRANSFER_TIMEOUT_S, deployment.kv_secret),
    )


@pytest.fixture(scope="module")
def started(demo_models, tmp_path_factory):
    """The supervised deployment and the foreign decode server, started side by side (one
    start-up for the four servers, not the foreign one alone after the other three)."""
    logs = tmp_path_factory.mktemp("fault_logs")
    topology = Topology(
        base_model=demo_models.base, decode_models=(DecodeModelSpec(MODEL, demo_models.decode[MODEL]),),
        decode_replicas=2, port=free_port(), log_dir=logs, transfer_timeout_s=TRANSFER_TIMEOUT_S,
        restart_on_failure=True,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAULT_STALL_ENV, f"{STALLED_ROOM}:{STALL_S}")  # inherited by the servers
        deployment = Deployment(topology)
        foreign = foreign_decode_process(deployment, demo_models, tmp_path_factory.mktemp("foreign"))
        foreign.start()
        try:
            with deployment as running:
                wait_until_healthy([foreign], 300)
                watcher = Supervised(running)
                try:
                    yield watcher, foreign.url
                finally:
                    watcher.stop()
        finally:
            foreign.stop()


@pytest.fixture(scope="module")
def supervised(started) -> Supervised:
    return started[0]


@pytest.fixture(scope="module")
def deployment(supervised) -> Deployment:
    return supervised.deployment


@pytest.fixture(scope="module")
def foreign_decode_server(started) -> str:
    return started[1]


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
        "model": MODEL, "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}},
        timeout=60)
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 3


def test_a_kv_write_after_the_decode_deadline_is_refused_and_the_deployment_serves_on(deployment, demo_models):
    body, prefill_url = _pd_body(deployment)
    body["bootstrap_room"] = STALLED_ROOM
    decode_url = next(w["url"] for w in requests.get(f"{deployment.url}/workers", timeout=10).json()["workers"]
                      if w["role"] == "decode")
    decode_log = deployment.log_dir / f"decode-{MODEL}-0.log"
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
    served = generate_greedy(deployment.url, MODEL, prompt_ids, 6)["output_ids"]
    reference = prefillshare_greedy(demo_models.base, demo_models.decode[MODEL], prompt_ids, 6)
    assert first_real_divergence(served, reference) is None, (served, reference.output_ids)


def _long_generate(url: str, rid: str) -> tuple[int, float]:
    """Status and end time of a generation long enough to be killed in the middle of."""
    reply = requests.post(f"{url}/generate", json={
        "model": MODEL, "input_ids": PROMPT, "rid": rid,
        "sampling_params": {"max_new_tokens": 1900, "temperature": 0, "ignore_eos": True}}, timeout=300)
    return reply.status_code, time.monotonic()


def _assert_exact(url: str, demo_models) -> None:
    served = generate_greedy(url, MODEL, PROMPT, 12)["output_ids"]
    reference = prefillshare_greedy(demo_models.base, demo_models.decode[MODEL], PROMPT, 12)
    assert first_real_divergence(served, reference) is None, (served, reference.output_ids)


def test_a_killed_decode_replica_fails_its_request_the_other_serves_and_it_rejoins(supervised, demo_models):
    url = supervised.deployment.url
    killed = f"decode-{MODEL}-0"
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(_long_generate, url, f"long-{i}") for i in range(2)]
        deadline = time.monotonic() + 60
        while not all(w["in_flight"] == 1 for w in supervised.workers() if w["role"] == "decode"):
            assert time.monotonic() < deadline, supervised.workers()  # least-loaded: one on each replica
            time.sleep(0.05)
        time.sleep(1)  # both are decoding
        killed_pid, killed_at = supervised.kill(killed), time.monotonic()
        outcomes = sorted(future.result() for future in running)
    (ok_status, _), (failed_status, failed_at) = outcomes
    assert ok_status == 200 and failed_status in (502, 503)
    assert failed_at - killed_at < 10, "the request on the killed replica did not end within 10 s"

    killed_url = supervised.server(killed).child.url
    assert not next(w for w in supervised.workers() if w["url"] == killed_url)["healthy"]
    for _ in range(3):  # the other replica serves meanwhile
        _assert_exact(url, demo_models)
    supervised.wait_serving_again(killed, killed_pid)
    steps = [(e.step, e.detail.split(";")[-1].strip()) for e in supervised.events if e.server == killed]
    assert steps[0] == (SupervisionStep.EXITED, "restart 1 of 5 in 1 s") and steps[-1][0] is SupervisionStep.SERVING
    with ThreadPoolExecutor(4) as pool:  # least-loaded spreads these over both replicas again
        replies = list(pool.map(lambda i: generate_greedy(url, MODEL, PROMPT, 12, rid=f"after-{i}"), range(4)))
    reference = prefillshare_greedy(demo_models.base, demo_models.decode[MODEL], PROMPT, 12)
    assert all(first_real_divergence(reply["output_ids"], reference) is None for reply in replies)
    wait_deployment_idle(url)


def test_a_killed_prefill_server_is_503_at_once_and_service_resumes_after_its_restart(supervised, demo_models):
    url = supervised.deployment.url
    decode_pids = {s.name: s.child.process.pid for s in supervised.deployment.servers if s.decode_server is not None}
    killed_pid = supervised.kill("prefill-0")
    time.sleep(0.5)
    for body in ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                 {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
                 {"model": MODEL, "prompt": "hi", "max_tokens": 4}):
        endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        started = time.monotonic()
        reply = requests.post(url + endpoint, json=body, timeout=60)
        assert reply.status_code == 503 and time.monotonic() - started < 3, reply.text
        assert reply.json()["error"]["type"] == "service_unavailable"
    supervised.wait_serving_again("prefill-0", killed_pid)
    _assert_exact(url, demo_models)
    assert {s.name: s.child.process.pid for s in supervised.deployment.servers
            if s.decode_server is not None} == decode_pids  # the decode servers kept running
    wait_deployment_idle(url)
