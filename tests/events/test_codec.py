"""The codec: every event type survives encode/decode; bad records are refused."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given

from sandboxd.events import types as ev
from sandboxd.events.codec import DecodeError, decode, encode, event_to_dict
from tests.events.strategies import events


@given(event=events())
def test_round_trip(event: ev.Event) -> None:
    assert decode(encode(event)) == event


@pytest.mark.parametrize("cls", ev.PAYLOAD_TYPES, ids=lambda c: c.TYPE)
def test_round_trip_of_each_type(cls: type[ev.Payload]) -> None:
    @given(event=events(cls))
    def check(event: ev.Event) -> None:
        raw = encode(event)
        assert decode(raw) == event
        assert orjson.loads(raw) == event_to_dict(event)

    check()


def test_the_record_has_the_wire_name_and_version() -> None:
    event = ev.Event(7, "2026-01-01T00:00:00.000000Z", "a", None, ev.SandboxPaused())
    assert orjson.loads(encode(event)) == {
        "seq": 7,
        "ts": "2026-01-01T00:00:00.000000Z",
        "type": "sandbox.paused",
        "sandbox_id": "a",
        "by": None,
        "data": {},
        "v": 1,
    }


GOOD = {
    "v": 1,
    "seq": 3,
    "ts": "t",
    "type": "sandbox.exited",
    "sandbox_id": "a",
    "by": None,
    "data": {"exit_code": 1, "signal": None},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "sandbox.exploded"}, "unknown event type"),
        ({"data": {"exit_code": 1}}, "missing fields"),
        ({"data": {"exit_code": 1, "signal": None, "extra": 1}}, "unknown fields"),
        ({"data": {"exit_code": "1", "signal": None}}, "expected an integer"),
        ({"seq": 0}, "seq"),
        ({"seq": "3"}, "seq"),
        ({"sandbox_id": 5}, "sandbox_id"),
        ({"v": 99}, "no upcaster"),
        ({"extra": True}, "envelope"),
    ],
)
def test_bad_records_are_refused(change: dict[str, object], message: str) -> None:
    assert decode(orjson.dumps(GOOD)).seq == 3
    with pytest.raises(DecodeError, match=message):
        decode(orjson.dumps({**GOOD, **change}))


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b"\x00\x00", b"null"])
def test_non_objects_are_refused(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(raw)
