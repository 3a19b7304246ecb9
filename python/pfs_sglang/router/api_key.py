"""``--api-key``: the router answers only requests that carry the deployment's key.

An ASGI wrapper (not Starlette's ``BaseHTTPMiddleware``, which would hide client
disconnects from the router): every request needs ``Authorization: Bearer KEY``,
compared in constant time, else 401 with an OpenAI error body (``invalid_api_key``), as
OpenAI answers. ``/health*`` and ``/metrics`` stay open, as in SGLang's own
``--api-key`` (probes and Prometheus scrapers hold no secrets). The router passes the
same key on to its SGLang servers, which the launcher starts with it.
"""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = ("/health", "/metrics")
_UNAUTHORIZED = json.dumps({"error": {
    "message": "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()


class RequireApiKey:
    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    @property
    def state(self):
        """The wrapped app's state (the launcher hands the router its servers through it)."""
        return self.app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})

    def _authorized(self, scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)
