"""The sending half of a ZMQ engine: per peer, a handshake and a transport; per call, a deadline.

Owns how a prefill server's KV reaches a decode server's engine. A thread connects to a
peer once (a ZMQ DEALER socket of its own) and opens the connection with the handshake
(``wire.HANDSHAKE``): its identity, the deployment's secret and, to a peer on this host,
an offer of the same-host transports with what proves each (a probe staging buffer, a
token to read back with ``process_vm_readv``, its CUDA IPC handles, its shared pool
segments). The peer's answer fixes the session's transports; every call then picks the
fastest the session allows for what it moves:

* ``cuda`` (``DEVICE_READ``): every source is device memory and the peer mapped this
  process's device regions; it copies the blocks GPU to GPU (``cuda_ipc``).
* ``map`` (``POOL_READ``): a request given by slots (``KVSlots``) whose every source lies
  in this process's shared pool, which the peer mapped (``shared_pool``); it copies the
  slot lists as they are.
* ``pvm`` (``DIRECT_READ``): host sources, blocks not tiny (``DIRECT_READ_MIN_BLOCK``), and
  the peer may read this process's memory; it reads them with ``process_vm_readv``
  (``process_memory``).
* otherwise the blocks are gathered into staging (``memory_regions.CopyPlan``: one
  indexed copy per region) in chunks of at most about ``CHUNK_BYTES``, the next chunk
  gathered while the peer writes the previous one: shared memory the peer maps
  (``shm``, ``STAGED_WRITE``: ``shared_staging``) or one zero-copy frame per chunk
  (``socket``, ``WRITE``), which is also the path between hosts.

A peer is on this host when the address it advertises (its session id) is one of this
engine's own (``SessionAddress.endpoint_from``); then the connection is IPC, else TCP
(``tcp_only``, the ``PFS_KV_FORCE_TCP`` switch: TCP and socket frames to every peer,
the cross-host path on one machine). Each new connection logs its endpoint and transport.

Every source block is checked to lie in memory this server registered before it is
read. Every write is for the room the calling thread is bound to (``rooms``) and carries
the generation the peer gave that room; a thread bound to no room writes nothing. Every
call has a deadline on this engine's monotonic clock, sent as a budget (``wire``). A
call returns 0 only once the peer acknowledged every part of it; anything else (refused,
late, unreachable, a failed copy) returns -1 with the reason kept for the calling thread
(``last_error``), so SGLang fails the request and never hands over partial KV. For tests
only, ``PFS_KV_FAULT_STALL=ROOM:SECONDS`` (``FAULT_STALL_ENV``) holds this sender's
writes for one room that long before they go out.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import zmq

from pfs_sglang.transfer import FAULT_STALL_ENV, wire
from pfs_sglang.transfer.cuda_copies import DeviceCopies
from pfs_sglang.transfer.cuda_ipc import export_regions, synchronize_devices
from pfs_sglang.transfer.kv_blocks import KVSlots
from pfs_sglang.transfer.memory_regions import (
    CopyPlan,
    OutsideRegisteredMemory,
    Region,
    RegionTable,
    RegisteredMemory,
    locate_slot_spans,
)
from pfs_sglang.transfer.rooms import LateRefusals, ThreadRooms
from pfs_sglang.transfer.shared_pool import segments_holding
from pfs_sglang.transfer.shared_staging import StagingBuffer
from pfs_sglang.transfer.wire import EngineIdentity, LateWriteRefused, SessionAddress, TransferError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # staged bytes per message; a chunk is at most twice this
# A direct read names 24 bytes per block; a request with more blocks than this goes as several reads.
MAX_BLOCKS_PER_READ = 1 << 20
# Direct reads cost the kernel about half a microsecond per block: below this mean block
# size, two vectorised copies through shared staging are faster.
DIRECT_READ_MIN_BLOCK = 1024


@dataclass(frozen=True)
class _Session:
    shared_staging: bool  # the peer maps this process's staging buffers
    direct_read: bool  # the peer may read this process's memory (process_vm_readv)
    device_read: bool = False  # the peer mapped this process's device regions (CUDA IPC)
    pool_read: bool = False  # the peer mapped this process's shared KV pool (``shared_pool``)


class Sender:
    """Writes registered memory's blocks into peers' registered memory, each peer over its best transport."""

    def __init__(self, identity: EngineIdentity, registered: RegisteredMemory, timeout_s: float, secret: bytes,
                 local_transports: tuple[str, ...], tcp_only: bool, local_hosts: set[str],
                 context: zmq.Context) -> None:
        self.identity = identity
        self.timeout_s = timeout_s
        self.rooms = ThreadRooms()  # the room each thread writes for
        self.late_refusals = LateRefusals()
        self._registered = registered
        self._secret = secret
        self._local_transports = local_transports
        self._tcp_only = tcp_only  # every peer over TCP and socket frames, also one on this host
        self._local_hosts = local_hosts
        self._context = context
        self._thread_state = threading.local()  # last_error, sockets, stagings, device_copies
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._stagings: list[StagingBuffer] = []  # every thread's, to release at close
        self._probe = StagingBuffer(0, shared=True) if local_transports else None
        self._pool_segments = RegionTable([])  # the shared pool segments offered to peers
        self._fault_stall = _parse_fault_stall(os.environ.get(FAULT_STALL_ENV, ""))

    def write_blocks(self, session_id: str, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> int:
        """Write ``lengths[i]`` bytes from ``src[i]`` here to ``dst[i]`` in the peer; 0, or -1 (``last_error``)."""
        return self._transfer(session_id, lambda session, room_tag: self._write(
            session_id, session, room_tag, src, dst, lengths))

    def write_slots(self, session_id: str, slots: KVSlots) -> int:
        """Write a request's KV given by slots: as slot lists to a peer that mapped this pool, else as blocks."""
        return self._transfer(session_id, lambda session, room_tag: self._write_slots(
            session_id, session, room_tag, slots))

    def probe(self, session_id: str) -> int:
        try:
            self._call(session_id, wire.PROBE, [])
            return 0
        except TransferError:
            return -1

    def transports(self, session_id: str) -> list[str]:
        """How bytes reach a verified peer: ``cuda`` (device reads), ``map`` (pool reads), ``pvm`` (direct
        reads), ``shm`` or ``socket`` staging."""
        session = self._sessions[session_id]
        return ((["cuda"] if session.device_read else []) + (["map"] if session.pool_read else [])
                + (["pvm"] if session.direct_read else []) + (["shm"] if session.shared_staging else ["socket"]))

    def last_error(self) -> Optional[str]:
        """The reason of this thread's last failed transfer, if any."""
        return getattr(self._thread_state, "last_error", None)

    def close(self) -> None:
        for staging in [*self._stagings, *([self._probe] if self._probe else [])]:
            staging.close()

    # ----- one call: the thread's room, the outcome -----
    def _transfer(self, session_id: str, write: Callable[[_Session, bytes], None]) -> int:
        """Run ``write`` for this thread's room; 0, or -1 with the reason kept (``last_error``)."""
        self._thread_state.last_error = None
        binding = self.rooms.binding()
        refused_late = False
        try:
            if binding is None:
                raise TransferError("KV write for no bootstrap room: refused (bind the thread to a room)")
            generation = binding.generation_of(session_id)
            if generation is None:
                raise TransferError(f"{session_id} gave room {binding.room} no receiving generation: refused")
            self._stall_if_injected(binding.room)
            write(self._session(session_id), wire.room_tag(binding.room, generation))
            return 0
        except LateWriteRefused as error:
            refused_late = True
            self._thread_state.last_error = str(error)
            logger.warning("pfs zmq KV transfer to %s refused: %s", session_id, error)
            return -1
        except (TransferError, OutsideRegisteredMemory) as error:
            self._thread_state.last_error = str(error)
            logger.error("pfs zmq KV transfer to %s failed: %s", session_id, error)
            return -1
        except Exception as error:  # e.g. a CUDA copy: the caller gets a failure, never an exception
            self._thread_state.last_error = f"{type(error).__name__}: {error}"
            logger.exception("pfs zmq KV transfer to %s failed", session_id)
            self._drop_staging()
            return -1
        finally:
            if binding is not None:
                self.late_refusals.note(session_id, binding.room, refused_late)

    def _stall_if_injected(self, room: int) -> None:
        """Fault injection (``FAULT_STALL_ENV``, tests only): hold this room's writes a while."""
        if self._fault_stall is not None and self._fault_stall[0] == room:
            logger.warning("pfs zmq KV engine: fault injection: holding room %d's write %.1fs", room, self._fault_stall[1])
            time.sleep(self._fault_stall[1])

    # ----- the transport, chosen per call from what the session allows -----
    def _write(self, session_id: str, session: _Session, room_tag: bytes, src, dst, lengths) -> None:
        """Device read (``cuda``), direct read (``pvm``), else staged chunks (``shm`` or ``socket``)."""
        deadline = time.monotonic() + self.timeout_s
        src, dst, lengths = _split_blocks(src, dst, lengths, CHUNK_BYTES)
        table = self._registered.table()
        if session.device_read:
            devices = {table.regions[i].device for i in np.unique(table.locate(src, lengths, "read"))}
            if None not in devices:
                synchronize_devices(devices)
                self._call(session_id, wire.DEVICE_READ, [wire.header(src, dst, lengths), wire.budget(deadline),
                                                          room_tag], deadline)
                return
        if session.direct_read and lengths.mean() >= DIRECT_READ_MIN_BLOCK:
            regions = table.locate(src, lengths, "read")
            if all(table.regions[i].device is None for i in np.unique(regions)):
                self._direct_read_by_peer(session_id, src, dst, lengths, room_tag, deadline)
                return
        self._write_staged(session_id, session, room_tag, table, src, dst, lengths, deadline)

    def _write_slots(self, session_id: str, session: _Session, room_tag: bytes, slots: KVSlots) -> None:
        """A pool read by the peer (``map``) where it mapped this pool and every source lies in it; else blocks."""
        if not (session.pool_read and len(slots.src_slots) and self._in_shared_pool(slots)):
            blocks = slots.blocks()
            self._write(session_id, session, room_tag, blocks.src, blocks.dst, blocks.lengths)
            return
        deadline = time.monotonic() + self.timeout_s
        buffers = wire.header(slots.src_ptrs, slots.dst_ptrs, slots.item_lens)
        self._call(session_id, wire.POOL_READ, [buffers, wire.slot_lists(slots.src_slots, slots.dst_slots),
                                                wire.budget(deadline), room_tag], deadline)

    def _direct_read_by_peer(self, session_id: str, src, dst, lengths, room_tag: bytes, deadline: float) -> None:
        """Have the peer read the blocks (``pvm``), in calls of at most ``MAX_BLOCKS_PER_READ`` blocks."""
        for lo in range(0, len(lengths), MAX_BLOCKS_PER_READ):
            hi = lo + MAX_BLOCKS_PER_READ
            self._call(session_id, wire.DIRECT_READ, [wire.header(src[lo:hi], dst[lo:hi], lengths[lo:hi]),
                                                      wire.budget(deadline), room_tag, wire.uint64(os.getpid())],
                       deadline)

    def _write_staged(self, session_id: str, session: _Session, room_tag: bytes, table: RegionTable, src, dst,
                      lengths, deadline: float) -> None:
        """Gather chunk by chunk into staging (two halves, the next gathered while the peer writes the last)."""
        positions = np.cumsum(lengths) - lengths
        cuts = np.flatnonzero(np.diff(positions // CHUNK_BYTES)) + 1
        bounds = [0, *cuts.tolist(), len(lengths)]
        plans = [CopyPlan.build(table, src[lo:hi], lengths[lo:hi], "read") for lo, hi in zip(bounds, bounds[1:])]
        if not plans:
            return
        staging = self._staging(session.shared_staging)
        sock = self._socket_for(session_id)
        pending = None
        try:
            for number, (plan, lo, hi) in enumerate(zip(plans, bounds, bounds[1:])):
                offset = (number % 2) * 2 * CHUNK_BYTES
                slot = staging.array[offset : offset + plan.nbytes]
                plan.gather(slot, self._device_copies() if plan.uses_device else None)
                if pending is not None:  # the peer wrote the previous chunk while this one was gathered
                    self._await(sock, session_id, pending, deadline)
                header = wire.header(dst[lo:hi], lengths[lo:hi])
                if staging.shared:
                    kind, frames = wire.STAGED_WRITE, [header, wire.budget(deadline), room_tag, staging.ref.encode(),
                                                       wire.uint64(offset)]
                else:
                    kind, frames = wire.WRITE, [header, wire.budget(deadline), room_tag, slot]
                pending = self._send(sock, session_id, kind, frames)
            self._await(sock, session_id, pending, deadline)
        except TransferError:
            self._drop_staging()
            raise

    def _in_shared_pool(self, slots: KVSlots) -> bool:
        """Whether every buffer, from slot 0 to the highest slot named, lies in registered memory of the shared pool."""
        try:
            for table in (self._pool_segments, self._registered.table()):
                locate_slot_spans(table, slots.src_ptrs, slots.item_lens, slots.src_slots, "read")
        except OutsideRegisteredMemory:
            return False  # the blocks' own checks refuse what lies outside registered memory
        return True

    def _staging(self, shared: bool) -> StagingBuffer:
        stagings = getattr(self._thread_state, "stagings", None)
        if stagings is None:
            stagings = self._thread_state.stagings = {}
        staging = stagings.get(shared)
        if staging is None:
            staging = stagings[shared] = StagingBuffer(4 * CHUNK_BYTES, shared=shared)
            self._stagings.append(staging)
        return staging

    def _drop_staging(self) -> None:
        """After a failed call the peer may still read the staging: never reuse it."""
        for staging in getattr(self._thread_state, "stagings", {}).values():
            staging.close()
        self._thread_state.stagings = {}

    def _device_copies(self) -> DeviceCopies:
        copies = getattr(self._thread_state, "device_copies", None)
        if copies is None:
            copies = self._thread_state.device_copies = DeviceCopies()
        return copies

    # ----- sessions: a connection per thread and peer, opened with the handshake -----
    def _session(self, session_id: str) -> _Session:
        """The peer's transports, after this thread's connection to it passed the handshake."""
        self._socket_for(session_id)
        with self._sessions_lock:
            return self._sessions[session_id]

    def _handshake(self, session_id: str, sock: zmq.Socket) -> None:
        """Introduce ``sock``'s connection to the peer (every connection must, before it writes)."""
        offer = b""
        if self._probe is not None and self._is_local(session_id):
            offer = json.dumps({
                "staging": asdict(self._probe.ref), "pid": os.getpid(),
                "token_addr": self._probe.token_view.ctypes.data, "token": self._probe.ref.token,
                "transports": list(self._local_transports), **self._device_offer(), **self._pool_offer(),
            }).encode()
        frames = [self.identity.encode(), offer, self._secret]
        reply = self._await(sock, session_id, self._send(sock, session_id, wire.HANDSHAKE, frames),
                            time.monotonic() + self.timeout_s)
        accepted = reply[2].decode().split(",") if len(reply) > 2 else []
        with self._sessions_lock:
            self._sessions[session_id] = _Session(shared_staging="shm" in accepted, direct_read="pvm" in accepted,
                                                  device_read="cuda" in accepted, pool_read="map" in accepted)
        logger.info("pfs zmq KV engine: connected to %s over %s, transport %s", session_id,
                    self._endpoint(session_id), "+".join(self.transports(session_id)))

    def _device_offer(self) -> dict:
        """The device regions a same-host peer may map (``cuda`` transport), when this engine has any."""
        regions = [region for region in self._registered.table().regions if region.device is not None]
        if "cuda" not in self._local_transports or not regions:
            return {}
        try:
            return {"cuda_regions": export_regions(regions)}
        except RuntimeError as error:
            logger.info("pfs zmq KV engine: device regions not exported (%s); staging through host memory", error)
            return {}

    def _pool_offer(self) -> dict:
        """The shared pool segments (``map`` transport) holding this engine's host regions, when it has any."""
        host_regions = [region for region in self._registered.table().regions if region.device is None]
        segments = segments_holding(host_regions) if "map" in self._local_transports else []
        self._pool_segments = RegionTable([Region(s.start, s.length) for s in segments])
        return {"pool_segments": [asdict(s) for s in segments]} if segments else {}

    def _endpoint(self, session_id: str) -> str:
        address = SessionAddress.decode(session_id)
        return address.tcp_endpoint() if self._tcp_only else address.endpoint_from(self._local_hosts)

    def _is_local(self, session_id: str) -> bool:
        return self._endpoint(session_id).startswith("ipc://")

    def _socket_for(self, session_id: str) -> zmq.Socket:
        sockets = getattr(self._thread_state, "sockets", None)
        if sockets is None:
            sockets = self._thread_state.sockets = {}
        sock = sockets.get(session_id)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._endpoint(session_id))
            sockets[session_id] = sock
            try:
                self._handshake(session_id, sock)
            except TransferError:
                self._drop_socket(session_id)
                raise
        return sock

    def _drop_socket(self, session_id: str) -> None:
        sock = self._thread_state.sockets.pop(session_id, None)
        if sock is not None:
            sock.close(0)

    # ----- messages: send, await the answer by the deadline -----
    def _send(self, sock: zmq.Socket, session_id: str, kind: bytes, frames: list) -> bytes:
        request_id = uuid.uuid4().bytes
        try:
            sock.send_multipart([wire.MAGIC, kind, request_id, *frames], copy=False)
        except zmq.ZMQError as error:
            self._drop_socket(session_id)
            raise TransferError(f"ZMQ error talking to {session_id}: {error}") from error
        return request_id

    def _await(self, sock: zmq.Socket, session_id: str, request_id: bytes, deadline: float) -> list[bytes]:
        try:
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not sock.poll(remaining_ms):
                    raise TransferError(f"no answer from {session_id} within {self.timeout_s:.1f}s")
                reply = sock.recv_multipart()
                if len(reply) >= 2 and reply[1] == request_id:  # skip stale answers to timed-out calls
                    break
        except zmq.ZMQError as error:
            self._drop_socket(session_id)
            raise TransferError(f"ZMQ error talking to {session_id}: {error}") from error
        except TransferError:
            self._drop_socket(session_id)
            raise
        if reply[0] != wire.OK:
            raise wire.refusal(reply)
        return reply

    def _call(self, session_id: str, kind: bytes, frames: list, deadline: Optional[float] = None) -> list[bytes]:
        sock = self._socket_for(session_id)
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout_s
        return self._await(sock, session_id, self._send(sock, session_id, kind, frames), deadline)


def _parse_fault_stall(value: str) -> Optional[tuple[int, float]]:
    """``ROOM:SECONDS`` (``FAULT_STALL_ENV``), or None when unset."""
    if not value:
        return None
    room, seconds = value.split(":")
    return int(room), float(seconds)


def _split_blocks(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, limit: int):
    """Blocks longer than ``limit`` cut into pieces of at most ``limit`` bytes."""
    pieces = np.maximum((lengths + limit - 1) // limit, 1)
    if (pieces == 1).all():
        return src, dst, lengths
    block = np.repeat(np.arange(len(lengths)), pieces)
    offset = (np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * limit
    return src[block] + offset, dst[block] + offset, np.minimum(lengths[block] - offset, limit)
