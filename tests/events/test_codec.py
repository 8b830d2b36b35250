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
        "data": {"reason": None},
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
            "sandbox.created": {"uid", "ports"},
            "sandbox.process_started": {"uid"},
            # And the optional fields added since (issue 10's policies), null too.
            "sandbox.exited": {"reason", "memory_max", "restart"},
            "sandbox.paused": {"reason"},
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


CREATED_BEFORE_NAMED_PORTS = {
    **GOOD,
    "type": "sandbox.created",
    "data": {"spec_id": "s", "created_by_user_id": None, "working_dir": "/w", "port": 30001},
}


def test_a_field_added_with_a_default_may_be_absent_from_older_records() -> None:
    # sandbox.created's ports and exposed_urls' port came after schema version 1's first
    # records: those decode with the defaults, under the same version.
    old = decode(orjson.dumps(CREATED_BEFORE_NAMED_PORTS))
    assert old.data == ev.SandboxCreated("s", None, "/w", 30001, None)
    running = {**GOOD, "type": "sandbox.running"}
    running["data"] = {"exposed_urls": [{"name": "AGENT_SERVER", "url": "http://h:1"}]}
    assert decode(orjson.dumps(running)).data == ev.SandboxRunning(
        [ev.ExposedUrl("AGENT_SERVER", "http://h:1", None)]
    )
    # A field without a default is still required, an unknown one still refused.
    for change in ({"port": None}, {"ports": [], "surprise": 1}):
        data = {**CREATED_BEFORE_NAMED_PORTS["data"], **change}  # type: ignore[dict-item]
        data = {k: v for k, v in data.items() if v is not None}
        with pytest.raises(DecodeError, match=r"missing fields|unknown fields"):
            decode(orjson.dumps({**CREATED_BEFORE_NAMED_PORTS, "data": data}))
    # What this version writes has every field.
    new = ev.SandboxCreated("s", None, "/w", 30001, [ev.NamedPort("AGENT_SERVER", 30001)])
    raw = encode(ev.Event(3, "t", "a", None, new))
    assert orjson.loads(raw)["data"]["ports"] == [{"name": "AGENT_SERVER", "port": 30001}]
    assert decode(raw).data == new
