"""The ZMQ engines' wire format: how engines name each other, the message kinds, their frames.

Owns what crosses the socket between a sending and a receiving engine, and nothing
else: no socket, no memory, no state. Nothing received is ever unpickled; every frame
is fixed-width little-endian integers, a float64, or JSON.

A request is ``[MAGIC, kind, request_id, *frames]``; the answer is ``[OK, request_id,
*frames]`` or ``[ERR, request_id, reason]``. The kinds and their frames:

* ``HANDSHAKE``: the sender's ``EngineIdentity`` (JSON), its same-host offer (JSON, or
  empty: which of ``LOCAL_TRANSPORTS`` it offers and what proves each) and the
  deployment's secret; answered with the transports the receiver accepted,
  comma-separated. Every connection opens with it.
* ``PROBE``: nothing (a liveness check).
* ``WRITE``: ``header`` of ``(dst_ptr, length)`` pairs, ``budget``, ``room``, then the
  staged bytes as one frame.
* ``STAGED_WRITE``: ``header``, ``budget``, ``room``, a ``StagingRef`` (JSON) naming the
  sender's shared staging buffer, and a uint64 offset into it.
* ``DIRECT_READ`` (``process_vm_readv``): ``header`` of ``(src_ptr, dst_ptr, length)``
  triples, ``budget``, ``room``, the sender's pid (uint64).
* ``DEVICE_READ`` (CUDA IPC): ``header`` of triples as ``DIRECT_READ``, ``budget``, ``room``.
* ``POOL_READ`` (the sender's shared pool): per buffer ``(src_ptr, dst_ptr, slot_bytes)``,
  then the int64 source slots followed by the destination slots, ``budget``, ``room``.

``header`` is a little-endian uint64 array; ``budget`` a little-endian float64, the
seconds the sender still waits for the answer as it sends (its deadline on its own
monotonic clock: no wall clock crosses the wire, so hosts whose clocks disagree still
agree on deadlines); ``room`` two little-endian uint64, the request's bootstrap room and
the receiving generation the decode side gave it (``rooms``). A refusal's reason
travels as text; a late write's names ``LATE_WRITE_REFUSED``, which the sender turns
back into :class:`LateWriteRefused`.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

MAGIC = b"PFSKV1"
HANDSHAKE, PROBE = b"H", b"P"
WRITE, STAGED_WRITE = b"W", b"S"
DIRECT_READ, DEVICE_READ, POOL_READ = b"R", b"D", b"L"
OK, ERR = b"OK", b"ERR"

LOCAL_TRANSPORTS = ("cuda", "map", "pvm", "shm")  # same-host transports, tried at the handshake in this order
LATE_WRITE_REFUSED = "late write refused"  # in the reason of every refused late write

_HEADER_DTYPE = np.dtype("<u8")
_ROOM_TAG = struct.Struct("<QQ")  # (bootstrap room, receiving generation)
_UINT64 = struct.Struct("<Q")
_BUDGET = struct.Struct("<d")


class TransferError(RuntimeError):
    """A KV transfer could not be completed (peer refused, late, or unreachable)."""


class LateWriteRefused(TransferError):
    """The peer no longer receives the write's (room, generation): it gave the request up."""


@dataclass(frozen=True)
class EngineIdentity:
    """What a peer must agree on before KV bytes move (invariant 4); the handshake's first frame."""

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

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "EngineIdentity":
        return cls(**json.loads(raw))


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


def header(*columns) -> bytes:
    """Columns of int64 values as the wire's little-endian uint64 rows."""
    return np.stack(columns, axis=1).astype(_HEADER_DTYPE).tobytes()


def header_rows(frame, width: int, malformed: str) -> np.ndarray:
    """A header frame as int64 rows of ``width`` columns; ``malformed`` is the refusal if it is not."""
    raw = frame.buffer
    if raw.nbytes % (8 * width):
        raise TransferError(malformed)
    return np.frombuffer(raw, dtype=_HEADER_DTYPE).reshape(-1, width).view(np.int64)


def slot_lists(src_slots: np.ndarray, dst_slots: np.ndarray) -> bytes:
    """A pool read's slots: the source slots, then as many destination slots, int64."""
    return np.concatenate([src_slots, dst_slots]).astype("<i8").tobytes()


def slot_lists_of(frame, malformed: str) -> np.ndarray:
    """A pool read's slots as two int64 rows (source, destination); ``malformed`` is the refusal if they are not."""
    raw = frame.buffer
    if raw.nbytes % 16:
        raise TransferError(malformed)
    return np.frombuffer(raw, dtype="<i8").reshape(2, -1)


def budget(deadline: float) -> bytes:
    """The time budget: the seconds left until ``deadline`` (the sender's monotonic clock), float64."""
    return _BUDGET.pack(deadline - time.monotonic())


def budget_of(frame) -> float:
    (seconds,) = _BUDGET.unpack(frame.bytes)
    return seconds


def room_tag(room: int, generation: int) -> bytes:
    return _ROOM_TAG.pack(room, generation)


def room_of(frame) -> tuple[int, int]:
    """``(room, generation)`` of a room frame."""
    if len(frame.bytes) != _ROOM_TAG.size:
        raise TransferError("malformed KV write room tag")
    return _ROOM_TAG.unpack(frame.bytes)


def uint64(value: int) -> bytes:
    return _UINT64.pack(value)


def uint64_of(frame) -> int:
    (value,) = _UINT64.unpack(frame.bytes)
    return value


def refusal(reply: list[bytes]) -> TransferError:
    """The error an ``ERR`` answer stands for (a late write's: :class:`LateWriteRefused`)."""
    reason = reply[2].decode(errors="replace") if len(reply) > 2 else "peer refused"
    return (LateWriteRefused if LATE_WRITE_REFUSED in reason else TransferError)(reason)
