"""The codec: every event type survives encode/decode; bad records are refused."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.events import types as ev
from sandboxd.events.codec import DecodeError, decode, encode, event_from_dict, event_to_dict
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
    event = ev.Event(7, "2026-01-01T00:00:00.000000Z", "a", None, ev.SandboxResumed())
    assert orjson.loads(encode(event)) == {
        "seq": 7,
        "ts": "2026-01-01T00:00:00.000000Z",
        "type": "sandbox.resumed",
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
        # msgspec's words: the expected type, the one found, and where.
        ({"data": {"exit_code": "1", "signal": None}}, r"Expected `int \| null`, got `str`"),
        ({"seq": 0}, "seq"),
        ({"seq": "3"}, "seq"),
        ({"sandbox_id": 5}, "sandbox_id"),
        ({"v": 99}, "no upcaster"),
        ({"v": []}, "no upcaster"),  # was a TypeError, not a DecodeError
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
            # and "node" and "labels", optional fields added later (docs/events.md), null too
            "sandbox.created": {"uid", "ports", "node", "labels"},
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


# -- the msgspec codec against the one it replaced --------------------------------------------
#
# The decoder it replaced parsed with orjson and checked every field in Python; this
# is that check, kept as the reference: for any record, well formed or mutated, the
# codec must accept exactly what it accepted, and decode it to the same event.


class _Refused(ValueError):
    pass


def _check(tp: object, value: object) -> object:
    """The replaced codec's strict check of one field: no coercion but int -> float."""
    if tp is int:
        if type(value) is not int:
            raise _Refused(value)
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise _Refused(value)
        return float(value)  # type: ignore[arg-type]
    if tp is str or tp is bool:
        if type(value) is not tp:
            raise _Refused(value)
        return value
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        return None if value is None else _check(inner, value)
    if typing.get_origin(tp) is list:
        if type(value) is not list:
            raise _Refused(value)
        return [_check(args[0], item) for item in value]
    if typing.get_origin(tp) is dict:  # labels: an object of strings
        if type(value) is not dict:
            raise _Refused(value)
        return {key: _check(args[1], item) for key, item in value.items()}
    return _reference_record(tp, value)


def _reference_record(cls: Any, value: object) -> object:
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    required = {name for name, f in fields.items() if f.required}
    if type(value) is not dict or not required <= value.keys() <= fields.keys():
        raise _Refused(value)
    # A field added with a default may be absent from older records: it takes the default.
    return cls(**{name: _check(fields[name].type, v) for name, v in value.items()})


def _reference_decode(raw: bytes) -> ev.Event:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Refused(raw) from None
    if type(record) is not dict or type(record.get("v")) is not int:
        raise _Refused(record)
    if record["v"] not in (1, ev.SCHEMA_VERSION):
        raise _Refused(record)  # version 1 is upcast: it only lacked fields with defaults
    if record.keys() != {"v", "seq", "ts", "type", "sandbox_id", "by", "data"}:
        raise _Refused(record)
    cls = ev.BY_TYPE.get(record["type"]) if type(record["type"]) is str else None
    seq, ts, sandbox_id, by = record["seq"], record["ts"], record["sandbox_id"], record["by"]
    if cls is None or type(seq) is not int or seq < 1 or type(ts) is not str:
        raise _Refused(record)
    if not (sandbox_id is None or type(sandbox_id) is str) or not (by is None or type(by) is str):
        raise _Refused(record)
    return ev.Event(seq, ts, sandbox_id, by, _reference_record(cls, record["data"]))  # type: ignore[arg-type]


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """An event's record, mutated in one place: a key dropped, added, or given any value."""
    record = event_to_dict(draw(events()))
    targets = [record]
    if isinstance(record["data"], dict) and record["data"]:
        targets.append(record["data"])
        for value in record["data"].values():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                targets.append(value[0])  # an exposed URL
    target = draw(st.sampled_from(targets))
    how = draw(st.sampled_from(["drop", "add", "change", "none"]))
    if how == "drop" and target:
        del target[draw(st.sampled_from(sorted(target)))]
    elif how == "add":
        target[draw(st.text(min_size=1, max_size=6))] = draw(_JSON)
    elif how == "change" and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(_JSON)
    return orjson.dumps(record)


@settings(max_examples=400)
@given(raw=_mutated())
def test_the_codec_accepts_what_the_replaced_one_accepted(raw: bytes) -> None:
    try:
        expected: ev.Event | None = _reference_decode(raw)
    except _Refused:
        expected = None
    if expected is None:
        with pytest.raises(DecodeError):
            decode(raw)
        with pytest.raises(DecodeError):
            event_from_dict(orjson.loads(raw))
    else:
        assert decode(raw) == expected
        assert event_from_dict(orjson.loads(raw)) == expected


@pytest.mark.parametrize("cls", ev.PAYLOAD_TYPES, ids=lambda c: c.TYPE)
def test_records_of_the_replaced_codec_decode(cls: type[ev.Payload]) -> None:
    """What the replaced encoder wrote (orjson, field by field) decodes to the same event,
    and the codec writes those very bytes."""

    @given(event=events(cls))
    def check(event: ev.Event) -> None:
        written = orjson.dumps(
            {
                "seq": event.seq,
                "ts": event.ts,
                "type": event.data.TYPE,
                "sandbox_id": event.sandbox_id,
                "by": event.by,
                "data": _as_builtins(event.data),
                "v": ev.SCHEMA_VERSION,
            }
        )
        assert decode(written) == event
        assert encode(event) == written

    check()


def _as_builtins(value: object) -> object:
    if isinstance(value, msgspec.Struct):
        return {name: _as_builtins(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, list):
        return [_as_builtins(item) for item in value]
    return value


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
