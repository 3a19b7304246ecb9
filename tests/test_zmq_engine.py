"""The ZMQ transfer engine: one-sided writes into registered memory, checked identity, deadlines
(which hold between hosts whose clocks disagree);
writes only from connections that passed the handshake (with the deployment's secret), a
size cap on what it receives; writes only for a (room, generation) the receiver has open,
so no late write lands in slots freed after the room retired."""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import asdict

import numpy as np
import pytest

from pfs_sglang.transfer import receiver as receiver_side, sender as sender_side, wire
from pfs_sglang.transfer.memory_regions import CopyPlan
from pfs_sglang.transfer.wire import SessionAddress
from pfs_sglang.transfer.zmq_engine import EngineIdentity, ZmqTransferEngine

PREFILL = EngineIdentity(role="prefill", prefill_fingerprint="pfs-aaa", page_size=1, kv_dtype="float32", kv_layout="nhd")
DECODE = EngineIdentity(role="decode", prefill_fingerprint="pfs-aaa", page_size=1, kv_dtype="float32", kv_layout="nhd")


@pytest.fixture
def engines():
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    yield sender, receiver
    sender.close()
    receiver.close()


ROOM = 7


def transfer(sender: ZmqTransferEngine, receiver: ZmqTransferEngine, src, dst, lengths, room: int = ROOM) -> int:
    """``sender``'s writes for ``room``, which ``receiver`` opens under a new generation first."""
    generation = receiver.open_room(room)
    with sender.writing_for(room, {receiver.get_session_id(): generation}.get):
        return sender.batch_transfer_sync(receiver.get_session_id(), src, dst, lengths)


def _registered(engine: ZmqTransferEngine, array: np.ndarray) -> int:
    engine.register(array.ctypes.data, array.nbytes)
    return array.ctypes.data


def test_pages_land_in_the_peer_pool(engines):
    sender, receiver = engines
    source = np.arange(64, dtype=np.float32).reshape(8, 8)
    destination = np.zeros((8, 8), dtype=np.float32)
    src, dst = _registered(sender, source), _registered(receiver, destination)
    row = source.strides[0]
    # pages 1..2 -> slots 5..6 and page 7 -> slot 0, as one batch
    status = transfer(
        sender, receiver, [src + 1 * row, src + 7 * row], [dst + 5 * row, dst], [2 * row, row]
    )
    assert status == 0
    np.testing.assert_array_equal(destination[5:7], source[1:3])
    np.testing.assert_array_equal(destination[0], source[7])
    assert not destination[1:5].any() and not destination[7].any()


def test_same_host_uses_ipc_and_other_hosts_tcp(engines):
    _, receiver = engines
    address = SessionAddress.decode(receiver.get_session_id())
    assert address.endpoint_from({"127.0.0.1"}).startswith("ipc://")
    assert SessionAddress("10.9.9.9", address.port).endpoint_from({"127.0.0.1"}) == f"tcp://10.9.9.9:{address.port}"


def _round_trip(sender: ZmqTransferEngine, receiver: ZmqTransferEngine) -> None:
    source = np.arange(4096, dtype=np.uint8)
    destination = np.zeros(4096, dtype=np.uint8)
    assert transfer(sender, receiver, [_registered(sender, source)], [_registered(receiver, destination)], [4096]) == 0
    np.testing.assert_array_equal(destination, source)


def test_tcp_only_engines_on_one_host_talk_tcp_over_the_socket(caplog):
    """``PFS_KV_FORCE_TCP`` (``tcp_only``): the cross-host path, on one machine."""
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5, tcp_only=True)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5, tcp_only=True)
    try:
        with caplog.at_level("INFO", logger=sender_side.__name__):
            _round_trip(sender, receiver)
        session = receiver.get_session_id()
        assert sender.peer_transports(session) == ["socket"]
        assert f"connected to {session} over tcp://{session}, transport socket" in caplog.text
    finally:
        sender.close()
        receiver.close()


def test_a_peer_on_another_host_gets_tcp_and_no_same_host_offer(caplog):
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5)
    receiver = ZmqTransferEngine(DECODE, "localhost", timeout_s=5)  # advertised as localhost:PORT
    sender.sender._local_hosts = {"127.0.0.1"}  # so, to the sender, an address of another host
    try:
        with caplog.at_level("INFO", logger=sender_side.__name__):
            _round_trip(sender, receiver)
        session = receiver.get_session_id()
        assert session.startswith("localhost:") and sender.peer_transports(session) == ["socket"]
        assert f"over tcp://{session}, transport socket" in caplog.text
    finally:
        sender.close()
        receiver.close()


