"""What a running deployment holds: Prometheus totals, KV slots in use, whether it is idle.

Used by the load run (``bench/load.py``) after its sessions end, and by the tests after
theirs (``tests/sglang_process.py`` re-exports these). "Idle" is the router's and every
server's own word: no router lease, no KV slot held by a request (``num_used_tokens`` of
SGLang's ``/v1/loads``; cached prefixes excluded), and ``/flush_cache`` succeeds
(SGLang answers it only when its scheduler has no queued request and no unprocessed
batch result).
"""

from __future__ import annotations

import time

import requests


def metric_total(url: str, series: str) -> float:
    """The sum of the Prometheus samples at ``url/metrics`` whose line starts with ``series``."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def used_kv_tokens(server_url: str, headers: dict[str, str] | None = None) -> int:
    """KV slots held by requests on an SGLang server (cache excluded), as its scheduler last
    published them: ``num_used_tokens`` of ``/v1/loads``, which SGLang republishes the moment
    the scheduler goes idle (its Prometheus gauge ``sglang:num_used_tokens`` keeps a finished
    request's slots until the next forward). ``headers``: the servers' API key, if any."""
    reply = requests.get(f"{server_url}/v1/loads", params={"include": "core"}, headers=headers, timeout=10)
    reply.raise_for_status()
    return sum(load["num_used_tokens"] for load in reply.json()["loads"])


def held_by_workers(router_url: str, headers: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """Per server behind the router: (router leases in flight, KV slots held by requests).
    ``headers``: what the router asks of clients (an API key; the servers take the same one)."""
    rows = requests.get(f"{router_url}/workers", headers=headers, timeout=10).json()["workers"]
    return {row["url"]: (row["in_flight"], used_kv_tokens(row["url"], headers)) for row in rows}


def wait_deployment_idle(router_url: str, timeout_s: float = 60, headers: dict[str, str] | None = None) -> None:
    """Until no router lease and no KV slot is held anywhere, and every server's
    ``/flush_cache`` succeeds; ``TimeoutError`` naming what is still held after ``timeout_s``.
    ``headers`` as in ``held_by_workers``."""
    deadline = time.monotonic() + timeout_s
    while True:
        held: dict = held_by_workers(router_url, headers)
        if not any(a or b for a, b in held.values()):
            flushed = requests.post(f"{router_url}/flush_cache", headers=headers, timeout=30)
            if flushed.status_code == 200:
                return
            held["flush_cache"] = (flushed.status_code, flushed.text[:200])
        if time.monotonic() > deadline:
            raise TimeoutError(f"not idle after {timeout_s:.0f} s (router leases, KV slots): {held}")
        time.sleep(0.5)
