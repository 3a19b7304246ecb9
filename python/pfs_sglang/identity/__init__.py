"""Prefill-module identity (invariant 4): fingerprints, token-sequence fields, decode-module
records, checks, and the fingerprint a launcher hands its servers."""

from pfs_sglang.identity.compat import (
    DECODE_MODULE_RECORD,
    Compatibility,
    DecodeModuleRecord,
    DecodeModuleRecordError,
    check_compatible,
    write_decode_module_record,
)
from pfs_sglang.identity.fingerprint import Fingerprint, fingerprint_of
from pfs_sglang.identity.handoff import FINGERPRINT_FILE_ENV, server_fingerprint, write_fingerprint_handoff
from pfs_sglang.identity.token_sequence import TOKEN_SEQUENCE_FIELDS, token_sequence_of

__all__ = [
    "DECODE_MODULE_RECORD",
    "Compatibility",
    "DecodeModuleRecord",
    "DecodeModuleRecordError",
    "FINGERPRINT_FILE_ENV",
    "Fingerprint",
    "TOKEN_SEQUENCE_FIELDS",
    "check_compatible",
    "fingerprint_of",
    "server_fingerprint",
    "token_sequence_of",
    "write_decode_module_record",
    "write_fingerprint_handoff",
]
