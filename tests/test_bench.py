"""The benchmark harness (issue 9): its parts on their own, and short runs on the demo models.

One run starts one real PD deployment (``pfs`` and ``pfs-noshare`` share it) for 2
ReAct sessions of 1 round and checks the files, the summary's schema, the same-output
check, and that sharing prefills fewer tokens than per-model namespaces. Another runs
the LoRA systems (``pfs-unified``, ``sglang-lora``, the demo LoRA adapters) the same
way: the unified tree shares the context across adapters, stock SGLang's does not. No
timing is asserted. The suite (``make test``) runs the first, the benchmark's one smoke
run; the second is a ``scenario`` test (``make test-scenarios``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from pfs_sglang.bench import __main__ as cli
from pfs_sglang.bench.metrics import RequestRecord, percentile, ratios, same_outputs, unique_prefix_tokens
from pfs_sglang.bench.shapes import ModelSet
from pfs_sglang.bench.systems import KVBudget, cpu_server_args, groups_of, make_group, stock_lora_command
from pfs_sglang.bench.workloads import Vocabulary, WorkloadConfig, build_sessions, react_sessions, reflexion_sessions
from pfs_sglang.launch.server_commands import ServerPorts, prefill_server_command
from pfs_sglang.oracle import load_tokenizer

SYSTEM_KEYS = {"ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s", "requests_per_s",
               "output_tokens_per_s", "prefill_tokens", "hit_ratio", "kv_bytes", "kv_gb_per_s", "peak_kv_tokens",
               "scheduler_cpu_s", "errors", "requests"}
RATIO_KEYS = {"p95_e2e_noshare_over_pfs", "throughput_pfs_over_noshare", "p95_e2e_sglang_over_pfs",
              "throughput_pfs_over_sglang", "p95_e2e_sglang_lora_over_unified", "throughput_unified_over_sglang_lora",
              "p95_e2e_sglang_over_unified", "throughput_unified_over_sglang"}
VOCAB = Vocabulary(10, 500)


def test_floor_counts_unique_prefix_tokens():
    assert unique_prefix_tokens([]) == 0
    assert unique_prefix_tokens([[1, 2, 3], [1, 2, 3]]) == 3
    assert unique_prefix_tokens([[1, 2, 3], [1, 2, 4], [5]]) == 5
    assert unique_prefix_tokens([[1, 2], [1, 2, 3, 4]]) == 4


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def test_same_outputs_needs_every_request_equal_and_successful():
    def record(step, ids, error=None):
        return RequestRecord("s", "a", step, "m", 4, output_ids=ids, error=error)

    assert same_outputs([record(0, [1]), record(1, [2])], [record(1, [2]), record(0, [1])]) == (True, [])
    assert same_outputs([record(0, [1])], [record(0, [9])]) == (False, ["a#0"])
    assert same_outputs([record(0, [1])], []) == (False, ["a#0"])
    assert same_outputs([record(0, [], "HTTP 500")], [record(0, [], "HTTP 500")]) == (False, ["a#0"])


def test_ratios():
    systems = {"pfs": {"e2e_p95_s": 1.0, "requests_per_s": 4.0}, "pfs-noshare": {"e2e_p95_s": 3.0, "requests_per_s": 2.0}}
    assert ratios(systems) == {"p95_e2e_noshare_over_pfs": 3.0, "throughput_pfs_over_noshare": 2.0,
                               "p95_e2e_sglang_over_pfs": None, "throughput_pfs_over_sglang": None,
                               "p95_e2e_sglang_lora_over_unified": None, "throughput_unified_over_sglang_lora": None,
                               "p95_e2e_sglang_over_unified": None, "throughput_unified_over_sglang": None}
    lora = {"pfs-unified": {"e2e_p95_s": 1.0, "requests_per_s": 6.0}, "sglang-lora": {"e2e_p95_s": 2.0,
                                                                                      "requests_per_s": 3.0}}
    assert ratios(lora)["p95_e2e_sglang_lora_over_unified"] == 2.0
    assert ratios(lora)["throughput_unified_over_sglang_lora"] == 2.0


def test_kv_budget_is_equal_across_systems_and_pd_splits_it_by_the_launchers_rule():
    from pfs_sglang.launch.processes import LaunchError

    budget = KVBudget(per_model_tokens=4096, decode_context_tokens=1024)
    for models in (1, 3, 5):
        pools = budget.pd_pools(models)
        assert pools.decode_tokens == 1024 + 512  # one context plus SGLang's decode reserve
        assert pools.prefill_tokens + models * pools.decode_tokens == budget.total(models) == models * 4096
    with pytest.raises(LaunchError, match="cannot serve a context of 1024"):
        KVBudget(per_model_tokens=1024, decode_context_tokens=1024).pd_pools(3)


def test_the_pd_systems_are_the_launchers_deployment_with_its_budget_rule(demo_models, tmp_path):
    """bench config -> Topology(kv_budget, --context-length, decode cache): the launcher's split."""
    args = cli.build_parser().parse_args(["run", "--shape", "tiny", "--models", "extract,compute", "--no-decode-cache",
                                          "--kv-tokens-per-model", "2048", "--out", str(tmp_path)])
    config = cli.bench_config(args, 2)
    assert config.decode_cache is False and config.budget.decode_context_tokens == 512  # the tiny shape's
    models = ModelSet("tiny", demo_models.base, {name: demo_models.decode[name] for name in ("extract", "compute")})
    pfs, noshare = make_group(("pfs", "pfs-noshare"), models, config.budget, "cpu", tmp_path, 60.0, config.decode_cache)
    topology = pfs.deployment.topology
    assert noshare.deployment is pfs.deployment and topology.kv_budget == 4096 and topology.decode_cache is False
    assert topology.decode_args == ("--context-length", "512")
    dry = pfs.deployment.dry_run()
    assert "2 decode pool(s) of 1024" in dry and "1 prefill pool(s) of 2048" in dry


