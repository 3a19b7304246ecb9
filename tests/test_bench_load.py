"""``python -m pfs_sglang.bench load``, short: 12 closed-loop sessions for 15 s against the
demo deployment it starts (router, prefill server, three decode servers on CPU).

The run's own checks must all pass: every request one outcome and every answer naming its
own rid, the router's ``pfs_router_requests_total`` risen by exactly the requests it
routed (less abandoned ones it never read), no error but the injected ones (an unknown
model: 404; a client that leaves: aborted), no KV slot held on any server afterwards, RSS
growth after warm-up bounded, no traceback in a server log. The full run (200 sessions,
120 s) is in ``docs/bench/load``.
"""

from __future__ import annotations

import json

from pfs_sglang.bench import load


def test_short_load_run_passes_its_checks(tmp_path):
    out = tmp_path / "load"
    code = load.main(["--sessions", "12", "--duration", "15", "--inject-every", "10", "--no-progress",
                      "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    failed = [name for name, ok in summary["checks"].items() if not ok]
    assert code == 0 and not failed, (failed, (out / "report.md").read_text())
    requests = summary["requests"]
    assert requests["answered"] > 12  # every session got past its first turn
    assert set(requests["injected"]) == {load.INJECTED_UNKNOWN, load.INJECTED_ABANDON}
    assert set(requests["by_model"]) == {"extract", "compute", "transform"}
    assert set(requests["by_kind"]) == {"chat", "chat-stream", "completion"}
    assert requests["router_requests_delta_by_status"]["200"] >= requests["answered"]
    assert not any(summary["kv_tokens_held_after"].values())
    assert {"router", "prefill", "decode-extract", "decode-compute", "decode-transform"} <= set(summary["memory"])
    assert (out / "load.png").stat().st_size > 0
