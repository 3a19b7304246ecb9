"""Decode-server hooks: the decode module computes prompt[-1] and every output token (invariant 2)."""
