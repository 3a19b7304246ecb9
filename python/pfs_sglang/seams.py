"""Every place pfs_sglang reaches into SGLang (a seam), as one table, and how to find each in the installed SGLang.

The project changes SGLang only from outside: hooks through SGLang's ``HookRegistry``,
entries in its registries, a forged enum member, process-wide patches, subclasses that
override members of SGLang's classes, private members read or called, and SGLang's
source read by path. Each of those is a seam that an SGLang upgrade can break, most of
them silently: ``HookRegistry.apply_hooks`` logs a target it cannot find and carries on,
and an override of a renamed method is simply never called. ``SEAMS`` lists them all,
each with the invariant it serves and why no public API does the job (the invariants and
the reasons, by group: docs/DESIGN.md, "Seams into SGLang"); ``resolve`` finds a seam's
target in the installed SGLang or raises :class:`SeamNotFound` naming it.
``tests/test_seams.py`` checks the table against the installed SGLang and against what
the plugin registers, in seconds and without a server. A new seam is one entry here.
"""

from __future__ import annotations

import ast
import functools
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal[
    "hook",             # a HookRegistry target (hook_type: SGLang's HookType value)
    "registry",         # an SGLang registry or extension API the project adds an entry to
    "enum-member",      # a member the project adds to an SGLang enum
    "monkey-patch",     # a process-wide patch made outside HookRegistry
    "import-stand-in",  # SGLang code whose import a stand-in module satisfies (no CUDA)
    "subclass",         # an SGLang class the project subclasses
    "override",         # a member of such a class the project overrides (SGLang calls it)
    "private-member",   # an internal member of SGLang the project calls, or sets or reads where a rename
                        # would go unnoticed (an attribute set, a read with a default, a call by position)
    "interface",        # a method SGLang calls on an object the project supplies
    "wire-format",      # positions in an SGLang message the project reads or extends
    "source-read",      # an SGLang class whose source file the project parses
]

DECODE_TAIL = "2: the decode module computes prompt[k:] and every output token"
RETRACTED_TAIL = "1 and 2: a retracted request keeps its exact KV; the decode module still computes prompt[k:]"
PREFILL_TREE = "3: the prefix tree is keyed on the prefill module"
IDENTITY = "4: a prefill module's KV reaches only decode modules trained against it"
UNIFIED_SPLIT = "2, unified server: an adapter applies from k; positions before k run with the base alone"
ZMQ_PD = "2 and 4: PD on any host (no RDMA, no CUDA) with the fingerprint handshake and prompt[:k] sends"
NO_LATE_WRITE = "none: a late KV write never lands in slots that were freed or reused"
TRANSPORT = "none: how the KV bytes move, not which"
CPU_SERVING = "none: SGLang serves on a machine without CUDA"
CPU_START = "none: a CPU server's scheduler and detokenizer do not import SGLang again"
KV_FIGURES = "none: per-request KV bytes and transfer time in prefill replies (router metrics)"
KNOWN_FIELDS = "none: a request field no SGLang request type has is a 400, not silently dropped"
ADMISSION = "none: a decode server refuses at once what its pool could never admit; no request waits forever"
DECODE_CACHE = "1: a decode server's prefix cache holds base KV of prompt[:k] only; the prefill sends only the rest"
SHARED_PREFIX = "none: concurrent requests over one prefix hold it once in a decode pool and move it once"

_MOONCAKE = "sglang.srt.disaggregation.mooncake.conn"
_DECODE = "sglang.srt.disaggregation.decode"
_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer"
_ZMQ_BACKEND = "pfs_sglang.transfer.zmq_backend"
_TAIL = "pfs_sglang.decode.prompt_tail_extend"
_ADMISSION = "pfs_sglang.decode.admission.cap_request_length_to_decode_pool"
_REPORT = "pfs_sglang.transfer.transfer_report.KVTransferReportingStreamer"
_CACHE = "pfs_sglang.cache.prefill_module_cache"
_SEGMENTS = "pfs_sglang.unified.adapter_segments"
_LORA_MANAGER = "sglang.srt.lora.lora_manager.LoRAManager"
_TORCH_FACTORIES_UNPINNED = ("tensor", "empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like",
                             "ones_like")