def test_force_tcp_switch_and_the_address_a_wildcard_bind_advertises(monkeypatch):
    from pfs_sglang.transfer import FORCE_TCP_ENV
    from pfs_sglang.transfer.zmq_backend import _bind_host, force_tcp_from_env

    monkeypatch.delenv(FORCE_TCP_ENV, raising=False)
    assert force_tcp_from_env() is False
    monkeypatch.setenv(FORCE_TCP_ENV, "1")
    assert force_tcp_from_env() is True
    monkeypatch.setenv(FORCE_TCP_ENV, "yes")
    with pytest.raises(ValueError, match="PFS_KV_FORCE_TCP is 1 .* or 0, got 'yes'"):
        force_tcp_from_env()
    # A wildcard bind advertises the address SGLang gives its own PD sockets, which peers reach.
    monkeypatch.setenv("SGLANG_HOST_IP", "10.1.2.3")
    assert _bind_host("0.0.0.0") == "10.1.2.3" and _bind_host("10.9.9.9") == "10.9.9.9"


def test_write_outside_registered_memory_is_refused(engines):
    sender, receiver = engines
    source = np.ones(16, dtype=np.uint8)
    destination = np.zeros(16, dtype=np.uint8)
    src, dst = _registered(sender, source), _registered(receiver, destination)
    assert transfer(sender, receiver, [src], [dst + 8], [16]) == -1
    assert "outside registered KV memory" in sender.last_error()
    assert not destination.any()


def test_foreign_prefill_module_is_refused_at_handoff():
    foreign = EngineIdentity(role="prefill", prefill_fingerprint="pfs-bbb", page_size=1, kv_dtype="float32", kv_layout="nhd")
    sender = ZmqTransferEngine(foreign, "127.0.0.1", timeout_s=5)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    try:
        source, destination = np.ones(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)
        src, dst = _registered(sender, source), _registered(receiver, destination)
        assert transfer(sender, receiver, [src], [dst], [8]) == -1
        assert sender.last_error() == (
            "KV hand-off refused: prefill_fingerprint differs: prefill server sends 'pfs-bbb', "
            "this decode server expects 'pfs-aaa'"
        )
        assert not destination.any()
    finally:
        sender.close()
        receiver.close()


def test_unanswered_transfer_fails_by_its_deadline():
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=0.5)
    with socket.socket() as silent:  # a port nobody answers ZMQ on
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
    try:
        source = np.ones(8, dtype=np.uint8)
        started = time.monotonic()
        with sender.writing_for(ROOM, lambda session_id: 1):
            status = sender.batch_transfer_sync(f"127.0.0.1:{port}", [_registered(sender, source)], [0], [8])
        assert status == -1 and time.monotonic() - started < 3
        assert "within 0.5s" in sender.last_error()
        assert sender.send_probe(f"127.0.0.1:{port}") == -1
    finally:
        sender.close()


def test_a_receiver_whose_clock_is_ahead_of_the_senders_still_takes_writes(engines, monkeypatch):
    """Deadlines never compare two hosts' clocks: here the sender's wall clock is an hour behind."""
    sender, receiver = engines
    real_time, sending_thread = time.time, threading.current_thread()
    monkeypatch.setattr(time, "time", lambda: real_time() - (3600 if threading.current_thread() is sending_thread
                                                             else 0))
    source, destination = np.arange(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)
    assert transfer(sender, receiver, [_registered(sender, source)], [_registered(receiver, destination)], [8]) == 0, \
        sender.last_error()
    np.testing.assert_array_equal(destination, source)


def test_a_write_whose_time_has_run_out_is_refused():
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    destination = np.zeros(8, dtype=np.uint8)
    dst = _registered(receiver, destination)
    generation = receiver.open_room(ROOM)
    peer = _raw_connection(receiver)
    try:
        assert _ask(peer, b"H", json.dumps(asdict(PREFILL)).encode(), b"", b"")[0] == b"OK"
        header = np.array([[dst, 8]], dtype="<u8").tobytes()
        reply = _ask(peer, b"W", header, struct.pack("<d", -1.0), struct.pack("<QQ", ROOM, generation), b"\xff" * 8)
        assert reply[0] == b"ERR" and b"after its deadline" in reply[2]
        assert not destination.any()
    finally:
        peer.close(0)
        receiver.close()


