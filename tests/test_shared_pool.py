"""The ``map`` transport: a prefill pool in shared memory, read in place by a receiver on the same host."""

from __future__ import annotations

import multiprocessing
import os
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from pfs_sglang.transfer import receiver as receiver_side, registration, shared_pool
from pfs_sglang.transfer.kv_blocks import KVSlots
from pfs_sglang.transfer.memory_regions import OutsideRegisteredMemory, RegionTable, Region, copy_slots
from pfs_sglang.transfer.shared_pool import PeerPools, move_to_shared_memory, segments_holding
from pfs_sglang.transfer.wire import LATE_WRITE_REFUSED
from pfs_sglang.transfer.zmq_engine import EngineIdentity, ZmqTransferEngine

PREFILL = EngineIdentity(role="prefill", prefill_fingerprint="pfs-aaa", page_size=1, kv_dtype="uint8", kv_layout="nhd")
DECODE = EngineIdentity(role="decode", prefill_fingerprint="pfs-aaa", page_size=1, kv_dtype="uint8", kv_layout="nhd")
ROOM = 3


def _mapped_lines(address: int) -> list[str]:
    lines = []
    for line in open("/proc/self/maps"):
        low, high = (int(part, 16) for part in line.split()[0].split("-"))
        if low <= address < high:
            lines.append(line)
    return lines


def test_moved_tensors_keep_their_views_and_values_on_memfd_memory():
    fused = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    k, v = fused[0, :5], fused[1, :5]  # SGLang's fused K/V halves of one allocation, padded rows cut off
    shared_k, shared_v = move_to_shared_memory([k, v])
    for old, new in ((k, shared_k), (v, shared_v)):
        assert (new.shape, new.stride(), new.storage_offset(), new.dtype) == (old.shape, old.stride(),
                                                                            old.storage_offset(), old.dtype)
        assert torch.equal(new, old)
    assert shared_k.untyped_storage().data_ptr() == shared_v.untyped_storage().data_ptr()  # still one storage
    assert any("memfd:pfs-kv-pool" in line for line in _mapped_lines(shared_k.data_ptr()))
    shared_v[0, 0] = -1.0  # a view of the pool, as SGLang writes it
    assert shared_k.untyped_storage().nbytes() == fused.untyped_storage().nbytes()
    regions = [Region(t.data_ptr(), t.nbytes) for t in (shared_k, shared_v)]
    (segment,) = segments_holding(regions)
    assert segment.length == fused.untyped_storage().nbytes()


@contextmanager
def _engines(shared_source: bool, layers: int = 3, slots: int = 300, item: int = 2048):
    """A sender whose pool is (or is not) in shared memory, and a receiver with a plain pool; both registered."""
    rng = np.random.default_rng(1)
    source = [rng.integers(0, 255, size=(slots, item), dtype=np.uint8) for _ in range(2 * layers)]
    if shared_source:
        source = [t.numpy() for t in move_to_shared_memory([torch.from_numpy(a) for a in source])]
    destination = [np.zeros((slots, item), dtype=np.uint8) for _ in range(2 * layers)]
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    sender.batch_register([a.ctypes.data for a in source], [a.nbytes for a in source])
    receiver.batch_register([a.ctypes.data for a in destination], [a.nbytes for a in destination])
    try:
        yield sender, receiver, source, destination
    finally:
        sender.close()
        receiver.close()


def _send(sender, receiver, source, destination, src_slots, dst_slots, room: int = ROOM, open_room: bool = True) -> int:
    generation = receiver.open_room(room) if open_room else 12345
    slots = KVSlots.of([a.ctypes.data for a in source], [a.ctypes.data for a in destination],
                       [a.shape[1] for a in source], src_slots, dst_slots)
    with sender.writing_for(room, {receiver.get_session_id(): generation}.get):
        return sender.batch_transfer_slots(receiver.get_session_id(), slots)


