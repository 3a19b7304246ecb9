"""The shared prefix tree of the prefill pool, keyed on the prefill module (invariant 3)."""