TRANSPORTS = {"pvm": ("pvm",), "shm": ("shm",), "socket": ()}


@pytest.fixture(params=sorted(TRANSPORTS))
def transport_engines(request):
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5, local_transports=TRANSPORTS[request.param])
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5, local_transports=TRANSPORTS[request.param])
    yield request.param, sender, receiver
    sender.close()
    receiver.close()


def _pools(sender, receiver, layers: int, slots: int, item: int):
    """SGLang-like pools: per layer a K and a V buffer of ``slots`` rows of ``item`` bytes."""
    rng = np.random.default_rng(1)
    source = [rng.integers(0, 255, size=(slots, item), dtype=np.uint8) for _ in range(2 * layers)]
    destination = [np.zeros((slots, item), dtype=np.uint8) for _ in range(2 * layers)]
    for array in source:
        _registered(sender, array)
    for array in destination:
        _registered(receiver, array)
    return source, destination


def _blocks(source, destination, src_slots, dst_slots, item):
    """One block per slot per buffer, as SGLang's Mooncake backend sends page size 1 with scattered slots."""
    src = [a.ctypes.data + int(s) * item for a in source for s in src_slots]
    dst = [a.ctypes.data + int(d) * item for a in destination for d in dst_slots]
    return src, dst, [item] * len(src)


@pytest.mark.parametrize("item", [16, 2048])
def test_scattered_slots_land_exactly_over_every_transport(transport_engines, item):
    name, sender, receiver = transport_engines
    source, destination = _pools(sender, receiver, layers=3, slots=300, item=item)
    rng = np.random.default_rng(2)
    src_slots, dst_slots = rng.choice(300, 200, replace=False), rng.choice(300, 200, replace=False)
    assert transfer(sender, receiver, *_blocks(source, destination, src_slots, dst_slots, item)) == 0
    assert sender.peer_transports(receiver.get_session_id()) == {
        "pvm": ["pvm", "socket"], "shm": ["shm"], "socket": ["socket"]}[name]
    untouched = np.setdiff1d(np.arange(300), dst_slots)
    for src_array, dst_array in zip(source, destination):
        np.testing.assert_array_equal(dst_array[dst_slots], src_array[src_slots])
        assert not dst_array[untouched].any()


def test_transfers_larger_than_a_chunk_are_pipelined_and_exact(transport_engines, monkeypatch):
    monkeypatch.setattr(sender_side, "CHUNK_BYTES", 4096)
    _, sender, receiver = transport_engines
    source, destination = _pools(sender, receiver, layers=2, slots=64, item=512)
    # one long run per buffer (split into chunk-sized pieces) and scattered single rows
    src = [source[0].ctypes.data, *(source[1].ctypes.data + s * 512 for s in (5, 9, 1))]
    dst = [destination[0].ctypes.data, *(destination[1].ctypes.data + d * 512 for d in (0, 63, 7))]
    assert transfer(sender, receiver, src, dst, [64 * 512, 512, 512, 512]) == 0
    np.testing.assert_array_equal(destination[0], source[0])
    np.testing.assert_array_equal(destination[1][[0, 63, 7]], source[1][[5, 9, 1]])


def test_writes_outside_registered_memory_are_refused_over_every_transport(transport_engines):
    _, sender, receiver = transport_engines
    source, destination = _pools(sender, receiver, layers=1, slots=8, item=2048)
    inside = destination[0].ctypes.data
    beyond = inside + 7 * 2048 + 1024  # the last row's second half and 1 KiB past the buffer
    status = transfer(
        sender, receiver, [source[0].ctypes.data, source[0].ctypes.data], [inside, beyond], [2048, 2048]
    )
    assert status == -1 and "outside registered KV memory" in sender.last_error()
    assert not destination[0].any()


def test_reads_outside_the_senders_registered_memory_are_refused(engines):
    sender, receiver = engines
    unregistered = np.ones(4096, dtype=np.uint8)
    destination = np.zeros(4096, dtype=np.uint8)
    dst = _registered(receiver, destination)
    assert transfer(sender, receiver, [unregistered.ctypes.data], [dst], [4096]) == -1
    assert sender.last_error().startswith("read of 4096 bytes at")
    assert not destination.any()


