"""What the launcher refuses before starting anything, because it cannot hold the invariants yet.

Each refusal is a :class:`LaunchError` naming the server, the flag or the model field,
and why. Server arguments are read with SGLang's own parser (abbreviations, ``=``
forms and its ``--config`` file included; flags it does not know are left to the
server, which fails with its own message).

- **Speculative decoding** (any ``--speculative-*``): a draft model computes and keeps
  KV of its own for prompt tokens, and its proposals would be verified against KV the
  prefill module never produced (invariants 1, 2).
- **A decode radix cache other than the ``pfs`` tree** (``--disaggregation-decode-enable-radix-cache``
  on a decode server whose ``--radix-cache-backend`` is not ``pfs``): SGLang's own tree
  would keep KV that the decode module computed and serve it as prompt KV in a later turn
  (invariant 1). The launcher turns the ``pfs`` one on itself (``decode_cache``); with it,
  the combinations not tested with a tree that holds only base KV are refused: HiCache
  (``--enable-hierarchical-cache``), decode KV offload, HiSparse, the ``host_pool``
  retraction backup (SGLang itself picks ``cpu_tensor`` with a decode tree) and DP
  attention (SGLang's decode tree with it is experimental). ``--no-decode-cache`` runs them
  without the tree.
- **Hybrid SWA, Mamba and linear-attention architectures** (``config.json``): their
  per-request state is not the page-indexed KV the hand-off moves and the prefix tree
  shares (a sliding-window pool, recurrent state).
- **Pools that disagree** on ``--page-size``, ``--kv-cache-dtype`` or ``--chat-template``:
  the KV would be laid out or encoded differently, or the prompt tokenized differently,
  on each side.
- **DP attention in the unified mode** (``--enable-dp-attention``): SGLang prepares
  those LoRA batches where the per-request split at ``k`` is not applied (invariant 2).
- **Placement flags in pass-through arguments** on GPUs (``--tp-size``, ``--dp-size``,
  ``--pp-size``, ``--base-gpu-id``, and ``--mem-fraction-static`` where the launcher
  sets it): the launcher's flags place servers; a second, conflicting placement would
  silently win.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pfs_sglang.identity.fingerprint import read_config
from pfs_sglang.launch.processes import LaunchError
from pfs_sglang.launch.server_commands import DECODE_CACHE_ARGS, RADIX_CACHE_BACKEND
from pfs_sglang.launch.topology import Topology

# Architectures whose state is not (only) full-attention KV, by ``model_type``.
HYBRID_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "zamba", "zamba2", "bamba", "nemotron_h",
    "granitemoehybrid", "lfm2", "lfm2_moe", "lfm2_vl", "qwen3_next", "qwen3_5", "qwen3_5_moe", "kimi_linear",
    "minimax", "minimax_m1", "minimax_text_01", "rwkv", "rwkv5", "rwkv6", "rwkv7", "recurrent_gemma",
    "jet_nemotron", "bailing_hybrid", "plamo2", "hymba", "gemma3n", "llama4", "gpt_oss", "gemma4",
})
# config.json keys that only hybrid (recurrent or linear-attention) models carry.
HYBRID_CONFIG_KEYS = ("linear_attn_config", "hybrid_override_pattern", "layers_block_type", "ssm_state_size",
                      "mamba_d_state", "attn_layer_indices", "full_attn_idxs")
FULL_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "attention", "global_attention"})
MATCHING_ARGS = ("page_size", "kv_cache_dtype", "chat_template")
PLACEMENT_ARGS = ("tp_size", "dp_size", "pp_size", "base_gpu_id")


@functools.lru_cache(maxsize=1)
def _sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve", add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def sglang_args(args: Sequence[str], label: str) -> argparse.Namespace:
    """``args`` as SGLang will read them (its ``--config`` file merged in), unknown flags ignored."""
    parser = _sglang_parser()
    argv = ["--model-path", "unused", *args]
    try:
        if "--config" in argv:
            from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

            argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
        return parser.parse_known_args(argv)[0]
    except SystemExit as error:  # argparse already printed what it rejects
        raise LaunchError(f"SGLang rejects the {label} arguments {' '.join(args)!r}") from error
    except (OSError, ValueError) as error:
        raise LaunchError(f"cannot read the {label} arguments: {error}") from error


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _set_speculative(ns: argparse.Namespace, defaults: argparse.Namespace) -> list[str]:
    return [f"{_flag(key)} {value}" for key, value in sorted(vars(ns).items())
            if key.startswith("speculative_") and value != getattr(defaults, key)]


def _check_server(label: str, ns: argparse.Namespace, defaults: argparse.Namespace, placed: bool,
                  memory_placed: bool) -> None:
    speculative = _set_speculative(ns, defaults)
    if speculative:
        raise LaunchError(f"{label}: speculative decoding ({', '.join(speculative)}) is not supported by "
                          "PrefillShare yet: a draft model would compute prompt KV of its own and verify against "
                          "KV the prefill module never produced")
    if placed:
        for key in PLACEMENT_ARGS + (("mem_fraction_static",) if memory_placed else ()):
            if getattr(ns, key) != getattr(defaults, key):
                raise LaunchError(f"{label}: {_flag(key)} in the pass-through arguments conflicts with the "
                                  "launcher's placement; use --prefill-tp/--decode-tp, "
                                  "--prefill-mem-fraction/--decode-mem-fraction and --gpus instead")


# Set together with the decode tree, each is a path not tested with a tree of base KV only.
DECODE_CACHE_UNTESTED = (
    ("enable_hierarchical_cache", "--enable-hierarchical-cache (HiCache loads prefixes back from host memory)"),
    ("disaggregation_decode_enable_offload_kvcache", "--disaggregation-decode-enable-offload-kvcache"),
    ("enable_hisparse", "--enable-hisparse"),
    ("enable_dp_attention", "--enable-dp-attention (SGLang's decode tree with DP attention is experimental)"),
)


def _check_decode_cache(label: str, ns: argparse.Namespace) -> None:
    """A decode server's prefix tree holds base KV only: the ``pfs`` tree, on paths tested with it."""
    if not ns.disaggregation_decode_enable_radix_cache:
        return
    if ns.radix_cache_backend != RADIX_CACHE_BACKEND:
        raise LaunchError(f"{label}: --disaggregation-decode-enable-radix-cache needs --radix-cache-backend "
                          f"{RADIX_CACHE_BACKEND} (got {ns.radix_cache_backend!r}): SGLang's own decode radix cache "
                          "keeps KV the decode module computed and would serve it as prompt KV in a later turn "
                          "(invariant 1); the launcher's decode cache (on unless --no-decode-cache) is the pfs tree")
    untested = [flag for key, flag in DECODE_CACHE_UNTESTED if getattr(ns, key, False)]
    if ns.disaggregation_decode_retraction_backup == "host_pool":
        untested.append("--disaggregation-decode-retraction-backup host_pool (SGLang picks cpu_tensor with a "
                        "decode tree)")
    if untested:
        raise LaunchError(f"{label}: the decode prefix cache is not supported with {', '.join(untested)} yet: that "
                          "path is untested with a tree that may hold only base KV (invariant 1); pass "
                          "--no-decode-cache to run it without the cache")


