"""KV transfer between the prefill pool and the decode pools (the ``zmq`` backend).

``zmq_engine`` moves bytes (one-sided writes into registered pool memory, with an
identity handshake and deadlines), a facade over ``wire`` (the message format),
``rooms`` (no late write lands in freed slots), ``sender`` and ``receiver``, with the
transports' memory and copies in modules of their own; it never imports SGLang.
``zmq_backend`` plugs it under SGLang's Mooncake PD protocol; ``registration`` holds
every hook and patch this package puts into SGLang's processes (the ``zmq`` backend's
registration, a CPU prefill server's KV pool in shared memory, PD servers that poll
rather than spin); ``transfer_report`` puts each request's KV bytes and transfer time
in prefill replies; ``shared_pool`` is the shared memory of a CPU prefill server's KV
pool, which same-host decode servers read in place.
"""

# Set by the launcher for every server it starts, read by ``zmq_backend``: the deadline
# of one KV hand-off, and the deployment's KV secret (engines accept KV writes only from
# peers that present it at the handshake).
TRANSFER_TIMEOUT_ENV = "PFS_KV_TRANSFER_TIMEOUT_S"
KV_SECRET_ENV = "PFS_KV_SECRET"

# ``1``: the engine reaches every peer over TCP and moves the bytes over that socket, also a
# peer on its own host (where it would use IPC and process_vm_readv or shared memory), just
# as between hosts: so the cross-host path runs on one machine. ``0`` or unset: off. Set by
# the launcher's ``--transfer-force-tcp`` for its servers; read by ``zmq_backend``.
FORCE_TCP_ENV = "PFS_KV_FORCE_TCP"

# Fault injection, for tests only (never set in production): ``ROOM:SECONDS`` makes every
# KV write a prefill server sends for bootstrap room ROOM wait SECONDS before it goes out,
# so a test can have a write arrive after the decode side gave the request up.
FAULT_STALL_ENV = "PFS_KV_FAULT_STALL"
