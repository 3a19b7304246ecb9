"""What ``transfer/`` puts into SGLang's processes: its hooks and patches, in this one module.

The plugin calls :func:`register_transfer_hooks` in every SGLang process. Each hook
below is a seam listed in ``pfs_sglang/seams.py`` (its kind, the invariant it serves and
why no public API does it); the rest of ``transfer/`` is code SGLang calls through them:
the Mooncake subclasses of ``zmq_backend`` (which drive the ZMQ engine) and the output
streamer of ``transfer_report``. The engine and its transports (``zmq_engine`` and the
modules under it) never import SGLang.

* The ``zmq`` transfer backend. SGLang resolves backends through the ``TransferBackend``
  enum and the ``get_kv_class`` if-chain, and validates the flag against a choices list.
  The choice is added through SGLang's own ``add_disagg_transfer_backend_choices``, a
  ``ZMQ`` member is added to the enum (an Enum cannot be extended through its public
  API; the member is created exactly as EnumType does it), and ``get_kv_class`` is
  wrapped with an AROUND hook so every ``from ... import get_kv_class`` copy sees it.
* Each prefill-side sender is told how many prompt tokens it sends
  (``record_prefill_module_len``, AROUND ``PrefillBootstrapQueue.create_sender``;
  invariant 2, ``ZmqKVSender``).
* A CPU ``zmq`` prefill server builds its KV pool in shared memory
  (``share_cpu_prefill_pool``, AROUND ``MHATokenToKVPool._create_buffers_normal``; the
  memory itself: ``shared_pool``), so a same-host decode server reads it in place.
  Invariant-neutral: how KV bytes move, not which.
* Per-request KV transfer figures in prefill replies (``transfer_report``'s streamer,
  REPLACE of ``SchedulerOutputStreamer``).
* PD servers that poll instead of spinning while a hand-off is in flight
  (``on_idle_polling_pd_waits``, AROUND ``Scheduler.on_idle``).
"""

from __future__ import annotations

import logging
import time
from enum import Enum

import torch

logger = logging.getLogger(__name__)

ZMQ_BACKEND = "zmq"
PD_WAIT_POLL_S = 0.0005


def register_transfer_hooks() -> None:
    from sglang.srt.arg_groups.choices import (
        DISAGG_TRANSFER_BACKEND_CHOICES,
        add_disagg_transfer_backend_choices,
    )
    from sglang.srt.disaggregation.utils import TransferBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from pfs_sglang.transfer.transfer_report import KVTransferReportingStreamer

    if ZMQ_BACKEND not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([ZMQ_BACKEND])
    _add_enum_member(TransferBackend, "ZMQ", ZMQ_BACKEND)
    for target, hook, hook_type in (
        ("sglang.srt.disaggregation.utils.get_kv_class", _get_kv_class_with_zmq, HookType.AROUND),
        ("sglang.srt.disaggregation.prefill.PrefillBootstrapQueue.create_sender", record_prefill_module_len,
         HookType.AROUND),
        ("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal", share_cpu_prefill_pool,
         HookType.AROUND),
        ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer",
         KVTransferReportingStreamer, HookType.REPLACE),
        ("sglang.srt.managers.scheduler.Scheduler.on_idle", on_idle_polling_pd_waits, HookType.AROUND),
    ):
        HookRegistry.register(target, hook, hook_type)


def _add_enum_member(enum_class: type[Enum], name: str, value: str) -> Enum:
    if value in enum_class._value2member_map_:
        return enum_class._value2member_map_[value]
    member = object.__new__(enum_class)
    member._name_ = name
    member._value_ = value
    member.__init__(value)
    type.__setattr__(enum_class, name, member)
    enum_class._member_map_[name] = member
    enum_class._member_names_.append(name)
    enum_class._value2member_map_[value] = member
    return member


