"""The context length each PD decode server can serve, planned before anything starts.

Invariant-neutral: which requests a decode server takes. SGLang's decode admission needs
a request's prompt plus ``--num-reserved-decode-tokens`` (512) free in the decode pool,
so a pool of P tokens can only ever take requests of ``P - reserve`` tokens
(``pfs_sglang.decode.admission``). Where the launcher knows a decode server's pool (on
CPU its ``--max-total-tokens`` or its share of ``--kv-budget``, ``pool_sizing.py``; on
GPUs when the decode arguments give one), it

- refuses a pool that admits no prompt at all, and a ``--context-length`` in the decode
  arguments longer than the pool admits (``LaunchError`` naming the numbers);
- passes ``--context-length`` = what the pool admits when that is less than the model's
  own, so SGLang's tokenizer refuses a longer request with its own 400 ("The input (N
  tokens) is longer than the model's context length (C tokens)") and its ``/v1/models``
  advertises it as ``max_model_len``;
- says so in ``--dry-run`` and in each decode server's start-up line.

A pool sized at start (a GPU's memory fraction) is capped by the decode server itself
(``decode/admission.py``); the router reads what each one serves (``router/decode_limits.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pfs_sglang.decode.admission import DecodePoolLimit, context_needed, pool_tokens_for
from pfs_sglang.launch.guards import sglang_args
from pfs_sglang.launch.pool_sizing import decode_server_model, model_context_length, plan_server_pools
from pfs_sglang.launch.processes import LaunchError
from pfs_sglang.launch.topology import DecodeServerSpec, Topology

MIN_PROMPT_TOKENS = 1  # a pool that admits fewer is refused at launch


@dataclass(frozen=True)
class PlannedDecodeLimit:
    """A decode server's pool limit (``limit``; None when its pool is sized at start) and
    the ``--context-length`` its own decode arguments give (``asked``; None: none)."""

    limit: DecodePoolLimit | None
    asked: int | None = None

    @property
    def context_args(self) -> tuple[str, ...]:
        """``--context-length`` for a decode server whose pool admits less than its model's context."""
        if self.limit is None or self.asked is not None or not self.limit.pool_bound:
            return ()
        return ("--context-length", str(self.limit.context_length))

    def describe(self) -> str:
        """One line for ``--dry-run`` and the start-up log."""
        if self.limit is None:
            return ("context length: the model's, unless its KV pool (sized when it starts) holds less than that "
                    "plus the decode reserve: the server then serves what its pool admits (the router's /v1/models "
                    "says how much)")
        return self.limit.describe() + (" (--context-length set)" if self.context_args else "")


def planned_limit(topology: Topology, spec: DecodeServerSpec, decode_pool_tokens: int) -> PlannedDecodeLimit:
    """The decode server's pool limit, from its arguments as SGLang reads them (over ``decode_pool_tokens``,
    the launcher's CPU pool) and its model's config."""
    t = topology
    pool = ("--max-total-tokens", str(decode_pool_tokens)) if t.device == "cpu" else ()
    ns = sglang_args((*pool, *t.decode_args_of(spec)), f"decode server '{spec.name}' --decode-args")
    if ns.max_total_tokens is None:
        return PlannedDecodeLimit(None, ns.context_length)
    model_context = ns.context_length or model_context_length(decode_server_model(t, spec))
    limit = DecodePoolLimit(pool_tokens=ns.max_total_tokens, reserved_decode_tokens=ns.num_reserved_decode_tokens,
                            page_size=ns.page_size or 1, model_context=model_context)
    return PlannedDecodeLimit(limit, ns.context_length)


def check_decode_limits(topology: Topology) -> dict[str, PlannedDecodeLimit]:
    """Each PD decode server this host starts, by name: its planned limit. Refuses
    (``LaunchError``) a pool that admits no prompt and a ``--context-length`` it cannot serve."""
    t = topology
    if t.deployment_mode().unified:  # one server, no hand-off: SGLang's own admission (no decode reserve)
        return {}
    plans: dict[str, PlannedDecodeLimit] = {}
    decode_pool_tokens = plan_server_pools(t).decode_tokens
    for spec in t.local_decode_servers():
        plan = plans[spec.name] = planned_limit(t, spec, decode_pool_tokens)
        limit, asked = plan.limit, plan.asked
        if limit is None:
            continue
        if limit.max_prompt_tokens < MIN_PROMPT_TOKENS:
            smallest = pool_tokens_for(context_needed(MIN_PROMPT_TOKENS, 0), limit.reserved_decode_tokens,
                                       limit.page_size)
            raise LaunchError(
                f"decode server '{spec.name}': its {limit.describe()}; give it at least {smallest} tokens "
                "(--max-total-tokens in --decode-args) or a smaller --num-reserved-decode-tokens")
        if asked is not None and asked > limit.admissible_tokens:
            raise LaunchError(
                f"decode server '{spec.name}': --context-length {asked} cannot be served by its KV pool of "
                f"{limit.pool_tokens} tokens: SGLang's decode admission reserves {limit.reserved_decode_tokens} "
                f"tokens per request, so it admits {limit.admissible_tokens} at most; give it at least "
                f"{pool_tokens_for(asked, limit.reserved_decode_tokens, limit.page_size)} tokens or a shorter "
                "--context-length")
    return plans
