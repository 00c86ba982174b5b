"""Errors in OpenAI's shape.

Over WebSocket an error is the event ``{"type": "error", "status", "error": {"type", "code",
"message", "param"}}`` (with ``stream_id`` when it concerns a named lane); over HTTP it is the
body ``{"error": {...}}`` with ``status`` as the HTTP status.
"""

from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

STREAM_ID_RULE = ("The 'stream_id' field must be a non-empty string with at most 256 characters "
                  "and may only contain letters, numbers, underscores, hyphens, and periods.")


class ApiError(Exception):
    """A request the server refuses, with what OpenAI would answer."""

    def __init__(self, message: str, *, code: str | None, param: str | None = None,
                 status: int = 400, type: str = INVALID_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.status = status
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "message": self.message,
                "param": self.param}

    def event(self, stream_id: str | None = None) -> dict[str, Any]:
        """The WebSocket ``error`` event (``stream_id`` only for a named lane)."""
        event: dict[str, Any] = {"type": "error", "status": self.status, "error": self.body()}
        if stream_id is not None:
            event["stream_id"] = stream_id
        return event

    def http_body(self) -> dict[str, Any]:
        return {"error": self.body()}


def previous_not_found(response_id: str) -> ApiError:
    return ApiError(f"Previous response with id '{response_id}' not found.",
                    code="previous_response_not_found", param="previous_response_id")


def response_not_found(response_id: str) -> ApiError:
    return ApiError(f"Response with id '{response_id}' not found.", code=None, status=404)


def invalid_stream_id() -> ApiError:
    return ApiError(STREAM_ID_RULE, code="invalid_stream_id", param="stream_id")


def stream_limit(limit: int) -> ApiError:
    return ApiError(
        f"This WebSocket connection has reached its maximum number of distinct stream IDs "
        f"({limit}). Reuse an existing stream_id or open a new WebSocket connection.",
        code="websocket_stream_limit_reached", param="stream_id")


def connection_limit(seconds: float) -> ApiError:
    minutes = seconds / 60
    span = f"{minutes:g} minutes" if minutes >= 1 else f"{seconds:g} seconds"
    return ApiError(f"Responses websocket connection limit reached ({span}). Create a new "
                    "websocket connection to continue.", code="websocket_connection_limit_reached")


def invalid_json(detail: str) -> ApiError:
    return ApiError(f"We could not parse the JSON body of your request: {detail}",
                    code="invalid_json")


def missing(param: str) -> ApiError:
    return ApiError(f"Missing required parameter: '{param}'.", code="missing_required_parameter",
                    param=param)


def invalid_type(param: str, expected: str) -> ApiError:
    return ApiError(f"Invalid type for '{param}': expected {expected}.", code="invalid_type",
                    param=param)


def invalid_value(param: str, message: str) -> ApiError:
    return ApiError(message, code="invalid_value", param=param)


def unauthorized(message: str) -> ApiError:
    return ApiError(message, code="invalid_api_key", status=401)


def server_error(message: str = "The server had an error while processing your request.",
                 ) -> ApiError:
    return ApiError(message, code="server_error", status=500, type=SERVER_ERROR)
