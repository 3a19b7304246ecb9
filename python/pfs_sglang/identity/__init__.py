"""Prefill-module identity (invariant 4): fingerprints, decode-module records, checks."""

from pfs_sglang.identity.compat import (
    DECODE_MODULE_RECORD,
    Compatibility,
    DecodeModuleRecord,
    DecodeModuleRecordError,
    check_compatible,
    write_decode_module_record,
)
from pfs_sglang.identity.fingerprint import Fingerprint, fingerprint_of

__all__ = [
    "DECODE_MODULE_RECORD",
    "Compatibility",
    "DecodeModuleRecord",
    "DecodeModuleRecordError",
    "Fingerprint",
    "check_compatible",
    "fingerprint_of",
    "write_decode_module_record",
]
