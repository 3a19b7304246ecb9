"""The receiving half of a ZMQ engine: one server thread, one dispatch table, every message checked.

Owns what a decode server's engine accepts into its KV pool. A ROUTER socket bound on
TCP and on IPC (``wire.ipc_endpoint_for``) takes every sender's messages; the server
thread answers each one (``OK``, or ``ERR`` with the reason: a failure is never left
hanging) through one table from message kind to handler (``wire`` lists the kinds). Before
a byte moves, a write or read is checked:

* its connection passed the handshake: the sender's prefill-module fingerprint and KV
  layout are the ones expected (a mismatch is refused, invariant 4) and it holds the
  deployment's secret when there is one (``PFS_KV_SECRET``, set by the launcher);
* every destination lies inside memory this server registered (and every source of a
  pool or device read inside what that sender's handshake mapped);
* its time budget has not run out since this engine took the message in, on this
  engine's own monotonic clock (time it waited in the queue before that is not counted;
  no clock of the sender's is read, so hosts whose clocks disagree still agree);
* its (room, generation) is receiving (``rooms.ReceivingRooms``): a late write never
  lands in slots that were freed.

The answer goes only once the bytes are in place (device copies synchronised), so a
sender never counts a write that did not land. At the handshake the receiver says which
same-host transports it proved on the sender's offer: ``cuda`` (it mapped the sender's
device regions, ``cuda_ipc``), ``map`` (it mapped the sender's shared pool segments, each
checked to be the announced memfd, ``shared_pool``), ``pvm`` (it read the sender's probe
token with ``process_vm_readv``, ``process_memory``), ``shm`` (it mapped the sender's
staging, ``shared_staging``); a transport whose proof fails or whose offer is malformed
is left out, never the handshake.

What the receiver keeps per connection (that it passed, the sender's device regions it
mapped, whose pool it reads) goes with the connection (ZMQ reports it gone, or a new
connection reads over its socket), a sender's mapped pool with the last connection that
reads it, so reconnects and restarted prefill servers leave nothing behind. An inbound
message larger than ``MAX_MESSAGE_BYTES`` drops its connection (ZMQ's ``MAXMSGSIZE``).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from pfs_sglang.transfer import wire
from pfs_sglang.transfer.cuda_copies import DeviceCopies
from pfs_sglang.transfer.cuda_ipc import OpenedAllocations, PeerDeviceMemory, copy_blocks
from pfs_sglang.transfer.kv_blocks import KVSlots
from pfs_sglang.transfer.memory_regions import CopyPlan, RegisteredMemory, copy_slots
from pfs_sglang.transfer.process_memory import can_read, read_from_process
from pfs_sglang.transfer.rooms import ReceivingRooms
from pfs_sglang.transfer.shared_pool import PeerPools, SharedSegment
from pfs_sglang.transfer.shared_staging import PeerStagings, StagingRef
from pfs_sglang.transfer.wire import EngineIdentity, SessionAddress, TransferError

logger = logging.getLogger(__name__)

# The largest inbound message part: a socket chunk (<= 2 x sender.CHUNK_BYTES) or the header of a
# direct read (24 bytes per block of >= sender.DIRECT_READ_MIN_BLOCK bytes: 24 MiB for 1 GiB of KV).
MAX_MESSAGE_BYTES = 64 << 20
# A pool read of at least this many bytes is split over the receiver's copy threads.
THREADED_COPY_MIN_BYTES = 4 << 20
# Kinds answered on a connection that has not passed the handshake (yet).
_BEFORE_HANDSHAKE = (wire.PROBE, wire.HANDSHAKE)

Handler = Callable[[bytes, list, float], list[bytes]]  # (peer, frames after the request id, arrived) -> answer frames


class Receiver:
    """Takes KV writes and reads into this server's registered memory, from peers that passed the handshake."""

    def __init__(self, registered: RegisteredMemory, check_peer: Callable[[EngineIdentity], Optional[str]],
                 secret: bytes, bind_host: str, context: zmq.Context) -> None:
        self.rooms = ReceivingRooms()
        self._registered = registered
        self._check_peer = check_peer
        self._secret = secret
        # per connection (its ZMQ routing id), while it lasts (``_forget_peer``)
        self._verified_peers: set[bytes] = set()  # connections that passed the handshake
        self._peer_by_fd: dict[int, bytes] = {}  # the socket each connection's messages came over
        self._peer_devices: dict[bytes, PeerDeviceMemory] = {}  # verified connection -> its sender's mapped regions
        self._peer_pool_pids: dict[bytes, int] = {}  # verified connection -> the pid whose pool it may read
        self._peer_stagings = PeerStagings()
        self._opened_allocations = OpenedAllocations()
        self._peer_pools = PeerPools()
        self._copy_threads: Optional[ThreadPoolExecutor] = None
        self._device = _current_cuda_device()
        self._device_copies: Optional[DeviceCopies] = None  # the server thread's
        # kind -> (the fewest frames it has, its handler)
        self._handlers: dict[bytes, tuple[int, Handler]] = {
            wire.PROBE: (0, lambda peer, frames, arrived: []),
            wire.HANDSHAKE: (1, self._handshake),
            wire.WRITE: (4, self._write),
            wire.STAGED_WRITE: (5, self._staged_write),
            wire.DIRECT_READ: (4, self._read_from_peer),
            wire.POOL_READ: (4, self._read_from_peer_pool),
            wire.DEVICE_READ: (3, self._read_from_peer_device),
        }
        self._stopped = threading.Event()
        self._server = context.socket(zmq.ROUTER)
        self._server.setsockopt(zmq.LINGER, 0)
        self._server.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        tcp_port = self._server.bind_to_random_port(f"tcp://{bind_host}")
        self._server.bind(wire.ipc_endpoint_for(tcp_port))
        self.address = SessionAddress(host=bind_host, port=tcp_port)
        self._server_thread = threading.Thread(target=self._serve, name="pfs-zmq-kv-engine", daemon=True)
        self._server_thread.start()

    def close(self) -> None:
        self._stopped.set()
        self._server_thread.join(timeout=2)
        self._server.close(0)
        self._opened_allocations.close()
        if self._copy_threads is not None:
            self._copy_threads.shutdown(wait=False)

    # ----- the server thread -----
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
        if len(frames) < 3 or frames[0].bytes != wire.MAGIC:
            logger.warning("pfs zmq KV engine: dropped a malformed message")
            return
        kind, request_id = frames[1].bytes, frames[2].bytes
        try:
            answer = [wire.OK, request_id, *self._handle(peer, kind, frames[3:], arrived)]
        except Exception as error:  # every failure is answered, never left hanging
            answer = [wire.ERR, request_id, str(error).encode()]
        self._server.send_multipart([peer, *answer])

    def _handle(self, peer: bytes, kind: bytes, frames: list, arrived: float) -> list[bytes]:
        """Answer one request (``arrived``: when this engine took it in, on its monotonic clock)."""
        if kind not in _BEFORE_HANDSHAKE and peer not in self._verified_peers:
            raise TransferError("KV request on a connection that has not passed the handshake: refused")
        least_frames, handler = self._handlers.get(kind, (None, None))
        if handler is None or len(frames) < least_frames:
            raise TransferError(f"unknown or malformed request kind {kind!r}")
        return handler(peer, frames, arrived)

    # ----- per-connection state lives as long as its connection -----
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

    # ----- the handshake -----
    def _handshake(self, peer: bytes, frames: list, arrived: float) -> list[bytes]:
        self._forget_peer(peer)
        reason = self._check_peer(EngineIdentity.decode(frames[0].bytes))
        if reason:
            raise TransferError(reason)
        secret = frames[2].bytes if len(frames) > 2 else b""
        if self._secret and not hmac.compare_digest(secret, self._secret):
            raise TransferError("the peer does not hold this deployment's KV secret: refused")
        offer = frames[1].bytes if len(frames) > 1 else b""
        accepted = [",".join(self._accept(json.loads(offer), peer)).encode()] if offer else []
        self._verified_peers.add(peer)
        return accepted

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

    # ----- writes and reads -----
    def _write(self, peer: bytes, frames: list, arrived: float) -> list[bytes]:
        """``WRITE``: the staged bytes came as the message's last frame."""
        return self._scatter(frames, arrived, lambda plan: frames[3].buffer)

    def _staged_write(self, peer: bytes, frames: list, arrived: float) -> list[bytes]:
        """``STAGED_WRITE``: the staged bytes are in the sender's shared staging, which this process maps."""
        def payload(plan: CopyPlan):
            ref = StagingRef.decode(frames[3].bytes)
            offset = wire.uint64_of(frames[4])
            if offset + plan.nbytes > ref.size:
                raise TransferError("KV write names bytes outside the sender's staging buffer")
            return self._peer_stagings.open(ref)[offset : offset + plan.nbytes]

        return self._scatter(frames, arrived, payload)

    def _scatter(self, frames: list, arrived: float, payload_of: Callable[[CopyPlan], "memoryview | np.ndarray"]
                 ) -> list[bytes]:
        """Staged bytes written to the header's destinations, each checked to lie in registered memory."""
        pairs = wire.header_rows(frames[0], 2, "malformed KV write header")
        plan = CopyPlan.build(self._registered.table(), pairs[:, 0], pairs[:, 1], "write")
        room, generation = wire.room_of(frames[2])
        payload = payload_of(plan)
        if payload.nbytes != plan.nbytes:
            raise TransferError(f"header names {plan.nbytes} bytes, message carries {payload.nbytes}")
        _refuse_if_late(frames[1], arrived)
        with self.rooms.admitting(room, generation):
            plan.scatter(payload, self._copies() if plan.uses_device else None)
        return []

    def _read_from_peer(self, peer: bytes, frames: list, arrived: float) -> list[bytes]:
        """A direct read: the sender named its (checked) sources; the destinations are checked here."""
        triples = wire.header_rows(frames[0], 3, "malformed KV read header")
        src, dst, lengths = triples[:, 0], triples[:, 1], triples[:, 2]
        table = self._registered.table()
        regions = table.locate(dst, lengths, "write")
        if any(table.regions[i].device is not None for i in np.unique(regions)):
            raise TransferError("direct reads into device memory are not supported")
        room, generation = wire.room_of(frames[2])
        pid = wire.uint64_of(frames[3])
        _refuse_if_late(frames[1], arrived)
        with self.rooms.admitting(room, generation):
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
        buffers = wire.header_rows(frames[0], 3, "malformed KV pool read")
        slot_pairs = wire.slot_lists_of(frames[1], "malformed KV pool read")
        slots = KVSlots.of(buffers[:, 0], buffers[:, 1], buffers[:, 2], slot_pairs[0], slot_pairs[1])
        room, generation = wire.room_of(frames[3])
        _refuse_if_late(frames[2], arrived)
        threads = None
        if slots.nbytes >= THREADED_COPY_MIN_BYTES:
            if self._copy_threads is None:
                self._copy_threads = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="pfs-kv-copy")
            threads = self._copy_threads
        with self.rooms.admitting(room, generation):
            copy_slots(table, self._registered.table(), slots, threads)
        return []

    def _read_from_peer_device(self, peer: bytes, frames: list, arrived: float) -> list[bytes]:
        """A device read: the sender named its (checked) device sources; destinations are checked here."""
        memory = self._peer_devices.get(peer)
        if memory is None:
            raise TransferError("device read on a connection whose device memory is not mapped")
        triples = wire.header_rows(frames[0], 3, "malformed KV read header")
        room, generation = wire.room_of(frames[2])
        _refuse_if_late(frames[1], arrived)
        with self.rooms.admitting(room, generation):
            copy_blocks(memory, triples[:, 0], self._registered.table(), triples[:, 1], triples[:, 2])
        return []

    def _copies(self) -> DeviceCopies:
        if self._device_copies is None:
            self._device_copies = DeviceCopies()
        return self._device_copies


def _refuse_if_late(budget_frame, arrived: float) -> None:
    """Refuse a write or read whose time budget has run out since it ``arrived`` (this engine's monotonic clock).

    No clock of the sender's is read: hosts whose clocks disagree still agree on a deadline.
    """
    if not time.monotonic() <= arrived + wire.budget_of(budget_frame):  # a NaN budget is refused too
        raise TransferError("KV write arrived after its deadline: refused (its slots may be freed)")


def _current_cuda_device() -> Optional[int]:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None
