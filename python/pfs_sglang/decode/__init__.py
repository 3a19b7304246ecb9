"""Decode-server hooks: the decode module computes the prompt's tail and every output token (invariant 2)."""
