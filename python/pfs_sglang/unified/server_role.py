"""Whether this SGLang process is a unified server (the switch for invariants 1-3 there).

A unified server is SGLang's multi-LoRA (``--enable-lora``) with the ``pfs`` radix-cache
backend and no disaggregation. Only there do adapter requests split at ``k`` and cap
what they insert into the tree; a stock ``--enable-lora`` server in the same
environment (the benchmark's ``sglang-lora``) keeps SGLang's own behaviour.
"""

from __future__ import annotations

import functools

from pfs_sglang.cache.prefill_module_cache import RADIX_CACHE_BACKEND


def is_unified_server_args(server_args) -> bool:
    return (
        bool(server_args.enable_lora)
        and server_args.radix_cache_backend == RADIX_CACHE_BACKEND
        and str(server_args.disaggregation_mode) == "null"
    )


@functools.cache
def is_unified_server() -> bool:
    """This process serves a unified server (read once; server arguments do not change)."""
    from sglang.srt.runtime_context import get_server_args

    return is_unified_server_args(get_server_args())
