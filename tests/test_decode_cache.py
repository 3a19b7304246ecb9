"""The decode-side prefix cache of base KV (issue 23, item 1) on real PD deployments.

Two deployments, both with the decode cache on (the launcher's default: SGLang's decode
radix cache as the ``pfs`` tree) and SGLang's overlap scheduling on every decode server:

* page size 1, the session's demo deployment (``conftest.demo_deployment``): the demo
  base, ``compute`` (full weights) and two LoRA adapters of the base co-located on one
  decode server (``extract-lora``, ``compute-lora``);
* page size 4, this module's own, every server under ``SGLANG_TEST_RETRACT`` (every third
  decode step retracts all but one running request): ``extract`` with the default pool
  and ``compute-small`` (``compute`` behind a small decode pool: eviction).

Each check is against the transformers oracle (invariant 5) and proves the hits it relies
on from the decode server's reply (``meta_info["pfs_decode_prefix_tokens"]``: the prefix
its cache held, so the prefill did not send it; the router counts the same figure in
``pfs_router_kv_decode_prefix_tokens_total``). The hits are exact: a conversation's next
turn hits ``floor_page(k)`` of the turn before, never more, so a tree that kept the KV
the decode module computed (``prompt[k:]``, the answer) would show a longer hit, and its
outputs would leave the oracle (``test_decode_module_kv_is_never_served_from_the_tree``).
Every test ends with every pool idle (``wait_deployment_idle``, which also flushes the
trees, so each test starts with empty ones, as each deployment's fixture here does first);
the last one reads the logs of every server these tests use for SGLang's leak check and
tracebacks.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from pfs_sglang.launch.deployment import Deployment
from pfs_sglang.launch.processes import free_port
from pfs_sglang.launch.topology import DecodeModelSpec, Topology
from pfs_sglang.oracle import first_real_divergence, prefillshare_greedy
from sglang_process import generate_greedy, metric_total, wait_deployment_idle

pytestmark = pytest.mark.server

SMALL_MODEL = "compute-small"  # compute's weights behind a decode pool a few prompts fill (eviction)
SMALL_POOL = 320
_conversation_ids = itertools.count()


@dataclass(frozen=True)
class Served:
    """A running deployment, its page size, where each model's weights are (for the oracle) and
    the logs of the servers this module's requests reach."""

    url: str
    page_size: int
    base: Path
    paths: dict[str, Path]
    server_logs: Callable[[], list[Path]]
    alive: Callable[[], bool]

    def floor_page(self, tokens: int) -> int:
        return tokens // self.page_size * self.page_size

    def counters(self, model: str) -> tuple[float, float, float]:
        """(decode-prefix tokens, KV transfers, KV bytes moved) the router has counted for ``model``.

        The router counts a transfer's bytes only when the prefill server's reply came before
        the decode server's (``PrefillDecodeClient.complete``); the decode prefix always."""
        return tuple(metric_total(self.url, f'pfs_router_{name}_total{{model="{model}"}}')
                     for name in ("kv_decode_prefix_tokens", "kv_transfers", "kv_transfer_bytes"))

    def ask(self, model: str, prompt: list[int], max_new_tokens: int = 6, **extra) -> tuple[list[int], int, int | None]:
        """One greedy request checked against the oracle; (its output, the decode-prefix hit, the KV bytes
        moved, None where the router did not learn them)."""
        before = self.counters(model)
        reply = generate_greedy(self.url, model, prompt, max_new_tokens, **extra)
        after = self.counters(model)
        [hit] = reply["meta_info"]["pfs_decode_prefix_tokens"][-1:]
        assert after[0] - before[0] == hit  # the router counts the decode server's figure
        moved = int(after[2] - before[2]) if after[1] > before[1] else None
        self.check_oracle(model, prompt, reply["output_ids"])
        return reply["output_ids"], hit, moved

    def check_oracle(self, model: str, prompt: list[int], output: list[int]) -> None:
        reference = prefillshare_greedy(self.base, self.paths[model], prompt, len(output))
        divergence = first_real_divergence(output, reference)
        assert divergence is None, f"{model} {len(prompt)}-token prompt: {output} != {reference.output_ids}"


def fresh_prompt(length: int) -> list[int]:
    """A prompt no other in this module starts with (its first token is its own)."""
    conversation = next(_conversation_ids)
    assert conversation < 200
    return [20 + conversation] + [(conversation * 37 + 11 * i) % 250 + 230 for i in range(length - 1)]


