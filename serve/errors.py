"""One error type for the service, mapped to HTTP status codes and a JSON body."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses, or a state in which it cannot answer."""

    def __init__(self, status: int, code: str, message: str, **details: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


def bad_request(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def unauthorized() -> ServiceError:
    return ServiceError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")


def not_found(message: str) -> ServiceError:
    return ServiceError(404, "not_found", message)


def too_large(limit: int) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"request body exceeds max_body_bytes ({limit} bytes)", limit=limit)


def unprocessable(message: str, **details: Any) -> ServiceError:
    return ServiceError(422, "unprocessable", message, **details)


def not_ready(message: str) -> ServiceError:
    return ServiceError(503, "not_ready", message)