def _get_kv_class_with_zmq(original, transfer_backend, class_type):
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend

    if transfer_backend is not TransferBackend(ZMQ_BACKEND) or class_type == KVClassType.KVARGS:
        return original(transfer_backend, class_type)
    from pfs_sglang.transfer.zmq_backend import (
        ZmqKVBootstrapServer,
        ZmqKVManager,
        ZmqKVReceiver,
        ZmqKVSender,
    )

    return {
        KVClassType.MANAGER: ZmqKVManager,
        KVClassType.SENDER: ZmqKVSender,
        KVClassType.RECEIVER: ZmqKVReceiver,
        KVClassType.BOOTSTRAP_SERVER: ZmqKVBootstrapServer,
    }.get(class_type)


def record_prefill_module_len(original, bootstrap_queue, req, *args, **kwargs):
    """AROUND ``PrefillBootstrapQueue.create_sender``: tell the request's sender its ``k``."""
    from pfs_sglang.decode.prompt_split import prefill_module_len
    from pfs_sglang.transfer.zmq_backend import ZmqKVSender

    created = original(bootstrap_queue, req, *args, **kwargs)
    if created and isinstance(req.disagg_kv_sender, ZmqKVSender):
        req.disagg_kv_sender.prefill_module_len = prefill_module_len(req)
    return created


def share_cpu_prefill_pool(original, pool, *args, **kwargs):
    """AROUND ``MHATokenToKVPool._create_buffers_normal``: a CPU ``zmq`` prefill server's buffers on memfd memory.

    Moved once, as the pool is built and before any pointer to them is taken, one layer
    (storage) at a time so the pool is never held twice (``shared_pool.move_to_shared_memory``).
    """
    from pfs_sglang.transfer.shared_pool import move_to_shared_memory

    result = original(pool, *args, **kwargs)
    if torch.device(pool.device).type == "cpu" and _is_zmq_prefill_server():
        for layer in range(len(pool.k_buffer)):
            pool.k_buffer[layer], pool.v_buffer[layer] = move_to_shared_memory([pool.k_buffer[layer],
                                                                                pool.v_buffer[layer]])
        logger.info("pfs_sglang: KV pool in shared memory (%d layers): same-host decode servers read it in place",
                    len(pool.k_buffer))
    return result


def _is_zmq_prefill_server() -> bool:
    from sglang.srt.runtime_context import get_server_args

    try:
        args = get_server_args()
    except Exception:  # no server published (a pool built outside a server): leave it as it is
        return False
    return (getattr(args, "disaggregation_mode", None) == "prefill"
            and getattr(args, "disaggregation_transfer_backend", None) == ZMQ_BACKEND)


def on_idle_polling_pd_waits(original, scheduler, *args, **kwargs):
    """AROUND ``Scheduler.on_idle``: a PD server waiting on a hand-off polls instead of spinning.

    SGLang's ``--sleep-on-idle`` puts a scheduler to sleep only when it is *fully* idle.
    A prefill or decode server that has nothing to compute but a hand-off in flight
    (bootstrap, KV transfer, metadata) is not fully idle: its event loop calls
    ``on_idle``, which yields with ``time.sleep(0)`` and loops again, a full core per
    server. On a small CPU box a deployment has several such servers, and their spinning
    takes the cores that the transfer threads, tokenizers and forwards need (seen here:
    four concurrent requests on the demo models took seconds each on two cores).

    This keeps SGLang's housekeeping and adds a short sleep (``PD_WAIT_POLL_S``) when the
    server sleeps on idle, is a PD server and is still waiting on something. Without
    ``--sleep-on-idle`` (the launcher's GPU default) nothing changes. The wait adds at
    most one poll interval to a hand-off; no request's outcome depends on it.
    """
    from sglang.srt.disaggregation.utils import DisaggregationMode

    result = original(scheduler, *args, **kwargs)
    if (
        scheduler.idle_sleeper is not None
        and scheduler.disaggregation_mode != DisaggregationMode.NULL
        and not scheduler.is_fully_idle()
    ):
        time.sleep(PD_WAIT_POLL_S)
    return result