def test_pfs_and_noshare_share_one_deployment():
    assert groups_of(("pfs", "sglang", "pfs-noshare")) == [("pfs", "pfs-noshare"), ("sglang",)]
    assert groups_of(("sglang",)) == [("sglang",)]
    assert groups_of(("sglang-lora", "pfs-unified", "vllm")) == [("pfs-unified",), ("sglang-lora",)]
    with pytest.raises(ValueError):
        groups_of(("tgi",))


def test_stock_server_uses_the_launchers_cpu_flags(demo_models, tmp_path):
    """Every launcher flag of a prefill server, less the PD and address ones, is in the stock command."""
    launcher = prefill_server_command(demo_models.base, "127.0.0.1", ServerPorts(http=1, bootstrap=2), "zmq", "cpu", 777)
    pd_only = {"--disaggregation-mode", "--disaggregation-bootstrap-port", "--disaggregation-transfer-backend",
               "--radix-cache-backend", "--model-path", "--host", "--port"}
    launcher_flags = {}
    args = launcher[3:]  # python -m sglang.launch_server
    for index, arg in enumerate(args):
        if arg.startswith("--") and arg not in pd_only:
            following = args[index + 1] if index + 1 < len(args) else None
            launcher_flags[arg] = None if following is None or following.startswith("--") else following
    stock = cpu_server_args("cpu", 777, demo_models.base)
    for flag, value in launcher_flags.items():
        assert flag in stock, flag
        if value is not None:
            assert stock[stock.index(flag) + 1] == value, flag


def test_stock_lora_is_the_unified_server_without_the_pfs_tree(tmp_path):
    models = ModelSet("x", tmp_path / "base", {}, {"a": tmp_path / "lora-a", "b": tmp_path / "lora-b"})
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    command = stock_lora_command(models, KVBudget(per_model_tokens=1000), "cpu", "127.0.0.1", 5)
    assert "--radix-cache-backend" not in command
    assert command[command.index("--max-total-tokens") + 1] == "2000"  # the whole budget: 2 models x 1000
    assert "--enable-lora" in command and f"a={tmp_path / 'lora-a'}" in command
    assert command[command.index("--lora-backend") + 1] == "torch_native"


