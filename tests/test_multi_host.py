"""One deployment over several hosts (``--role``, ``external_servers``; docs/multi_host.md).

* Three launchers on this machine stand for three hosts: ``--role prefill``, ``--role
  decode:extract-lora`` (a LoRA decode module served alone: a decode server of the base's
  weights and that one adapter) and ``--role router`` over the other two (one topology
  file for all three, as a ConfigMap would give them), the KV forced over TCP. The router
  answers 503 naming the servers while they start elsewhere; then a greedy ``/generate``
  through it equals the oracle (base KV of ``prompt[:-1]``, the adapter from ``prompt[-1]``), a chat completion is served, the prefill server's log shows the KV
  went over TCP sockets, and SIGTERM to each launcher stops its servers.
* Without servers: ``--role`` and ``external_servers`` parsing and every refusal, each
  role's ``--dry-run``, the router role's wait for servers that never come, a taken
  fixed port, a decode role checking only its own decode module.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from pfs_sglang.identity import fingerprint_of, write_decode_module_record
from pfs_sglang.launch import DecodeModelSpec, Deployment, LaunchError, Topology
from pfs_sglang.launch.cli import build_parser, main, topology_from_args
from pfs_sglang.launch.processes import ManagedProcess, free_port, free_ports, wait_until_healthy
from pfs_sglang.launch.topology import Role, parse_external_servers
from pfs_sglang.models.demo import write_perturbed_decode_module
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from pfs_sglang.transfer import KV_SECRET_ENV
from sglang_process import generate_greedy

MODEL = "extract"
ADAPTER = "extract-lora"  # the session's LoRA decode module (conftest.lora_adapters)
PROMPT = [21, 48, 95, 130, 77, 64, 33]
SECRET = "multi-host-test-secret"
# Two servers starting at once on a shared 2-core box (each ~40 s of CPU when alone).
STARTUP_TIMEOUT_S = 420


def write_topology(path: Path, demo_models, **settings) -> Path:
    path.write_text(yaml.safe_dump({
        "base_model": str(demo_models.base), "decode_models": {MODEL: str(demo_models.decode[MODEL])},
        "kv_secret": SECRET, "device": "cpu", **settings}))
    return path


def external(prefill_port: int, bootstrap_port: int, decode_port: int, lora_model: str | None = None) -> dict:
    """The router's view of the other hosts: their prefill server, and a decode server of
    ``MODEL`` (or of the LoRA adapter ``lora_model``)."""
    decode = {lora_model: {"urls": [f"http://127.0.0.1:{decode_port}"], "lora": True}} if lora_model else \
        {MODEL: [f"http://127.0.0.1:{decode_port}"]}
    return {"prefill": [{"url": f"http://127.0.0.1:{prefill_port}", "bootstrap": f"127.0.0.1:{bootstrap_port}"}],
            "decode": decode}


def launcher(name: str, tmp_path: Path, config: Path, url: str, *flags: str) -> ManagedProcess:
    """One host's ``python -m pfs_sglang.launch_server``; healthy when ``url`` (its server, or its router) is."""
    command = [sys.executable, "-m", "pfs_sglang.launch_server", "--config", str(config),
               "--log-dir", str(tmp_path / name), "--startup-timeout", str(STARTUP_TIMEOUT_S), *flags]
    # one core's worth of threads each: the "hosts" share this machine's cores
    return ManagedProcess(name=name, command=command, log_path=tmp_path / f"{name}-launcher.log", url=url,
                          env={"OMP_NUM_THREADS": "1"})


def stop_launcher(host: ManagedProcess) -> None:
    """SIGTERM to the launcher alone; it must stop its servers and exit 0."""
    servers = psutil.Process(host.process.pid).children(recursive=True)
    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(timeout=90) == 0, host.log_tail()
    time.sleep(1)
    assert not [server.pid for server in servers if alive(server)], host.name


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def first_router_answer(url: str, router: ManagedProcess, timeout_s: float = 120) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and router.exit_code() is None:
        try:
            return requests.get(f"{url}/health", timeout=5)
        except requests.ConnectionError:
            time.sleep(0.5)
    raise AssertionError(f"the router never answered; its launcher's log ends:\n{router.log_tail()}")


