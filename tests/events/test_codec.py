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
        "v": 2,
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


#: Version 1 records of the types version 2 added fields to (and one it did not), as written.
V1_RECORDS = [
    ("sandbox.created", {"spec_id": "s", "created_by_user_id": "u", "working_dir": "/", "port": 1}),
    ("sandbox.process_started", {"pid": 5, "pgid": 5, "create_time": 1.5, "command": ["x"]}),
    ("sandbox.exited", {"exit_code": None, "signal": 9}),
    ("sandbox.paused", {}),
]


@pytest.mark.parametrize(("event_type", "data"), V1_RECORDS, ids=[t for t, _ in V1_RECORDS])
def test_version_1_records_read_as_version_2_with_the_new_fields_null(
    event_type: str, data: dict[str, object]
) -> None:
    record = {"v": 1, "seq": 3, "ts": "t", "type": event_type, "sandbox_id": "a", "by": None}
    event = decode(orjson.dumps({**record, "data": data}))
    added = set(event_to_dict(event)["data"]) - set(data)
    assert (
        added
        == {
            "sandbox.created": {"uid"},
            "sandbox.process_started": {"uid"},
            "sandbox.exited": {"reason", "memory_max"},
            "sandbox.paused": set(),
        }[event_type]
    )
    assert all(event_to_dict(event)["data"][name] is None for name in added)
    # Written again, it is a version 2 record that reads back the same.
    assert orjson.loads(encode(event))["v"] == ev.SCHEMA_VERSION == 2
    assert decode(encode(event)) == event


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b"\x00\x00", b"null"])
def test_non_objects_are_refused(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(raw)