def test_react_sessions_share_the_system_prompt_and_call_every_model():
    config = WorkloadConfig("react", sessions=3, rounds=2, models=("a", "b", "c"), system_tokens=50, task_tokens=7,
                            observation_tokens=5, output_tokens=4, seed=1)
    sessions = react_sessions(config, VOCAB)
    assert len(sessions) == 3
    assert all(session.context[:50] == sessions[0].context[:50] for session in sessions)
    assert sessions[0].context[50:] != sessions[1].context[50:]
    assert [step.model for step in sessions[0].steps] == ["a", "b", "c", "a", "b", "c"]
    assert all(step.keep_output and step.max_tokens == 4 for step in sessions[0].steps)
    assert len(sessions[0].steps[3].prefix) > len(sessions[0].steps[0].prefix)  # the observation comes with round 2
    assert react_sessions(config, VOCAB) == sessions  # seeded
    assert all(VOCAB.low <= token < VOCAB.high for token in sessions[0].context)


def test_reflexion_sessions_use_actor_evaluator_reflector():
    config = WorkloadConfig("reflexion", sessions=2, rounds=2, models=("actor", "judge", "reflector"),
                            output_tokens=6, score_tokens=2, rate=4.0)
    sessions = reflexion_sessions(config, VOCAB)
    assert [step.model for step in sessions[0].steps] == ["actor", "judge", "reflector"] * 2
    assert [step.max_tokens for step in sessions[0].steps] == [6, 2, 6] * 2
    assert sessions[0].start_s == 0.0 < sessions[1].start_s  # Poisson arrivals


