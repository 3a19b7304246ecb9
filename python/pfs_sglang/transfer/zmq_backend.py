"""The ``zmq`` PD transfer backend: SGLang's Mooncake protocol over our ZMQ engine.

SGLang's Mooncake backend already does everything a KV hand-off needs (bootstrap
registration, page-run grouping per layer, aux metadata rows, status messages,
aborts, heartbeats) and talks to its transport through a small engine interface.
These subclasses keep all of that and swap the engine for
:class:`~pfs_sglang.transfer.zmq_engine.ZmqTransferEngine`, so PD works on any host
with no RDMA and no CUDA-only calls:

* ``ZmqKVSender`` sends the KV of ``prompt[:k]`` only (invariant 2), and its
  ``supports_host_tensor_indices = False`` keeps the prefill scheduler on
  its plain path (no ``pin_memory``, no ``torch.cuda.Event``).
* the engine's handshake carries the prefill-module fingerprint (invariant 4): a
  decode server refuses KV from a prefill module its model was not trained against,
  and the request fails with that reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.mooncake.conn import (
    MooncakeKVBootstrapServer,
    MooncakeKVManager,
    MooncakeKVReceiver,
    MooncakeKVSender,
)
from sglang.srt.disaggregation.utils import DisaggregationMode

from pfs_sglang.transfer import KV_SECRET_ENV, TRANSFER_TIMEOUT_ENV
from pfs_sglang.transfer.zmq_engine import EngineIdentity, ZmqTransferEngine

logger = logging.getLogger(__name__)

DEFAULT_TRANSFER_TIMEOUT_S = 30.0


def expected_prefill_fingerprint(model_path: str, mode: DisaggregationMode) -> str:
    """The prefill-module digest this server produces (prefill) or expects (decode)."""
    from pfs_sglang.identity import DecodeModuleRecord, server_fingerprint
    from pfs_sglang.identity.compat import DECODE_MODULE_RECORD

    if mode == DisaggregationMode.DECODE and (Path(model_path) / DECODE_MODULE_RECORD).is_file():
        return DecodeModuleRecord.load(model_path).trained_against.digest
    # A prefill module, or a plain model decoding its own prefill: the model itself
    # (the launcher's fingerprint when it handed one over, so the weights are not re-hashed).
    return server_fingerprint(model_path).digest


def _bind_host(server_host: str) -> str:
    if server_host and server_host not in ("0.0.0.0", "::"):
        return server_host
    from sglang.srt.utils.network import get_local_ip_auto

    return get_local_ip_auto()


class ZmqKVManager(MooncakeKVManager):
    """Mooncake's KV manager with the ZMQ engine as its transport."""

    # Both ends run this class, so the prefill's failure reason can travel to decode.
    kv_status_msg_carries_reason = True

    def init_engine(self) -> None:
        import os

        mode = self.disaggregation_mode
        identity = EngineIdentity(
            role=mode.value,
            prefill_fingerprint=expected_prefill_fingerprint(self.server_args.model_path, mode),
            page_size=self.kv_args.page_size,
            kv_dtype=str(self.kv_args.kv_cache_dtype_str),
            kv_layout=str(self.kv_args.kv_layout),
        )
        timeout_s = float(os.environ.get(TRANSFER_TIMEOUT_ENV, DEFAULT_TRANSFER_TIMEOUT_S))
        self.engine = ZmqTransferEngine(identity, _bind_host(self.server_args.host), timeout_s,
                                        secret=os.environ.get(KV_SECRET_ENV, ""))
        logger.info("pfs zmq KV engine (%s) at %s", mode.value, self.engine.session_id)

    def check_status(self, bootstrap_room: int) -> KVPoll:
        """As SGLang's, but on the prefill side a room that is gone has concluded.

        Mooncake's transfer worker checks ``room in request_status`` and then reads it,
        while the scheduler thread may clear the finished room in between; the KeyError
        killed the transfer thread (seen on CPU with short answers), and every later
        hand-off hung. A prefill room is registered before its first chunk, so a missing
        one was cleared after it concluded.
        """
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            return self.request_status.get(bootstrap_room, KVPoll.Success)
        return super().check_status(bootstrap_room)

    def conclude_failure(self, *, bootstrap_room: int, failure_reason: str, targets=None):
        """Append the engine's reason (e.g. a refused fingerprint) to Mooncake's message."""
        detail: Optional[str] = self.engine.last_error()
        if detail:
            failure_reason = f"{failure_reason}: {detail}"
        return super().conclude_failure(
            bootstrap_room=bootstrap_room, failure_reason=failure_reason, targets=targets
        )

    def teardown(self) -> None:
        super().teardown()
        self.engine.close()


class ZmqKVSender(MooncakeKVSender):
    """Sends the KV of ``prompt[:k]`` only: the decode module computes ``prompt[k:]`` (invariant 2).

    ``k`` (``prefill_module_len``) is set on the sender when the prefill server creates
    it (``record_prefill_module_len``); pages past the one holding token ``k - 1`` are
    left out of every chunk, and the last chunk still concludes the transfer.
    """

    # Host-tensor indices make the prefill scheduler pin memory and record CUDA events.
    supports_host_tensor_indices = False
    prefill_module_len: Optional[int] = None

    def _prepare_send_indices(self, kv_indices, state_indices=None):
        kv_indices, index_slice, is_last_chunk, should_skip = super()._prepare_send_indices(
            kv_indices, state_indices
        )
        if should_skip or self.prefill_module_len is None:
            return kv_indices, index_slice, is_last_chunk, should_skip
        page_size = self.kv_mgr.kv_args.page_size
        pages_to_send = -(-self.prefill_module_len // page_size)
        stop = max(index_slice.start, min(index_slice.stop, pages_to_send))
        kv_indices = kv_indices[: stop - index_slice.start]
        # A middle chunk wholly past prompt[:k] has nothing to send; the last one always
        # goes, carrying the metadata that concludes the transfer.
        should_skip = len(kv_indices) == 0 and not is_last_chunk
        return kv_indices, slice(index_slice.start, stop), is_last_chunk, should_skip


def record_prefill_module_len(original, bootstrap_queue, req, *args, **kwargs):
    """AROUND ``PrefillBootstrapQueue.create_sender``: tell the request's sender its ``k``."""
    from pfs_sglang.decode.prompt_split import prefill_module_len

    created = original(bootstrap_queue, req, *args, **kwargs)
    if created and isinstance(req.disagg_kv_sender, ZmqKVSender):
        req.disagg_kv_sender.prefill_module_len = prefill_module_len(req)
    return created


class ZmqKVReceiver(MooncakeKVReceiver):
    pass


class ZmqKVBootstrapServer(MooncakeKVBootstrapServer):
    pass
