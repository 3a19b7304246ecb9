"""One-copy hand-off between processes on one host: ``process_vm_readv`` of the peer's KV blocks.

Owns the receiver's direct read of a same-host sender's pool memory. The receiving
engine, having checked that every destination lies in memory it registered (the sender
has checked its sources), has the kernel copy each block from the sender's pool straight
into its own, with no staging and no socket copy: a whole request in a few system calls
of up to ``IOV_MAX`` blocks each. The kernel allows it only where the receiver may trace
the sender (same user and, under Yama ``ptrace_scope`` 1, an explicit allowance): the
engines try it once per peer at the identity handshake and otherwise use shared staging.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

IOV_MAX = 1024
_libc = ctypes.CDLL(None, use_errno=True)
_readv = getattr(_libc, "process_vm_readv", None)
if _readv is not None:
    _readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    _readv.restype = ctypes.c_ssize_t


def _iovecs(addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``struct iovec[]`` (base, length) as a uint64 array."""
    iov = np.empty((len(addrs), 2), dtype=np.uint64)
    iov[:, 0], iov[:, 1] = addrs, lengths
    return iov


def read_from_process(pid: int, remote: np.ndarray, local: np.ndarray, lengths: np.ndarray) -> None:
    """Copy ``lengths[i]`` bytes at ``remote[i]`` in process ``pid`` to ``local[i]`` here; raises OSError."""
    if _readv is None:
        raise OSError("process_vm_readv is not available")
    remote_iov, local_iov = _iovecs(remote, lengths), _iovecs(local, lengths)
    for start in range(0, len(lengths), IOV_MAX):
        count = min(IOV_MAX, len(lengths) - start)
        expected = int(lengths[start : start + count].sum())
        done = _readv(pid, local_iov[start:].ctypes.data, count, remote_iov[start:].ctypes.data, count, 0)
        if done != expected:
            error = ctypes.get_errno() if done < 0 else 0
            raise OSError(error, f"process_vm_readv from pid {pid} copied {done} of {expected} bytes: {os.strerror(error)}")


def can_read(pid: int, addr: int, expected: bytes) -> bool:
    """Whether this process may read ``pid``'s memory, proven on a buffer holding ``expected``."""
    probe = np.zeros(len(expected), dtype=np.uint8)
    try:
        read_from_process(pid, np.array([addr]), np.array([probe.ctypes.data]), np.array([len(expected)]))
    except OSError:
        return False
    return probe.tobytes() == expected
