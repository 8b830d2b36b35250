"""The protocol's errors, for both ends.

The server raises ``ProtocolError`` (a code, one sentence naming the
offending field, extra fields) to make an error reply. A client turns an
error reply back into one exception per code, all ``ClientError``s
(``error_from_reply``), and raises ``ClientError``s of its own for what the
transport does: a daemon it cannot reach, a connection lost under a
request, a frame protocol.md does not describe.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar, Final

from sandboxd.actors.info import SandboxInfo
from sandboxd.gateway.protocol._converter import converter


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    START_FAILED = "start_failed"
    LIMIT_EXCEEDED = "limit_exceeded"
    GONE = "gone"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


# --- The server's side ------------------------------------------------------------------


class ProtocolError(Exception):
    """The one exception a handler raises to make an error reply.

    ``message`` is one sentence a person can act on, naming the offending
    field; ``extra`` goes into the error object beside ``code`` and
    ``message`` (``oldest_seq`` for gone, ``sandbox`` for start_failed).
    """

    def __init__(self, code: ErrorCode, message: str, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra: dict[str, object] = extra


class RequestError(ProtocolError):
    """A frame that is not a valid request; the reply echoes ``request_id``.

    ``request_id`` is None when the frame has no usable id: the reply then
    carries ``"id": null``, as protocol.md says.
    """

    def __init__(
        self, code: ErrorCode, message: str, request_id: str | int | None, **extra: object
    ) -> None:
        super().__init__(code, message, **extra)
        self.request_id = request_id


# --- A client's side: one type per code -------------------------------------------------


class ClientError(Exception):
    """Base of everything a client raises; ``str()`` is the one-sentence reason."""

    code: ClassVar[str | None] = None

    def __init__(self, message: str, error: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The whole error object of the reply, for fields a newer server adds.
        self.error: Mapping[str, Any] = error or {}


class ConnectError(ClientError):
    """The daemon cannot be reached, or refused the handshake."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class AuthenticationError(ConnectError):
    """The daemon refused the token (HTTP 401)."""


class ConnectionLostError(ClientError):
    """The connection dropped before the reply came; the op may or may not have happened."""


class MalformedFrameError(ClientError):
    """The server sent a frame, or a result, that protocol.md does not describe."""


class BadRequestError(ClientError):
    code = "bad_request"


class UnknownOpError(ClientError):
    code = "unknown_op"


class NotFoundError(ClientError):
    code = "not_found"


class ConflictError(ClientError):
    code = "conflict"


class StartFailedError(ClientError):
    code = "start_failed"

    def __init__(self, message: str, error: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, error)
        raw = self.error.get("sandbox")
        #: The sandbox that failed to start, status ERROR (None if the server sent none).
        self.sandbox: SandboxInfo | None = (
            None if raw is None else converter.structure(raw, SandboxInfo)
        )


class LimitExceededError(ClientError):
    code = "limit_exceeded"


class GoneError(ClientError):
    code = "gone"

    def __init__(self, message: str, error: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, error)
        oldest = self.error.get("oldest_seq")
        #: The oldest seq the log still holds.
        self.oldest_seq: int | None = oldest if isinstance(oldest, int) else None


class BusyError(ClientError):
    code = "busy"


class UnavailableError(ClientError):
    code = "unavailable"


class InternalError(ClientError):
    code = "internal"


_BY_CODE: Final[dict[str, type[ClientError]]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnknownOpError,
        NotFoundError,
        ConflictError,
        StartFailedError,
        LimitExceededError,
        GoneError,
        BusyError,
        UnavailableError,
        InternalError,
    )
    if cls.code is not None
}
assert set(_BY_CODE) == set(ErrorCode), "one client exception per code"


# --- A client's side: what the transport tells, worded once for every client --------------


def refused(url: str, status: int, body: bytes | str | None = None) -> ConnectError:
    """The daemon answered the handshake with an HTTP status instead of a websocket."""
    if status == 401:
        return AuthenticationError(f"sandboxd at {url} refused the token (HTTP 401)", url)
    # The body says why (404: the path; 429: too many connections of this user).
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    why = text.strip()
    return ConnectError(
        f"sandboxd at {url} refused the connection (HTTP {status}" + (f": {why})" if why else ")"),
        url,
    )


def unreachable(url: str, reason: object) -> ConnectError:
    """No websocket could be opened: no listener, a dropped handshake, a timeout."""
    return ConnectError(f"cannot reach sandboxd at {url}: {reason}", url)


def not_a_url(url: str, reason: object) -> ConnectError:
    return ConnectError(f"{url!r} is not a websocket URL: {reason}", url)


def closed(url: str, code: int | None = None, reason: str = "") -> str:
    """Why requests in flight were lost: the connection closed, with the close frame's code."""
    if code is None:
        return f"the connection to {url} closed"
    return f"the connection to {url} closed (code {code}{': ' + reason if reason else ''})"


def error_from_reply(error: Mapping[str, Any]) -> ClientError:
    """The exception for a reply's error object; an unknown code gives a plain ClientError."""
    code = error.get("code")
    message = str(error.get("message") or code or "the server gave no reason")
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    return ClientError(message, error) if cls is None else cls(message, error)