def test_trace_replay_reads_jsonl(demo_models, tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [{"session_id": "s1", "model": "extract", "messages": [{"role": "user", "content": "name: tom"}],
             "max_tokens": 3, "arrival_time": 0.5},
            {"session_id": "s1", "model": "compute", "messages": [{"role": "user", "content": "qty: 3"}],
             "max_tokens": 4, "arrival_time": 0.1}]
    trace.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    tokenizer = load_tokenizer(str(demo_models.base))
    (session,) = build_sessions(WorkloadConfig("trace", 0, 0, (), trace=trace), tokenizer)
    assert [step.model for step in session.steps] == ["compute", "extract"]  # arrival order
    assert session.steps[0].reset and session.steps[0].not_before_s == 0.1
    assert list(session.steps[1].prefix) == tokenizer.apply_chat_template(
        rows[0]["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    trace.write_text(json.dumps({"session_id": "s"}) + "\n")
    with pytest.raises(ValueError, match="missing"):
        build_sessions(WorkloadConfig("trace", 0, 0, (), trace=trace), tokenizer)


FEW_SHOT = """Answer questions with Thought, Action, Observation steps.
Question: Which city holds record 7?
Thought 1: I need to look up record 7.
Action 1: Search[record 7]
Observation 1: Record 7 is the city of Ost.
Action 2: Finish[Ost]

Question: How many items are open?
Thought 1:I should count them.
Action 1:Finish[3]
"""


def test_react_trace_replays_each_worked_example_as_a_three_model_session(demo_models, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"webthink": FEW_SHOT}))
    trace = tmp_path / "trace.jsonl"
    assert cli.main(["react-trace", "--prompts", str(prompts), "--key", "webthink", "--sessions", "3",
                     "--rate", "1.0", "--output-tokens", "8", "--out", str(trace)]) == 0
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    first = [row for row in rows if row["session_id"] == "s0"]
    assert [row["model"] for row in first] == ["planner", "actor", "actor", "critic"]
    assert first[0]["messages"] == [{"role": "system", "content": FEW_SHOT.strip()},
                                    {"role": "user", "content": "Task 0.\nQuestion: Which city holds record 7?"}]
    # every later prompt holds the example's real earlier steps, the observation as the user's
    assert first[2]["messages"][2:] == [{"role": "assistant", "content": "Thought 1: I need to look up record 7."},
                                        {"role": "assistant", "content": "Action 1: Search[record 7]"},
                                        {"role": "user", "content": "Observation 1: Record 7 is the city of Ost."}]
    assert [row["model"] for row in rows if row["session_id"] == "s1"] == ["planner", "actor", "critic"]
    assert rows[-1]["messages"][1]["content"].startswith("Task 2.\nQuestion: Which city")  # examples in turn
    arrivals = sorted({row["arrival_time"] for row in rows})
    assert arrivals[0] == 0.0 and len(arrivals) == 3 and all(row["max_tokens"] == 8 for row in rows)
    tokenizer = load_tokenizer(str(demo_models.base))
    sessions = build_sessions(WorkloadConfig("trace", 0, 0, (), trace=trace), tokenizer)
    assert [len(session.steps) for session in sessions] == [4, 3, 4]
    assert cli.main(["react-trace", "--prompts", str(prompts), "--key", "other", "--out", str(trace)]) == 2


def test_handoff_subcommand_dispatches(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "pfs_sglang.bench.handoff",
                        types.SimpleNamespace(main=lambda argv: seen.append(argv) or 7))
    assert cli.main(["handoff", "--shape", "x"]) == 7
    assert seen == [["--shape", "x"]]


@pytest.mark.server
def test_run_on_the_demo_models(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pfs_sglang.bench", "run", "--shape", "tiny", "--sessions", "2", "--rounds", "1",
               "--systems", "pfs,pfs-noshare", "--models", "extract,compute", "--models-dir", str(tmp_path / "models"),
               "--no-progress", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"workload", "floor_prefill_tokens", "systems", "ratios", "same_outputs_pfs_noshare"}
    assert set(summary["systems"]) == {"pfs", "pfs-noshare"}
    assert set(summary["ratios"]) == RATIO_KEYS
    for figures in summary["systems"].values():
        assert set(figures) == SYSTEM_KEYS
        assert figures["requests"] == 2 * 2 and figures["errors"] == 0
        assert figures["kv_bytes"] > 0 and figures["ttft_p50_s"] <= figures["e2e_p50_s"]
        assert summary["floor_prefill_tokens"] <= figures["prefill_tokens"]
        assert figures["scheduler_cpu_s"] > 0  # the servers' schedulers did the work
    assert summary["same_outputs_pfs_noshare"] is True
    pfs, noshare = summary["systems"]["pfs"], summary["systems"]["pfs-noshare"]
    assert pfs["prefill_tokens"] < noshare["prefill_tokens"]  # one shared prefix tree against one per model
    assert pfs["hit_ratio"] > noshare["hit_ratio"]
    assert summary["ratios"]["throughput_pfs_over_noshare"] is not None

    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 4 and all(len(record["output_ids"]) == 8 for record in records)
    details = json.loads((out / "details.json").read_text())
    assert details["systems"]["pfs"]["kv_pool_total_tokens"] == summary["workload"]["kv_budget_tokens"]
    assert "| pfs |" in (out / "report.md").read_text()
    assert (out / "systems.png").stat().st_size > 0


@pytest.mark.server
@pytest.mark.scenario  # a second benchmark run: make test-scenarios, not make test
def test_lora_systems_on_the_demo_adapters(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pfs_sglang.bench", "run", "--shape", "tiny", "--sessions", "2", "--rounds", "1",
               "--systems", "pfs-unified,sglang-lora", "--models", "extract,compute",
               "--models-dir", str(tmp_path / "models"), "--no-progress", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["systems"]) == {"pfs-unified", "sglang-lora"}
    for figures in summary["systems"].values():
        assert figures["requests"] == 2 * 2 and figures["errors"] == 0
        assert summary["floor_prefill_tokens"] <= figures["prefill_tokens"]
    unified, stock = summary["systems"]["pfs-unified"], summary["systems"]["sglang-lora"]
    assert unified["prefill_tokens"] < stock["prefill_tokens"]  # one tree across adapters against one per adapter
    assert summary["ratios"]["throughput_unified_over_sglang_lora"] is not None
    details = json.loads((out / "details.json").read_text())
    for name in ("pfs-unified", "sglang-lora"):
        assert details["systems"][name]["kv_pool_total_tokens"] == summary["workload"]["kv_budget_tokens"]
    assert "| pfs-unified |" in (out / "report.md").read_text()