def _slot_layouts(rng, slots: int, tokens: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "scattered": (np.sort(rng.choice(slots, tokens, replace=False)), np.sort(rng.choice(slots, tokens, replace=False))),
        "shuffled": (rng.choice(slots, tokens, replace=False), rng.choice(slots, tokens, replace=False)),
        "consecutive": (np.arange(40, 40 + tokens), np.arange(90, 90 + tokens)),
        "mixed": (np.concatenate([np.arange(5, 105), rng.choice(np.arange(150, 300), tokens - 100, replace=False)]),
                  np.concatenate([np.arange(180, 280), np.arange(0, tokens - 100)])),
    }


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("item", [16, 2048])
@pytest.mark.parametrize("layout", ["scattered", "shuffled", "consecutive", "mixed"])
def test_slots_land_exactly_when_the_receiver_reads_the_senders_pool(monkeypatch, layout, item, threaded):
    monkeypatch.setattr(receiver_side, "THREADED_COPY_MIN_BYTES", 0 if threaded else 1 << 40)
    monkeypatch.setattr("pfs_sglang.transfer.memory_regions._COPY_TASK_BYTES", 4096)  # many pieces per buffer
    with _engines(shared_source=True, item=item) as (sender, receiver, source, destination):
        src_slots, dst_slots = _slot_layouts(np.random.default_rng(2), 300, 150)[layout]
        assert _send(sender, receiver, source, destination, src_slots, dst_slots) == 0, sender.last_error()
        assert sender.peer_transports(receiver.get_session_id())[0] == "map"
        untouched = np.setdiff1d(np.arange(300), dst_slots)
        for src_array, dst_array in zip(source, destination):
            np.testing.assert_array_equal(dst_array[dst_slots], src_array[src_slots])
            assert not dst_array[untouched].any()


def test_a_pool_not_in_shared_memory_moves_the_same_blocks_another_way():
    with _engines(shared_source=False) as (sender, receiver, source, destination):
        src_slots, dst_slots = _slot_layouts(np.random.default_rng(3), 300, 100)["shuffled"]
        assert _send(sender, receiver, source, destination, src_slots, dst_slots) == 0
        assert "map" not in sender.peer_transports(receiver.get_session_id())
        for src_array, dst_array in zip(source, destination):
            np.testing.assert_array_equal(dst_array[dst_slots], src_array[src_slots])


def test_slots_beyond_either_pool_are_refused_and_nothing_is_written():
    with _engines(shared_source=True, slots=8) as (sender, receiver, source, destination):
        # destination slot 8 is one row past the receiver's buffers: checked by the receiver before a byte moves
        assert _send(sender, receiver, source, destination, np.arange(4), np.array([1, 2, 3, 8])) == -1
        assert "outside registered KV memory" in sender.last_error()
        assert not any(a.any() for a in destination)
        # source slot 8 is past the sender's registered buffers: the sender refuses it on any transport
        assert _send(sender, receiver, source, destination, np.array([0, 8]), np.array([0, 1]), room=ROOM + 1) == -1
        assert "outside registered KV memory" in sender.last_error()
        assert not any(a.any() for a in destination)


def test_a_read_for_a_room_no_longer_receiving_is_refused_as_late():
    with _engines(shared_source=True, slots=8) as (sender, receiver, source, destination):
        generation = receiver.open_room(ROOM)
        receiver.close_room(ROOM, generation)
        assert _send(sender, receiver, source, destination, np.arange(4), np.arange(4), open_room=False) == -1
        assert LATE_WRITE_REFUSED in sender.last_error()
        assert not any(a.any() for a in destination)


def test_copy_slots_checks_every_buffer_before_a_byte_moves():
    source = [np.arange(64, dtype=np.uint8).reshape(8, 8) for _ in range(2)]
    target = [np.zeros((8, 8), dtype=np.uint8) for _ in range(2)]
    src_table = RegionTable([Region.host(a.ctypes.data, a.nbytes) for a in source])
    dst_table = RegionTable([Region.host(a.ctypes.data, a.nbytes) for a in target[:1]])  # the second not registered
    slots = KVSlots.of([a.ctypes.data for a in source], [a.ctypes.data for a in target], [8, 8], [1, 2], [3, 4])
    with pytest.raises(OutsideRegisteredMemory):
        copy_slots(src_table, dst_table, slots)
    assert not target[0].any()
    for bad_slot in (-1, 1 << 60):  # below slot 0; so high that its span would wrap around in int64
        bad = KVSlots.of([source[0].ctypes.data], [target[0].ctypes.data], [8], [bad_slot], [0])
        with pytest.raises(OutsideRegisteredMemory):
            copy_slots(src_table, dst_table, bad)


