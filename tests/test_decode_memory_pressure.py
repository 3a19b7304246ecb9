"""A decode pool too small for its load: real retraction, every output exact (issue 7).

The decode server ``compute-tight`` of the session's demo deployment (``conftest.py``:
the ``compute`` decode module once more) gets a KV pool of 160 tokens, overlap
scheduling off (the loop the paged test does not run) and a small per-request decode
reserve, so SGLang admits several requests whose outputs then outgrow the pool and it
retracts some ("KV cache pool is full. Retract requests."). A retracted request's KV is
backed up and restored exactly (``cpu_tensor``): base KV for its prompt, decode-module
KV for what the decode module computed (invariant 1); nothing is recomputed by the
prefill module. Every request must still give the oracle's output (invariant 5), and
every pool must be idle afterwards.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from conftest import TIGHT_MODEL
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from sglang_process import generate_greedy, wait_deployment_idle

PROMPT_TOKENS, NEW_TOKENS, REQUESTS = 24, 60, 6  # any 2 of these 84-token requests overflow 160 (TIGHT_POOL_TOKENS)


def test_retraction_under_memory_pressure_keeps_every_output_exact(demo_deployment, demo_models):
    prompts = [[(17 * r + 5 * i) % 200 + 20 for i in range(PROMPT_TOKENS)] for r in range(REQUESTS)]

    def generate(prompt: list[int]) -> list[int]:
        return generate_greedy(demo_deployment.url, TIGHT_MODEL, prompt, NEW_TOKENS)["output_ids"]

    with ThreadPoolExecutor(REQUESTS) as pool:
        outputs = list(pool.map(generate, prompts))
    for prompt, served in zip(prompts, outputs):
        reference = prefillshare_greedy(demo_models.base, demo_models.decode["compute"], prompt, NEW_TOKENS)
        assert first_real_divergence(served, reference) is None, (served, reference.output_ids)
    log = (demo_deployment.log_dir / f"decode-{TIGHT_MODEL}-0.log").read_text(errors="replace")
    retracted = sum(int(n) for n in re.findall(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)", log))
    assert retracted > 0, "the pool never ran out: the test did not test retraction"
    wait_deployment_idle(demo_deployment.url)
