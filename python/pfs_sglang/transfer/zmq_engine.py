"""A ZMQ "transfer engine": one-sided writes of KV bytes into a peer's registered memory.

SGLang's Mooncake backend drives a transfer engine with a tiny interface: register
memory regions, ``batch_transfer_sync(session, src_ptrs, dst_ptrs, lengths)``, a
session id, and a liveness probe. This module gives that interface over ZMQ, so the
whole Mooncake PD protocol (bootstrap, page grouping, aux rows, aborts, heartbeats)
runs unchanged on any host: TCP between hosts, IPC when both ends share a host.

Wire format (no pickle): ``[MAGIC, b"W", request_id, header, block_0, block_1, ...]``
where ``header`` is a little-endian uint64 array of ``(dst_ptr, length)`` pairs and
each block frame carries that many raw bytes, read straight from the sender's pool
memory (staged through host memory when the pool is on a GPU). The receiving engine
checks every destination lies inside memory it registered, writes the bytes, and
answers ``[b"OK", request_id]`` or ``[b"ERR", request_id, reason]``.

Before the first write to a peer the sender performs a handshake
(``[MAGIC, b"H", request_id, identity_json]``): the receiver compares the sender's
prefill-module fingerprint and KV layout with what it expects and refuses a mismatch
(invariant 4). Every call has a deadline; a late or failed call returns non-zero and
the reason is kept for the calling thread (``last_error``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import zmq

logger = logging.getLogger(__name__)

MAGIC = b"PFSKV1"
_HEADER_DTYPE = np.dtype("<u8")


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
        return f"tcp://{self.host}:{self.port}"


class MemoryAccess:
    """Reads and writes raw pool memory: host memory directly, device memory staged."""

    def __init__(self) -> None:
        self._cudart = None
        import torch

        if torch.cuda.is_available():
            self._cudart = _load_cudart()

    def _is_device_pointer(self, ptr: int) -> bool:
        if self._cudart is None:
            return False
        attributes = (ctypes.c_int * 8)()  # cudaPointerAttributes: type is the first int
        if self._cudart.cudaPointerGetAttributes(attributes, ctypes.c_void_p(ptr)) != 0:
            return False
        return attributes[0] in (2, 3)  # cudaMemoryTypeDevice, cudaMemoryTypeManaged

    def read(self, ptr: int, length: int) -> memoryview:
        if self._is_device_pointer(ptr):
            staging = bytearray(length)
            host = (ctypes.c_char * length).from_buffer(staging)
            self._memcpy(ctypes.addressof(host), ptr, length, kind=2)  # DeviceToHost
            return memoryview(staging)
        return memoryview((ctypes.c_char * length).from_address(ptr)).cast("B")

    def write(self, ptr: int, data: memoryview) -> None:
        length = data.nbytes
        source = np.frombuffer(data, dtype=np.uint8)
        if self._is_device_pointer(ptr):
            self._memcpy(ptr, source.ctypes.data, length, kind=1)  # HostToDevice
        else:
            ctypes.memmove(ptr, source.ctypes.data, length)

    def _memcpy(self, dst: int, src: int, length: int, kind: int) -> None:
        status = self._cudart.cudaMemcpy(
            ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(length), ctypes.c_int(kind)
        )
        if status != 0:
            raise RuntimeError(f"cudaMemcpy failed with status {status}")


def _load_cudart():
    import glob

    import torch

    candidates = ["libcudart.so"]
    torch_lib = Path(torch.__file__).parent / "lib"
    candidates += glob.glob(str(torch_lib / "libcudart*.so*"))
    candidates += glob.glob(str(torch_lib.parent.parent / "nvidia" / "*" / "lib" / "libcudart.so*"))
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("CUDA is available but libcudart could not be loaded for KV staging")


class RegisteredMemory:
    """The regions peers may write into; every incoming write is checked against them."""

    def __init__(self) -> None:
        self._regions: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, ptr: int, length: int) -> None:
        with self._lock:
            self._regions[ptr] = length

    def remove(self, ptr: int) -> None:
        with self._lock:
            self._regions.pop(ptr, None)

    def contains(self, ptr: int, length: int) -> bool:
        with self._lock:
            return any(start <= ptr and ptr + length <= start + size for start, size in self._regions.items())


class ZmqTransferEngine:
    """Drop-in for SGLang's ``MooncakeTransferEngine``, moving bytes over ZMQ."""

    def __init__(
        self,
        identity: EngineIdentity,
        bind_host: str,
        timeout_s: float,
        check_peer: Optional[Callable[[EngineIdentity], Optional[str]]] = None,
    ) -> None:
        self.identity = identity
        self.timeout_s = timeout_s
        self._check_peer = check_peer or identity.mismatch_with
        self._memory = MemoryAccess()
        self._registered = RegisteredMemory()
        self._context = zmq.Context.instance()
        self._local_hosts = {bind_host, "localhost", socket.gethostname()}
        self._thread_state = threading.local()
        self._verified_sessions: set[str] = set()
        self._verified_lock = threading.Lock()
        self._stopped = threading.Event()

        self._server = self._context.socket(zmq.ROUTER)
        self._server.setsockopt(zmq.LINGER, 0)
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
        self, session_id: str, buffers: list[int], peer_buffer_addresses: list[int], lengths: list[int]
    ) -> int:
        """Write ``lengths[i]`` bytes from local ``buffers[i]`` to the peer's addresses."""
        self._thread_state.last_error = None
        try:
            self._ensure_verified(session_id)
            header = np.array(
                [value for pair in zip(peer_buffer_addresses, lengths) for value in pair], dtype=_HEADER_DTYPE
            )
            blocks = [self._memory.read(ptr, length) for ptr, length in zip(buffers, lengths)]
            self._call(session_id, b"W", [header.tobytes(), *blocks])
            return 0
        except TransferError as error:
            self._thread_state.last_error = str(error)
            logger.error("pfs zmq KV transfer to %s failed: %s", session_id, error)
            return -1

    def transfer_sync(self, session_id: str, buffer: int, peer_buffer_address: int, length: int) -> int:
        return self.batch_transfer_sync(session_id, [buffer], [peer_buffer_address], [length])

    def send_probe(self, peer_session_id: str) -> int:
        try:
            self._call(peer_session_id, b"P", [])
            return 0
        except TransferError:
            return -1

    def last_error(self) -> Optional[str]:
        """The reason of this thread's last failed transfer, if any."""
        return getattr(self._thread_state, "last_error", None)

    def close(self) -> None:
        self._stopped.set()
        self._server_thread.join(timeout=2)
        self._server.close(0)

    # ----- sender side -----
    def _ensure_verified(self, session_id: str) -> None:
        with self._verified_lock:
            if session_id in self._verified_sessions:
                return
        self._call(session_id, b"H", [json.dumps(asdict(self.identity)).encode()])
        with self._verified_lock:
            self._verified_sessions.add(session_id)

    def _socket_for(self, session_id: str) -> zmq.Socket:
        sockets = getattr(self._thread_state, "sockets", None)
        if sockets is None:
            sockets = self._thread_state.sockets = {}
        sock = sockets.get(session_id)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(SessionAddress.decode(session_id).endpoint_from(self._local_hosts))
            sockets[session_id] = sock
        return sock

    def _drop_socket(self, session_id: str) -> None:
        sock = self._thread_state.sockets.pop(session_id, None)
        if sock is not None:
            sock.close(0)

    def _call(self, session_id: str, kind: bytes, frames: list) -> None:
        request_id = uuid.uuid4().bytes
        sock = self._socket_for(session_id)
        deadline = time.monotonic() + self.timeout_s
        try:
            sock.send_multipart([MAGIC, kind, request_id, *frames], copy=False)
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
            raise TransferError(reply[2].decode(errors="replace") if len(reply) > 2 else "peer refused")

    # ----- receiver side -----
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._server, zmq.POLLIN)
        while not self._stopped.is_set():
            if not poller.poll(200):
                continue
            message = self._server.recv_multipart(copy=False)
            peer, frames = message[0].bytes, message[1:]
            if len(frames) < 3 or frames[0].bytes != MAGIC:
                logger.warning("pfs zmq KV engine: dropped a malformed message")
                continue
            kind, request_id = frames[1].bytes, frames[2].bytes
            try:
                self._handle(kind, frames[3:])
                answer = [b"OK", request_id]
            except Exception as error:  # every failure is answered, never left hanging
                answer = [b"ERR", request_id, str(error).encode()]
            self._server.send_multipart([peer, *answer])

    def _handle(self, kind: bytes, frames: list) -> None:
        if kind == b"P":
            return
        if kind == b"H":
            writer = EngineIdentity(**json.loads(frames[0].bytes))
            reason = self._check_peer(writer)
            if reason:
                raise TransferError(reason)
            return
        if kind != b"W":
            raise TransferError(f"unknown request kind {kind!r}")
        pairs = np.frombuffer(frames[0].buffer, dtype=_HEADER_DTYPE).reshape(-1, 2)
        blocks = frames[1:]
        if len(blocks) != len(pairs):
            raise TransferError(f"header names {len(pairs)} blocks, message carries {len(blocks)}")
        for (dst, length), block in zip(pairs.tolist(), blocks):
            if block.buffer.nbytes != length or not self._registered.contains(dst, length):
                raise TransferError(f"write of {length} bytes at {dst:#x} is outside registered KV memory")
        for (dst, _), block in zip(pairs.tolist(), blocks):
            self._memory.write(dst, block.buffer)


class TransferError(RuntimeError):
    """A KV transfer could not be completed (peer refused, late, or unreachable)."""
