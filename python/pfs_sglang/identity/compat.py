"""Decode-module records and the compatibility check (invariant 4).

A decode module is a checkpoint of the base's architecture trained to read the KV of
one specific prefill module. It says which one in ``prefillshare.json`` beside its
weights. ``check_compatible`` compares that record, and the decode module's own KV
shape, with the prefill module actually being served, and names the first field that
differs. Given the prefill module's token-sequence fields (``token_sequence.py``:
tokenizer, special tokens, chat template, stop ids) it also compares the decode
module's own, and what its record says it was trained with, so both servers turn a
request into the same tokens. The launcher calls it before starting anything; the KV
hand-off repeats the fingerprint comparison so that a mismatch is refused there too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfs_sglang.identity.fingerprint import STRUCTURE_FIELDS, Fingerprint, structure_of
from pfs_sglang.identity.token_sequence import TOKEN_SEQUENCE_FIELDS, token_sequence_of

DECODE_MODULE_RECORD = "prefillshare.json"
RECORD_FORMAT_VERSION = 1
PREFILL_TOKEN_SEQUENCE = "prefill_token_sequence"  # optional record key, written by the trainer


@dataclass(frozen=True)
class DecodeModuleRecord:
    """What a decode module checkpoint says about itself."""

    path: Path
    structure: dict[str, Any]  # the decode module's own KV-shaping fields
    trained_against: Fingerprint  # the prefill module it was trained to read
    token_sequence: dict[str, str]  # the decode module's own tokenizer, template, stop ids
    trained_token_sequence: dict[str, str] | None = None  # the base's, as recorded by the trainer

    @classmethod
    def load(cls, path: str | Path) -> "DecodeModuleRecord":
        path = Path(path)
        record_path = path / DECODE_MODULE_RECORD
        if not record_path.is_file():
            raise DecodeModuleRecordError(
                f"{path} is not a decode module: it has no {DECODE_MODULE_RECORD} "
                "recording the prefill module it was trained against"
            )
        data = json.loads(record_path.read_text())
        if data.get("format_version") != RECORD_FORMAT_VERSION:
            raise DecodeModuleRecordError(
                f"{record_path}: unsupported format_version {data.get('format_version')!r}"
            )
        return cls(
            path=path,
            structure=structure_of(path),
            trained_against=Fingerprint.from_dict(data["prefill_fingerprint"]),
            token_sequence=token_sequence_of(path),
            trained_token_sequence=data.get(PREFILL_TOKEN_SEQUENCE),
        )


class DecodeModuleRecordError(ValueError):
    """A decode module's record is missing or unreadable."""


def write_decode_module_record(
    decode_dir: str | Path, prefill: Fingerprint, extra: dict[str, Any] | None = None
) -> Path:
    """Record in ``decode_dir`` that it was trained against ``prefill``."""
    record = {
        "format_version": RECORD_FORMAT_VERSION,
        "prefill_fingerprint": prefill.to_dict(),
        **(extra or {}),
    }
    record_path = Path(decode_dir) / DECODE_MODULE_RECORD
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record_path


@dataclass(frozen=True)
class Compatibility:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _first_difference(
    prefill: dict[str, Any], other: dict[str, Any], field_names: tuple[str, ...], other_label: str
) -> str | None:
    for name in field_names:
        if prefill[name] != other.get(name):
            return f"{name} differs: prefill module has {prefill[name]!r}, {other_label} {other.get(name)!r}"
    return None


def check_compatible(
    prefill: Fingerprint, decode: DecodeModuleRecord, prefill_token_sequence: dict[str, str] | None = None
) -> Compatibility:
    """Can ``decode`` consume KV produced by ``prefill``? If not, say exactly why.

    ``prefill_token_sequence`` (``token_sequence_of(base_dir)``) adds the token-sequence
    comparison; without it only the KV identity is checked (the KV hand-off's case).
    """
    prefill_fields = prefill.to_dict()
    own_shape = _first_difference(
        prefill_fields, decode.structure, STRUCTURE_FIELDS, "decode module has"
    )
    if own_shape:
        return Compatibility(False, f"decode module {decode.path}: {own_shape}")
    recorded = _first_difference(
        prefill_fields,
        decode.trained_against.to_dict(),
        STRUCTURE_FIELDS + ("weights_hash",),
        "decode module was trained against",
    )
    if recorded:
        return Compatibility(False, f"decode module {decode.path}: {recorded}")
    if prefill_token_sequence is not None:
        tokens = _first_difference(prefill_token_sequence, decode.token_sequence, TOKEN_SEQUENCE_FIELDS,
                                   "decode module has")
        if tokens is None and decode.trained_token_sequence is not None:
            tokens = _first_difference(prefill_token_sequence, decode.trained_token_sequence, TOKEN_SEQUENCE_FIELDS,
                                       "decode module was trained with")
        if tokens:
            return Compatibility(False, f"decode module {decode.path}: {tokens} (the two servers would tokenize "
                                        "requests differently)")
    return Compatibility(True)
