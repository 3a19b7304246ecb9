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
* no late KV write ever lands in freed slots: ``ZmqKVReceiver`` opens its room in the
  decode engine (a new generation) before it hands its slots to the prefill side, sends
  the generation with them (one more frame of Mooncake's metadata message), and retires
  the room when it concludes (success, failure, abort, timeout, clear), which returns only
  once no write for it is in progress. ``ZmqKVManager``'s transfer workers tag every write
  with their chunk's room and the generation its decode peer sent; a write the peer
  refused as late fails that request through Mooncake's normal path, without marking the
  decode server dead and with the drained-abort acknowledgement still sent (the retired
  room can take no more writes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
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

from pfs_sglang.transfer import FORCE_TCP_ENV, KV_SECRET_ENV, TRANSFER_TIMEOUT_ENV
from pfs_sglang.transfer.kv_blocks import KVSlots
from pfs_sglang.transfer.zmq_engine import EngineIdentity, RoomBinding, ZmqTransferEngine

logger = logging.getLogger(__name__)

DEFAULT_TRANSFER_TIMEOUT_S = 30.0
# The frame a decode receiver appends to Mooncake's per-room metadata message: its room's
# receiving generation (stripped on the prefill side before Mooncake parses the message).
GENERATION_FRAME_PREFIX = b"pfs-kv-generation:"
# Prefill rooms remembered as registered (``RecentRooms``): far more than are ever in flight at once.
ROOMS_REMEMBERED = 1 << 16


class RecentRooms:
    """The last ``ROOMS_REMEMBERED`` bootstrap rooms a prefill manager registered (thread-safe)."""

    def __init__(self) -> None:
        self._rooms: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, room: int) -> None:
        with self._lock:
            self._rooms[room] = None
            self._rooms.move_to_end(room)
            while len(self._rooms) > ROOMS_REMEMBERED:
                self._rooms.popitem(last=False)

    def __contains__(self, room: int) -> bool:
        with self._lock:
            return room in self._rooms


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
    """Where the engine listens, which is also the address it gives peers (its session id):
    the server's host, or for a wildcard (0.0.0.0, ::) the address SGLang advertises for
    its own PD sockets (``SGLANG_HOST_IP``, else this host's first non-loopback address),
    so a peer on another host can reach it."""
    if server_host and server_host not in ("0.0.0.0", "::"):
        return server_host
    from sglang.srt.utils.network import get_local_ip_auto

    return get_local_ip_auto()


def force_tcp_from_env() -> bool:
    """``FORCE_TCP_ENV``: ``1`` on, ``0`` or unset off; anything else is an error."""
    value = os.environ.get(FORCE_TCP_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{FORCE_TCP_ENV} is 1 (TCP to every peer) or 0, got {value!r}")
    return value == "1"


class ZmqKVManager(MooncakeKVManager):
    """Mooncake's KV manager with the ZMQ engine as its transport."""

    # Both ends run this class, so the prefill's failure reason can travel to decode.
    kv_status_msg_carries_reason = True

    def init_engine(self) -> None:
        mode = self.disaggregation_mode
        identity = EngineIdentity(
            role=mode.value,
            prefill_fingerprint=expected_prefill_fingerprint(self.server_args.model_path, mode),
            page_size=self.kv_args.page_size,
            kv_dtype=str(self.kv_args.kv_cache_dtype_str),
            kv_layout=str(self.kv_args.kv_layout),
        )
        timeout_s = float(os.environ.get(TRANSFER_TIMEOUT_ENV, DEFAULT_TRANSFER_TIMEOUT_S))
        tcp_only = force_tcp_from_env()
        self.engine = ZmqTransferEngine(identity, _bind_host(self.server_args.host), timeout_s,
                                        secret=os.environ.get(KV_SECRET_ENV, ""), tcp_only=tcp_only)
        # prefill: room -> {decode session id: the generation that decode rank receives the room under}
        self._peer_generations: dict[int, dict[str, int]] = {}
        self._registered_rooms = RecentRooms()  # prefill: rooms a sender registered (``check_status``)
        logger.info("pfs zmq KV engine (%s) at %s%s", mode.value, self.engine.session_id,
                    f", TCP to every peer ({FORCE_TCP_ENV}=1)" if tcp_only else "")

    # ----- decode side: the room's generation travels with its destination slots -----
    def build_receiver_metadata_message(self, *, bootstrap_room: int, **kwargs) -> list[bytes]:
        """Mooncake's message, plus the generation ``ZmqKVReceiver`` opened the room under."""
        message = super().build_receiver_metadata_message(bootstrap_room=bootstrap_room, **kwargs)
        generation = self.engine.receiving_generation(bootstrap_room)
        if generation is not None:
            message.append(GENERATION_FRAME_PREFIX + str(generation).encode("ascii"))
        return message

    # ----- prefill side: every write tagged with its room and the peer's generation -----
    def _make_worker_recv(self, socket, timeout_ms: int = 500):
        """On prefill, a room's metadata message leaves its generation here before Mooncake reads it."""
        recv = super()._make_worker_recv(socket, timeout_ms)
        if self.disaggregation_mode != DisaggregationMode.PREFILL:
            return recv

        def recv_noting_generations():
            message = recv()
            return self._note_peer_generation(message) if message else message

        return recv_noting_generations

    def _note_peer_generation(self, message: list[bytes]) -> list[bytes]:
        if len(message) < 5 or not message[-1].startswith(GENERATION_FRAME_PREFIX):
            return message
        try:
            room = int(message[0].decode("ascii"))
            session_id = message[3].decode("ascii")
            generation = int(message[-1][len(GENERATION_FRAME_PREFIX):].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return message
        if len(self._peer_generations) > 2 * len(self.transfer_infos) + 64:
            # rooms Mooncake has finished with (this thread adds to transfer_infos, the workers pop)
            for finished in [r for r in self._peer_generations if r not in self.transfer_infos]:
                self._peer_generations.pop(finished, None)
        self._peer_generations.setdefault(room, {})[session_id] = generation
        return message[:-1]

    def _generation_for(self, room: int, session_id: str) -> Optional[int]:
        return self._peer_generations.get(room, {}).get(session_id)

    def _send_kvcache_generic(self, mooncake_session_id, src_data_ptrs, dst_data_ptrs, item_lens,
                              prefill_data_indices, dst_data_indices, executor, **options) -> int:
        """Plain MHA pools: the transfer as slot lists (``KVSlots``) in one engine call.

        A same-host peer that mapped this server's shared pool copies them as they are;
        other transports move SGLang's blocks, built with array operations (``kv_blocks``).

        SGLang's own code builds a Python tuple per run of slots and buffer; with scattered
        slots that costs more than moving the bytes. It still pairs the buffers
        (``get_mha_kv_ptrs_with_pp``), and it does the whole transfer wherever its layout is
        not plain per-layer K and V (MLA, layer ids, state buffers, device-side destination
        indices, custom memory pools, bounded index batches).
        """
        plain = (not any(options.get(name) for name in (
                     "state_type", "force_flat", "src_layer_ids", "dst_layer_ids", "dst_item_lens"))
                 and options.get("dst_device_data_indices") is None  # an index array when given
                 and not (self.is_mla_backend or self.is_hybrid_mla_backend or self.enable_custom_mem_pool)
                 and (self.max_transfer_batch_indices <= 0
                      or prefill_data_indices.size <= self.max_transfer_batch_indices))
        if plain:
            src_k, src_v, dst_k, dst_v, layers = self.get_mha_kv_ptrs_with_pp(src_data_ptrs, dst_data_ptrs)
            plain = layers <= len(dst_k)  # otherwise SGLang logs the mismatch and fails the chunk
        if not plain:
            return super()._send_kvcache_generic(
                mooncake_session_id=mooncake_session_id, src_data_ptrs=src_data_ptrs, dst_data_ptrs=dst_data_ptrs,
                item_lens=item_lens, prefill_data_indices=prefill_data_indices, dst_data_indices=dst_data_indices,
                executor=executor, **options)
        item = list(item_lens[:layers]) + list(item_lens[layers : 2 * layers])  # K lengths, then V lengths
        slots = KVSlots.of(src_k[:layers] + src_v[:layers], dst_k[:layers] + dst_v[:layers], item,
                           prefill_data_indices, dst_data_indices)
        if not len(slots.src_slots) or not layers:
            return 0
        return self.engine.batch_transfer_slots(mooncake_session_id, slots)

    def transfer_worker(self, queue, executor, staging_buffer=None, worker_index=0):
        """Mooncake's worker, its thread (and the executor threads it uses) bound to each chunk's room."""
        return super().transfer_worker(
            _RoomBindingQueue(queue, self), _RoomBindingExecutor(executor, self.engine), staging_buffer, worker_index
        )

    def _poison_unsettled_send(self, room: int) -> None:
        """Mooncake's, except after a write refused as late: that decode rank retired the room,
        so no write of it can land any more and its drained-abort acknowledgement may go."""
        if self.engine.refused_late(room):
            return
        super()._poison_unsettled_send(room)

    @property
    def failed_sessions(self):
        return self._failed_sessions

    @failed_sessions.setter
    def failed_sessions(self, sessions) -> None:
        self._failed_sessions = _SessionsFailed(sessions, self)

    def update_status(self, bootstrap_room: int, status: KVPoll) -> None:
        """SGLang's; on the prefill side a room it registers is also remembered (``check_status``)."""
        super().update_status(bootstrap_room, status)
        if self.disaggregation_mode == DisaggregationMode.PREFILL and bootstrap_room in self.request_status:
            self._registered_rooms.note(bootstrap_room)

    def check_status(self, bootstrap_room: int) -> KVPoll:
        """As SGLang's, but on the prefill side a room that is gone has concluded, if it was registered.

        Mooncake's transfer worker checks ``room in request_status`` and then reads it,
        while the scheduler thread may clear the finished room in between; the KeyError
        killed the transfer thread (seen on CPU with short answers), and every later
        hand-off hung. A prefill room is registered before its first chunk, so a missing
        one this manager registered was cleared after it concluded (``Success``); one it
        never registered has no transfer at all (``Failed``).
        """
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            status = self.request_status.get(bootstrap_room)
            if status is not None:
                return status
            return KVPoll.Success if bootstrap_room in self._registered_rooms else KVPoll.Failed
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
    it (``registration.record_prefill_module_len``); pages past the one holding token ``k - 1`` are
    left out of every chunk, and the last chunk still concludes the transfer.

    A decode server with a prefix cache of base KV promises the first ``P`` tokens
    (SGLang's ``decode_prefix_len``; the decode tree caps every match at ``k``, page-floored:
    invariant 1). SGLang then sends from token ``P`` and counts this sender's pages from
    there (``index_slice`` is relative to page ``P / page``), so the pages sent are
    ``[P / page, ceil(k / page))``. A claimed prefix that is not page-aligned or reaches
    past ``floor_page(k)`` would mean the decode side holds KV of ``prompt[k:]`` as prompt
    KV, or a row SGLang's page math cannot address: the hand-off is refused
    (``pop_decode_prefix_len``) with that reason instead.
    """

    # Host-tensor indices make the prefill scheduler pin memory and record CUDA events.
    supports_host_tensor_indices = False
    prefill_module_len: Optional[int] = None
    decode_prefix_len: int = 0

    def pop_decode_prefix_len(self) -> int:
        claimed = super().pop_decode_prefix_len()
        refusal = decode_prefix_refusal(claimed, self.prefill_module_len, self.kv_mgr.kv_args.page_size)
        if refusal is not None:
            logger.error("room %s: %s", self.bootstrap_room, refusal)
            self.kv_mgr.conclude_failure(bootstrap_room=self.bootstrap_room, failure_reason=refusal)
            claimed = 0  # SGLang's page math stays well-formed; the room has failed and sends nothing
        self.decode_prefix_len = claimed
        return claimed

    def _prepare_send_indices(self, kv_indices, state_indices=None):
        kv_indices, index_slice, is_last_chunk, should_skip = super()._prepare_send_indices(
            kv_indices, state_indices
        )
        if should_skip or self.prefill_module_len is None:
            return kv_indices, index_slice, is_last_chunk, should_skip
        pages_to_send = pages_past_decode_prefix(self.prefill_module_len, self.decode_prefix_len,
                                                 self.kv_mgr.kv_args.page_size)
        stop = max(index_slice.start, min(index_slice.stop, pages_to_send))
        kv_indices = kv_indices[: stop - index_slice.start]
        # A middle chunk wholly past prompt[:k] has nothing to send; the last one always
        # goes, carrying the metadata that concludes the transfer.
        should_skip = len(kv_indices) == 0 and not is_last_chunk
        return kv_indices, slice(index_slice.start, stop), is_last_chunk, should_skip


def pages_past_decode_prefix(prefill_module_len: int, decode_prefix_len: int, page_size: int) -> int:
    """How many pages of ``prompt[:k]`` the decode side lacks: ``ceil(k / page) - P / page``
    (counted, as SGLang's sender counts, from page ``P / page``)."""
    return -(-prefill_module_len // page_size) - decode_prefix_len // page_size


def decode_prefix_refusal(decode_prefix_len: int, prefill_module_len: Optional[int], page_size: int) -> Optional[str]:
    """Why a decode side's claimed prefix cannot be base KV it holds, or None when it can."""
    if decode_prefix_len == 0:
        return None
    if decode_prefix_len % page_size:
        return (f"the decode server claims a cached prefix of {decode_prefix_len} tokens, not a whole number of "
                f"{page_size}-token pages")
    if prefill_module_len is not None and decode_prefix_len > prefill_module_len // page_size * page_size:
        return (f"the decode server claims a cached prefix of {decode_prefix_len} tokens, past the "
                f"{prefill_module_len // page_size * page_size} page-aligned tokens of prompt[:k] (k = "
                f"{prefill_module_len}) that the prefill module computes for it: its cache may hold only base KV "
                "(invariant 1)")
    return None


class ZmqKVReceiver(MooncakeKVReceiver):
    """Mooncake's receiver, whose room receives KV writes only between handing out its slots and concluding.

    ``send_metadata`` opens the room in the decode engine under a new generation before the
    slots go to the prefill side; ``poll`` (on success or failure, timeouts included),
    ``abort`` and ``clear`` retire it, returning once no write for it is in progress, so a
    write that comes later is refused and never lands in slots freed or given to another
    request. SGLang frees a request's slots only after one of these.
    """

    _kv_generation: Optional[int] = None

    def send_metadata(self, *args, **kwargs):
        if getattr(self, "_owns_bootstrap_room", True):
            self._kv_generation = self.kv_mgr.engine.open_room(self.bootstrap_room)
        return super().send_metadata(*args, **kwargs)

    def poll(self) -> KVPoll:
        state = super().poll()
        if state in (KVPoll.Success, KVPoll.Failed):
            self._stop_receiving()
        return state

    def abort(self):
        self._stop_receiving()
        return super().abort()

    def clear(self) -> None:
        self._stop_receiving()
        return super().clear()

    def _stop_receiving(self) -> None:
        generation, self._kv_generation = self._kv_generation, None
        if generation is not None:
            self.kv_mgr.engine.close_room(self.bootstrap_room, generation)


class ZmqKVBootstrapServer(MooncakeKVBootstrapServer):
    pass


class _RoomBindingQueue:
    """A transfer worker's queue: taking a chunk binds the worker thread's writes to the chunk's room."""

    def __init__(self, queue, manager: ZmqKVManager) -> None:
        self._queue, self._manager = queue, manager

    def get(self):
        chunk = self._queue.get()
        room = getattr(chunk, "room", None)
        self._manager.engine.bind(
            None if room is None else RoomBinding(room, lambda session_id: self._manager._generation_for(room, session_id))
        )
        return chunk

    def __getattr__(self, name):  # put (a deferred chunk goes back), and the rest
        return getattr(self._queue, name)


class _RoomBindingExecutor:
    """A transfer worker's executor: a submitted task writes for the submitting thread's room."""

    def __init__(self, executor, engine: ZmqTransferEngine) -> None:
        self._executor, self._engine = executor, engine

    def submit(self, fn, /, *args, **kwargs):
        binding = self._engine.binding()

        def bound():
            previous = self._engine.bind(binding)
            try:
                return fn(*args, **kwargs)
            finally:
                self._engine.bind(previous)

        return self._executor.submit(bound)

    def __getattr__(self, name):
        return getattr(self._executor, name)


class _SessionsFailed(set):
    """The prefill's failed decode sessions, except that a write refused as late marks none.

    Mooncake marks a session failed (its later requests fail at once until a probe) whenever a
    write to it fails; a late refusal means only that the decode rank gave this request up.
    """

    def __init__(self, sessions, manager: ZmqKVManager) -> None:
        super().__init__(sessions)
        self._manager = manager

    def add(self, session_id: str) -> None:
        binding = self._manager.engine.binding()
        if binding is not None and self._manager.engine.refused_late(binding.room, session_id):
            logger.info("decode session %s refused room %d's late write: the session stays usable",
                        session_id, binding.room)
            return
        super().add(session_id)