@dataclass(frozen=True)
class Seam:
    """One place the project relies on SGLang (or on torch inside SGLang's processes)."""

    kind: Kind
    target: str  # the dotted path of what the project relies on, in SGLang (or torch)
    invariant: str  # "N: ..." for one of the five invariants, else "none: what it keeps"
    why: str  # why no public API does it
    owner: str  # the project's code that relies on it (a hook's target: the hook itself)
    hook_type: str = ""  # hooks: SGLang's HookType value
    entry: str = ""  # registries and enums: the name the project adds
    parameters: tuple[str, ...] = ()  # the target's parameters the project relies on, in the target's order

    def __post_init__(self) -> None:
        if (self.kind == "hook") != bool(self.hook_type):
            raise ValueError(f"{self.target}: hook seams, and only they, have a hook_type")


SEAMS: tuple[Seam, ...] = (
    # ----- the plugin and SGLang's registries -----
    Seam("registry", "sglang.srt.plugins.load_plugins", "all: everything below is registered from the plugin",
         "SGLang's plugin API: the entry point group sglang.srt.plugins (pyproject.toml) runs in every process",
         "pfs_sglang.plugin.load", entry="pfs_sglang"),
    Seam("registry", "sglang.srt.mem_cache.registry.register_radix_cache_backend", PREFILL_TREE,
         "SGLang's public way to swap the prefix tree (--radix-cache-backend pfs)",
         f"{_CACHE}.register_prefill_module_cache", entry="pfs"),
    Seam("registry", "sglang.srt.mem_cache.registry.create_unified_radix_cache", PREFILL_TREE,
         "the registry's factory for SGLang's own tree, with cache_class for a subclass",
         f"{_CACHE}.build_prefill_module_cache", parameters=("ctx", "cache_class")),
    Seam("registry", "sglang.srt.arg_groups.choices.add_disagg_transfer_backend_choices", ZMQ_PD,
         "SGLang's helper for a new --disaggregation-transfer-backend choice",
         "pfs_sglang.transfer.registration.register_transfer_hooks", entry="zmq"),
    Seam("enum-member", "sglang.srt.disaggregation.utils.TransferBackend", ZMQ_PD,
         "backends are TransferBackend members and an Enum has no public way to grow: ZMQ is created "
         "as EnumType creates members", "pfs_sglang.transfer.registration._add_enum_member", entry="ZMQ"),
    # ----- hooks (HookRegistry) -----
    Seam("hook", "sglang.srt.disaggregation.utils.get_kv_class", ZMQ_PD,
         "the backend classes come from an if-chain over TransferBackend with no registration; the hook "
         "also reaches every `from ... import get_kv_class` copy",
         "pfs_sglang.transfer.registration._get_kv_class_with_zmq", hook_type="around"),
    Seam("hook", "sglang.srt.disaggregation.prefill.PrefillBootstrapQueue.create_sender", DECODE_TAIL,
         "nothing tells a sender its request's k; the prefill side must stop at prompt[:k]",
         "pfs_sglang.transfer.registration.record_prefill_module_len", hook_type="around"),
    Seam("hook", f"{_DECODE}.DecodeTransferQueue._commit_transfer_to_req", DECODE_TAIL,
         "stock PD makes the prefill server's token the first output; no option leaves it out",
         f"{_TAIL}.commit_transfer_without_prefill_token", hook_type="around"),
    Seam("hook", "sglang.srt.managers.scheduler_components.batch_result_processor."
         "SchedulerBatchResultProcessor._maybe_update_reasoning_tokens", DECODE_TAIL,
         "the prefill server's token, taken back out, must not be counted as a reasoning token",
         f"{_TAIL}.reasoning_tokens_without_prefill_token", hook_type="around"),
    Seam("hook", f"{_DECODE}.DecodePreallocQueue.resume_retracted_reqs", RETRACTED_TAIL,
         "a request retracted before its first token would resume on SGLang's prebuilt path, which "
         "takes the prefill server's token", f"{_TAIL}.resume_retracted_with_tail_extend", hook_type="around"),
    Seam("hook", f"{_DECODE}.SchedulerDisaggregationDecodeMixin.get_next_disagg_decode_batch_to_run",
         DECODE_TAIL, "SGLang's decode loop has no extension point for running an EXTEND batch first",
         f"{_TAIL}.next_decode_batch_with_tail_extend", hook_type="around"),
    Seam("hook", f"{_DECODE}.DecodePreallocQueue._allocatable_token_budgets", DECODE_TAIL,
         "between run and merge a tail-extend batch is in no queue, so SGLang would not count its "
         "decode reserve and admission would over-admit", f"{_TAIL}.reserve_for_tail_extend_batch",
         hook_type="around"),
    Seam("hook", "sglang.srt.managers.scheduler.Scheduler.can_schedule_lora_req", DECODE_TAIL,
         "between run and merge a tail-extend batch is in no queue, so SGLang's decode admission would not count "
         "its adapters and the merged batch could hold more than --max-loras-per-batch",
         f"{_TAIL}.lora_budget_counts_tail_extend_batch", hook_type="around",
         parameters=("self", "req", "running_loras")),
    Seam("hook", f"{_DECODE}.DecodePreallocQueue.pop_preallocated", SHARED_PREFIX,
         "SGLang's in-batch prefix caching holds back requests over a prefix not yet cached only in the prefill "
         "scheduler; decode preallocation has no such option", "pfs_sglang.decode.shared_prefix_wait."
         "preallocate_after_shared_prefixes", hook_type="around", parameters=("self", "rids_to_check")),
    *(Seam("private-member", f"{_DECODE}.DecodePreallocQueue.{member}", SHARED_PREFIX,
           "read to find the requests in flight and what the tree holds of a waiting one",
           "pfs_sglang.decode.shared_prefix_wait.waiting_on_shared_prefix")
      for member in ("transfer_queue", "tree_cache", "pp_size")),
    Seam("hook", f"{_STREAMER}._GenerationStreamAccumulator.__post_init__", DECODE_TAIL,
         "SGLang hard-codes that decode servers send no input logprobs; ours computed them",
         f"{_TAIL}.stream_input_logprobs_from_decode", hook_type="around"),
    Seam("hook", f"{_STREAMER}.SchedulerOutputStreamer", KV_FIGURES,
         "SGLang measures each hand-off only into server-wide histograms; its customized-info methods "
         "are for subclasses, but no option selects one", _REPORT, hook_type="replace"),
    Seam("hook", "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal", TRANSPORT,
         "no allocator option puts the KV pool in shared memory for same-host decode servers to read",
         "pfs_sglang.transfer.registration.share_cpu_prefill_pool", hook_type="around"),
    Seam("hook", "sglang.srt.managers.scheduler.Scheduler.on_idle",
         "none: a PD server waiting only on a hand-off does not spin a core (--sleep-on-idle)",
         "--sleep-on-idle sleeps only when fully idle; no option covers a hand-off in flight",
         "pfs_sglang.transfer.registration.on_idle_polling_pd_waits", hook_type="around"),
    Seam("hook", "sglang.srt.entrypoints.http_server._freeze_gc_after_server_warmup",
         "none: clean start-up logs and a frozen GC with --skip-server-warmup",
         "SGLang posts /freeze_gc before uvicorn listens; no option makes it wait",
         "pfs_sglang.server_startup.freeze_gc_after_listening.freeze_gc_once_listening", hook_type="around"),
    Seam("hook", "sglang.srt.entrypoints.engine._set_envs_and_config", CPU_START,
         "SGLang sets spawn unconditionally (for CUDA); no option lets a CPU server's subprocesses fork",
         "pfs_sglang.server_startup.fork_on_cpu.fork_subprocesses_on_cpu", hook_type="after", parameters=("server_args",)),
    Seam("private-member", "sglang.srt.arg_groups.overrides.resolving_view", CPU_START,
         "a server's resolved --device is read through SGLang's resolution view (the record alone may hold "
         "what resolution overrides)", "pfs_sglang.server_startup.fork_on_cpu.fork_subprocesses_on_cpu"),
    Seam("hook", "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend",
         "none: an extend over a cached prefix computes its new rows only (the same attention)",
         "torch_native computes and throws away the prefix's rows; no option skips them",
         "pfs_kernels.prefix_extend_attention.extend_attention_over_new_tokens", hook_type="around",
         parameters=("self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices",
                     "seq_lens", "extend_prefix_lens", "extend_seq_lens", "encoder_lens", "scaling", "enable_gqa",
                     "causal", "is_cross_attn", "sliding_window_size")),
    Seam("hook", "sglang.srt.managers.scheduler.Scheduler.init_disaggregation", ADMISSION,
         "SGLang caps a request at the KV pool (max_req_len) but its decode admission also needs "
         "num_reserved_decode_tokens free; no option lowers the cap by that reserve", _ADMISSION,
         hook_type="around"),
    *(Seam("private-member", f"sglang.srt.managers.scheduler.Scheduler.{member}", ADMISSION,
           "read (the pool, its page size, the mode) or lowered (the request caps) once the pool is built, "
           "before the scheduler serves", _ADMISSION)
      for member in ("max_total_num_tokens", "page_size", "disaggregation_mode", "max_req_len",
                     "max_req_input_len", "disagg_decode_prealloc_queue")),
    Seam("private-member", f"{_DECODE}.DecodePreallocQueue.num_reserved_decode_tokens", ADMISSION,
         "the decode reserve SGLang's admission adds to every request", _ADMISSION),
    # ----- CPU support outside HookRegistry (installed only where no CUDA is present) -----
    Seam("import-stand-in", "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__", CPU_SERVING,
         "it imports vllm._custom_ops for a CUDA-only path; no option skips the import",
         "pfs_kernels.stand_ins.install_import_stand_ins"),
    *(Seam("monkey-patch", f"torch.{factory}", CPU_SERVING,
           "SGLang's multi-LoRA asks for pinned host memory, which torch refuses without CUDA; "
           "no option turns pinning off", "pfs_kernels.unpinned_host_memory.install_unpinned_host_memory")
      for factory in _TORCH_FACTORIES_UNPINNED),
    Seam("monkey-patch", "torch.Tensor.pin_memory", CPU_SERVING,
         "SGLang's multi-LoRA pins tensors, which torch refuses without CUDA; no option turns pinning off",
         "pfs_kernels.unpinned_host_memory.install_unpinned_host_memory"),
    # ----- the zmq backend: SGLang's Mooncake protocol over the project's engine -----
    Seam("subclass", f"{_MOONCAKE}.MooncakeKVManager", ZMQ_PD,
         "Mooncake's protocol (bootstrap, page runs, aux rows, aborts, heartbeats) with its transport swapped; "
         "SGLang has no transport interface", f"{_ZMQ_BACKEND}.ZmqKVManager"),
    Seam("subclass", f"{_MOONCAKE}.MooncakeKVSender", DECODE_TAIL,
         "SGLang's senders send the whole prompt's KV; no option stops at prompt[:k]", f"{_ZMQ_BACKEND}.ZmqKVSender"),
    Seam("subclass", f"{_MOONCAKE}.MooncakeKVReceiver", NO_LATE_WRITE,
         "nothing in SGLang refuses a write that arrives after the receiver concluded; this receiver's room "
         "takes writes only while it waits for them", f"{_ZMQ_BACKEND}.ZmqKVReceiver"),
    Seam("subclass", f"{_MOONCAKE}.MooncakeKVBootstrapServer", ZMQ_PD,
         "get_kv_class must return a bootstrap server class for the backend", f"{_ZMQ_BACKEND}.ZmqKVBootstrapServer"),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.init_engine", ZMQ_PD,
         "where Mooncake builds its transfer engine: the one place to put the ZMQ engine",
         f"{_ZMQ_BACKEND}.ZmqKVManager.init_engine"),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.kv_status_msg_carries_reason", IDENTITY,
         "lets a refusal's reason (a fingerprint mismatch) travel from prefill to decode",
         f"{_ZMQ_BACKEND}.ZmqKVManager.kv_status_msg_carries_reason"),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.build_receiver_metadata_message", NO_LATE_WRITE,
         "the decode side appends its room's generation to the metadata message",
         f"{_ZMQ_BACKEND}.ZmqKVManager.build_receiver_metadata_message", parameters=("bootstrap_room",)),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager._make_worker_recv", NO_LATE_WRITE,
         "the prefill side takes the generation off the message before Mooncake parses it",
         f"{_ZMQ_BACKEND}.ZmqKVManager._make_worker_recv", parameters=("socket", "timeout_ms")),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager._send_kvcache_generic", TRANSPORT,
         "Mooncake builds a Python tuple per slot run; a plain MHA transfer goes as slot lists in one engine "
         "call (the options named here send it back to Mooncake's own code)",
         f"{_ZMQ_BACKEND}.ZmqKVManager._send_kvcache_generic",
         parameters=("mooncake_session_id", "src_data_ptrs", "dst_data_ptrs", "item_lens", "prefill_data_indices",
                     "dst_data_indices", "executor", "state_type", "force_flat", "src_layer_ids", "dst_layer_ids",
                     "dst_device_data_indices", "dst_item_lens")),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.transfer_worker", NO_LATE_WRITE,
         "binds each worker thread, and the executor threads it uses, to its chunk's room",
         f"{_ZMQ_BACKEND}.ZmqKVManager.transfer_worker",
         parameters=("queue", "executor", "staging_buffer", "worker_index")),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager._poison_unsettled_send", NO_LATE_WRITE,
         "a write refused as late lets the room's drained-abort acknowledgement go",
         f"{_ZMQ_BACKEND}.ZmqKVManager._poison_unsettled_send", parameters=("room",)),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.failed_sessions", NO_LATE_WRITE,
         "a set Mooncake adds a session to on any failed write; a late refusal must not mark the decode "
         "server failed", f"{_ZMQ_BACKEND}.ZmqKVManager.failed_sessions"),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.update_status", ZMQ_PD,
         "remembers the rooms this prefill manager registered, so check_status can tell a concluded room "
         "from one it never had", f"{_ZMQ_BACKEND}.ZmqKVManager.update_status",
         parameters=("bootstrap_room", "status")),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.check_status", ZMQ_PD,
         "Mooncake's transfer worker reads a room the scheduler may have cleared (KeyError killed the thread)",
         f"{_ZMQ_BACKEND}.ZmqKVManager.check_status", parameters=("bootstrap_room",)),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.conclude_failure", IDENTITY,
         "the engine's reason (a refused fingerprint) joins Mooncake's failure message",
         f"{_ZMQ_BACKEND}.ZmqKVManager.conclude_failure",
         parameters=("bootstrap_room", "failure_reason", "targets")),
    Seam("override", f"{_MOONCAKE}.MooncakeKVManager.teardown", ZMQ_PD,
         "closes the engine with the manager", f"{_ZMQ_BACKEND}.ZmqKVManager.teardown"),
    Seam("override", f"{_MOONCAKE}.MooncakeKVSender.supports_host_tensor_indices", ZMQ_PD,
         "False keeps the prefill scheduler from pinning memory and recording CUDA events",
         f"{_ZMQ_BACKEND}.ZmqKVSender.supports_host_tensor_indices"),
    Seam("override", f"{_MOONCAKE}.MooncakeKVSender.pop_decode_prefix_len", DECODE_CACHE,
         "where the prefill side learns the prefix the decode side holds (SGLang's decode_prefix_len): a claim "
         "past floor_page(k) or unaligned fails the room, and the sender keeps P for its page count",
         f"{_ZMQ_BACKEND}.ZmqKVSender.pop_decode_prefix_len"),
    Seam("private-member", "sglang.srt.disaggregation.common.conn.CommonKVSender.curr_idx", DECODE_CACHE,
         "SGLang counts a sender's pages from page decode_prefix_len / page (index_slice starts there); the cut "
         "at prompt[:k] is made in that count (tests/test_decode_cache_units.py drives it as the prefill does)",
         f"{_ZMQ_BACKEND}.ZmqKVSender._prepare_send_indices"),
    Seam("override", f"{_MOONCAKE}.MooncakeKVSender._prepare_send_indices", DECODE_TAIL,
         "each chunk's pages are cut at prompt[:k]; the last chunk still concludes the transfer",
         f"{_ZMQ_BACKEND}.ZmqKVSender._prepare_send_indices", parameters=("kv_indices", "state_indices")),
    Seam("override", f"{_MOONCAKE}.MooncakeKVReceiver.send_metadata", NO_LATE_WRITE,
         "the room opens in the decode engine before its slots go to the prefill side",
         f"{_ZMQ_BACKEND}.ZmqKVReceiver.send_metadata"),
    *(Seam("override", f"{_MOONCAKE}.MooncakeKVReceiver.{method}", NO_LATE_WRITE,
           "the room is retired (no write in progress, later ones refused) before SGLang frees its slots",
           f"{_ZMQ_BACKEND}.ZmqKVReceiver.{method}")
      for method in ("poll", "abort", "clear")),
    Seam("private-member", f"{_MOONCAKE}.MooncakeKVReceiver._owns_bootstrap_room", NO_LATE_WRITE,
         "only the receiver that owns its room opens it (read with a default: a rename would go unnoticed)",
         f"{_ZMQ_BACKEND}.ZmqKVReceiver.send_metadata"),
    *(Seam("private-member", f"{_MOONCAKE}.MooncakeKVManager.{member}", ZMQ_PD,
           "read by the overrides above to decide what Mooncake's own code keeps doing",
           f"{_ZMQ_BACKEND}.ZmqKVManager.{owner}")
      for member, owner in (("request_status", "check_status"), ("transfer_infos", "_note_peer_generation"),
                            ("get_mha_kv_ptrs_with_pp", "_send_kvcache_generic"),
                            ("is_mla_backend", "_send_kvcache_generic"),
                            ("is_hybrid_mla_backend", "_send_kvcache_generic"),
                            ("enable_custom_mem_pool", "_send_kvcache_generic"),
                            ("max_transfer_batch_indices", "_send_kvcache_generic"))),
    Seam("wire-format", f"{_MOONCAKE}.TransferInfo.from_zmq", NO_LATE_WRITE,
         "the room is frame 0 and the decode session frame 3 of Mooncake's metadata message, and the parser "
         "reads fixed positions (decode_prefix_len is frame 8, device indices frame 9): the generation frame "
         "goes last and comes off before it parses",
         f"{_ZMQ_BACKEND}.ZmqKVManager._note_peer_generation"),
    *(Seam("interface", f"sglang.srt.distributed.device_communicators.mooncake_transfer_engine."
           f"MooncakeTransferEngine.{method}", ZMQ_PD,
           "Mooncake's manager calls it on its engine; the ZMQ engine stands in for Mooncake's",
           f"pfs_sglang.transfer.zmq_engine.ZmqTransferEngine.{method}")
      for method in ("get_session_id", "batch_register", "batch_deregister", "batch_transfer_sync", "send_probe")),
    # ----- the prefix tree -----
    Seam("subclass", "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache", PREFILL_TREE,
         "SGLang's own tree; only the request namespace changes", f"{_CACHE}.PrefillModuleRadixCache"),
    Seam("override", "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.match_prefix", PREFILL_TREE,
         "stock SGLang namespaces by extra_key + lora_id, which would split the tree per adapter; on decode "
         "servers (and for unified adapters) a match stops at k (invariant 1), which is also the prefix the "
         "decode side promises the prefill (SGLang's decode admission matches through it)",
         f"{_CACHE}.PrefillModuleRadixCache.match_prefix", parameters=("params",)),
    Seam("override", "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.checkpoint", PREFILL_TREE,
         "a request inserted before it matched takes the prefill module's namespace too; on decode servers "
         "(and for unified adapters) every insert, the final one at release included, stops at k (invariant 1)",
         f"{_CACHE}.PrefillModuleRadixCache.checkpoint", parameters=("req", "up_to")),
    *(Seam("private-member", f"sglang.srt.server_args.ServerArgs.{member}", DECODE_CACHE,
           "read by the tree's factory and start-up check to tell a decode server with its tree on",
           f"{_CACHE}.{owner}")
      for member, owner in (("disaggregation_mode", "is_decode_server_args"),
                            ("disaggregation_decode_enable_radix_cache", "check_decode_tree"),
                            ("radix_cache_backend", "check_decode_tree"))),
    Seam("hook", "sglang.srt.managers.scheduler.Scheduler.init_disaggregation", DECODE_CACHE,
         "the first point after the scheduler builds its tree (inline in its __init__); no option refuses a "
         "decode tree that would keep decode-module KV", f"{_CACHE}.check_decode_tree_once_built",
         hook_type="after"),
    *(Seam("private-member", f"sglang.srt.managers.scheduler.Scheduler.{member}", DECODE_CACHE,
           "the scheduler's tree and arguments, checked once built (a decode tree must be the capped pfs tree)",
           f"{_CACHE}.check_decode_tree")
      for member in ("tree_cache", "server_args")),
    Seam("private-member", f"{_DECODE}._bind_root_prefix", DECODE_CACHE,
         "a resumed tail-extend request starts at the decode tree's root, as SGLang's prebuilt path starts it",
         f"{_TAIL}._prepare_tail_extend", parameters=("req", "tree_cache")),
    Seam("private-member", "sglang.srt.runtime_context.get_disagg", DECODE_CACHE,
         "whether the decode tree is on, read as SGLang's decode scheduler reads it (the disagg config bag)",
         f"{_TAIL}._prepare_tail_extend"),
    *(Seam("private-member", f"sglang.srt.managers.schedule_batch.{member}", DECODE_CACHE,
           "read: a resumed request has no tree node (None), and the tree's part of a row ends by floor_page(k)",
           f"{_TAIL}._prepare_tail_extend")
      for member in ("Req.last_node", "ReqKvInfo.cache_protected_len")),
    Seam("private-member", "sglang.srt.managers.schedule_batch.ReqKvInfo.cache_protected_len", KV_FIGURES,
         "at transfer commit it is still the decode cache's hit (SGLang's admission sets it to decode_prefix_len); "
         "recorded for the decode server's reply", f"{_TAIL}.commit_transfer_without_prefill_token"),
    Seam("private-member", "sglang.srt.managers.schedule_batch.Req.disagg_decode_prefix_len", KV_FIGURES,
         "the prefix the decode side held, set on the prefill's request at bootstrap (read with a default: a "
         "rename would go unnoticed)", "pfs_sglang.transfer.transfer_report.kv_transfer_report"),
    Seam("private-member", "sglang.srt.mem_cache.radix_cache.RadixKey", PREFILL_TREE,
         "the key is rebuilt with the request's namespace, its fields passed by position (cache_salt last)",
         f"{_CACHE}.PrefillModuleRadixCache.match_prefix",
         parameters=("token_ids", "extra_key", "is_bigram", "limit", "cache_salt")),
    # ----- the decode module's tail extend -----
    Seam("private-member", "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", DECODE_TAIL,
         "requests whose grammar became ready are queued before the batch is built, as SGLang's prebuilt "
         "path does", f"{_TAIL}._queue_ready_grammar_requests"),
    Seam("private-member", "sglang.srt.managers.schedule_batch.Req._cache_breakdown_computed", DECODE_TAIL,
         "the received prefix is the prefill side's cache hit, not the decode side's (cached_tokens)",
         f"{_TAIL}._prepare_tail_extend"),
    *(Seam("private-member", f"sglang.srt.managers.schedule_batch.{member}", DECODE_TAIL,
           "set to point the request at prompt[k:] over the received KV of prompt[:k], as SGLang's own "
           "extend preparation does; no API re-targets a request", f"{_TAIL}._prepare_tail_extend")
      for member in ("Req.prefix_len", "Req.extend_end", "Req.already_computed", "ReqKvInfo.kv_allocated_len",
                     "ReqKvInfo.kv_committed_len")),
    Seam("private-member", "sglang.srt.managers.schedule_batch.ScheduleBatch.init_new", DECODE_TAIL,
         "the tail-extend batch is built as the scheduler builds a prefill batch, its arguments passed by position",
         f"{_TAIL}._build_tail_extend_batch",
         parameters=("reqs", "req_to_token_pool", "token_to_kv_pool_allocator", "tree_cache", "model_config",
                     "enable_overlap", "spec_algorithm")),
    Seam("private-member", f"{_STREAMER}._GenerationStreamAccumulator.disaggregation_mode", DECODE_TAIL,
         "set to NULL on a decode server so it sends the input logprobs its decode module computed",
         f"{_TAIL}.stream_input_logprobs_from_decode"),
    # ----- the unified server: adapters split at k -----
    Seam("hook", "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", UNIFIED_SPLIT,
         "SGLang's LoRA set-up runs inside the forward batch's construction, where no request's k is at hand",
         f"{_SEGMENTS}.note_adapter_starts", hook_type="around"),
    Seam("hook", f"{_LORA_MANAGER}.prepare_lora_batch", UNIFIED_SPLIT,
         "SGLang's multi-LoRA routes a whole request to one adapter; no option splits a request at k",
         f"{_SEGMENTS}.split_adapter_rows_at_k", hook_type="around"),
    Seam("hook", "sglang.srt.lora.backend.torch_backend.TorchNativeLoRABackend.prepare_lora_token_segments",
         UNIFIED_SPLIT, "SGLang's CPU LoRA backend has no token segments (its base class raises)",
         f"{_SEGMENTS}.torch_native_token_segments", hook_type="replace",
         parameters=("segment_lens", "weight_indices", "lora_ranks", "scalings")),
    Seam("private-member", f"{_LORA_MANAGER}.prepare_lora_token_segments", UNIFIED_SPLIT,
         "SGLang's per-token adapter routing, which its scheduler never uses for a request's own tokens",
         f"{_SEGMENTS}.split_adapter_rows_at_k", parameters=("lora_ids", "segment_lens")),
    Seam("private-member", f"{_LORA_MANAGER}.fetch_new_loras", UNIFIED_SPLIT,
         "the base's slot in the adapter pool (kept zeroed) is fetched for the rows before k",
         f"{_SEGMENTS}.split_adapter_rows_at_k", parameters=("new_loras",)),
    Seam("private-member", "sglang.srt.lora.backend.torch_backend.TorchNativeLoRABatchInfo", UNIFIED_SPLIT,
         "the CPU backend's batch info, built from the segments as SGLang builds it from requests",
         f"{_SEGMENTS}.torch_native_token_segments",
         parameters=("use_cuda_graph", "bs", "num_segments", "seg_indptr", "weight_indices", "lora_ranks", "scalings",
                     "max_len", "seg_lens", "permutation", "expected_tokens", "is_prefill", "lora_ranks_cpu",
                     "seg_indptr_cpu", "seg_lens_cpu", "weight_indices_cpu", "scalings_cpu")),
    # ----- per-request KV transfer figures -----
    *(Seam("override", f"{_STREAMER}.SchedulerOutputStreamer.{member}", KV_FIGURES,
           "the streamer's extension point for a subclass's per-request info", f"{_REPORT}.{member}")
      for member in ("has_additional_customized_info", "should_build_additional_customized_info",
                     "build_additional_customized_info", "is_request_level_customized_info_key")),
    Seam("private-member", "sglang.srt.managers.schedule_batch.Req.disagg_kv_sender", KV_FIGURES,
         "the request's sender holds its transfer metric (read with a default: a rename would go unnoticed)",
         "pfs_sglang.transfer.transfer_report.kv_transfer_report"),
    # ----- SGLang's request types, parsed from source by the router -----
    *(Seam("source-read", f"{module}.{name}", KNOWN_FIELDS,
           "importing SGLang costs the router seconds and torch; the fields are read from the class's file",
           "pfs_sglang.router.sglang_fields.fields_of")
      for module, name in (("sglang.srt.entrypoints.openai.protocol", "ChatCompletionRequest"),
                           ("sglang.srt.entrypoints.openai.protocol", "CompletionRequest"),
                           ("sglang.srt.managers.io_struct", "GenerateReqInput"),
                           ("sglang.srt.sampling.sampling_params", "SamplingParams"))),
)


