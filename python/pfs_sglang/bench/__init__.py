"""Benchmarks: KV hand-off speed and end-to-end latency (``python -m pfs_sglang.bench``)."""