class _FakeCudart:
    """cudaPointerGetAttributes answering with a fixed status, memory type and device."""

    def __init__(self, status: int, memory_type: int = 0, device: int = 0):
        self.status, self.memory_type, self.device = status, memory_type, device

    def cudaPointerGetAttributes(self, attributes, ptr):
        attributes[0], attributes[1] = self.memory_type, self.device
        return self.status

    def cudaGetLastError(self):
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'in use' in this process, with a cudart whose answers the test chooses."""
    import torch

    from pfs_sglang.transfer import cuda_copies

    def use(cudart):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda_copies, "_load_cudart", lambda: cudart)

    return use


def test_memory_of_unknown_kind_is_refused_at_registration(engines, fake_cuda):
    _, receiver = engines
    fake_cuda(_FakeCudart(status=1))  # cudaErrorInvalidValue: the driver cannot say what it is
    with pytest.raises(RuntimeError, match="cannot be told apart from device memory"):
        receiver.register(np.zeros(16, dtype=np.uint8).ctypes.data, 16)
    assert not receiver._registered.table().regions


def test_device_memory_is_never_written_as_host_memory(engines, fake_cuda):
    sender, receiver = engines
    source = np.ones(4096, dtype=np.uint8)
    src = _registered(sender, source)
    fake_cuda(_FakeCudart(status=0, memory_type=2, device=0))  # the receiver's pool "is on a GPU"
    destination = np.zeros(4096, dtype=np.uint8)
    dst = _registered(receiver, destination)
    assert receiver._registered.devices() == {0}
    # no CUDA here: the device copy fails, and a host memmove must not have happened instead
    assert transfer(sender, receiver, [src], [dst], [4096]) == -1
    assert not destination.any()


def _eventually(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_connection_that_goes_releases_its_senders_device_mapping(engines, fake_cuda, monkeypatch):
    """Per-connection state (verified, the sender's mapped device regions) goes with the connection."""
    sender, receiver = engines
    mappings = []

    class Mapping:  # stands in for cuda_ipc.PeerDeviceMemory: what the receiver maps per connection
        def __init__(self, exported, sender_pid, device, opened):
            self.closed = False
            mappings.append(self)

        def close(self):
            self.closed = True

    monkeypatch.setattr(sender_side, "export_regions", lambda regions: [{"handle": "00", "start": r.start}
                                                                       for r in regions])
    monkeypatch.setattr(receiver_side, "PeerDeviceMemory", Mapping)
    fake_cuda(_FakeCudart(status=0, memory_type=2, device=0))  # both pools "are on a GPU"
    _registered(sender, np.ones(4096, dtype=np.uint8))
    _registered(receiver, np.zeros(4096, dtype=np.uint8))
    session = receiver.get_session_id()
    for _ in range(3):  # connect; the connection fails and the sender connects again (a new ZMQ routing id)
        sender.sender._session(session)  # connects: the handshake
        assert sender.peer_transports(session)[0] == "cuda"
        sender.sender._drop_socket(session)
    assert len(mappings) == 3
    assert _eventually(lambda: not receiver.receiver._verified_peers and not receiver.receiver._peer_devices)
    assert all(mapping.closed for mapping in mappings)


def test_a_peer_device_mapping_closes_each_ipc_handle_with_its_last_user(monkeypatch):
    import contextlib

    import torch

    from pfs_sglang.transfer import cuda_ipc

    class Cudart:
        def __init__(self):
            self.open, self.closed = [], []

        def cudaIpcOpenMemHandle(self, mapped, handle, flags):
            mapped._obj.value = (1 << 40) + (len(self.open) << 30)
            self.open.append(bytes(handle.reserved)[:1])
            return 0

        def cudaIpcCloseMemHandle(self, base):
            self.closed.append(base.value)
            return 0

    cudart = Cudart()
    monkeypatch.setattr(cuda_ipc, "_load_cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    opened = cuda_ipc.OpenedAllocations()
    handle = "01" + "00" * 63
    exported = [{"start": 4096 * (i + 1), "length": 4096, "handle": handle, "offset": 4096 * i} for i in range(2)]
    first = cuda_ipc.PeerDeviceMemory(exported, os.getpid() + 1, 0, opened)
    second = cuda_ipc.PeerDeviceMemory(exported, os.getpid() + 1, 0, opened)  # another connection, same sender
    assert len(cudart.open) == 1  # one open per handle and process
    first.close()
    assert cudart.closed == []  # the other connection still maps it
    second.close()
    assert cudart.closed == [1 << 40]


def test_device_reads_pair_every_source_row_with_its_destination_row():
    """The ``cuda`` transport's row pairing, run on host regions: blocks of mixed sizes land exactly."""
    from pfs_sglang.transfer.cuda_ipc import paired_rows, plans_in_one_unit
    from pfs_sglang.transfer.memory_regions import Region, RegionTable

    rng = np.random.default_rng(3)
    pools = {side: [rng.integers(0, 255, 64 * 96, dtype=np.uint8) for _ in range(3)] for side in ("src", "dst")}
    pools["dst"] = [np.zeros_like(array) for array in pools["dst"]]
    tables = {side: RegionTable([Region.host(a.ctypes.data, a.nbytes) for a in arrays]) for side, arrays in pools.items()}
    src, dst, lengths = [], [], []
    for layer in range(3):  # blocks of 96 and 192 bytes (one or two rows), at offsets of 96-byte rows
        for s_row, d_row, rows in zip(rng.choice(60, 8, replace=False), rng.choice(60, 8, replace=False), rng.integers(1, 3, 8)):
            src.append(pools["src"][layer].ctypes.data + int(s_row) * 96)
            dst.append(pools["dst"][layer].ctypes.data + int(d_row) * 96)
            lengths.append(int(rows) * 96)
    src, dst, lengths = (np.array(values, dtype=np.int64) for values in (src, dst, lengths))
    source, target = plans_in_one_unit(tables["src"], src, tables["dst"], dst, lengths)
    assert source.unit == target.unit == 96
    expected = [np.zeros_like(array) for array in pools["dst"]]
    for s, d, n in zip(src, dst, lengths):  # the block-by-block copy the pairing must equal
        layer = next(i for i, a in enumerate(pools["dst"]) if a.ctypes.data <= d < a.ctypes.data + a.nbytes)
        s_layer = next(a for a in pools["src"] if a.ctypes.data <= s < a.ctypes.data + a.nbytes)
        expected[layer][d - pools["dst"][layer].ctypes.data:][:n] = s_layer[s - s_layer.ctypes.data:][:n]
    for s_group, t_group, s_rows, t_rows in paired_rows(source, target):
        t_group.region.units(target.unit)[t_rows] = s_group.region.units(source.unit)[s_rows]
    for got, want in zip(pools["dst"], expected):
        assert np.array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("transports", [("cuda",), ("shm",), ()], ids=["cuda", "shm", "socket"])
def test_cuda_pools_round_trip_with_bytes_checked(transports):
    """GPU pools on both sides (one device), SGLang-like layout: exact bytes, and GB/s printed."""
    import torch

    torch.cuda.init()
    torch.cuda.set_device(0)
    layers, slots, item = 8, 4096, 2048  # 8 layers of a Llama-8B-like pool: 2 KiB per slot per buffer
    gen = torch.Generator(device="cuda").manual_seed(0)
    source = [torch.randint(0, 255, (slots, item), dtype=torch.uint8, device="cuda", generator=gen) for _ in range(2 * layers)]
    destination = [torch.zeros((slots, item), dtype=torch.uint8, device="cuda") for _ in range(2 * layers)]
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=30, local_transports=transports)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=30, local_transports=transports)
    try:
        for tensor in source:
            sender.register(tensor.data_ptr(), tensor.numel())
        for tensor in destination:
            receiver.register(tensor.data_ptr(), tensor.numel())
        assert receiver._registered.devices() == {0}
        rng = np.random.default_rng(0)
        src_slots, dst_slots = rng.choice(slots, 1024, replace=False), rng.choice(slots, 1024, replace=False)
        src = [t.data_ptr() + int(s) * item for t in source for s in src_slots]
        dst = [t.data_ptr() + int(d) * item for t in destination for d in dst_slots]
        lengths = [item] * len(src)
        assert transfer(sender, receiver, src, dst, lengths) == 0, sender.last_error()
        torch.cuda.synchronize()
        index_src, index_dst = torch.from_numpy(src_slots).cuda(), torch.from_numpy(dst_slots).cuda()
        for s_tensor, d_tensor in zip(source, destination):
            assert torch.equal(d_tensor[index_dst], s_tensor[index_src])
        started = time.perf_counter()
        for _ in range(5):
            assert transfer(sender, receiver, src, dst, lengths) == 0
        seconds = (time.perf_counter() - started) / 5
        print(f"\nGPU KV hand-off ({'+'.join(transports) or 'socket'}): {sum(lengths) / seconds / 1e9:.2f} GB/s "
              f"({sum(lengths) / 1e6:.0f} MB, {len(lengths)} blocks)")
    finally:
        sender.close()
        receiver.close()


