"""Errors a user can cause, each with a stable UPPER_SNAKE code and an HTTP status."""

from collections.abc import Mapping


class ConfigError(Exception):
    """A setting is missing or malformed; the message says which and how to fix it."""


class RelayError(Exception):
    """An error answered to an HTTP client as `{"error": {"code", "message"}}`."""

    status = 400
    code = "INVALID_REQUEST"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON error shape every HTTP answer of Relay's uses."""
        return {"error": {"code": self.code, "message": self.message}}


def error_class(name: str, status: int, code: str) -> type[RelayError]:
    return type(name, (RelayError,), {"status": status, "code": code})


InvalidSignature = error_class("InvalidSignature", 401, "INVALID_SIGNATURE")
MissingSignature = error_class("MissingSignature", 401, "MISSING_SIGNATURE")
TimestampOutOfTolerance = error_class("TimestampOutOfTolerance", 401, "TIMESTAMP_OUT_OF_TOLERANCE")
BodyTooLarge = error_class("BodyTooLarge", 413, "BODY_TOO_LARGE")
InvalidPayload = error_class("InvalidPayload", 400, "INVALID_PAYLOAD")
InvalidRequest = error_class("InvalidRequest", 400, "INVALID_REQUEST")
Unauthorized = error_class("Unauthorized", 401, "UNAUTHORIZED")
Forbidden = error_class("Forbidden", 403, "FORBIDDEN")
NotFound = error_class("NotFound", 404, "NOT_FOUND")
MethodNotAllowed = error_class("MethodNotAllowed", 405, "METHOD_NOT_ALLOWED")
BodyIncomplete = error_class("BodyIncomplete", 400, "BODY_INCOMPLETE")


class DatabaseUnavailable(RelayError):
    status = 503
    code = "DATABASE_UNAVAILABLE"

    def __init__(self, message: str = "the database cannot commit right now; retry later"):
        super().__init__(message, headers={"Retry-After": "5"})
