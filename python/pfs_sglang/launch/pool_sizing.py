"""How one KV budget is split among the servers of a deployment: the launcher's
``--kv-budget`` and the benchmark's equal budgets use this rule and no other.

Invariant-neutral: pool sizes, not what a pool holds. Without a budget every server gets
``--max-total-tokens`` (the launcher's CPU default). With ``--kv-budget B`` (on CPU, one
host running the whole deployment):

- **unified**: each of the ``R`` unified servers gets ``B // R`` (one pool, one tree each);
- **PD**: each decode server gets room for one request of the context length ``C`` it
  serves, ``pool_tokens_for(C)`` (SGLang's decode admission needs the prompt plus its
  reserve of decode tokens free). That is one context, not one per running request:
  requests over one context hold it once in a decode pool (the decode prefix cache and
  ``decode/shared_prefix_wait.py``), so each further one adds only its own tail and
  reserve. The prefill servers share the rest, ``(B - decode servers x pool) //
  prefill servers``: theirs is the tree every decode model reads (invariant 3), so the
  budget goes where the sharing is;
- ``C`` is the decode servers' ``--context-length`` (``--decode-args``) where given, else
  the longest for which the decode pools take at most half the budget, and never more
  than the model's own context length;
- refused (``LaunchError``): a budget whose prefill share cannot hold one prompt of ``C``
  tokens, or whose decode pools cannot admit any prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from pfs_sglang.decode.admission import SGLANG_RESERVED_DECODE_TOKENS, floor_page, pool_tokens_for
from pfs_sglang.identity.fingerprint import read_config
from pfs_sglang.launch.guards import sglang_args
from pfs_sglang.launch.processes import LaunchError
from pfs_sglang.launch.topology import DecodeServerSpec, Topology


@dataclass(frozen=True)
class PDPools:
    """A PD deployment's pools under one budget: each prefill server's and each decode
    server's ``--max-total-tokens``, and the context length ``C`` the decode pools were sized for."""

    budget: int
    prefill_tokens: int
    decode_tokens: int
    context_tokens: int

    def describe(self, prefill_servers: int, decode_servers: int) -> str:
        return (f"KV budget {self.budget} tokens: {decode_servers} decode pool(s) of {self.decode_tokens} (one "
                f"{self.context_tokens}-token context plus SGLang's decode reserve; requests over one context share "
                f"it there), {prefill_servers} prefill pool(s) of {self.prefill_tokens} (the rest: the shared tree)")


def split_pd_budget(budget: int, prefill_servers: int, decode_servers: int, context_tokens: int,
                    reserved_decode_tokens: int = SGLANG_RESERVED_DECODE_TOKENS, page_size: int = 1) -> PDPools:
    """The rule's PD split for decode pools that serve ``context_tokens``; refuses a budget too small for it."""
    decode = pool_tokens_for(context_tokens, reserved_decode_tokens, page_size)
    rest = budget - decode_servers * decode
    prefill = floor_page(rest // max(prefill_servers, 1), page_size)
    if context_tokens < 1 or prefill < context_tokens:
        raise LaunchError(
            f"KV budget of {budget} tokens cannot serve a context of {context_tokens} tokens: {decode_servers} decode "
            f"pool(s) of {decode} tokens leave {max(rest, 0)} for {prefill_servers} prefill pool(s), which need "
            f"{context_tokens} each; give --kv-budget at least "
            f"{decode_servers * decode + prefill_servers * context_tokens} or a shorter --context-length")
    return PDPools(budget, prefill, decode, context_tokens)


def default_context_tokens(budget: int, decode_servers: int, model_context: int,
                           reserved_decode_tokens: int = SGLANG_RESERVED_DECODE_TOKENS, page_size: int = 1) -> int:
    """The longest context for which the decode pools take at most half the budget (at most the model's)."""
    per_pool = floor_page(budget // (2 * decode_servers), page_size)
    fitting = floor_page(per_pool - pool_tokens_for(0, reserved_decode_tokens, page_size), page_size)
    return min(model_context, fitting)


def model_context_length(model_dir: Path) -> int:
    """The model's context length as SGLang derives it from ``config.json`` (its ``get_context_length``)."""
    from sglang.srt.utils.hf_transformers.common import get_context_length

    config = read_config(model_dir)
    text = config.get("text_config") or config
    return get_context_length(SimpleNamespace(**text))


def decode_server_model(topology: Topology, spec: DecodeServerSpec) -> Path:
    """The weights a decode server loads: the base for LoRA adapters, else its decode module."""
    return topology.base_model if spec.lora else spec.models[0].path


@dataclass(frozen=True)
class ServerPools:
    """Each kind of server's ``--max-total-tokens`` on this host, and the rule that gave them (for ``--dry-run``)."""

    prefill_tokens: int
    decode_tokens: int
    unified_tokens: int
    rule: str


def plan_server_pools(topology: Topology) -> ServerPools:
    """The pools of the servers this host starts, by the rule above."""
    t = topology
    if t.kv_budget is None:
        every = t.max_total_tokens
        return ServerPools(every, every, every, f"each server's KV pool: {every} tokens (--max-total-tokens)")
    if t.deployment_mode().unified:
        each = t.kv_budget // t.replicas
        return ServerPools(each, each, each, f"KV budget {t.kv_budget} tokens: {t.replicas} unified pool(s) of {each}")
    ns = sglang_args(t.decode_args, "--decode-args")
    page_size, reserve = ns.page_size or 1, ns.num_reserved_decode_tokens
    servers = t.local_decode_servers()
    decode_servers = len(servers) * t.decode_replicas
    context = ns.context_length or default_context_tokens(
        t.kv_budget, decode_servers, min(model_context_length(decode_server_model(t, spec)) for spec in servers),
        reserve, page_size)
    pools = split_pd_budget(t.kv_budget, t.prefill_replicas, decode_servers, context, reserve, page_size)
    return ServerPools(pools.prefill_tokens, pools.decode_tokens, pools.decode_tokens,
                       pools.describe(t.prefill_replicas, decode_servers))