def _raw_connection(receiver: ZmqTransferEngine):
    """A bare ZMQ connection to ``receiver``, as any process that reaches its port could open."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(SessionAddress.decode(receiver.get_session_id()).endpoint_from({"127.0.0.1"}))
    return sock


def _ask(sock, kind: bytes, *frames: bytes, timeout_ms: int = 3000) -> list[bytes] | None:
    sock.send_multipart([wire.MAGIC, kind, b"req-1", *frames])
    return sock.recv_multipart() if sock.poll(timeout_ms) else None


def _write_frames(dst: int, payload: bytes) -> list[bytes]:
    header = np.array([[dst, len(payload)]], dtype="<u8").tobytes()
    return [header, struct.pack("<d", 30.0), struct.pack("<QQ", ROOM, 1), payload]  # 30 s of budget


def test_writes_need_a_handshake_on_their_own_connection(engines):
    sender, receiver = engines
    destination = np.zeros(8, dtype=np.uint8)
    dst = _registered(receiver, destination)
    source = np.ones(8, np.uint8)
    assert transfer(sender, receiver, [_registered(sender, source)],
                                      [dst], [8]) == 0  # the engine's own connection handshook
    destination[:] = 0
    intruder = _raw_connection(receiver)  # another connection, skipping the handshake
    try:
        reply = _ask(intruder, b"W", *_write_frames(dst, b"\xff" * 8))
        assert reply[0] == b"ERR" and b"has not passed the handshake" in reply[2]
        assert not destination.any()
    finally:
        intruder.close(0)


def test_a_transport_missing_from_the_offer_is_skipped_not_the_handshake():
    """An offer whose ``pvm`` part lacks its probe address: that transport is left out, the others stay."""
    from pfs_sglang.transfer.shared_staging import StagingBuffer

    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    probe = StagingBuffer(0, shared=True)
    peer = _raw_connection(receiver)
    try:
        offer = {"transports": ["pvm", "shm"], "pid": os.getpid(), "token": probe.ref.token,
                 "staging": asdict(probe.ref)}  # no "token_addr"
        reply = _ask(peer, b"H", json.dumps(asdict(PREFILL)).encode(), json.dumps(offer).encode(), b"")
        assert reply is not None and reply[0] == b"OK", reply
        assert reply[2] == b"shm"
    finally:
        peer.close(0)
        probe.close()
        receiver.close()


def test_a_peer_without_the_deployments_secret_is_refused():
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5, secret="s3cret")
    outsiders = [ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5, secret=s) for s in ("", "guess")]
    insider = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5, secret="s3cret")
    try:
        source, destination = np.ones(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)
        dst = _registered(receiver, destination)
        for outsider in outsiders:
            assert transfer(outsider, receiver, [_registered(outsider, source)],
                                                [dst], [8]) == -1
            assert "does not hold this deployment's KV secret" in outsider.last_error()
            assert not destination.any()
        assert transfer(insider, receiver, [_registered(insider, source)], [dst], [8]) == 0
        np.testing.assert_array_equal(destination, source)
    finally:
        for engine in (receiver, insider, *outsiders):
            engine.close()


def test_an_oversized_message_drops_its_connection_and_the_engine_serves_on(monkeypatch):
    monkeypatch.setattr(receiver_side, "MAX_MESSAGE_BYTES", 1 << 16)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5)
    flood = _raw_connection(receiver)
    try:
        assert _ask(flood, b"W", *_write_frames(0, b"\x00" * (1 << 17)), timeout_ms=1000) is None  # dropped
        source, destination = np.ones(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)
        dst = _registered(receiver, destination)
        assert transfer(sender, receiver, [_registered(sender, source)], [dst], [8]) == 0
        np.testing.assert_array_equal(destination, source)
    finally:
        flood.close(0)
        sender.close()
        receiver.close()


def test_a_thread_bound_to_no_room_writes_nothing(engines):
    sender, receiver = engines
    source, destination = np.ones(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)
    src, dst = _registered(sender, source), _registered(receiver, destination)
    assert sender.batch_transfer_sync(receiver.get_session_id(), [src], [dst], [8]) == -1
    assert "for no bootstrap room" in sender.last_error()
    with sender.writing_for(ROOM, {}.get):  # the peer gave this room no generation
        assert sender.batch_transfer_sync(receiver.get_session_id(), [src], [dst], [8]) == -1
    assert "no receiving generation" in sender.last_error()
    assert not destination.any()


def _one_layer(transport_engines):
    """A sender and receiver pool of one layer (2 KiB rows, so a same-host peer reads directly)."""
    name, sender, receiver = transport_engines
    source, destination = _pools(sender, receiver, layers=1, slots=8, item=2048)  # a K and a V buffer
    blocks = _blocks(source, destination, [1, 2, 5], [6, 0, 3], 2048)
    return name, sender, receiver, source, destination, blocks


def _landed(source, destination) -> bool:
    return all(np.array_equal(d[[6, 0, 3]], s[[1, 2, 5]]) for s, d in zip(source, destination))


def _untouched(destination) -> bool:
    return not any(d.any() for d in destination)


def _wipe(destination) -> None:
    for d in destination:
        d[:] = 0


def _write_for(sender, receiver, room, generation, blocks) -> int:
    with sender.writing_for(room, {receiver.get_session_id(): generation}.get):
        return sender.batch_transfer_sync(receiver.get_session_id(), *blocks)


def test_late_writes_never_land_over_every_transport(transport_engines):
    """Retired (room, generation), or a stale generation of a reused room: refused, memory unchanged."""
    name, sender, receiver, source, destination, blocks = _one_layer(transport_engines)
    session = receiver.get_session_id()
    first = receiver.open_room(ROOM)
    assert _write_for(sender, receiver, ROOM, first, blocks) == 0, sender.last_error()
    assert sender.peer_transports(session)[0] == {"pvm": "pvm", "shm": "shm", "socket": "socket"}[name]
    assert _landed(source, destination)

    _wipe(destination)
    receiver.close_room(ROOM, first)  # the request concluded: its slots may be freed now
    assert _write_for(sender, receiver, ROOM, first, blocks) == -1
    assert sender.last_error() == f"room {ROOM} generation {first} is no longer receiving (late write refused)"
    assert sender.refused_late(ROOM, session) and sender.refused_late(ROOM)
    assert _untouched(destination)

    second = receiver.open_room(ROOM)  # the same room number, used again later
    assert second != first
    assert _write_for(sender, receiver, ROOM, first, blocks) == -1  # the earlier attempt's write
    assert f"generation {first} is no longer receiving" in sender.last_error()
    assert _untouched(destination)
    assert _write_for(sender, receiver, ROOM, second, blocks) == 0
    assert _landed(source, destination)
    assert not sender.refused_late(ROOM, session)  # its last write landed
    assert receiver.late_writes_refused == 2
    receiver.close_room(ROOM, first)  # an old generation's retirement leaves the live one open
    assert receiver.receiving_generation(ROOM) == second


def test_retiring_a_room_waits_for_the_write_in_progress(transport_engines, monkeypatch):
    name, sender, receiver, source, destination, blocks = _one_layer(transport_engines)
    started, events = threading.Event(), []

    def slowly(original):
        def apply(*args, **kwargs):
            started.set()
            time.sleep(0.5)
            original(*args, **kwargs)
            events.append("write applied")
        return apply

    # the receiver's two ways of applying a write: scatter from staging, or read from the sender
    monkeypatch.setattr(CopyPlan, "scatter", slowly(CopyPlan.scatter))
    monkeypatch.setattr(receiver_side, "read_from_process", slowly(receiver_side.read_from_process))
    generation = receiver.open_room(ROOM)
    statuses = []
    writer = threading.Thread(target=lambda: statuses.append(_write_for(sender, receiver, ROOM, generation, blocks)))
    writer.start()
    assert started.wait(5)
    other = receiver.open_room(ROOM + 1)
    receiver.close_room(ROOM + 1, other)  # another room's retirement does not wait for this write
    assert events == []
    receiver.close_room(ROOM, generation)
    events.append("room retired")
    writer.join(10)
    assert events == ["write applied", "room retired"] and statuses == [0]
    assert _landed(source, destination)
    _wipe(destination)
    assert _write_for(sender, receiver, ROOM, generation, blocks) == -1  # and none after it
    assert _untouched(destination)


def test_an_executor_task_writes_for_the_submitting_threads_room(engines):
    """Mooncake's worker hands some writes to its thread pool: they keep the chunk's room."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from pfs_sglang.transfer.zmq_backend import _RoomBindingExecutor, _RoomBindingQueue

    sender, receiver = engines
    source, destination = np.ones(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)
    src, dst = _registered(sender, source), _registered(receiver, destination)
    generation = receiver.open_room(ROOM)
    manager = SimpleNamespace(engine=sender, _generation_for=lambda room, session: generation if room == ROOM else None)
    chunks = _RoomBindingQueue(queue.Queue(), manager)
    chunks.put(SimpleNamespace(room=ROOM))  # put goes through to the worker's queue
    with ThreadPoolExecutor(1) as pool:
        executor = _RoomBindingExecutor(pool, sender)
        chunks.get()  # the worker took a chunk of ROOM: this thread now writes for it
        write = lambda: sender.batch_transfer_sync(receiver.get_session_id(), [src], [dst], [8])
        assert executor.submit(write).result() == 0
        np.testing.assert_array_equal(destination, source)
        sender.bind(None)
        assert executor.submit(write).result() == -1


