"""The frames a server sends: encoded on the server's side, parsed on a client's.

A server frame is a reply to a request (``Reply``) or a frame of a
subscription (``EventFrame``, ``EventsFrame`` for a subscription that asked for
batches, ``CaughtUpFrame``, ``EndedFrame``).
``parse_frame`` turns the text of one into one of those, or raises
``MalformedFrameError``; it does no I/O and needs no trio, so any client (the
trio one, an asyncio one) reads the server with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import orjson

from sandboxd.events.types import Event
from sandboxd.gateway.protocol._converter import converter
from sandboxd.gateway.protocol._errors import (
    ClientError,
    MalformedFrameError,
    ProtocolError,
    error_from_reply,
)
from sandboxd.gateway.protocol._results import decode_event


@attrs.frozen
class Reply:
    """The reply to request ``id``: its result (JSON, not decoded yet) or its error object."""

    id: str | int | None
    ok: bool
    result: Any = None
    error: Mapping[str, Any] = attrs.Factory(dict)

    def exception(self) -> ClientError:
        """The exception of an error reply, one type per code."""
        return error_from_reply(self.error)


@attrs.frozen
class EventFrame:
    """An event of a subscription, as the server's log stored it (decoded on demand)."""

    subscription: str
    seq: int
    raw: Mapping[str, Any]

    def event(self) -> Event | None:
        """The event; None for a type this client does not know (a newer server's)."""
        return decode_event(self.raw)


@attrs.frozen
class EventsFrame:
    """Several events of a subscription, in seq order (one ``EventFrame`` each, in
    effect): what a subscription made with ``"batch": true`` receives."""

    subscription: str
    events: list[EventFrame]


@attrs.frozen
class CaughtUpFrame:
    """Sent once per subscription: history up to ``seq`` is sent, live from here."""

    subscription: str
    seq: int
    caught_up: Literal[True] = True


@attrs.frozen
class EndedFrame:
    """The server cannot go on with the subscription; resume after ``last_seq``."""

    subscription: str
    reason: str
    last_seq: int
    ended: Literal[True] = True


Frame = Reply | EventFrame | EventsFrame | CaughtUpFrame | EndedFrame


# --- The server's side: text out ----------------------------------------------------------


def _dumps(frame: object) -> str:
    return orjson.dumps(frame, default=converter.unstructure).decode()


def encode_ok(request_id: str | int, result: object) -> str:
    return _dumps({"id": request_id, "ok": True, "result": result})


def encode_error(request_id: str | int | None, error: ProtocolError) -> str:
    body = {"code": error.code, "message": error.message, **error.extra}
    return _dumps({"id": request_id, "ok": False, "error": body})


def encode_event_frame(subscription: str, event: bytes | Mapping[str, Any]) -> str:
    """A subscription's event frame.

    Events come from the log already encoded; splicing those bytes into the
    frame spares a decode and re-encode per event per subscriber.
    """
    if not isinstance(event, bytes):
        event = orjson.dumps(event, default=converter.unstructure)
    return (b'{"subscription":' + orjson.dumps(subscription) + b',"event":' + event + b"}").decode()


def encode_events_frame(subscription: str, events: list[bytes]) -> str:
    """A batch subscription's frame of several events, each as the log stored it: the
    stored bytes joined, not decoded nor encoded again (once per event, not per frame)."""
    return b"".join(events_frame_parts(subscription, events)).decode()


def events_frame_parts(subscription: str, events: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """``encode_events_frame``'s UTF-8, in three parts: for a writer that sends them as
    they are (one ``writev``), with no copy of the events into one frame."""
    head = b'{"subscription":' + orjson.dumps(subscription) + b',"events":['
    return head, b",".join(events), b"]}"


def encode_caught_up(subscription: str, seq: int) -> str:
    return _dumps(CaughtUpFrame(subscription, seq))


def encode_ended(subscription: str, reason: str, last_seq: int) -> str:
    return _dumps(EndedFrame(subscription, reason, last_seq))


# --- A client's side: text in -------------------------------------------------------------


def _malformed(what: str, frame: object) -> MalformedFrameError:
    text = repr(frame)
    shown = text if len(text) <= 80 else text[:77] + "..."
    return MalformedFrameError(
        f"the server sent {what}, which protocol.md does not describe: {shown}"
    )


def _int(value: object) -> bool:
    return type(value) is int


def parse_frame(frame: str | bytes) -> Frame:
    """One frame of the server, typed; ``MalformedFrameError`` if it is none of protocol.md's."""
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise _malformed("a frame that is not JSON", frame) from None
    if type(doc) is not dict:
        raise _malformed("a frame that is not a JSON object", doc)
    if "subscription" in doc:
        subscription = doc["subscription"]
        if type(subscription) is not str:
            raise _malformed("a subscription frame without a string id", doc)
        if "event" in doc:
            raw = doc["event"]
            if type(raw) is not dict or not _int(raw.get("seq")):
                raise _malformed("an event without a seq", doc)
            return EventFrame(subscription, raw["seq"], raw)
        if "events" in doc:
            raws = doc["events"]
            if type(raws) is not list or not raws:
                raise _malformed("an events frame without events", doc)
            frames = []
            for raw in raws:
                if type(raw) is not dict or not _int(raw.get("seq")):
                    raise _malformed("an event without a seq", doc)
                frames.append(EventFrame(subscription, raw["seq"], raw))
            return EventsFrame(subscription, frames)
        if doc.get("caught_up") is True and _int(doc.get("seq")):
            return CaughtUpFrame(subscription, doc["seq"])
        if doc.get("ended") is True and _int(doc.get("last_seq")):
            return EndedFrame(subscription, str(doc.get("reason")), doc["last_seq"])
        raise _malformed("a subscription frame", doc)
    request_id = doc.get("id")
    if not (request_id is None or type(request_id) is str or _int(request_id)):
        raise _malformed("a reply whose id is neither a string nor an integer", doc)
    if doc.get("ok") is True:
        return Reply(request_id, True, result=doc.get("result"))
    if doc.get("ok") is False and type(doc.get("error")) is dict:
        return Reply(request_id, False, error=doc["error"])
    raise _malformed("a frame that is neither a reply nor a subscription's", doc)
