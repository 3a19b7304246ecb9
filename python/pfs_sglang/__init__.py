"""pfs_sglang: PrefillShare on SGLang.

One frozen prefill module computes every prompt's KV once; many task decode modules
consume it. Parts: ``identity`` (fingerprints, invariant 4), ``models`` (the embedded
demo models), ``plugin`` (what SGLang loads in its processes). See DESIGN.md.
"""

__version__ = "0.1.0"
