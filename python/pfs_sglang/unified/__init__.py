"""The unified server: one SGLang server holds the base and every LoRA decode module.

One process, one KV pool, one prefix tree keyed on the prefill module (see
docs/DESIGN.md, "Unified"). Nothing is transferred: inside a request's extend the
positions before ``k`` (:func:`pfs_sglang.decode.prompt_split.prefill_module_len`) run
with the base alone and the positions from ``k`` on with the request's adapter
(:mod:`pfs_sglang.unified.adapter_segments`, invariant 2), and the tree takes in at
most the first ``k`` tokens of an adapter request (:mod:`pfs_sglang.cache`,
invariants 1 and 3).

A server is unified when it runs SGLang's multi-LoRA with the ``pfs`` radix-cache
backend and no disaggregation (:func:`is_unified_server`); the launcher starts it so.
"""

from pfs_sglang.unified.server_role import is_unified_server

__all__ = ["is_unified_server"]