def _gpu_receiver(conn, layers: int, slots: int, item: int) -> None:
    """A decode-like process: a GPU pool registered with its engine; answers with the rows it was asked for."""
    import torch

    torch.cuda.init()
    torch.cuda.set_device(0)
    pool = [torch.zeros((slots, item), dtype=torch.uint8, device="cuda") for _ in range(2 * layers)]
    engine = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=30)
    for tensor in pool:
        engine.register(tensor.data_ptr(), tensor.numel())
    conn.send((engine.get_session_id(), [tensor.data_ptr() for tensor in pool], engine.open_room(ROOM)))
    while (rows := conn.recv()) is not None:
        conn.send([tensor[torch.from_numpy(rows).cuda()].cpu().numpy() for tensor in pool])
    engine.close()


@pytest.mark.gpu
def test_cuda_ipc_moves_kv_gpu_to_gpu_between_two_processes():
    """The ``cuda`` transport between processes (CUDA IPC): the receiver maps the sender's pool, bytes exact."""
    import multiprocessing

    import torch

    layers, slots, item = 8, 4096, 2048
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_gpu_receiver, args=(theirs, layers, slots, item), daemon=True)
    child.start()
    try:
        session_id, dst_ptrs, generation = ours.recv()
        torch.cuda.init()
        torch.cuda.set_device(0)
        gen = torch.Generator(device="cuda").manual_seed(1)
        source = [torch.randint(0, 255, (slots, item), dtype=torch.uint8, device="cuda", generator=gen)
                  for _ in range(2 * layers)]
        sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=30)
        for tensor in source:
            sender.register(tensor.data_ptr(), tensor.numel())
        rng = np.random.default_rng(0)
        src_slots, dst_slots = rng.choice(slots, 1024, replace=False), rng.choice(slots, 1024, replace=False)
        src = [t.data_ptr() + int(s) * item for t in source for s in src_slots]
        dst = [ptr + int(d) * item for ptr in dst_ptrs for d in dst_slots]
        with sender.writing_for(ROOM, {session_id: generation}.get):
            assert sender.batch_transfer_sync(session_id, src, dst, [item] * len(src)) == 0, sender.last_error()
            assert sender.peer_transports(session_id)[0] == "cuda"
            started = time.perf_counter()
            for _ in range(5):
                assert sender.batch_transfer_sync(session_id, src, dst, [item] * len(src)) == 0
            seconds = (time.perf_counter() - started) / 5
        print(f"\nGPU KV hand-off between processes (cuda): {len(src) * item / seconds / 1e9:.2f} GB/s")
        ours.send(dst_slots)
        landed = ours.recv()
        for tensor, rows in zip(source, landed):
            assert np.array_equal(rows, tensor[torch.from_numpy(src_slots).cuda()].cpu().numpy())
        sender.close()
    finally:
        ours.send(None)
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