def test_a_connection_that_goes_leaves_no_state_in_the_receiver():
    """Per-connection state (verified, whose pool it may read) goes with the connection; the pool with the last one."""
    with _engines(shared_source=True, layers=1, slots=8) as (sender, receiver, source, destination):
        session = receiver.get_session_id()
        for attempt in range(3):  # the connection fails and the sender connects again (a new ZMQ routing id)
            assert _send(sender, receiver, source, destination, [1, 2], [3, 4]) == 0, sender.last_error()
            assert sender.peer_transports(session)[0] == "map"
            sender.sender._drop_socket(session)
        deadline = time.monotonic() + 5
        while (receiver.receiver._verified_peers or receiver.receiver._peer_pool_pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not receiver.receiver._verified_peers and not receiver.receiver._peer_pool_pids
        assert receiver.receiver._peer_pools.table(os.getpid()) is None  # the sender's pool is mapped no more


def _hold_a_shared_segment(conn) -> None:
    (tensor,) = move_to_shared_memory([torch.ones(4096, dtype=torch.uint8)])
    (segment,) = segments_holding([Region(tensor.data_ptr(), tensor.nbytes)])
    conn.send((os.getpid(), segment))
    conn.recv()


def test_a_senders_pool_is_unmapped_once_its_process_exits():
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_hold_a_shared_segment, args=(theirs,), daemon=True)
    child.start()
    pid, segment = ours.recv()
    pools = PeerPools()
    pools.open(pid, [segment])
    (region,) = pools.table(pid).regions
    assert region.host_bytes.all()  # the child's bytes, read here
    ours.send("exit")
    child.join(timeout=30)
    (own,) = move_to_shared_memory([torch.zeros(4096, dtype=torch.uint8)])
    pools.open(os.getpid(), segments_holding([Region(own.data_ptr(), own.nbytes)]))
    assert pools.table(pid) is None and pools.table(os.getpid()) is not None


def test_a_senders_pool_is_unmapped_once_its_pid_belongs_to_another_process(monkeypatch):
    """A pid the kernel reused is not the sender any more: the start time in /proc/PID/stat tells them apart."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_hold_a_shared_segment, args=(theirs,), daemon=True)
    child.start()
    try:
        pid, segment = ours.recv()
        pools = PeerPools()
        pools.open(pid, [segment])
        started_at = shared_pool._started_at
        # the sender exited and another process took its pid (the child stands in for it: /proc/PID stays)
        monkeypatch.setattr(shared_pool, "_started_at", lambda p: started_at(p) + (p == pid))
        (own,) = move_to_shared_memory([torch.zeros(4096, dtype=torch.uint8)])
        pools.open(os.getpid(), segments_holding([Region(own.data_ptr(), own.nbytes)]))
        assert pools.table(pid) is None and pools.table(os.getpid()) is not None
    finally:
        ours.send("exit")
        child.join(timeout=30)


def test_a_segment_is_released_with_the_last_tensor_over_it():
    (tensor,) = move_to_shared_memory([torch.zeros(4096, dtype=torch.uint8)])
    region = Region(tensor.data_ptr(), tensor.nbytes)
    (segment,) = segments_holding([region])
    del tensor
    assert segments_holding([region]) == []
    assert not os.path.exists(f"/proc/self/fd/{segment.fd}") or "pfs-kv-pool" not in os.readlink(f"/proc/self/fd/{segment.fd}")


def test_a_segment_that_is_not_the_announced_one_is_refused():
    (tensor,) = move_to_shared_memory([torch.zeros(4096, dtype=torch.uint8)])
    (segment,) = segments_holding([Region(tensor.data_ptr(), tensor.nbytes)])
    forged = shared_pool.SharedSegment(segment.start, segment.length, segment.fd, segment.inode + 1)
    with pytest.raises(PermissionError):
        PeerPools().open(os.getpid(), [forged])


@pytest.mark.parametrize("zmq_prefill_server", [True, False])
def test_sglangs_cpu_pool_is_built_in_shared_memory_on_a_zmq_prefill_server(monkeypatch, zmq_prefill_server):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    create = MHATokenToKVPool._create_buffers_normal
    monkeypatch.setattr(MHATokenToKVPool, "_create_buffers_normal",
                        lambda pool: registration.share_cpu_prefill_pool(create, pool))
    monkeypatch.setattr(registration, "_is_zmq_prefill_server", lambda: zmq_prefill_server)
    pool = MHATokenToKVPool(size=64, page_size=1, dtype=torch.float32, head_num=2, head_dim=8, layer_num=2,
                            device="cpu", enable_memory_saver=False)
    ptrs, lengths, _ = pool.get_contiguous_buf_infos()  # what the KV manager registers
    held = segments_holding([Region(ptr, length) for ptr, length in zip(ptrs, lengths)])
    assert len(held) == (2 if zmq_prefill_server else 0)  # one segment per layer: its K and V halves
    layer = type("Layer", (), {"layer_id": 1, "k_scale": None, "v_scale": None})()
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    pool.set_kv_buffer(layer, torch.tensor([4, 9, 63]), key, value)  # the pool works as SGLang uses it
    assert torch.equal(pool.get_key_buffer(1)[[4, 9, 63]], key) and torch.equal(pool.get_value_buffer(1)[[4, 9, 63]], value)


def test_a_process_that_published_no_server_args_is_no_zmq_prefill_server():
    assert registration._is_zmq_prefill_server() is False
