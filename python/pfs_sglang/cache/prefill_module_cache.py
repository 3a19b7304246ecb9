"""The prefill pool's prefix tree, keyed on the prefill module (invariant 3).

Registered with SGLang's radix-cache backend registry as ``pfs`` and selected with
``--radix-cache-backend pfs`` on the prefill server. It is SGLang's own
``UnifiedRadixCache``; only the request namespace changes. Stock SGLang namespaces a
request by ``extra_key + lora_id``, so per-model adapters would split the tree. Here
every request's namespace becomes ``pfs:<prefill-module digest>`` plus the user's own
``extra_key`` (LoRA id removed), while ``cache_salt`` keeps isolating as usual: every
decode model that shares a prompt prefix hits the same nodes.

In a unified server (:mod:`pfs_sglang.unified`: the base and every LoRA decode module
in one server) the same tree holds base KV only (invariant 1): a request with an
adapter matches at most its first ``k`` tokens (:func:`prefill_module_len`) and
checkpoints at most its first ``k`` (page-floored by SGLang's insert), so KV an
adapter computed (``prompt[k:]``, output tokens) is freed with the request and never
served to anyone, the request itself included (a retracted request rebuilds from at
most ``k``). Base requests and PD prefill servers insert as SGLang does.
"""

from __future__ import annotations

import dataclasses

from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from pfs_sglang.decode.prompt_split import prefill_module_len

RADIX_CACHE_BACKEND = "pfs"
_NAMESPACED = "pfs_namespaced"


def prefill_module_namespace(prefill_digest: str, extra_key: str | None, lora_id: str | None) -> str:
    """The tree namespace of a request: the prefill module, then the user's extra key."""
    user_key = extra_key or ""
    if lora_id and user_key.endswith(lora_id):
        user_key = user_key[: -len(lora_id)]
    return f"pfs:{prefill_digest}" + (f"|{user_key}" if user_key else "")


class PrefillModuleRadixCache(UnifiedRadixCache):
    """SGLang's radix cache with requests namespaced by the prefill module."""

    prefill_digest: str = ""
    caps_adapter_requests: bool = False  # a unified server: adapter requests keep base KV only
    caps_every_request: bool = False  # a PD decode server: every request keeps base KV only

    def _base_kv_len(self, req) -> int | None:
        """How far a request's KV is the base's, where a decode module or an adapter computed the rest."""
        if self.caps_every_request or (self.caps_adapter_requests and req.lora_id is not None):
            return prefill_module_len(req)
        return None

    def _adopt_namespace(self, req) -> None:
        if getattr(req, _NAMESPACED, False):
            return
        req.extra_key = prefill_module_namespace(self.prefill_digest, req.extra_key, req.lora_id)
        setattr(req, _NAMESPACED, True)

    def match_prefix(self, params: MatchPrefixParams):
        if params.req is not None:
            self._adopt_namespace(params.req)
            key = params.key
            limit = key.limit
            base_kv_len = self._base_kv_len(params.req)
            if base_kv_len is not None:
                limit = base_kv_len if limit is None else min(limit, base_kv_len)
            params = dataclasses.replace(
                params,
                key=RadixKey(key.token_ids, params.req.extra_key, key.is_bigram, limit, key.cache_salt),
            )
        return super().match_prefix(params)

    def checkpoint(self, req, *, up_to: int, **kwargs) -> None:
        self._adopt_namespace(req)
        base_kv_len = self._base_kv_len(req)
        if base_kv_len is not None:
            up_to = min(up_to, base_kv_len)
        super().checkpoint(req, up_to=up_to, **kwargs)


def is_decode_server_args(server_args) -> bool:
    return str(server_args.disaggregation_mode) == "decode"


def build_prefill_module_cache(ctx):
    """Factory for ``register_radix_cache_backend``: a tree named by the prefill module's fingerprint."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    from pfs_sglang.transfer.zmq_backend import expected_prefill_fingerprint
    from pfs_sglang.unified.server_role import is_unified_server_args

    cache = create_unified_radix_cache(ctx, cache_class=PrefillModuleRadixCache)
    decode = is_decode_server_args(ctx.server_args)
    # The prefill module's digest: on a decode server the one its model was trained against
    # (a LoRA decode server serves the base); elsewhere the model's own, the launcher's
    # fingerprint when it handed one over (no second hash of the weights).
    mode = DisaggregationMode.DECODE if decode else DisaggregationMode.PREFILL
    cache.prefill_digest = expected_prefill_fingerprint(ctx.server_args.model_path, mode)
    cache.caps_adapter_requests = is_unified_server_args(ctx.server_args)
    cache.caps_every_request = decode
    return cache


def check_decode_tree_once_built(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.init_disaggregation`` (the scheduler's tree is built by then): ``check_decode_tree``."""
    check_decode_tree(scheduler)
    return result


def check_decode_tree(scheduler) -> None:
    """A decode server whose prefix tree is on must run this tree with the cap (invariant 1).

    SGLang's own decode tree would insert the prompt and output KV the decode module
    computed and serve it as prompt KV; so would this tree without ``caps_every_request``.
    Raises ``RuntimeError`` (the server does not start) naming the fix.
    """
    args = scheduler.server_args
    if not (is_decode_server_args(args) and args.disaggregation_decode_enable_radix_cache):
        return
    tree = scheduler.tree_cache
    if isinstance(tree, PrefillModuleRadixCache) and tree.caps_every_request:
        return
    raise RuntimeError(
        "pfs_sglang: --disaggregation-decode-enable-radix-cache on a decode server needs "
        f"--radix-cache-backend {RADIX_CACHE_BACKEND} (got {type(tree).__name__}, backend "
        f"{args.radix_cache_backend!r}): another decode tree would keep KV the decode module computed and serve it "
        "as prompt KV (invariant 1)")


def register_prefill_module_cache() -> None:
    from sglang.srt.mem_cache.registry import (
        register_radix_cache_backend,
        registered_radix_cache_backends,
    )

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if RADIX_CACHE_BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(RADIX_CACHE_BACKEND, build_prefill_module_cache)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.init_disaggregation", check_decode_tree_once_built,
                          HookType.AFTER)
