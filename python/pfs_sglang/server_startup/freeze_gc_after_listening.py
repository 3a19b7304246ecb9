"""SGLang's post-start ``/freeze_gc`` call waits until the server is listening (clean start-up logs).

Runs inside every SGLang server (registered by the plugin). With ``--skip-server-warmup``
(the launcher's CPU default) SGLang's ``_wait_and_warmup`` thread posts ``/freeze_gc``
to its own HTTP port at once, racing uvicorn's bind: when it loses, the log gets
"post-warmup freeze_gc failed" and a connection-refused traceback although nothing is
wrong, and the scheduler's GC is never frozen. ``freeze_gc_once_listening`` (AROUND
``_freeze_gc_after_server_warmup``) first waits, up to ``LISTEN_WAIT_S``, until the
server's port accepts a connection, then lets SGLang make its call; after the wait
SGLang's own warning stands. No request is affected.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from urllib.parse import urlsplit

HTTP_SERVER_MODULE = "sglang.srt.entrypoints.http_server"
LISTEN_WAIT_S = 60.0
POLL_S = 0.05


def wait_until_listening(host: str, port: int, timeout_s: float = LISTEN_WAIT_S) -> bool:
    """True once ``host:port`` accepts a TCP connection, False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)


def freeze_gc_once_listening(original, server_args, *args, **kwargs):
    address = urlsplit(server_args.url())
    wait_until_listening(address.hostname, address.port)
    return original(server_args, *args, **kwargs)


def register_freeze_gc_after_listening() -> None:
    """Hook the HTTP server's process only (the one SGLang's launch did not spawn): the
    scheduler and detokenizer processes would import ``http_server`` just for this hook."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if multiprocessing.parent_process() is not None:
        return
    HookRegistry.register(f"{HTTP_SERVER_MODULE}._freeze_gc_after_server_warmup",
                          freeze_gc_once_listening, HookType.AROUND)