class SeamNotFound(LookupError):
    """A seam's target is not in the installed SGLang."""


def resolve(seam: Seam) -> object:
    """The seam's target in the installed SGLang; raises :class:`SeamNotFound` naming it.

    An attribute SGLang sets on instances (``self.name = ...`` in a class of the target's
    class hierarchy, or a dataclass field without a default) resolves to the class that sets it.
    """
    try:
        return pkgutil.resolve_name(seam.target)
    except AttributeError as missing:
        parent_path, _, name = seam.target.rpartition(".")
        try:
            parent = pkgutil.resolve_name(parent_path)
        except (AttributeError, ImportError, ValueError) as error:
            raise SeamNotFound(_not_found(seam, error)) from error
        setter = _class_setting(parent, name) if isinstance(parent, type) else None
        if setter is None:
            raise SeamNotFound(_not_found(seam, missing)) from missing
        return setter
    except (ImportError, ValueError) as error:
        raise SeamNotFound(_not_found(seam, error)) from error


def _not_found(seam: Seam, error: BaseException) -> str:
    return f"SGLang seam {seam.target} ({seam.kind}, relied on by {seam.owner}) not found: {error}"


def _class_setting(cls: type, name: str) -> type | None:
    """The class in ``cls``'s hierarchy whose source assigns ``self.<name>`` or declares the field ``name``."""
    for klass in cls.__mro__[:-1]:  # not object
        if name in vars(klass).get("__annotations__", {}):
            return klass
        try:
            path = inspect.getsourcefile(klass)
        except TypeError:  # a built-in class
            continue
        if path and any(_assigns_to_self(node, name) for node in _class_definitions(path).get(klass.__name__, ())):
            return klass
    return None


@functools.cache
def _class_definitions(path: str) -> dict[str, list[ast.ClassDef]]:
    definitions: dict[str, list[ast.ClassDef]] = {}
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=path)):
        if isinstance(node, ast.ClassDef):
            definitions.setdefault(node.name, []).append(node)
    return definitions


def _assigns_to_self(definition: ast.ClassDef, name: str) -> bool:
    for node in ast.walk(definition):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if (isinstance(element, ast.Attribute) and element.attr == name
                        and isinstance(element.value, ast.Name) and element.value.id == "self"):
                    return True
    return False