@pytest.fixture(scope="module")
def page1(demo_deployment, demo_models, lora_adapters):
    paths = {"compute": demo_models.decode["compute"], **{name: lora_adapters[name] for name in ("extract-lora", "compute-lora")}}
    used = ("prefill-0.log", "decode-compute-0.log", "decode-lora-0.log")
    wait_deployment_idle(demo_deployment.url)  # empty trees: the session's other tests may have left prefixes
    yield Served(demo_deployment.url, 1, demo_models.base, paths,
                 lambda: [demo_deployment.log_dir / name for name in used], demo_deployment.launcher_alive)


@pytest.fixture(scope="module")
def page4(tmp_path_factory, demo_models):
    paged = ("--page-size", "4")
    paths = {"extract": demo_models.decode["extract"], SMALL_MODEL: demo_models.decode["compute"]}
    small = ("--max-total-tokens", str(SMALL_POOL), "--num-reserved-decode-tokens", "16")
    topology = Topology(base_model=demo_models.base,
                        decode_models=(DecodeModelSpec("extract", paths["extract"]),
                                       DecodeModelSpec(SMALL_MODEL, paths[SMALL_MODEL], args=small)),
                        port=free_port(), log_dir=tmp_path_factory.mktemp("decode_cache_page4"), max_total_tokens=2048,
                        prefill_args=paged, decode_args=paged)
    deployment = Deployment(topology)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SGLANG_TEST_RETRACT", "1")  # read by the decode schedulers; prefill ones never retract
            deployment.start()
        yield Served(deployment.url, 4, demo_models.base, paths, lambda: list(deployment.log_dir.glob("*.log")),
                     lambda: not deployment.dead_children())
    finally:
        deployment.stop()


@pytest.fixture(params=[pytest.param("page1", marks=pytest.mark.shared_server("demo_deployment")), "page4"])
def served(request) -> Served:
    return request.getfixturevalue(request.param)


def models_of(served: Served) -> list[str]:
    return list(served.paths)


def test_multi_turn_conversations_hit_the_decode_cache_and_match_the_oracle(served):
    """Three turns per model, each next prompt = the last prompt + its answer + new text: from
    turn 2 the decode server already holds floor_page(k) of the turn before, and only that."""
    for model in models_of(served):
        prompt = fresh_prompt(23)
        previous_k = None
        for turn in range(3):
            output, hit, moved = served.ask(model, prompt)
            if previous_k is None:
                assert hit == 0, (model, turn, hit)
            else:
                assert hit == served.floor_page(previous_k) > 0, (model, turn, hit, previous_k)
            assert moved is None or moved > 0  # the rest of prompt[:k] still comes from the prefill
            previous_k = len(prompt) - 1
            prompt = prompt + output + [(turn * 13 + i) % 200 + 25 for i in range(5 + turn)]
    wait_deployment_idle(served.url)


def test_decode_module_kv_is_never_served_from_the_tree(page1):
    """Page 1 is the sharpest case: a tree that kept the KV of the decode module's last prompt
    token X[-1] or of its answer would give B = X + [t] a hit of len(X), and C = X + answer + text
    one past it, and both outputs would then read decode-module KV as prompt KV (leaving the
    oracle). The hits must stop at k of A: len(X) - 1."""
    served = page1
    for model in models_of(served):
        x = fresh_prompt(17)
        answer, _, _ = served.ask(model, x)
        _, hit_b, _ = served.ask(model, x + [42])
        assert hit_b == len(x) - 1, (model, hit_b)
        _, hit_c, _ = served.ask(model, x + answer + [43, 44])
        assert hit_c == len(x), (model, hit_c)  # B's k = len(X) (all base KV), never into the answer
    # input logprobs from position s: k = s, so the tree holds prompt[:s] and no further
    y = fresh_prompt(20)
    reply = generate_greedy(served.url, "compute", y, 1, return_logprob=True, logprob_start_len=8)
    assert reply["meta_info"]["pfs_decode_prefix_tokens"][-1] == 0
    reference = prefillshare_greedy(served.base, served.paths["compute"], y, 1, prefill_len=8)
    assert first_real_divergence(reply["output_ids"], reference) is None
    _, hit, _ = served.ask("compute", y + [45])
    assert hit == 8, hit
    wait_deployment_idle(served.url)


def test_a_full_hit_moves_no_kv_and_adapters_share_the_tree(page1):
    """The same prompt twice: the second time the decode server holds all of prompt[:k] (page 1),
    the prefill sends no KV page (only the concluding metadata). On the co-located LoRA server
    the adapters share one tree keyed on the prefill module: compute-lora hits what extract-lora left."""
    served = page1
    prompt = fresh_prompt(30)
    served.ask("compute", prompt)
    _, hit, moved = served.ask("compute", prompt)
    assert hit == len(prompt) - 1 and moved in (None, 0), (hit, moved)  # P = k: no page to send
    shared = fresh_prompt(26)
    served.ask("extract-lora", shared)
    _, hit, _ = served.ask("compute-lora", shared + [50, 51])
    assert hit == len(shared) - 1, hit
    _, hit, moved = served.ask("compute-lora", shared)  # a full hit of what the other adapter inserted
    assert hit == len(shared) - 1 and moved in (None, 0), (hit, moved)
    wait_deployment_idle(served.url)


