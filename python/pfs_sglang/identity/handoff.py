"""The base's fingerprint, computed once per launch and handed to its servers (invariant 4).

Hashing the weights of a large base takes minutes, and every server needs the digest
(the ``zmq`` backend's handshake, the ``pfs`` prefix tree's namespace, on every TP
rank). The launcher fingerprints the base once, writes the result with the size and
mtime of every file the fingerprint reads (``write_fingerprint_handoff``) and names
that file in each server's environment (``FINGERPRINT_FILE_ENV``). A server calls
``server_fingerprint(model_dir)``: it takes the handed-over fingerprint when the file
is for the same directory and every file still has the recorded size and mtime (a
cheap stat), and otherwise, or when started by hand without the variable, computes
the fingerprint itself. Each outcome is logged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pfs_sglang.identity.fingerprint import Fingerprint, fingerprint_of

FINGERPRINT_FILE_ENV = "PFS_PREFILL_FINGERPRINT_FILE"
HANDOFF_FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


def _fingerprinted_files(model_dir: Path) -> dict[str, list[int]]:
    """Size and mtime (ns) of every file ``fingerprint_of`` reads."""
    paths = [model_dir / "config.json", model_dir / "tokenizer.json", *sorted(model_dir.glob("*.safetensors"))]
    stats = {}
    for path in paths:
        stat = path.stat()
        stats[path.name] = [stat.st_size, stat.st_mtime_ns]
    return stats


def write_fingerprint_handoff(model_dir: str | Path, fingerprint: Fingerprint, path: str | Path) -> Path:
    """Write ``fingerprint`` of ``model_dir`` to ``path`` for servers to read."""
    model_dir = Path(model_dir).resolve()
    record = {
        "format_version": HANDOFF_FORMAT_VERSION,
        "model_dir": str(model_dir),
        "files": _fingerprinted_files(model_dir),
        "fingerprint": fingerprint.to_dict(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def _handed_over(model_dir: Path, record_path: str) -> tuple[Fingerprint | None, str]:
    """The fingerprint in the launcher's record if it still describes ``model_dir``, and why not."""
    try:
        record: dict[str, Any] = json.loads(Path(record_path).read_text())
        if record.get("format_version") != HANDOFF_FORMAT_VERSION:
            return None, f"unsupported format_version {record.get('format_version')!r}"
        if record["model_dir"] != str(model_dir):
            return None, f"it is for {record['model_dir']}"
        if record["files"] != _fingerprinted_files(model_dir):
            return None, "the model's files changed size or mtime since the launcher hashed them"
        return Fingerprint.from_dict(record["fingerprint"]), ""
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"unreadable: {error}"


def server_fingerprint(model_dir: str | Path) -> Fingerprint:
    """The fingerprint of ``model_dir``: the launcher's (checked by stat) or computed here."""
    model_dir = Path(model_dir).resolve()
    record_path = os.environ.get(FINGERPRINT_FILE_ENV)
    if record_path:
        fingerprint, why_not = _handed_over(model_dir, record_path)
        if fingerprint is not None:
            logger.info("pfs: prefill-module fingerprint of %s taken from the launcher's record %s (%s)",
                        model_dir, record_path, fingerprint.digest)
            return fingerprint
        logger.warning("pfs: not using the launcher's fingerprint record %s: %s", record_path, why_not)
    logger.info("pfs: hashing the weights of %s for its prefill-module fingerprint", model_dir)
    return fingerprint_of(model_dir)
