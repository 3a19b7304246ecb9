"""Registers the ``zmq`` transfer backend with SGLang (called from the plugin).

SGLang resolves backends through the ``TransferBackend`` enum and the
``get_kv_class`` if-chain, and validates the flag against a choices list. We add the
choice through SGLang's own ``add_disagg_transfer_backend_choices``, add a ``ZMQ``
member to the enum (an Enum cannot be extended through its public API; the member
is created exactly as EnumType does it), and wrap ``get_kv_class`` with an AROUND
hook from SGLang's hook registry so every ``from ... import get_kv_class`` copy sees it.
A second hook tells each prefill-side sender how many prompt tokens it sends
(invariant 2, ``ZmqKVSender``).
"""

from __future__ import annotations

from enum import Enum

ZMQ_BACKEND = "zmq"


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


def _record_prefill_module_len(original, *args, **kwargs):
    from pfs_sglang.transfer.zmq_backend import record_prefill_module_len

    return record_prefill_module_len(original, *args, **kwargs)


def register_zmq_transfer_backend() -> None:
    from sglang.srt.arg_groups.choices import (
        DISAGG_TRANSFER_BACKEND_CHOICES,
        add_disagg_transfer_backend_choices,
    )
    from sglang.srt.disaggregation.utils import TransferBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if ZMQ_BACKEND not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([ZMQ_BACKEND])
    _add_enum_member(TransferBackend, "ZMQ", ZMQ_BACKEND)
    HookRegistry.register(
        "sglang.srt.disaggregation.utils.get_kv_class", _get_kv_class_with_zmq, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.disaggregation.prefill.PrefillBootstrapQueue.create_sender",
        _record_prefill_module_len,
        HookType.AROUND,
    )
