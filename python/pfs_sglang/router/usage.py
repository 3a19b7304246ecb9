"""Token and KV-transfer accounting read from SGLang replies.

- OpenAI replies: ``usage`` with ``prompt_tokens_details.cached_tokens`` (the prompt
  tokens the shared prefill tree served; SGLang reports them with
  ``--enable-cache-report`` and may put ``null`` there, which the router turns into 0 so
  clients can always read it).
- ``/generate`` replies: ``meta_info`` with ``prompt_tokens``, ``cached_tokens``,
  ``completion_tokens``, and, when the KV transfer backend reports it,
  ``meta_info["pfs_kv_transfer"] = [{"bytes": int, "seconds": float, "decode_prefix_tokens":
  int}]`` (written by the prefill server, see ``transfer/transfer_report.py``): the KV bytes
  moved from the prefill server to the decode server for this request, how long
  the transfer took, and the prompt tokens whose KV the decode server's prefix cache
  already held (not moved). The router reads it from the decode server's reply, else
  from the prefill server's (kept only when it came first); without it no transfer is
  counted. The decode server's reply also carries ``meta_info["pfs_decode_prefix_tokens"]
  = [int]``, the prefix its cache held, which the router always counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KV_TRANSFER_KEY = "pfs_kv_transfer"
DECODE_PREFIX_KEY = "pfs_decode_prefix_tokens"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class KVTransfer:
    bytes: int
    seconds: float


def usage_of(payload: dict[str, Any]) -> Usage | None:
    """Token counts from an OpenAI ``usage`` block or an SGLang ``meta_info``."""
    usage = payload.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details") or {}
        return Usage(usage.get("prompt_tokens") or 0, details.get("cached_tokens") or 0,
                     usage.get("completion_tokens") or 0)
    meta = payload.get("meta_info")
    if isinstance(meta, dict) and "prompt_tokens" in meta:
        return Usage(meta["prompt_tokens"] or 0, meta.get("cached_tokens") or 0, meta.get("completion_tokens") or 0)
    return None


def kv_transfer_of(payload: dict[str, Any] | None) -> KVTransfer | None:
    meta = (payload or {}).get("meta_info")
    record = meta.get(KV_TRANSFER_KEY) if isinstance(meta, dict) else None
    if isinstance(record, list):  # SGLang accumulates customized info as a list per request
        record = record[-1] if record else None
    if not isinstance(record, dict):
        return None
    return KVTransfer(bytes=int(record.get("bytes") or 0), seconds=float(record.get("seconds") or 0.0))


def decode_prefix_tokens_of(payload: dict[str, Any] | None) -> int | None:
    """The prompt tokens whose KV the decode server's prefix cache held (its reply's
    ``meta_info["pfs_decode_prefix_tokens"]``), or None where it reports none."""
    meta = (payload or {}).get("meta_info")
    record = meta.get(DECODE_PREFIX_KEY) if isinstance(meta, dict) else None
    if isinstance(record, list):
        record = record[-1] if record else None
    return int(record) if isinstance(record, int) else None


def ensure_cached_tokens(payload: dict[str, Any]) -> bool:
    """Give an OpenAI ``usage`` block an integer ``prompt_tokens_details.cached_tokens``; True if changed."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return False
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        return False
    details = details if isinstance(details, dict) else {}
    details["cached_tokens"] = details.get("cached_tokens") or 0
    usage["prompt_tokens_details"] = details
    return True
