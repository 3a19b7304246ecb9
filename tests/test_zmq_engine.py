"""The ZMQ transfer engine: one-sided writes into registered memory, checked identity, deadlines."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from pfs_sglang.transfer.zmq_engine import EngineIdentity, SessionAddress, ZmqTransferEngine

PREFILL = EngineIdentity(role="prefill", prefill_fingerprint="pfs-aaa", page_size=1, kv_dtype="float32", kv_layout="nhd")
DECODE = EngineIdentity(role="decode", prefill_fingerprint="pfs-aaa", page_size=1, kv_dtype="float32", kv_layout="nhd")


@pytest.fixture
def engines():
    sender = ZmqTransferEngine(PREFILL, "127.0.0.1", timeout_s=5)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    yield sender, receiver
    sender.close()
    receiver.close()


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
    status = sender.batch_transfer_sync(
        receiver.get_session_id(), [src + 1 * row, src + 7 * row], [dst + 5 * row, dst], [2 * row, row]
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


def test_write_outside_registered_memory_is_refused(engines):
    sender, receiver = engines
    source = np.ones(16, dtype=np.uint8)
    destination = np.zeros(16, dtype=np.uint8)
    src, dst = _registered(sender, source), _registered(receiver, destination)
    assert sender.batch_transfer_sync(receiver.get_session_id(), [src], [dst + 8], [16]) == -1
    assert "outside registered KV memory" in sender.last_error()
    assert not destination.any()


def test_foreign_prefill_module_is_refused_at_handoff():
    foreign = EngineIdentity(role="prefill", prefill_fingerprint="pfs-bbb", page_size=1, kv_dtype="float32", kv_layout="nhd")
    sender = ZmqTransferEngine(foreign, "127.0.0.1", timeout_s=5)
    receiver = ZmqTransferEngine(DECODE, "127.0.0.1", timeout_s=5)
    try:
        source, destination = np.ones(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)
        src, dst = _registered(sender, source), _registered(receiver, destination)
        assert sender.batch_transfer_sync(receiver.get_session_id(), [src], [dst], [8]) == -1
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
        status = sender.batch_transfer_sync(f"127.0.0.1:{port}", [_registered(sender, source)], [0], [8])
        assert status == -1 and time.monotonic() - started < 3
        assert "within 0.5s" in sender.last_error()
        assert sender.send_probe(f"127.0.0.1:{port}") == -1
    finally:
        sender.close()
