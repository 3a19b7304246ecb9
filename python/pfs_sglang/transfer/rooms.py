"""Rooms: which request a KV write is for, and the rule that no late write lands in freed slots.

Owns the late-write invariant, on both sides, with no socket and no memory involved (so
it is testable alone):

* Receiver (:class:`ReceivingRooms`). The decode side opens a room (``open``: a new
  generation, so a reused room number never accepts an earlier attempt's writes) before
  it hands the room's destination slots to the prefill side, and retires it (``close``)
  when the request concludes, before its slots are freed. A write is admitted
  (``admitting``) only while its (room, generation) is receiving, checked under the lock
  ``close`` takes, and ``close`` returns only once no write it admitted for that room is
  still being applied: a write in progress finishes before the room retires and none
  lands afterwards (writes for other rooms never hold it up). A late one is refused with
  "room R generation G is no longer receiving (late write refused)".
* Sender (:class:`ThreadRooms`, :class:`LateRefusals`). A thread's writes are tagged with
  the room it works for (``bind`` / ``writing_for``: a thread-local :class:`RoomBinding`,
  which also names the generation each peer gave the room), and the sender remembers
  which rooms a peer refused as late, so SGLang's Mooncake code can tell "that decode
  rank gave the request up" from "that decode rank is gone" (``zmq_backend``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from pfs_sglang.transfer.wire import LATE_WRITE_REFUSED, LateWriteRefused

logger = logging.getLogger(__name__)

LATE_REFUSALS_KEPT = 4096  # (peer, room) pairs remembered by a sender


class ReceivingRooms:
    """The receiver's rooms: which (room, generation) takes writes now, and the writes being applied."""

    def __init__(self) -> None:
        # the rooms receiving now (room -> generation) and the writes admitted and being applied
        # ((room, generation) -> count), both under _lock: ``close`` retires a room and waits for
        # its admitted writes, so none lands after it returns
        self._lock = threading.Condition()
        self._receiving: dict[int, int] = {}
        self._applying: dict[tuple[int, int], int] = {}
        self._generations = itertools.count(1)
        self.late_writes_refused = 0

    def open(self, room: int) -> int:
        """Receive writes for ``room`` from now on, under a new generation (returned).

        Called before the room's destination slots are handed to a sender. A generation the
        room had before is retired: a reused room never accepts an earlier attempt's writes.
        """
        with self._lock:
            generation = next(self._generations)
            self._receiving[room] = generation
        return generation

    def close(self, room: int, generation: int) -> None:
        """Stop receiving writes for ``room``'s ``generation`` (a later generation stays open).

        Returns once no write for it is in progress, and none is applied afterwards: after
        this, the room's slots may be freed.
        """
        with self._lock:
            if self._receiving.get(room) == generation:
                del self._receiving[room]
            while (room, generation) in self._applying:
                self._lock.wait()

    def generation(self, room: int) -> Optional[int]:
        """The generation ``room`` receives writes under now, or None."""
        with self._lock:
            return self._receiving.get(room)

    @contextmanager
    def admitting(self, room: int, generation: int) -> Iterator[None]:
        """Admit a write for ``(room, generation)`` only while it is receiving; ``close`` waits for it."""
        key = (room, generation)
        with self._lock:
            if self._receiving.get(room) != generation:
                self.late_writes_refused += 1
                reason = f"room {room} generation {generation} is no longer receiving ({LATE_WRITE_REFUSED})"
                logger.warning("pfs zmq KV engine: %s", reason)
                raise LateWriteRefused(reason)
            self._applying[key] = self._applying.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._applying[key] -= 1
                if not self._applying[key]:
                    del self._applying[key]
                self._lock.notify_all()


@dataclass(frozen=True)
class RoomBinding:
    """The request a thread's writes are for: its bootstrap room, and each peer's generation for it."""

    room: int
    generation_of: Callable[[str], Optional[int]]  # peer session id -> generation (None: that peer sent none)


class ThreadRooms:
    """The sender's side: the room each thread writes for (a thread bound to no room writes nothing)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def bind(self, binding: Optional[RoomBinding]) -> Optional[RoomBinding]:
        """Tag this thread's writes with ``binding`` (None: no room) until bound again; the previous binding."""
        previous = self.binding()
        self._local.binding = binding
        return previous

    def binding(self) -> Optional[RoomBinding]:
        return getattr(self._local, "binding", None)

    @contextmanager
    def writing_for(self, room: int, generation_of: Callable[[str], Optional[int]]) -> Iterator[None]:
        """This thread's writes inside the block are for ``room``."""
        previous = self.bind(RoomBinding(room, generation_of))
        try:
            yield
        finally:
            self.bind(previous)


class LateRefusals:
    """The sender's side: the (peer, room) pairs whose last write the peer refused as late (the latest
    ``LATE_REFUSALS_KEPT``)."""

    def __init__(self) -> None:
        self._pairs: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, session_id: str, room: int, refused: bool) -> None:
        """The last write for ``room`` to ``session_id`` was (or was not) refused as late."""
        key = (session_id, room)
        with self._lock:
            if not refused:
                self._pairs.pop(key, None)
                return
            self._pairs[key] = None
            self._pairs.move_to_end(key)
            while len(self._pairs) > LATE_REFUSALS_KEPT:
                self._pairs.popitem(last=False)

    def refused(self, room: int, session_id: Optional[str] = None) -> bool:
        """Whether the last write for ``room`` to ``session_id`` (None: to any peer) was refused as late.

        Such a peer had retired the room: nothing more of it can land there, and the peer
        itself is alive.
        """
        with self._lock:
            if session_id is not None:
                return (session_id, room) in self._pairs
            return any(key[1] == room for key in self._pairs)
