"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                           "code": code or str(status)}},
    )


def from_upstream(status: int, body: bytes) -> JSONResponse:
    """Re-shape an SGLang error body (``{"object": "error", "message": ...}``) the OpenAI way."""
    import json

    try:
        payload = json.loads(body)
        message = payload.get("message") or payload.get("error", {}).get("message") or body.decode()
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")
    return error_response(status, message)