@pytest.mark.server
def test_prefill_decode_and_router_on_three_hosts_over_tcp(demo_models, lora_adapters, tmp_path):
    prefill_port, bootstrap_port, decode_port, router_port = free_ports(4)
    adapter = lora_adapters[ADAPTER]
    config = write_topology(tmp_path / "topology.yaml", demo_models, transfer_force_tcp=True, max_total_tokens=2048,
                            decode_models={ADAPTER: str(adapter)},
                            external_servers=external(prefill_port, bootstrap_port, decode_port, ADAPTER))
    router_url = f"http://127.0.0.1:{router_port}"
    prefill = launcher("prefill", tmp_path, config, f"http://127.0.0.1:{prefill_port}", "--role", "prefill",
                       "--port", str(prefill_port), "--bootstrap-port", str(bootstrap_port))
    decode = launcher("decode", tmp_path, config, f"http://127.0.0.1:{decode_port}", "--role", f"decode:{ADAPTER}",
                      "--port", str(decode_port))
    router = launcher("router", tmp_path, config, router_url, "--role", "router", "--port", str(router_port))
    hosts = [prefill, decode, router]
    try:
        for host in hosts:
            host.start()
        starting = first_router_answer(router_url, router)
        assert starting.status_code == 503, starting.text
        assert sorted(starting.json()["starting"]) == [f"decode http://127.0.0.1:{decode_port}",
                                                       f"prefill http://127.0.0.1:{prefill_port}"]
        wait_until_healthy(hosts, timeout_s=STARTUP_TIMEOUT_S + 30)

        served = generate_greedy(router_url, ADAPTER, PROMPT, 6)["output_ids"]
        reference = prefillshare_greedy(demo_models.base, adapter, PROMPT, len(served))
        assert first_real_divergence(served, reference) is None, (served, reference.output_ids)
        base_alone = prefillshare_greedy(demo_models.base, demo_models.base, PROMPT, len(served)).output_ids
        assert served != base_alone  # the adapter was applied
        chat = requests.post(f"{router_url}/v1/chat/completions", timeout=120, json={
            "model": ADAPTER, "messages": [{"role": "user", "content": "name: tom. name?"}], "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        assert isinstance(chat.json()["choices"][0]["message"]["content"], str)
        assert chat.json()["usage"]["prompt_tokens"] > 0

        prefill_log = (tmp_path / "prefill" / "prefill-0.log").read_text()
        decode_log = (tmp_path / "decode" / f"decode-{ADAPTER}-0.log").read_text()
        assert "'enable_lora': True" in decode_log and f"'model_path': '{demo_models.base}'" in decode_log
        for log in (prefill_log, decode_log):
            assert "TCP to every peer (PFS_KV_FORCE_TCP=1)" in log
        connections = [line for line in prefill_log.splitlines() if "pfs zmq KV engine: connected to" in line]
        assert connections and all(" over tcp://127.0.0.1:" in line and line.endswith("transport socket")
                                   for line in connections), connections
        router_output = router.attempt_log()
        assert f"prefill http://127.0.0.1:{prefill_port} awaited (runs on another host)" in router_output
        assert f"decode http://127.0.0.1:{decode_port} healthy" in router_output
        assert "serving on" in router_output and "serving on" in prefill.attempt_log()
        for log in tmp_path.glob("**/*.log"):
            assert "Traceback" not in log.read_text(), log
        # identities are checked where the models are: each server host wrote the base's fingerprint
        assert (tmp_path / "prefill" / "prefill_fingerprint.json").is_file()
        assert (tmp_path / "decode" / "prefill_fingerprint.json").is_file()
        assert not (tmp_path / "router" / "prefill_fingerprint.json").exists()

        for host in (router, decode, prefill):
            stop_launcher(host)
    finally:
        for host in hosts:
            host.stop()


# ----- without servers -----

def topology(argv: list[str]) -> Topology:
    return topology_from_args(build_parser().parse_args(argv))


def test_roles_and_external_servers_parse():
    assert Role.parse("all") == Role() and str(Role.parse("decode:lora")) == "decode:lora"
    assert Role.parse("router").runs_router and not Role.parse("prefill").runs_router
    for text in ("decode", "decode:", "prefill:x", "worker"):
        with pytest.raises(ValueError, match="--role takes all, prefill, decode:NAME or router"):
            Role.parse(text)
    servers = parse_external_servers({
        "prefill": [{"url": "http://10.0.0.1:30001/", "bootstrap": 30002},
                    {"url": "https://p2:30001", "bootstrap": "10.0.0.2:8998"}],
        "decode": {"extract": "http://10.0.0.3:30001", "sql": {"urls": ["http://10.0.0.4:1"], "lora": True}}})
    assert [(s.url, s.bootstrap_host, s.bootstrap_port) for s in servers.prefill] == [
        ("http://10.0.0.1:30001", "10.0.0.1", 30002), ("https://p2:30001", "10.0.0.2", 8998)]
    assert [(p.model, p.urls, p.lora) for p in servers.decode] == [
        ("extract", ("http://10.0.0.3:30001",), False), ("sql", ("http://10.0.0.4:1",), True)]
    prefill, decode = [{"url": "http://h:1", "bootstrap": 2}], {"a": "http://h:1"}
    for value, message in (
            ({"prefill": []}, "takes prefill .* and decode"),
            ({"prefill": [], "decode": decode}, r"prefill is a non-empty list"),
            ({"prefill": [{"url": "http://h:1"}], "decode": decode}, r"prefill\[0\] takes url and bootstrap"),
            ({"prefill": [{"url": "h:1", "bootstrap": 2}], "decode": decode}, "is http://HOST:PORT, got 'h:1'"),
            ({"prefill": [{"url": "http://h", "bootstrap": 2}], "decode": decode}, "got 'http://h'"),
            ({"prefill": [{"url": "http://h:1", "bootstrap": "h:x"}], "decode": decode},
             "bootstrap is HOST:PORT or a port"),
            ({"prefill": prefill, "decode": {"a": []}}, r"decode.a: a URL or a non-empty"),
            ({"prefill": prefill, "decode": {"a": {"urls": "http://h:1", "lora": 1}}}, "takes urls and lora")):
        with pytest.raises(ValueError, match=message):
            parse_external_servers(value)


def test_role_refusals(demo_models, tmp_path):
    base = ["--base-model", str(demo_models.base), "--decode-model", f"{MODEL}={demo_models.decode[MODEL]}",
            "--device", "cpu"]
    for argv, message in (
            (["--role", "decode:nope"], r"--role decode:nope: no decode server of that name; the decode servers are "
                                        r"\['extract'\]"),
            (["--role", "prefill", "--prefill-replicas", "2"], "--role prefill runs one prefill server on fixed ports"),
            (["--role", f"decode:{MODEL}", "--decode-replicas", "2"], "runs one decode server on a fixed port"),
            (["--role", "prefill", "--port", "8998"], "--port and --bootstrap-port are both 8998"),
            (["--bootstrap-port", "1234"], "--bootstrap-port is the KV bootstrap port of --role prefill"),
            (["--role", "router"], "--role router routes to servers started elsewhere: list them under "
                                   "external_servers"),
            (["--transfer-force-tcp", "--transfer-backend", "mooncake"], "--transfer-force-tcp is for the zmq")):
        with pytest.raises(ValueError, match=message):
            topology([*base, *argv])
    servers = external(1, 2, 3)
    with pytest.raises(ValueError, match="external_servers lists servers started on other hosts, for --role router"):
        topology(["--config", str(write_topology(tmp_path / "a.yaml", demo_models, external_servers=servers))])
    other = write_topology(tmp_path / "b.yaml", demo_models,
                           external_servers={**servers, "decode": {"coder": "http://h:1"}})
    with pytest.raises(ValueError, match=r"decode_models \['extract'\] and the models of external_servers \['coder'\]"):
        topology(["--config", str(other), "--role", "router"])
    with pytest.raises(ValueError, match="default model 'x' is not one of the decode models"):
        topology(["--config", str(write_topology(tmp_path / "c.yaml", demo_models, external_servers=servers)),
                  "--role", "router", "--default-model", "x"])


def test_a_server_role_needs_the_shared_kv_secret(demo_models, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KV_SECRET_ENV, raising=False)
    argv = ["--base-model", str(demo_models.base), "--decode-model", f"{MODEL}={demo_models.decode[MODEL]}",
            "--device", "cpu", "--role", "prefill", "--log-dir", str(tmp_path), "--dry-run"]
    assert main(argv) == 1
    assert "the servers of every host must share one KV secret" in capsys.readouterr().err
    monkeypatch.setenv(KV_SECRET_ENV, SECRET)
    assert main(argv) == 0
    assert "PFS_KV_SECRET='<given>'" in capsys.readouterr().out  # never printed


def test_dry_run_of_each_role(demo_models, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SGLANG_HOST_IP", raising=False)
    config = write_topology(tmp_path / "topology.yaml", demo_models, external_servers=external(30001, 30002, 30011))
    common = ["--config", str(config), "--log-dir", str(tmp_path / "logs"), "--dry-run"]

    assert main([*common, "--role", "prefill", "--server-host", "0.0.0.0", "--port", "30001",
                 "--bootstrap-port", "30002", "--transfer-force-tcp"]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "sglang.launch_server" in line]
    assert "--host 0.0.0.0 --port 30001" in line and "--disaggregation-bootstrap-port 30002" in line
    assert "PFS_KV_FORCE_TCP=1" in line and "SGLANG_HOST_IP" not in line  # a wildcard: SGLang's own address
    assert "# no router on this host (--role prefill)" in out

    assert main([*common, "--role", f"decode:{MODEL}", "--server-host", "10.0.0.5", "--port", "30011"]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "sglang.launch_server" in line]
    assert "--host 10.0.0.5 --port 30011" in line and "--served-model-name extract" in line
    assert "SGLANG_HOST_IP=10.0.0.5" in line and "PFS_KV_FORCE_TCP" not in line

    # The router needs no weights: no base model here, and none of the paths exist.
    router_config = tmp_path / "router.yaml"
    router_config.write_text(yaml.safe_dump({"external_servers": {
        "prefill": [{"url": "http://p:30001", "bootstrap": 30002}],
        "decode": {MODEL: ["http://d1:30011", "http://d2:30011"], "sql": {"urls": "http://l:30021", "lora": True},
                   "chat": {"urls": "http://l:30021", "lora": True}}}}, sort_keys=False))
    assert main(["--config", str(router_config), "--role", "router", "--port", "8000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sglang.launch_server" not in out
    assert ("# router (in the launcher process): http://127.0.0.1:8000; prefill pool http://p:30001; decode pools "
            "extract -> http://d1:30011, http://d2:30011; sql -> http://l:30021; chat -> http://l:30021; "
            "waits up to 420 s for their /health") in out
    deployment = Deployment(topology(["--config", str(router_config), "--role", "router"]))
    config = deployment._router_config()
    assert config.vocab_size is None and config.prefill_workers[0].bootstrap_host == "p"
    pools = config.decode_pools
    assert pools["sql"].workers[0] is pools["chat"].workers[0]  # one co-located LoRA server, one load count
    assert (pools["sql"].lora_adapter, pools[MODEL].lora_adapter) == ("sql", None)
    assert [server.name for server in deployment.remote_servers] == [
        "prefill http://p:30001", "decode http://d1:30011", "decode http://d2:30011", "decode http://l:30021"]


def test_the_router_waits_for_external_servers_under_a_deadline(tmp_path):
    silent = free_ports(3)  # nothing listens on them
    t = Topology(base_model=None, role=Role("router"), port=free_port(), startup_timeout_s=3,
                 external_servers=parse_external_servers(external(*silent)))
    deployment = Deployment(t)
    answers = []
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"not healthy after 3 s: prefill http://127.0.0.1:\d+, decode "
                                          r"http://127.0.0.1:\d+ \(they run on other hosts"):
        deployment.on_startup = lambda event: answers.append(requests.get(f"{deployment.url}/health", timeout=5))
        deployment.start()
    assert time.monotonic() - started < 30
    assert answers and all(a.status_code == 503 and len(a.json()["starting"]) == 2 for a in answers)
    with pytest.raises(requests.ConnectionError):  # stopped
        requests.get(f"{deployment.url}/health", timeout=5)


def test_server_roles_check_their_own_models_and_fixed_ports(demo_models, tmp_path):
    foreign = write_perturbed_decode_module(demo_models.base, tmp_path / "foreign", seed=21)
    write_decode_module_record(foreign, fingerprint_of(write_perturbed_decode_module(demo_models.base,
                                                                                     tmp_path / "other", seed=22)))
    models = (DecodeModelSpec(MODEL, demo_models.decode[MODEL]), DecodeModelSpec("foreign", foreign),
              DecodeModelSpec("elsewhere", tmp_path / "not-on-this-host"))
    shared = dict(base_model=demo_models.base, decode_models=models, device="cpu", kv_secret=SECRET,
                  log_dir=tmp_path / "logs")
    with pytest.raises(LaunchError, match="decode model 'foreign' refused: .*weights_hash differs"):
        Deployment(Topology(**shared, role=Role("decode", "foreign"))).start()
    # decode:extract checks extract alone (the others' directories are other hosts' business)
    assert "--served-model-name extract" in Deployment(Topology(**shared, role=Role("decode", MODEL))).dry_run()
    with socket.socket() as listener:  # the prefill role's fixed HTTP port, taken
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        taken = Deployment(Topology(**shared, role=Role("prefill"), port=port, bootstrap_port=free_port()))
        with pytest.raises(LaunchError, match=f"cannot listen on 127.0.0.1:{port}"):
            taken.start()
        assert taken.children == []
