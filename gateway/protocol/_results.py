"""What the ops answer, as types both ends share: the server encodes them, a client decodes.

``SandboxInfo`` and ``SpecInfo`` are the registry's own (actors/info.py): the
gateway sends what the registry gives. The rest are the shapes protocol.md
gives the other results. Events are the log's ``Event``; on the wire the
server forwards each stored record as it is (``EventPage[orjson.Fragment]``),
and a client decodes it with ``decode_event``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import attrs

from sandboxd.actors.boundary.cgroupfs import Usage
from sandboxd.actors.info import SandboxInfo, SandboxUsage, SpecInfo
from sandboxd.events import codec
from sandboxd.events.types import BY_TYPE, SCHEMA_VERSION, Event
from sandboxd.gateway.protocol._errors import MalformedFrameError

__all__ = [
    "EventPage",
    "Logs",
    "SandboxInfo",
    "SandboxUsage",
    "SearchPage",
    "ServerDetails",
    "SpecInfo",
    "Subscribed",
    "Usage",
    "decode_event",
]

log = logging.getLogger(__name__)

E = TypeVar("E")

_ENVELOPE = ("v", "seq", "ts", "type", "sandbox_id", "by", "data")


@attrs.frozen
class SearchPage:
    """sandbox.search: newest first; ``next_page_id`` None on the last page."""

    items: list[SandboxInfo]
    next_page_id: str | None


@attrs.frozen
class Logs:
    """sandbox.logs: the end of a sandbox's output, and whether there was more."""

    data: str
    truncated: bool


@attrs.frozen
class ServerDetails:
    """server.info. The last three (extensions, absent from an older daemon's answer): the
    tree boundary in force, who sandboxes run as, and what enforces each limit."""

    version: str
    protocol: int
    user: str | None
    admin: bool
    head_seq: int
    started_at: str
    boundary: str | None = None  # "cgroup2" | "cgroup1" | "markers"
    isolation: str | None = None  # "dynamic" | "user:NAME" | "daemon" | "none (daemon not root)"
    limits: dict[str, str] | None = None  # limit key -> "cgroup" | "RLIMIT_..." | "none"
    #: This daemon's cluster.node_id, and, in a cluster, the nodes holding a lease now.
    node: str | None = None
    nodes: list[str] | None = None


@attrs.frozen
class Subscribed:
    """events.subscribe: the subscription's id on this connection, and the head then."""

    subscription: str
    head_seq: int


@attrs.frozen
class EventPage(Generic[E]):
    """events.read: one page of history, and where the next one starts."""

    events: list[E]
    next_after_seq: int


def decode_event(raw: Mapping[str, Any]) -> Event | None:
    """An event of the wire; None for a type this client does not know (a newer server's)."""
    record = {key: raw[key] for key in _ENVELOPE if key in raw}
    # The server forwards its log's records, which carry "v"; one that does
    # not is of the current version. Fields beyond the envelope are extensions.
    record.setdefault("v", SCHEMA_VERSION)
    try:
        return codec.event_from_dict(record)
    except codec.DecodeError as exc:
        if raw.get("type") not in BY_TYPE:
            log.debug("skipping event %s of unknown type %r", raw.get("seq"), raw.get("type"))
            return None
        raise MalformedFrameError(
            f"event {raw.get('seq')} is not what protocol.md says: {exc}"
        ) from exc