def test_every_prompt_length_modulo_the_page_size_with_a_hit(page4):
    """A prompt of each length against a held prefix: the hit is whole pages only, the kept
    partial page and the tail extend line up for every residue."""
    served = page4
    stem = fresh_prompt(6)
    served.ask("extract", stem)
    for extra in range(1, 2 * served.page_size + 2):
        prompt = stem + [(7 * extra + i) % 200 + 25 for i in range(extra)]
        _, hit, _ = served.ask("extract", prompt, max_new_tokens=4)
        assert served.floor_page(len(stem) - 1) <= hit <= served.floor_page(len(prompt) - 1), (extra, hit)
    wait_deployment_idle(served.url)


def test_a_small_pool_evicts_the_oldest_prefixes_and_still_serves_every_request(page4):
    """compute-small's decode pool holds about three of these prompts' prefixes: asking five evicts the
    oldest (its hit when asked again is gone), the newest is still held, every answer matches."""
    served = page4
    prompts = [fresh_prompt(97) for _ in range(5)]
    for prompt in prompts:
        served.ask(SMALL_MODEL, prompt, max_new_tokens=4)
    _, hit_oldest, _ = served.ask(SMALL_MODEL, prompts[0], max_new_tokens=4)
    assert hit_oldest < served.floor_page(len(prompts[0]) - 1), "nothing was evicted: the test did not test eviction"
    _, hit_newest, _ = served.ask(SMALL_MODEL, prompts[-1], max_new_tokens=4)
    assert hit_newest == served.floor_page(len(prompts[-1]) - 1), hit_newest
    wait_deployment_idle(served.url)


def test_a_burst_over_one_new_context_holds_and_moves_it_once(page4):
    """Four requests at once over a context the decode server does not hold yet (a fan-out of
    agents over one history): the first is preallocated and sent the context, the others wait
    until its prefix is in the tree (``decode/shared_prefix_wait.py``), then hit all of it, so
    the pool holds it once and the prefill sends it once. Every output matches the oracle."""
    served = page4
    context = fresh_prompt(97)
    jobs = [context + [(3 * j + i) % 200 + 25 for i in range(2 + j)] for j in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda prompt: generate_greedy(served.url, "extract", prompt, 6), jobs))
    hits = sorted(reply["meta_info"]["pfs_decode_prefix_tokens"][-1] for reply in replies)
    assert hits[0] == 0 and all(hit >= served.floor_page(len(context)) for hit in hits[1:]), hits
    for prompt, reply in zip(jobs, replies):
        served.check_oracle("extract", prompt, reply["output_ids"])
    wait_deployment_idle(served.url)


def retractions_logged(served: Served) -> int:
    return sum(int(count) for log in served.server_logs()
               for count in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)", log.read_text(errors="replace")))


def test_retracted_requests_over_a_held_prefix_give_the_unretracted_output(page4):
    """Eight concurrent requests over one prefix the decode server holds, retracted and resumed
    (their rows restored from the backup, re-inserted up to floor_page(k)); every output matches."""
    served = page4
    prefix = fresh_prompt(21)
    served.ask("extract", prefix)
    before, hit_before = retractions_logged(served), served.counters("extract")[0]  # the router's count
    jobs = [prefix + [(5 * j + i) % 200 + 25 for i in range(1 + j)] for j in range(8)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(lambda prompt: generate_greedy(served.url, "extract", prompt, 20)["output_ids"], jobs))
    for prompt, output in zip(jobs, outputs):
        served.check_oracle("extract", prompt, output)
    assert retractions_logged(served) > before, "no request was retracted: the test did not test retraction"
    hits = served.counters("extract")[0] - hit_before
    assert hits >= len(jobs) * served.floor_page(len(prefix) - 1), hits
    wait_deployment_idle(served.url)


def test_no_server_leaked_or_failed(served):
    """SGLang checks its pools whenever a server goes idle (available + evictable + protected =
    total, raising otherwise); a double free or a leak of the decode cache would be there."""
    wait_deployment_idle(served.url)
    assert served.alive()
    for log in served.server_logs():
        text = log.read_text(errors="replace")
        for needle in ("memory leak", "Traceback"):
            assert needle not in text, f"{log.name}: {needle}"
