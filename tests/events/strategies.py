"""Hypothesis strategies for events: any payload, and histories the projection accepts."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec
from hypothesis import strategies as st

from sandboxd.events import types as ev
from sandboxd.events.codec import now_ts

# The codec's JSON holds 64-bit integers and finite floats; so do the events.
_INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False)


def for_type(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for one field type of the event catalogue."""
    if tp is int:
        return _INT
    if tp is float:
        return _FLOAT
    if tp is str:
        return st.text(max_size=20)
    if tp is bool:
        return st.booleans()
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | for_type(inner)
    if typing.get_origin(tp) is list:
        return st.lists(for_type(args[0]), max_size=4)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return records(tp)
    raise TypeError(f"no strategy for {tp!r}")


def records(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Any instance of a class (a msgspec Struct) of the catalogue."""
    fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **{name: for_type(tp) for name, tp in fields.items()})


def payloads(cls: type[ev.Payload] | None = None) -> st.SearchStrategy[ev.Payload]:
    if cls is not None:
        return records(cls)
    return st.one_of([records(c) for c in ev.PAYLOAD_TYPES])


def events(cls: type[ev.Payload] | None = None) -> st.SearchStrategy[ev.Event]:
    return st.builds(
        ev.Event,
        seq=st.integers(min_value=1, max_value=2**63 - 1),
        ts=st.text(max_size=32),
        sandbox_id=st.none() | st.text(max_size=16),
        by=st.none() | st.text(max_size=16),
        data=payloads(cls),
    )


_SANDBOX_PAYLOADS = [
    c for c in ev.PAYLOAD_TYPES if c.TYPE.startswith("sandbox.") and c is not ev.SandboxCreated
]
_DAEMON_PAYLOADS = [c for c in ev.PAYLOAD_TYPES if c.TYPE.startswith("daemon.")]


@st.composite
def histories(draw: st.DrawFn, max_size: int = 60) -> list[ev.PendingEvent]:
    """A sequence of events the projection accepts: nothing before a sandbox's
    creation or after its deletion (an id may be created again afterwards),
    daemon events in between."""
    live: set[str] = set()
    history: list[ev.PendingEvent] = []
    for _ in range(draw(st.integers(min_value=0, max_value=max_size))):
        kind = draw(st.integers(min_value=0, max_value=9))
        if kind == 0:
            data = draw(payloads(draw(st.sampled_from(_DAEMON_PAYLOADS))))
            history.append(ev.PendingEvent(None, None, data))
        elif kind <= 2 or not live:
            sandbox_id = draw(st.sampled_from("abcdefgh"))
            if sandbox_id in live:
                continue
            live.add(sandbox_id)
            created = draw(records(ev.SandboxCreated))
            history.append(ev.PendingEvent(sandbox_id, created.created_by_user_id, created))
        else:
            sandbox_id = draw(st.sampled_from(sorted(live)))
            data = draw(payloads(draw(st.sampled_from(_SANDBOX_PAYLOADS))))
            if isinstance(data, ev.SandboxDeleted):
                live.discard(sandbox_id)
            history.append(ev.PendingEvent(sandbox_id, draw(st.none() | st.just("u")), data))
    return history


def stamp(history: list[ev.PendingEvent], first_seq: int = 1) -> list[ev.Event]:
    """Give pending events the seqs and ts the log would."""
    ts = now_ts()
    return [ev.Event(first_seq + i, ts, p.sandbox_id, p.by, p.data) for i, p in enumerate(history)]


def sample_pending(i: int) -> ev.PendingEvent:
    """A realistic event, different for each ``i``."""
    sandbox_id = f"sbx-{i // 8:06d}"
    kind = i % 8
    data: ev.Payload
    if kind == 0:
        data = ev.SandboxCreated(
            "default", "alice", f"/var/lib/sandboxd/{sandbox_id}", 30000 + i % 9999
        )
    elif kind == 1:
        data = ev.ProcessStarted(10000 + i, 10000 + i, 1732619539.25, ["python3", "-m", "server"])
    elif kind in (2, 5):
        data = ev.SandboxRunning(
            [ev.ExposedUrl("AGENT_SERVER", f"http://127.0.0.1:{30000 + i % 9999}")]
        )
    elif kind == 3:
        data = ev.SandboxPaused()
    elif kind == 4:
        data = ev.SandboxResumed()
    elif kind == 6:
        data = ev.SandboxUnhealthy("health check timed out")
    else:
        data = ev.SandboxDeleted(False)
    return ev.PendingEvent(sandbox_id, "alice", data)
