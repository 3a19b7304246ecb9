"""Rooms alone (``transfer.rooms``), with no engine, socket or memory: a write is admitted only while its
(room, generation) receives; retiring a room waits for the write in progress and for no other room's;
the sender's thread bindings and its memory of late refusals."""

from __future__ import annotations

import threading
import time

import pytest

from pfs_sglang.transfer import rooms
from pfs_sglang.transfer.rooms import LateRefusals, ReceivingRooms, RoomBinding, ThreadRooms
from pfs_sglang.transfer.wire import LateWriteRefused


def test_a_write_is_admitted_only_while_its_generation_receives():
    receiving = ReceivingRooms()
    first = receiving.open(7)
    with receiving.admitting(7, first):
        pass
    receiving.close(7, first)
    assert receiving.generation(7) is None
    with pytest.raises(LateWriteRefused, match=f"room 7 generation {first} is no longer receiving"):
        with receiving.admitting(7, first):
            pytest.fail("a retired room's write was admitted")
    second = receiving.open(7)  # the room number used again: the earlier attempt's writes stay out
    assert second != first
    with pytest.raises(LateWriteRefused):
        with receiving.admitting(7, first):
            pass
    receiving.close(7, first)  # retiring an old generation leaves the live one open
    assert receiving.generation(7) == second
    assert receiving.late_writes_refused == 2


def test_retiring_a_room_waits_for_its_write_in_progress_only():
    receiving = ReceivingRooms()
    generation, other = receiving.open(1), receiving.open(2)
    writing, events = threading.Event(), []

    def write():
        with receiving.admitting(1, generation):
            writing.set()
            time.sleep(0.3)
            events.append("write applied")

    writer = threading.Thread(target=write)
    writer.start()
    assert writing.wait(5)
    receiving.close(2, other)  # another room's retirement does not wait
    assert events == []
    receiving.close(1, generation)
    events.append("room retired")
    writer.join(5)
    assert events == ["write applied", "room retired"]


def test_a_threads_binding_is_its_own():
    thread_rooms = ThreadRooms()
    seen = []
    with thread_rooms.writing_for(3, {"peer": 9}.get):
        other = threading.Thread(target=lambda: seen.append(thread_rooms.binding()))
        other.start()
        other.join()
        assert thread_rooms.binding().room == 3 and thread_rooms.binding().generation_of("peer") == 9
    assert seen == [None] and thread_rooms.binding() is None
    binding = RoomBinding(4, {}.get)
    assert thread_rooms.bind(binding) is None and thread_rooms.bind(None) is binding


def test_late_refusals_are_kept_per_peer_until_a_write_lands(monkeypatch):
    monkeypatch.setattr(rooms, "LATE_REFUSALS_KEPT", 2)
    refusals = LateRefusals()
    refusals.note("a", 1, refused=True)
    assert refusals.refused(1, "a") and refusals.refused(1) and not refusals.refused(1, "b")
    refusals.note("a", 1, refused=False)  # its last write landed
    assert not refusals.refused(1)
    for room in (1, 2, 3):
        refusals.note("a", room, refused=True)
    assert not refusals.refused(1) and refusals.refused(2) and refusals.refused(3)  # the oldest is forgotten
