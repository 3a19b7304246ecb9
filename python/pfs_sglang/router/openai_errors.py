"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 422: "invalid_request_error",
          502: "upstream_error", 503: "service_unavailable", 504: "timeout"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                           "code": code or str(status)}},
    )


def upstream_message(body: bytes) -> str:
    """The message of an SGLang error body (``{"object": "error", "message": ...}`` or OpenAI-shaped)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode(errors="replace")
    if isinstance(payload, dict):
        error = payload.get("error")
        message = payload.get("message") or (error.get("message") if isinstance(error, dict) else error)
        if message:
            return str(message)
    return body.decode(errors="replace")
