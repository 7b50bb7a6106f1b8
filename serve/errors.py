"""One error type for the service, mapped to HTTP status codes and a JSON body."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses, or a state in which it cannot answer."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        **details: Any,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}
        self.param = param  # the request field at fault, where one is

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


def bad_request(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(400, "bad_request", message, param=param)


def empty(name: str) -> ServiceError:
    return ServiceError(400, "empty", f"{name!r} is empty", param=name)


def unauthorized() -> ServiceError:
    return ServiceError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")


def not_found(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(404, "not_found", message, param=param)


def method_not_allowed(method: str, allowed: str) -> ServiceError:
    return ServiceError(405, "method_not_allowed", f"{method} not allowed; allowed: {allowed}", {"Allow": allowed})


def request_timeout(message: str) -> ServiceError:
    return ServiceError(408, "request_timeout", message, {"Connection": "close"})


def too_large(limit: int) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"request body exceeds max_body_bytes ({limit} bytes)", limit=limit)


def unsupported_media_type(message: str) -> ServiceError:
    return ServiceError(415, "unsupported_media_type", message)


def unprocessable(message: str, param: str | None = None, **details: Any) -> ServiceError:
    return ServiceError(422, "unprocessable", message, param=param, **details)


def not_ready(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(503, "not_ready", message, param=param)


def internal() -> ServiceError:
    return ServiceError(500, "internal", "internal error")
