"""A ZMQ "transfer engine": one-sided writes of KV bytes into a peer's registered memory.

SGLang's Mooncake backend drives a transfer engine with a tiny interface: register
memory regions, ``batch_transfer_sync(session, src_ptrs, dst_ptrs, lengths)``, a
session id, and a liveness probe. :class:`ZmqTransferEngine` gives that interface over
ZMQ, so the whole Mooncake PD protocol (bootstrap, page grouping, aux rows, aborts,
heartbeats) runs unchanged on any host (``zmq_backend`` plugs it in), plus what the
``zmq`` backend adds: requests given by slots (``batch_transfer_slots``) and the rooms
that keep late writes out of freed slots.

It is a facade over four parts, each of which owns one thing:

* ``wire``: the message kinds, their frames and encoding, how engines name each other,
  the identity a handshake compares (invariant 4);
* ``rooms``: which request a write is for; a write is applied only while the decode
  side's (room, generation) receives, and retiring a room waits for the write in
  progress, so no late write lands in freed slots;
* ``sender``: per peer a handshake and the fastest transport it allows (``cuda``,
  ``map``, ``pvm``, ``shm``, ``socket``), per call a deadline; a call succeeds only once
  every part of it landed, so partial KV is never handed over;
* ``receiver``: one server thread and one dispatch table; every write or read checked
  (handshake, registered memory, budget on its own monotonic clock, room) before a byte
  moves.

The transports' memory and copies live in their own modules (``memory_regions``,
``cuda_ipc``, ``cuda_copies``, ``shared_pool``, ``process_memory``, ``shared_staging``).
Both halves share the memory this server registered (``memory_regions.RegisteredMemory``):
a sender reads only from it, a receiver writes only into it.
"""

from __future__ import annotations

import socket
from contextlib import AbstractContextManager
from typing import Callable, Optional, Sequence

import numpy as np
import zmq

from pfs_sglang.transfer.kv_blocks import KVSlots
from pfs_sglang.transfer.memory_regions import RegisteredMemory
from pfs_sglang.transfer.receiver import Receiver
from pfs_sglang.transfer.rooms import RoomBinding
from pfs_sglang.transfer.sender import Sender
from pfs_sglang.transfer.wire import LOCAL_TRANSPORTS, EngineIdentity

# the engine and the types its interface takes
__all__ = ["LOCAL_TRANSPORTS", "EngineIdentity", "RoomBinding", "ZmqTransferEngine"]


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
        self._registered = RegisteredMemory()
        context = zmq.Context.instance()
        self.receiver = Receiver(self._registered, check_peer or identity.mismatch_with, secret.encode(), bind_host,
                                 context)
        self.sender = Sender(identity, self._registered, timeout_s, secret.encode(),
                             () if tcp_only else tuple(local_transports), tcp_only,
                             {bind_host, "localhost", socket.gethostname()}, context)
        self.session_id = self.receiver.address.encode()  # host:port, as SGLang expects

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
        0, or -1 with the reason kept for this thread (``last_error``).
        """
        return self.sender.write_blocks(session_id, np.asarray(buffers, dtype=np.int64),
                                        np.asarray(peer_buffer_addresses, dtype=np.int64),
                                        np.asarray(lengths, dtype=np.int64))

    def transfer_sync(self, session_id: str, buffer: int, peer_buffer_address: int, length: int) -> int:
        return self.batch_transfer_sync(session_id, [buffer], [peer_buffer_address], [length])

    def send_probe(self, peer_session_id: str) -> int:
        return self.sender.probe(peer_session_id)

    # ----- what the zmq backend adds -----
    def batch_transfer_slots(self, session_id: str, slots: KVSlots) -> int:
        """Write a request's KV given by slots (the blocks ``slots.blocks()`` names), as ``batch_transfer_sync``.

        A peer that mapped this process's shared pool (``map``) copies it from the slot lists
        as they are; every other transport moves ``slots.blocks()``.
        """
        return self.sender.write_slots(session_id, slots)

    def peer_transports(self, session_id: str) -> list[str]:
        """How bytes reach a verified peer (``Sender.transports``)."""
        return self.sender.transports(session_id)

    def last_error(self) -> Optional[str]:
        """The reason of this thread's last failed transfer, if any."""
        return self.sender.last_error()

    # ----- rooms, sender side: which request this thread's writes are for -----
    def bind(self, binding: Optional[RoomBinding]) -> Optional[RoomBinding]:
        """Tag this thread's writes with ``binding`` (None: no room); the previous binding (``ThreadRooms``)."""
        return self.sender.rooms.bind(binding)

    def binding(self) -> Optional[RoomBinding]:
        return self.sender.rooms.binding()

    def writing_for(self, room: int, generation_of: Callable[[str], Optional[int]]) -> AbstractContextManager[None]:
        """This thread's writes inside the block are for ``room``."""
        return self.sender.rooms.writing_for(room, generation_of)

    def refused_late(self, room: int, session_id: Optional[str] = None) -> bool:
        """Whether the last write for ``room`` to ``session_id`` (None: any peer) was refused as late."""
        return self.sender.late_refusals.refused(room, session_id)

    # ----- rooms, receiver side: no late write lands in freed slots -----
    def open_room(self, room: int) -> int:
        """Receive writes for ``room`` under a new generation (returned), before its slots go out."""
        return self.receiver.rooms.open(room)

    def close_room(self, room: int, generation: int) -> None:
        """Retire ``room``'s ``generation``; returns once no write for it is in progress: its slots may be freed."""
        self.receiver.rooms.close(room, generation)

    def receiving_generation(self, room: int) -> Optional[int]:
        """The generation ``room`` receives writes under now, or None."""
        return self.receiver.rooms.generation(room)

    @property
    def late_writes_refused(self) -> int:
        return self.receiver.rooms.late_writes_refused

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()
