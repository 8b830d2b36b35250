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
    return _reference_record(tp, value)


def _reference_record(cls: Any, value: object) -> object:
    fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
    if type(value) is not dict or value.keys() != fields.keys():
        raise _Refused(value)
    return cls(*[_check(tp, value[name]) for name, tp in fields.items()])


def _reference_decode(raw: bytes) -> ev.Event:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Refused(raw) from None
    if type(record) is not dict or record.get("v") != 1:
        raise _Refused(record)
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
                "v": 1,
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
