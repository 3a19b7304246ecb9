"""The pfs_sglang SGLang plugin: entry point ``sglang.srt.plugins`` -> :func:`load`.

SGLang calls :func:`load` early in every one of its processes (main, scheduler,
detokenizer, DP controller); registrations made in a parent process are lost across
``spawn``, so everything pfs_sglang adds to SGLang is registered from here:

* CPU import stand-ins and unpinned host memory for SGLang's multi-LoRA
  (``pfs_kernels``) where no CUDA is present, and ``torch_native`` extend attention
  that skips the cached prefix's rows (``pfs_kernels``, every device);
* the ``zmq`` KV transfer backend, a CPU prefill server's KV pool in shared memory
  for same-host decode servers to read in place, per-request KV transfer figures in
  prefill replies, and PD servers that poll rather than spin while a hand-off is in
  flight (with ``--sleep-on-idle``): ``pfs_sglang.transfer.registration``;
* the ``pfs`` radix-cache backend keyed on the prefill module (``pfs_sglang.cache``,
  invariant 3), which on decode servers is their prefix cache of base KV, and the
  start-up check that a decode server's tree is that one (invariant 1);
* the decode-side hooks that make the decode module compute the prompt's tail
  (``pfs_sglang.decode``, invariant 2), and the decode server's request-length cap
  to what its pool can admit (``pfs_sglang.decode.admission``: no request waits forever);
* concurrent requests over one prompt prefix preallocated on a decode server after the
  first one's prefix is in its tree, so they hold it once (``pfs_sglang.decode.shared_prefix_wait``);
* the unified server's adapter routing: each LoRA decode module applies from the
  position where it takes over (``pfs_sglang.unified``, invariant 2);
* SGLang's post-start ``/freeze_gc`` call made once the server listens (clean logs);
* a CPU server's scheduler and detokenizer started by fork, not spawn
  (``pfs_sglang.server_startup.fork_on_cpu``: they do not import SGLang a second and third time).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def load() -> None:
    from pfs_kernels import install_import_stand_ins, install_unpinned_host_memory, register_prefix_extend_attention
    from pfs_sglang.cache.prefill_module_cache import register_prefill_module_cache
    from pfs_sglang.decode.admission import register_decode_admission_hooks
    from pfs_sglang.decode.prompt_tail_extend import register_prompt_tail_hooks
    from pfs_sglang.decode.shared_prefix_wait import register_shared_prefix_wait_hook
    from pfs_sglang.server_startup.fork_on_cpu import register_fork_on_cpu
    from pfs_sglang.server_startup.freeze_gc_after_listening import register_freeze_gc_after_listening
    from pfs_sglang.transfer.registration import register_transfer_hooks
    from pfs_sglang.unified.adapter_segments import register_adapter_segment_hooks

    installed = install_import_stand_ins()
    if installed:
        logger.info("pfs_sglang: CPU import stand-ins installed for %s", ", ".join(installed))
    install_unpinned_host_memory()
    register_transfer_hooks()
    register_prefix_extend_attention()
    register_prompt_tail_hooks()
    register_shared_prefix_wait_hook()
    register_decode_admission_hooks()
    register_adapter_segment_hooks()
    register_prefill_module_cache()
    register_freeze_gc_after_listening()
    register_fork_on_cpu()
