"""A ZMQ "transfer engine": one-sided writes of KV bytes into a peer's registered memory.

SGLang's Mooncake backend drives a transfer engine with a tiny interface: register
memory regions, ``batch_transfer_sync(session, src_ptrs, dst_ptrs, lengths)``, a
session id, and a liveness probe. This module gives that interface over ZMQ, so the
whole Mooncake PD protocol (bootstrap, page grouping, aux rows, aborts, heartbeats)
runs unchanged on any host: TCP between hosts, IPC when both ends share a host
(``tcp_only``, the ``PFS_KV_FORCE_TCP`` switch: TCP and socket frames to every peer,
the cross-host path on one machine). A peer is on this host when the address it
advertises (its session id) is one of this engine's own (``SessionAddress.endpoint_from``);
each new connection logs its endpoint and transport.

A call moves a request's KV as a few large operations, never block by block in
Python. Between engines on one host whose pools live on GPUs, the receiver maps the
sender's pool with CUDA IPC at the handshake and moves the blocks device to device
(``cuda_ipc``, transport ``cuda``): no host staging. Where the sender's host pool lives
in shared memory (a CPU prefill server's, ``shared_pool``), the receiver maps it
read-only at the handshake, and a request given by slots (``batch_transfer_slots``,
``KVSlots``: per buffer a pointer and a slot size, and the two slot lists) is copied
from it into the receiver's pool in one pass, checked per buffer, split over a few
threads (transport ``map``). Otherwise, between engines on one
host the receiver, once it has checked every destination
lies in memory it registered, reads the blocks straight out of the sender's pool with
``process_vm_readv`` (``process_memory``: one copy, no staging) where the kernel allows
it and blocks are not tiny. Otherwise the sender checks every source block lies in
memory it registered, gathers the blocks into a staging buffer with one indexed copy per
region (``memory_regions.CopyPlan``), and sends chunks of at most about
``CHUNK_BYTES``, gathering the next chunk while the receiver writes the previous one;
on one host the staging is shared memory the receiver maps (``shared_staging``), so
only a small message crosses the socket, and between hosts the staged bytes travel as
one zero-copy ZMQ frame per chunk.

Wire format (no pickle): ``[MAGIC, kind, request_id, header, budget, room, ...]`` where
``header`` is a little-endian uint64 array of ``(dst_ptr, length)`` pairs (kind ``R``:
``(src_ptr, dst_ptr, length)`` triples), ``budget`` a little-endian float64: the seconds
the sender still waits for the answer as it sends (its deadline on its own monotonic
clock; no wall clock crosses the wire, so hosts whose clocks disagree still agree on
deadlines), and ``room`` two little-endian uint64: the request's bootstrap room and
the receiving generation the decode side gave it; kind ``D`` (device read) carries
``(src_ptr, dst_ptr, length)`` triples like ``R``; kind ``L`` (pool read) carries
``(src_ptr, dst_ptr, slot_bytes)`` per buffer and then the int64 source slots followed by
the destination slots, before ``budget`` and ``room``; kind ``W`` carries the staged bytes as
one more frame, kind ``S`` names a shared staging buffer (``StagingRef`` JSON) and a
uint64 offset into it, kind ``R`` the sender's pid. The receiving engine checks every
destination lies inside memory it registered and that the budget has not run out since it
took the message in (on its own monotonic clock; time the message waited in its queue
before that is not counted), and
writes the bytes only while that (room, generation) is receiving; it answers
``[b"OK", request_id]`` or ``[b"ERR", request_id, reason]``.

No late write lands in freed slots: the decode side opens a room (``open_room``: a new
generation, so a reused room number never accepts an earlier attempt's writes) before
it hands the room's destination slots to the prefill side, and retires it
(``close_room``) when the request concludes, before its slots are freed. A write or read
is checked against the receiving rooms under the lock ``close_room`` takes, and
``close_room`` returns only once no write it admitted for that room is still being
applied, so a write in progress finishes before the room retires and none lands
afterwards (writes for other rooms never hold it up); a late one is refused with
"room R generation G is no longer receiving (late write refused)". The sender tags its
writes with the room it works for (``writing_for`` / ``bind``: a thread-local binding)
and remembers which rooms a peer refused as late (``refused_late``). For tests only,
``PFS_KV_FAULT_STALL=ROOM:SECONDS`` (``FAULT_STALL_ENV``, a fault-injection knob) holds
a sender's writes for one room that long before they go out.

Every connection opens with a handshake
(``[MAGIC, b"H", request_id, identity_json, probe, secret]``): the receiver compares the
sender's prefill-module fingerprint and KV layout with what it expects and refuses a
mismatch (invariant 4), refuses a sender without the deployment's secret (when it has
one: ``PFS_KV_SECRET``, set by the launcher), and says which same-host transports it
proved on the sender's probe buffer (``shm``: it can map the sender's staging; ``pvm``:
it can read the sender's memory; ``map``: it mapped the sender's shared pool segments,
each checked to be the announced memfd). A write or read request on a connection that has not
passed the handshake is refused. What the receiver keeps per connection (that it passed,
the sender's device regions it mapped, whose pool it reads) goes with the connection
(ZMQ reports it gone, or a new connection reads over its socket), a sender's mapped pool
with the last connection that reads it, so reconnects and restarted prefill servers
leave nothing behind. An inbound message larger than
``MAX_MESSAGE_BYTES`` drops the connection (ZMQ's ``MAXMSGSIZE``); nothing received is
ever unpickled. Every call has a deadline; a late or failed call returns
non-zero and the reason is kept for the calling thread (``last_error``).
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from pfs_sglang.transfer import FAULT_STALL_ENV
from pfs_sglang.transfer.cuda_ipc import OpenedAllocations, PeerDeviceMemory, copy_blocks, export_regions, synchronize_devices
from pfs_sglang.transfer.kv_blocks import KVSlots
from pfs_sglang.transfer.memory_regions import (
    CopyPlan,
    OutsideRegisteredMemory,
    Region,
    RegionTable,
    RegisteredMemory,
    copy_slots,
    locate_slot_spans,
)
from pfs_sglang.transfer.process_memory import can_read, read_from_process
from pfs_sglang.transfer.shared_pool import PeerPools, SharedSegment, segments_holding
from pfs_sglang.transfer.shared_staging import PeerStagings, StagingBuffer, StagingRef

logger = logging.getLogger(__name__)

MAGIC = b"PFSKV1"
_HEADER_DTYPE = np.dtype("<u8")
_ROOM_TAG = struct.Struct("<QQ")  # (bootstrap room, receiving generation)
LATE_WRITE_REFUSED = "late write refused"  # in the reason of every refused late write
_LATE_REFUSALS_KEPT = 4096  # (peer, room) pairs remembered by a sender


@dataclass(frozen=True)
class EngineIdentity:
    """What a peer must agree on before KV bytes move (invariant 4)."""

    role: str  # "prefill" (writes KV) or "decode" (receives KV)
    prefill_fingerprint: str  # digest of the prefill module this side produces / expects
    page_size: int
    kv_dtype: str
    kv_layout: str

    def mismatch_with(self, writer: "EngineIdentity") -> Optional[str]:
        """Reason a KV write from ``writer`` must be refused here, or None."""
        for name in ("prefill_fingerprint", "page_size", "kv_dtype", "kv_layout"):
            mine, theirs = getattr(self, name), getattr(writer, name)
            if mine != theirs:
                return (
                    f"KV hand-off refused: {name} differs: prefill server sends {theirs!r}, "
                    f"this decode server expects {mine!r}"
                )
        return None


def ipc_endpoint_for(tcp_port: int) -> str:
    """The IPC endpoint an engine listening on ``tcp_port`` also binds (ports are unique per host).

    A Linux abstract socket (``@`` prefix): no file to leave behind when a server is killed.
    """
    return f"ipc://@pfs_sglang-kv-{tcp_port}"


@dataclass(frozen=True)
class SessionAddress:
    """A receiving engine's address; its session id is ``host:port`` as SGLang expects."""

    host: str
    port: int

    def encode(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def decode(cls, session_id: str) -> "SessionAddress":
        host, port = session_id.rsplit(":", 1)
        return cls(host=host, port=int(port))

    def endpoint_from(self, local_hosts: set[str]) -> str:
        """IPC when the peer listens on this host, else TCP."""
        if self.host in local_hosts or self.host.startswith("127."):
            return ipc_endpoint_for(self.port)
        return self.tcp_endpoint()

    def tcp_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


CHUNK_BYTES = 8 << 20  # staged bytes per message; a chunk is at most twice this
# The largest inbound message part: a socket chunk (<= 2 x CHUNK_BYTES) or the header of a
# direct read (24 bytes per block of >= DIRECT_READ_MIN_BLOCK bytes: 24 MiB for 1 GiB of KV).
MAX_MESSAGE_BYTES = 64 << 20
LOCAL_TRANSPORTS = ("cuda", "map", "pvm", "shm")  # same-host transports, tried at the handshake in this order
# A direct read names 24 bytes per block; a request with more blocks than this goes as several reads.
MAX_BLOCKS_PER_READ = 1 << 20
# A pool read of at least this many bytes is split over the receiver's copy threads.
THREADED_COPY_MIN_BYTES = 4 << 20
# Direct reads cost the kernel about half a microsecond per block: below this mean block
# size, two vectorised copies through shared staging are faster.
DIRECT_READ_MIN_BLOCK = 1024


@dataclass(frozen=True)
class RoomBinding:
    """The request a thread's writes are for: its bootstrap room, and each peer's generation for it."""

    room: int
    generation_of: Callable[[str], Optional[int]]  # peer session id -> generation (None: that peer sent none)


@dataclass(frozen=True)
class _Session:
    shared_staging: bool  # the peer maps this process's staging buffers
    direct_read: bool  # the peer may read this process's memory (process_vm_readv)
    device_read: bool = False  # the peer mapped this process's device regions (CUDA IPC)
    pool_read: bool = False  # the peer mapped this process's shared KV pool (``shared_pool``)


class ZmqTransferEngine:
    """Drop-in for SGLang's ``MooncakeTransferEngine``, moving bytes over ZMQ (or shared memory)."""

    def __init__(
        self,
        identity: EngineIdentity,
        bind_host: str,
        timeout_s: float,
        check_peer: Optional[Callable[[EngineIdentity], Optional[str]]] = None,
        local_transports: tuple[str, ...] = LOCAL_TRANSPORTS,
        secret: str = "",
        tcp_only: bool = False,
    ) -> None:
        self.identity = identity
        self.tcp_only = tcp_only  # every peer over TCP and socket frames, also one on this host
        self._secret = secret.encode()
        # receiver, per connection (its ZMQ routing id), while it lasts (``_forget_peer``)
        self._verified_peers: set[bytes] = set()  # connections that passed the handshake
        self._peer_by_fd: dict[int, bytes] = {}  # the socket each connection's messages came over
        self.timeout_s = timeout_s
        self._check_peer = check_peer or identity.mismatch_with
        self._local_transports = () if tcp_only else tuple(local_transports)
        self._registered = RegisteredMemory()
        self._peer_stagings = PeerStagings()
        self._peer_devices: dict[bytes, PeerDeviceMemory] = {}  # verified connection -> its sender's mapped regions
        self._opened_allocations = OpenedAllocations()
        self._peer_pools = PeerPools()
        self._peer_pool_pids: dict[bytes, int] = {}  # verified connection -> the pid whose pool it may read
        self._pool_segments = RegionTable([])  # sender: the shared pool segments offered to peers
        self._copy_threads: Optional[ThreadPoolExecutor] = None
        self._probe = StagingBuffer(0, shared=True) if self._local_transports else None
        self._context = zmq.Context.instance()
        self._local_hosts = {bind_host, "localhost", socket.gethostname()}
        self._thread_state = threading.local()
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._stagings: list[StagingBuffer] = []  # every thread's, to release at close
        self._stopped = threading.Event()
        self._device = _current_cuda_device()
        # receiver: the rooms receiving now (room -> generation) and the writes admitted and being
        # applied ((room, generation) -> count), both under _rooms: close_room retires a room and
        # waits for its admitted writes, so none lands after it returns
        self._rooms = threading.Condition()
        self._receiving: dict[int, int] = {}
        self._applying: dict[tuple[int, int], int] = {}
        self._generations = itertools.count(1)
        self.late_writes_refused = 0
        # sender: (peer session id, room) pairs whose last write the peer refused as late
        self._late_refusals: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._late_refusals_lock = threading.Lock()
        self._fault_stall = _parse_fault_stall(os.environ.get(FAULT_STALL_ENV, ""))

        self._server = self._context.socket(zmq.ROUTER)
        self._server.setsockopt(zmq.LINGER, 0)
        self._server.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        tcp_port = self._server.bind_to_random_port(f"tcp://{bind_host}")
        self._server.bind(ipc_endpoint_for(tcp_port))
        self.session_address = SessionAddress(host=bind_host, port=tcp_port)
        self.session_id = self.session_address.encode()
        self._server_thread = threading.Thread(target=self._serve, name="pfs-zmq-kv-engine", daemon=True)
        self._server_thread.start()

    # ----- the MooncakeTransferEngine interface -----
    def get_session_id(self) -> str:
        return self.session_id

    def register(self, ptr: int, length: int) -> None:
        self._registered.add(ptr, length)

    def deregister(self, ptr: int) -> None:
        self._registered.remove(ptr)

    def batch_register(self, ptrs: list[int], lengths: list[int]) -> int:
        for ptr, length in zip(ptrs, lengths):
            self.register(ptr, length)
        return 0

    def batch_deregister(self, ptrs: list[int]) -> int:
        for ptr in ptrs:
            self.deregister(ptr)
        return 0

    def batch_transfer_sync(
        self, session_id: str, buffers: Sequence[int], peer_buffer_addresses: Sequence[int], lengths: Sequence[int]
    ) -> int:
        """Write ``lengths[i]`` bytes from local ``buffers[i]`` to the peer's addresses (lists or int64 arrays).

        The writes are for the room this thread is bound to (``bind``/``writing_for``), tagged
        with the generation the peer gave that room; a thread bound to no room writes nothing.
        """
        src, dst = np.asarray(buffers, dtype=np.int64), np.asarray(peer_buffer_addresses, dtype=np.int64)
        return self._transfer(session_id, lambda session, room_tag: self._write(
            session_id, session, room_tag, src, dst, np.asarray(lengths, dtype=np.int64)))

    def batch_transfer_slots(self, session_id: str, slots: KVSlots) -> int:
        """Write a request's KV given by slots (the blocks ``slots.blocks()`` names), as ``batch_transfer_sync``.

        A peer that mapped this process's shared pool (``map``) copies it from the slot lists
        as they are; every other transport moves ``slots.blocks()``.
        """
        return self._transfer(session_id, lambda session, room_tag: self._write_slots(
            session_id, session, room_tag, slots))

    def _transfer(self, session_id: str, write: Callable[[_Session, bytes], None]) -> int:
        """Run ``write`` for this thread's room; 0, or -1 with the reason kept (``last_error``)."""
        self._thread_state.last_error = None
        binding = self.binding()
        refused_late = False
        try:
            if binding is None:
                raise TransferError("KV write for no bootstrap room: refused (bind the thread to a room)")
            generation = binding.generation_of(session_id)
            if generation is None:
                raise TransferError(f"{session_id} gave room {binding.room} no receiving generation: refused")
            self._stall_if_injected(binding.room)
            write(self._session(session_id), _ROOM_TAG.pack(binding.room, generation))
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
                self._note_late_refusal(session_id, binding.room, refused_late)

    def transfer_sync(self, session_id: str, buffer: int, peer_buffer_address: int, length: int) -> int:
        return self.batch_transfer_sync(session_id, [buffer], [peer_buffer_address], [length])

    def send_probe(self, peer_session_id: str) -> int:
        try:
            self._call(peer_session_id, b"P", [])
            return 0
        except TransferError:
            return -1

    def peer_transports(self, session_id: str) -> list[str]:
        """How bytes reach a verified peer: ``cuda`` (device reads), ``map`` (pool reads), ``pvm`` (direct reads), ``shm`` or ``socket`` staging."""
        session = self._sessions[session_id]
        return ((["cuda"] if session.device_read else []) + (["map"] if session.pool_read else [])
                + (["pvm"] if session.direct_read else []) + (["shm"] if session.shared_staging else ["socket"]))

    def last_error(self) -> Optional[str]:
        """The reason of this thread's last failed transfer, if any."""
        return getattr(self._thread_state, "last_error", None)

    # ----- rooms: which request a write is for (no late write lands in freed slots) -----
    def bind(self, binding: Optional[RoomBinding]) -> Optional[RoomBinding]:
        """Tag this thread's writes with ``binding`` (None: no room) until bound again; the previous binding."""
        previous = self.binding()
        self._thread_state.binding = binding
        return previous

    def binding(self) -> Optional[RoomBinding]:
        return getattr(self._thread_state, "binding", None)

    @contextmanager
    def writing_for(self, room: int, generation_of: Callable[[str], Optional[int]]) -> Iterator[None]:
        """This thread's writes inside the block are for ``room``."""
        previous = self.bind(RoomBinding(room, generation_of))
        try:
            yield
        finally:
            self.bind(previous)

    def refused_late(self, room: int, session_id: Optional[str] = None) -> bool:
        """Whether the last write for ``room`` to ``session_id`` (None: to any peer) was refused as late.

        Such a peer had retired the room (``close_room``): nothing more of it can land
        there, and the peer itself is alive.
        """
        with self._late_refusals_lock:
            if session_id is not None:
                return (session_id, room) in self._late_refusals
            return any(key[1] == room for key in self._late_refusals)

    def open_room(self, room: int) -> int:
        """Receive writes for ``room`` from now on, under a new generation (returned).

        Called before the room's destination slots are handed to a sender. A generation the
        room had before is retired: a reused room never accepts an earlier attempt's writes.
        """
        with self._rooms:
            generation = next(self._generations)
            self._receiving[room] = generation
        return generation

    def close_room(self, room: int, generation: int) -> None:
        """Stop receiving writes for ``room``'s ``generation`` (a later generation stays open).

        Returns once no write for it is in progress, and none is applied afterwards: after
        this, the room's slots may be freed.
        """
        with self._rooms:
            if self._receiving.get(room) == generation:
                del self._receiving[room]
            while (room, generation) in self._applying:
                self._rooms.wait()

    def receiving_generation(self, room: int) -> Optional[int]:
        """The generation ``room`` receives writes under now, or None."""
        with self._rooms:
            return self._receiving.get(room)

    def close(self) -> None:
        self._stopped.set()
        self._server_thread.join(timeout=2)
        self._server.close(0)
        for staging in [*self._stagings, *([self._probe] if self._probe else [])]:
            staging.close()
        self._opened_allocations.close()
        if self._copy_threads is not None:
            self._copy_threads.shutdown(wait=False)

    # ----- sender side -----
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
        frames = [json.dumps(asdict(self.identity)).encode(), offer, self._secret]
        reply = self._await(sock, session_id, self._send(sock, session_id, b"H", frames),
                            time.monotonic() + self.timeout_s)
        accepted = reply[2].decode().split(",") if len(reply) > 2 else []
        with self._sessions_lock:
            self._sessions[session_id] = _Session(shared_staging="shm" in accepted, direct_read="pvm" in accepted,
                                                  device_read="cuda" in accepted, pool_read="map" in accepted)
        logger.info("pfs zmq KV engine: connected to %s over %s, transport %s", session_id,
                    self._endpoint(session_id), "+".join(self.peer_transports(session_id)))

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

    def _in_shared_pool(self, slots: KVSlots) -> bool:
        """Whether every buffer, from slot 0 to the highest slot named, lies in registered memory of the shared pool."""
        try:
            for table in (self._pool_segments, self._registered.table()):
                locate_slot_spans(table, slots.src_ptrs, slots.item_lens, slots.src_slots, "read")
        except OutsideRegisteredMemory:
            return False  # the blocks' own checks refuse what lies outside registered memory
        return True

    def _endpoint(self, session_id: str) -> str:
        address = SessionAddress.decode(session_id)
        return address.tcp_endpoint() if self.tcp_only else address.endpoint_from(self._local_hosts)

    def _is_local(self, session_id: str) -> bool:
        return self._endpoint(session_id).startswith("ipc://")

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

    def _device_copies(self):
        copies = getattr(self._thread_state, "device_copies", None)
        if copies is None:
            from pfs_sglang.transfer.cuda_copies import DeviceCopies

            copies = self._thread_state.device_copies = DeviceCopies()
        return copies

    def _stall_if_injected(self, room: int) -> None:
        """Fault injection (``FAULT_STALL_ENV``, tests only): hold this room's writes a while."""
        if self._fault_stall is not None and self._fault_stall[0] == room:
            logger.warning("pfs zmq KV engine: fault injection: holding room %d's write %.1fs", room, self._fault_stall[1])
            time.sleep(self._fault_stall[1])

    def _note_late_refusal(self, session_id: str, room: int, refused: bool) -> None:
        key = (session_id, room)
        with self._late_refusals_lock:
            if not refused:
                self._late_refusals.pop(key, None)
                return
            self._late_refusals[key] = None
            self._late_refusals.move_to_end(key)
            while len(self._late_refusals) > _LATE_REFUSALS_KEPT:
                self._late_refusals.popitem(last=False)

    def _write(self, session_id: str, session: _Session, room_tag: bytes, src, dst, lengths) -> None:
        deadline = time.monotonic() + self.timeout_s
        src, dst, lengths = _split_blocks(src, dst, lengths, CHUNK_BYTES)
        positions = np.cumsum(lengths) - lengths
        cuts = np.flatnonzero(np.diff(positions // CHUNK_BYTES)) + 1
        bounds = [0, *cuts.tolist(), len(lengths)]
        table = self._registered.table()
        if session.device_read:
            devices = {table.regions[i].device for i in np.unique(table.locate(src, lengths, "read"))}
            if None not in devices:
                synchronize_devices(devices)
                header = _header(src, dst, lengths)
                self._call(session_id, b"D", [header, _budget(deadline), room_tag], deadline)
                return
        if session.direct_read and lengths.mean() >= DIRECT_READ_MIN_BLOCK:
            regions = table.locate(src, lengths, "read")
            if all(table.regions[i].device is None for i in np.unique(regions)):
                self._direct_read_by_peer(session_id, src, dst, lengths, room_tag, deadline)
                return
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
                header = _header(dst[lo:hi], lengths[lo:hi])
                if staging.shared:
                    frames = [b"S", header, _budget(deadline), room_tag, staging.ref.encode(),
                              struct.pack("<Q", offset)]
                else:
                    frames = [b"W", header, _budget(deadline), room_tag, slot]
                pending = self._send(sock, session_id, frames[0], frames[1:])
            self._await(sock, session_id, pending, deadline)
        except TransferError:
            self._drop_staging()
            raise

    def _write_slots(self, session_id: str, session: _Session, room_tag: bytes, slots: KVSlots) -> None:
        """A pool read by the peer (kind ``L``) where it mapped this pool and every source lies in it; else blocks."""
        if not (session.pool_read and len(slots.src_slots) and self._in_shared_pool(slots)):
            blocks = slots.blocks()
            self._write(session_id, session, room_tag, blocks.src, blocks.dst, blocks.lengths)
            return
        deadline = time.monotonic() + self.timeout_s
        buffers = _header(slots.src_ptrs, slots.dst_ptrs, slots.item_lens)
        self._call(session_id, b"L", [buffers, np.concatenate([slots.src_slots, slots.dst_slots]).astype("<i8").tobytes(),
                                      _budget(deadline), room_tag], deadline)

    def _direct_read_by_peer(self, session_id: str, src, dst, lengths, room_tag: bytes, deadline: float) -> None:
        """Have the peer read the blocks (kind ``R``), in calls of at most ``MAX_BLOCKS_PER_READ`` blocks."""
        for lo in range(0, len(lengths), MAX_BLOCKS_PER_READ):
            hi = lo + MAX_BLOCKS_PER_READ
            header = _header(src[lo:hi], dst[lo:hi], lengths[lo:hi])
            self._call(session_id, b"R", [header, _budget(deadline), room_tag, struct.pack("<Q", os.getpid())],
                       deadline)

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

    def _send(self, sock: zmq.Socket, session_id: str, kind: bytes, frames: list) -> bytes:
        request_id = uuid.uuid4().bytes
        try:
            sock.send_multipart([MAGIC, kind, request_id, *frames], copy=False)
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
        if reply[0] != b"OK":
            reason = reply[2].decode(errors="replace") if len(reply) > 2 else "peer refused"
            raise (LateWriteRefused if LATE_WRITE_REFUSED in reason else TransferError)(reason)
        return reply

    def _call(self, session_id: str, kind: bytes, frames: list, deadline: Optional[float] = None) -> list[bytes]:
        sock = self._socket_for(session_id)
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout_s
        return self._await(sock, session_id, self._send(sock, session_id, kind, frames), deadline)

    # ----- receiver side -----
    def _serve(self) -> None:
        if self._device is not None:
            import torch

            torch.cuda.set_device(self._device)  # this thread's CUDA work runs on the server's device
        disconnects = self._server.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(self._server, zmq.POLLIN)
        poller.register(disconnects, zmq.POLLIN)
        try:
            while not self._stopped.is_set():
                ready = dict(poller.poll(200))
                # first: a message's connection may have taken over the socket of one that went
                self._forget_disconnected(disconnects)
                if self._server in ready:
                    self._serve_one()
        finally:
            self._server.disable_monitor()
            disconnects.close(0)

    def _serve_one(self) -> None:
        """Answer the next message (every one is answered, a malformed one dropped)."""
        message = self._server.recv_multipart(copy=False)
        arrived = time.monotonic()
        peer, frames = message[0].bytes, message[1:]
        self._note_connection(peer, message[-1].get(zmq.SRCFD))
        if len(frames) < 3 or frames[0].bytes != MAGIC:
            logger.warning("pfs zmq KV engine: dropped a malformed message")
            return
        kind, request_id = frames[1].bytes, frames[2].bytes
        try:
            answer = [b"OK", request_id, *self._handle(peer, kind, frames[3:], arrived)]
        except Exception as error:  # every failure is answered, never left hanging
            answer = [b"ERR", request_id, str(error).encode()]
        self._server.send_multipart([peer, *answer])

    # ----- receiver side: per-connection state lives as long as its connection -----
    def _note_connection(self, peer: bytes, fd: int) -> None:
        """``peer``'s messages come over socket ``fd``; a connection that had that socket before is gone."""
        previous = self._peer_by_fd.get(fd)
        if previous != peer:
            if previous is not None:
                self._forget_peer(previous)
            self._peer_by_fd[fd] = peer

    def _forget_disconnected(self, disconnects: zmq.Socket) -> None:
        """Drop the state of every connection ZMQ has reported gone (its event names its socket)."""
        while True:
            try:
                event = recv_monitor_message(disconnects, zmq.NOBLOCK)
            except zmq.Again:
                return
            peer = self._peer_by_fd.pop(event["value"], None)
            if peer is not None:
                self._forget_peer(peer)

    def _forget_peer(self, peer: bytes) -> None:
        """``peer``'s connection went (or handshakes again): it is unverified, its sender's memory unmapped."""
        self._verified_peers.discard(peer)
        memory = self._peer_devices.pop(peer, None)
        if memory is not None:
            memory.close()
        pid = self._peer_pool_pids.pop(peer, None)
        if pid is not None and pid not in self._peer_pool_pids.values():
            self._peer_pools.close(pid)

    def _handle(self, peer: bytes, kind: bytes, frames: list, arrived: float) -> list[bytes]:
        """Answer one request (``arrived``: when this engine took it in, on its monotonic clock)."""
        if kind == b"P":
            return []
        if kind == b"H":
            self._forget_peer(peer)
            writer = EngineIdentity(**json.loads(frames[0].bytes))
            reason = self._check_peer(writer)
            if reason:
                raise TransferError(reason)
            secret = frames[2].bytes if len(frames) > 2 else b""
            if self._secret and not hmac.compare_digest(secret, self._secret):
                raise TransferError("the peer does not hold this deployment's KV secret: refused")
            offer = frames[1].bytes if len(frames) > 1 else b""
            accepted = [",".join(self._accept(json.loads(offer), peer)).encode()] if offer else []
            self._verified_peers.add(peer)
            return accepted
        if peer not in self._verified_peers:
            raise TransferError("KV request on a connection that has not passed the handshake: refused")
        if kind == b"R" and len(frames) >= 4:
            return self._read_from_peer(frames, arrived)
        if kind == b"L" and len(frames) >= 4:
            return self._read_from_peer_pool(peer, frames, arrived)
        if kind == b"D" and len(frames) >= 3:
            return self._read_from_peer_device(peer, frames, arrived)
        if kind not in (b"W", b"S") or len(frames) < (4 if kind == b"W" else 5):
            raise TransferError(f"unknown or malformed request kind {kind!r}")
        header = frames[0].buffer
        if header.nbytes % 16:
            raise TransferError("malformed KV write header")
        pairs = np.frombuffer(header, dtype=_HEADER_DTYPE).reshape(-1, 2).view(np.int64)
        plan = CopyPlan.build(self._registered.table(), pairs[:, 0], pairs[:, 1], "write")
        room, generation = _room_tag(frames[2])
        if kind == b"W":
            payload = frames[3].buffer
        else:
            ref = StagingRef.decode(frames[3].bytes)
            (offset,) = struct.unpack("<Q", frames[4].bytes)
            if offset + plan.nbytes > ref.size:
                raise TransferError("KV write names bytes outside the sender's staging buffer")
            payload = self._peer_stagings.open(ref)[offset : offset + plan.nbytes]
        if payload.nbytes != plan.nbytes:
            raise TransferError(f"header names {plan.nbytes} bytes, message carries {payload.nbytes}")
        _refuse_if_late(frames[1], arrived)
        with self._writing_into(room, generation):
            plan.scatter(payload, self._device_copies() if plan.uses_device else None)
        return []

    @contextmanager
    def _writing_into(self, room: int, generation: int) -> Iterator[None]:
        """Admit a write for ``(room, generation)`` only while it is receiving; ``close_room`` waits for it."""
        key = (room, generation)
        with self._rooms:
            if self._receiving.get(room) != generation:
                self.late_writes_refused += 1
                reason = f"room {room} generation {generation} is no longer receiving ({LATE_WRITE_REFUSED})"
                logger.warning("pfs zmq KV engine: %s", reason)
                raise LateWriteRefused(reason)
            self._applying[key] = self._applying.get(key, 0) + 1
        try:
            yield
        finally:
            with self._rooms:
                self._applying[key] -= 1
                if not self._applying[key]:
                    del self._applying[key]
                self._rooms.notify_all()

    def _accept(self, offer: dict, peer: bytes) -> list[str]:
        """Which same-host transports the peer's offer allows (proven on its probe buffer, or mapped)."""
        accepted = []
        offered = offer.get("transports", [])
        devices = self._registered.devices()
        if "cuda" in offered and offer.get("cuda_regions") and devices:
            try:
                self._peer_devices[peer] = PeerDeviceMemory(offer["cuda_regions"], int(offer["pid"]),
                                                            self._device if self._device is not None else min(devices),
                                                            self._opened_allocations)
                accepted.append("cuda")
            except (RuntimeError, KeyError, ValueError) as error:
                logger.info("pfs zmq KV engine: peer's device memory not mapped (%s); staging through host memory", error)
        if "map" in offered and offer.get("pool_segments") and not devices:
            try:
                self._peer_pools.open(int(offer["pid"]), [SharedSegment(**s) for s in offer["pool_segments"]])
                self._peer_pool_pids[peer] = int(offer["pid"])
                accepted.append("map")
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.info("pfs zmq KV engine: peer's KV pool not mapped (%s); using another transport", error)
        if "pvm" in offered and not self._registered.devices():
            try:
                if can_read(int(offer["pid"]), int(offer["token_addr"]), offer["token"].encode()):
                    accepted.append("pvm")
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                logger.info("pfs zmq KV engine: peer's offer of direct reads is malformed (%r); using another "
                            "transport", error)
        if "shm" in offered:
            try:
                self._peer_stagings.open(StagingRef.decode(json.dumps(offer["staging"]).encode()))
                accepted.append("shm")
            except (OSError, ValueError, KeyError) as error:
                logger.info("pfs zmq KV engine: peer's shared staging not usable (%s); using socket frames", error)
        return accepted

    def _read_from_peer(self, frames: list, arrived: float) -> list[bytes]:
        """A direct read: the sender named its (checked) sources; the destinations are checked here."""
        header = frames[0].buffer
        if header.nbytes % 24:
            raise TransferError("malformed KV read header")
        triples = np.frombuffer(header, dtype=_HEADER_DTYPE).reshape(-1, 3).view(np.int64)
        src, dst, lengths = triples[:, 0], triples[:, 1], triples[:, 2]
        table = self._registered.table()
        regions = table.locate(dst, lengths, "write")
        if any(table.regions[i].device is not None for i in np.unique(regions)):
            raise TransferError("direct reads into device memory are not supported")
        room, generation = _room_tag(frames[2])
        (pid,) = struct.unpack("<Q", frames[3].bytes)
        _refuse_if_late(frames[1], arrived)
        with self._writing_into(room, generation):
            try:
                read_from_process(pid, src, dst, lengths)
            except OSError as error:
                raise TransferError(f"direct read of KV failed: {error}") from error
        return []

    def _read_from_peer_pool(self, peer: bytes, frames: list, arrived: float) -> list[bytes]:
        """A pool read: the sender named buffers and slots in its shared pool; both sides are checked here."""
        pid = self._peer_pool_pids.get(peer)
        table = self._peer_pools.table(pid) if pid is not None else None
        if table is None:
            raise TransferError("pool read on a connection whose sender's pool is not mapped")
        buffers, slot_bytes = frames[0].buffer, frames[1].buffer
        if buffers.nbytes % 24 or slot_bytes.nbytes % 16:
            raise TransferError("malformed KV pool read")
        buffers = np.frombuffer(buffers, dtype=_HEADER_DTYPE).reshape(-1, 3).view(np.int64)
        slot_pairs = np.frombuffer(slot_bytes, dtype="<i8").reshape(2, -1)
        slots = KVSlots.of(buffers[:, 0], buffers[:, 1], buffers[:, 2], slot_pairs[0], slot_pairs[1])
        room, generation = _room_tag(frames[3])
        _refuse_if_late(frames[2], arrived)
        threads = None
        if slots.nbytes >= THREADED_COPY_MIN_BYTES:
            if self._copy_threads is None:
                self._copy_threads = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="pfs-kv-copy")
            threads = self._copy_threads
        with self._writing_into(room, generation):
            copy_slots(table, self._registered.table(), slots, threads)
        return []

    def _read_from_peer_device(self, peer: bytes, frames: list, arrived: float) -> list[bytes]:
        """A device read: the sender named its (checked) device sources; destinations are checked here."""
        memory = self._peer_devices.get(peer)
        if memory is None:
            raise TransferError("device read on a connection whose device memory is not mapped")
        header = frames[0].buffer
        if header.nbytes % 24:
            raise TransferError("malformed KV read header")
        triples = np.frombuffer(header, dtype=_HEADER_DTYPE).reshape(-1, 3).view(np.int64)
        room, generation = _room_tag(frames[2])
        _refuse_if_late(frames[1], arrived)
        with self._writing_into(room, generation):
            copy_blocks(memory, triples[:, 0], self._registered.table(), triples[:, 1], triples[:, 2])
        return []


def _budget(deadline: float) -> bytes:
    """The wire's time budget: the seconds left until ``deadline`` (this engine's monotonic clock), float64."""
    return struct.pack("<d", deadline - time.monotonic())


def _refuse_if_late(budget_frame, arrived: float) -> None:
    """Refuse a write or read whose time budget has run out since it ``arrived`` (this engine's monotonic clock).

    No clock of the sender's is read: hosts whose clocks disagree still agree on a deadline.
    """
    (budget,) = struct.unpack("<d", budget_frame.bytes)
    if not time.monotonic() <= arrived + budget:  # a NaN budget is refused too
        raise TransferError("KV write arrived after its deadline: refused (its slots may be freed)")


def _header(*columns) -> bytes:
    """Columns of int64 values as the wire's little-endian uint64 rows."""
    return np.stack(columns, axis=1).astype(_HEADER_DTYPE).tobytes()


def _room_tag(frame) -> tuple[int, int]:
    if len(frame.bytes) != _ROOM_TAG.size:
        raise TransferError("malformed KV write room tag")
    return _ROOM_TAG.unpack(frame.bytes)


def _parse_fault_stall(value: str) -> Optional[tuple[int, float]]:
    """``ROOM:SECONDS`` (``FAULT_STALL_ENV``), or None when unset."""
    if not value:
        return None
    room, seconds = value.split(":")
    return int(room), float(seconds)


def _current_cuda_device() -> Optional[int]:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def _split_blocks(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, limit: int):
    """Blocks longer than ``limit`` cut into pieces of at most ``limit`` bytes."""
    pieces = np.maximum((lengths + limit - 1) // limit, 1)
    if (pieces == 1).all():
        return src, dst, lengths
    block = np.repeat(np.arange(len(lengths)), pieces)
    offset = (np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * limit
    return src[block] + offset, dst[block] + offset, np.minimum(lengths[block] - offset, limit)


class TransferError(RuntimeError):
    """A KV transfer could not be completed (peer refused, late, or unreachable)."""


class LateWriteRefused(TransferError):
    """The peer no longer receives the write's (room, generation): it gave the request up."""
