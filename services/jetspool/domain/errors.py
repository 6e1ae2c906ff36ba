"""Errors, one shallow tree per layer.

    JetspoolError
    ├── ConfigError            bad settings: the process stops with the message
    ├── DecodeError            a wire message or stored record that cannot be read
    ├── RequestError           a client's request cannot be served (HTTP status on the class)
    │   ├── InvalidInput        422
    │   ├── BadRequest          400
    │   ├── NotFound            404
    │   ├── PayloadTooLarge     413
    │   ├── QueueFull           429
    │   └── Unavailable         503
    └── DeliveryError          one invocation of a function failed (worker side)
        ├── RetryableDelivery   connection errors, 429, 502, 503, 504: try again later
        └── PermanentDelivery   exec timeout: record the outcome, do not retry

HTTP status codes are mapped in exactly one place: the `status_code` attribute here,
read by the gateway's exception handler.
"""

from __future__ import annotations

from typing import ClassVar


class JetspoolError(Exception):
    """Base of every error jetspool raises on purpose."""


class ConfigError(JetspoolError):
    """A setting is invalid; the message names the key."""


class DecodeError(JetspoolError):
    """A message or record could not be decoded."""


class RequestError(JetspoolError):
    """A client request that cannot be served; `detail` is shown to the client."""

    status_code: ClassVar[int] = 400
    error_type: ClassVar[str | None] = None

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        """Headers the error's answer carries besides the gateway's own."""


class InvalidInput(RequestError):
    status_code = 422


class BadRequest(RequestError):
    status_code = 400


class NotFound(RequestError):
    status_code = 404


class RequestTimeout(RequestError):
    status_code = 408


class PayloadTooLarge(RequestError):
    status_code = 413


class HeadersTooLarge(RequestError):
    status_code = 431


class QueueFull(RequestError):
    status_code = 429


class Unavailable(RequestError):
    status_code = 503


class DeliveryError(JetspoolError):
    """One invocation of a function did not produce a response to record."""

    error_type: ClassVar[str] = "runner_unavailable"


class RetryableDelivery(DeliveryError):
    """Worth another attempt; `retry_after_s` is the function's own `Retry-After`, if it sent one."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class PermanentDelivery(DeliveryError):
    """Not worth another attempt."""

    def __init__(self, reason: str, error_type: str) -> None:
        super().__init__(reason)
        self.error_type = error_type  # type: ignore[misc]
