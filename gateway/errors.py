"""Errors translated once, at the boundary: the registry's and the log's into protocol.md's.

Each error type of the parts behind the gateway has the protocol's code of the
same name; anything else is a bug, which the caller logs with its traceback
and answers with ``internal`` (no internals on the wire).
"""

from __future__ import annotations

from typing import Final

from sandboxd.actors import errors
from sandboxd.events.errors import CorruptLog, Gone, LogUnavailable
from sandboxd.gateway import protocol as p

_CODES: Final[dict[type[Exception], p.ErrorCode]] = {
    errors.BadRequest: p.ErrorCode.BAD_REQUEST,
    errors.NotFound: p.ErrorCode.NOT_FOUND,
    errors.Conflict: p.ErrorCode.CONFLICT,
    errors.LimitExceeded: p.ErrorCode.LIMIT_EXCEEDED,
    errors.Unavailable: p.ErrorCode.UNAVAILABLE,
    LogUnavailable: p.ErrorCode.UNAVAILABLE,
}


def translate(error: Exception) -> p.ProtocolError | None:
    """The protocol error for an error of the registry or the log; None for a bug."""
    if isinstance(error, p.ProtocolError):
        return error
    if isinstance(error, errors.StartFailed):
        return p.ProtocolError(p.ErrorCode.START_FAILED, str(error), sandbox=error.sandbox)
    if isinstance(error, Gone):
        return p.ProtocolError(
            p.ErrorCode.GONE,
            f"The events asked for are older than the retained log, which starts at seq"
            f" {error.oldest_seq}; ask again with after_seq {error.oldest_seq - 1} or later.",
            oldest_seq=error.oldest_seq,
        )
    if isinstance(error, CorruptLog):
        return p.ProtocolError(p.ErrorCode.UNAVAILABLE, damaged(error))
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return p.ProtocolError(code, str(error))
    return None


def damaged(damage: CorruptLog) -> str:
    """What a reader is told of a damaged record: not a bug, and nothing it did wrong
    (`unavailable`), naming the damage; the daemon logs it, with its reason, once."""
    return (
        f"The event log is damaged at {damage.where} and cannot be read there; an operator"
        " can see more with `sandboxd log verify`."
    )


def internal() -> p.ProtocolError:
    """What a client is told of a bug: that it happened, and where the details are."""
    return p.ProtocolError(
        p.ErrorCode.INTERNAL, "The daemon hit a bug handling this request; its log has the details."
    )


def shutting_down() -> p.ProtocolError:
    return p.ProtocolError(
        p.ErrorCode.UNAVAILABLE, "The daemon is shutting down and takes no new requests."
    )


def busy() -> p.ProtocolError:
    return p.ProtocolError(
        p.ErrorCode.BUSY,
        f"{p.MAX_IN_FLIGHT} requests are already in flight on this connection;"
        " wait for their replies before sending more.",
    )
