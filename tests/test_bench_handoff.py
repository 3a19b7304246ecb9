"""The hand-off benchmark: throughput between two engines in two processes, the latency table's plumbing."""

from __future__ import annotations

import json

from pfs_sglang.bench import handoff
from pfs_sglang.bench.handoff import SHAPES, measure_throughput, stock_command


def test_throughput_between_two_processes_is_measured_against_memcpy():
    rows = measure_throughput(SHAPES["demo"], prompt_tokens=(64, 256), concurrency=(1, 2), layouts=("scattered",),
                              pool_mb=16, min_seconds=0.0)
    assert [(row.prompt_tokens, row.concurrency) for row in rows] == [(64, 1), (64, 2), (256, 1), (256, 2)]
    for row in rows:
        assert row.handoff_gbps > 0 and row.memcpy_gbps > 0
        assert row.mb_per_request == row.prompt_tokens * SHAPES["demo"].bytes_per_token / 1e6
        assert row.transport in ("map+pvm+shm", "map+shm")  # the sender's pool is shared, as a prefill server's
        assert row.blocks_per_request > row.prompt_tokens  # scattered: about one block per slot per buffer


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    assert handoff.main(["--skip-latency", "--shape", "demo", "--tokens", "128", "--concurrency", "1",
                         "--layout", "consecutive", "--transports", "none", "--out", str(tmp_path)]) == 0
    assert "| demo | consecutive | socket | 128 | 1 |" in capsys.readouterr().out
    results = json.loads((tmp_path / "handoff.json").read_text())
    assert results["throughput"][0]["blocks_per_request"] == 2 * SHAPES["demo"].layers
    assert results["latency"] == []


def test_stock_command_is_the_decode_command_without_pd_flags():
    decode = ["python", "-m", "sglang.launch_server", "--model-path", "/m", "--port", "123",
              "--disaggregation-transfer-backend", "zmq", "--device", "cpu", "--disaggregation-mode", "decode",
              "--served-model-name", "extract", "--disaggregation-decode-retraction-backup", "cpu_tensor",
              "--disaggregation-decode-enable-radix-cache", "--radix-cache-backend", "pfs", "--sleep-on-idle"]
    assert stock_command(decode, 456) == ["python", "-m", "sglang.launch_server", "--model-path", "/m", "--port", "456",
                                          "--device", "cpu", "--served-model-name", "extract", "--sleep-on-idle"]