def _hybrid_reason(config: dict[str, Any]) -> str | None:
    """Why a config.json describes a hybrid SWA / Mamba / linear-attention model, or None."""
    for part in (config, config.get("text_config") or {}):
        model_type = part.get("model_type")
        if model_type in HYBRID_MODEL_TYPES:
            return f"model_type {model_type!r} mixes attention with sliding-window, recurrent or linear layers"
        other_layers = sorted(set(part.get("layer_types") or ()) - FULL_ATTENTION_LAYER_TYPES)
        if other_layers:
            return f"layer_types holds {', '.join(other_layers)} layers"
        keys = [key for key in HYBRID_CONFIG_KEYS if part.get(key) is not None]
        if keys:
            return f"config has {', '.join(keys)} (recurrent or linear-attention layers)"
        if part.get("is_hybrid_swa"):
            return "config sets is_hybrid_swa"
        window = part.get("sliding_window")
        max_positions = part.get("max_position_embeddings")
        if window and part.get("use_sliding_window", True) is not False and \
                (max_positions is None or window < max_positions):
            return f"sliding_window {window} (attention limited to a window)"
    return None


def check_architecture(model_dir: Path, label: str) -> None:
    try:
        config = read_config(model_dir)
    except (OSError, ValueError) as error:
        raise LaunchError(f"{label} {model_dir}: cannot read its config: {error}") from error
    reason = _hybrid_reason(config)
    if reason:
        raise LaunchError(f"{label} {model_dir}: hybrid SWA / Mamba / linear-attention models are not supported by "
                          f"PrefillShare yet ({reason}): their state is not the page-indexed KV that is handed "
                          "over and shared")


def check_guards(topology: Topology) -> None:
    """Refuse (``LaunchError``) what the servers this host starts cannot serve correctly
    (its ``role``'s; with one topology file on every host, each decode pool's arguments are
    compared with the prefill pool's); see the module docstring."""
    t = topology
    check_architecture(t.base_model, "base model")
    for spec in t.local_decode_models():
        check_architecture(spec.path, f"decode model '{spec.name}'")
    defaults = sglang_args((), "default")
    placed = t.device == "cuda"
    prefill = sglang_args(t.prefill_args, "--prefill-args")
    _check_server("prefill servers", prefill, defaults, placed, t.pack or t.prefill_mem_fraction is not None)
    if t.deployment_mode().unified:  # one server: nothing is handed over between pools
        spec = t.unified_server()
        unified = sglang_args(t.decode_args_of(spec), "unified servers' --decode-args")
        _check_server("unified servers", unified, defaults, placed, t.pack or t.decode_mem_fraction_of(spec) is not None)
        if unified.enable_dp_attention:
            raise LaunchError("unified servers: --enable-dp-attention is not supported in the unified mode: SGLang "
                              "prepares DP-attention LoRA batches outside the step that splits each request's "
                              "adapter at k (invariant 2); use --mode pd")
        return
    for spec in t.local_decode_models():
        label = f"decode model '{spec.name}'"
        # The launcher's decode-cache flags first, the pass-through ones after (they win, as on the command line).
        decode = sglang_args((*(DECODE_CACHE_ARGS if t.decode_cache else ()), *t.decode_args_of(spec)),
                             f"{label} --decode-args")
        _check_server(label, decode, defaults, placed, t.pack or t.decode_mem_fraction_of(spec) is not None)
        _check_decode_cache(label, decode)
        for key in MATCHING_ARGS:
            if getattr(decode, key) != getattr(prefill, key):
                raise LaunchError(f"{label}: {_flag(key)} differs between pools: prefill servers use "
                                  f"{getattr(prefill, key)!r}, this decode pool {getattr(decode, key)!r}; "
                                  "the KV handed over (or the prompt's tokens) would not match")
