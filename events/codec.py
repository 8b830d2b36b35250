"""Events to bytes and back, strictly, with msgspec.

A record on disk is one JSON object (the envelope of protocol.md plus ``v``,
the payload's schema version)::

    {"seq":42,"ts":"...","type":"sandbox.running","sandbox_id":"a","by":null,"data":{...},"v":1}

Decoding is strict: an unknown type, a missing or unknown field, or a wrong
type raises ``DecodeError`` unless an upcaster for the record's version is
registered. The bytes are also what subscribers receive, so the gateway
forwards them without encoding an event twice.

How: for each payload class of the catalogue a record type is generated
(``_RECORDS``): the envelope's fields with ``data`` typed as that class, tagged
by ``type``. msgspec decodes a record into the one of them its ``type`` names
in a single pass, in C, checking every field, and ``Event`` is made from it.
That is the fast path (about 0.6 us a record with ``Event``, against 5 us for
orjson plus checks written in Python that it replaced; bench/eventlog.py).
A record it refuses (an older schema version, or a bad record) takes the slow
path: parsed to a dict, upcast, checked field by field, so that what is wrong
is said in words (``event_from_dict``, which the clients use too).

How a payload may change (docs/events.md, "Changing an event"): a new field
with a default, which records written before it lack, keeps the schema
version (such a field may be absent, and decodes to its default, on both
paths); anything else (a required field, a field renamed, removed or meaning
something else) raises ``SCHEMA_VERSION`` and registers an upcaster from the
version before.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Union

import msgspec
import orjson

from sandboxd.events.types import (
    BY_TYPE,
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    Event,
    Payload,
)

_ENVELOPE_KEYS = frozenset({"v", "seq", "ts", "type", "sandbox_id", "by", "data"})

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
#: (wire type, version) -> function turning that version's record into the next version's.
_upcasters: dict[tuple[str, int], Upcaster] = {}


class DecodeError(ValueError):
    """A record that is well framed but is not an event this code understands."""


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that lifts a record of ``from_version`` one version up."""

    def register(fn: Upcaster) -> Upcaster:
        _upcasters[(event_type, from_version)] = fn
        return fn

    return register


def now_ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unstructure_payload(data: Payload) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(data)
    return result


def event_to_dict(event: Event, *, with_version: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {
        "seq": event.seq,
        "ts": event.ts,
        "type": event.data.TYPE,
        "sandbox_id": event.sandbox_id,
        "by": event.by,
        "data": unstructure_payload(event.data),
    }
    if with_version:
        record["v"] = SCHEMA_VERSION
    return record


def encode(event: Event) -> bytes:
    # The writer's hot path: the envelope as a dict (keys in the order of the docs),
    # the payload Struct turned into builtins by msgspec. orjson writes it, as it
    # always has: it refuses what a reader could not take back, such as integers
    # beyond 64 bits (msgspec writes them, and orjson-based clients cannot read
    # them), at 0.17 us an event more than msgspec alone.
    data = event.data
    return orjson.dumps(
        {
            "seq": event.seq,
            "ts": event.ts,
            "type": data.TYPE,
            "sandbox_id": event.sandbox_id,
            "by": event.by,
            "data": data,
            "v": SCHEMA_VERSION,
        },
        default=msgspec.to_builtins,
    )


def _record_type(cls: type[Payload]) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        f"{cls.__name__}Record",
        [
            ("seq", int),
            ("ts", str),
            ("sandbox_id", Union[str, None]),  # noqa: UP007  (a runtime type, for msgspec)
            ("by", Union[str, None]),  # noqa: UP007
            ("data", cls),
            ("v", int),
        ],
        tag_field="type",
        tag=cls.TYPE,
        forbid_unknown_fields=True,
        gc=False,  # made and dropped once per record: not worth the collector's time
    )


#: One record type per payload class, tagged by the wire name in ``type``.
_RECORDS = {cls: _record_type(cls) for cls in PAYLOAD_TYPES}
_RecordUnion = Union[tuple(_RECORDS.values())]  # type: ignore[valid-type]  # noqa: UP007
_decoder = msgspec.json.Decoder(_RecordUnion)
_FIELDS = {cls.TYPE: frozenset(cls.__struct_fields__) for cls in PAYLOAD_TYPES}
#: The fields a record must carry: those without a default (added later ones have one).
_REQUIRED = {
    cls.TYPE: frozenset(f.name for f in msgspec.structs.fields(cls) if f.required)
    for cls in PAYLOAD_TYPES
}


def decode(raw: bytes | memoryview) -> Event:
    try:
        record: Any = _decoder.decode(raw)
    except msgspec.DecodeError:
        # Not this version's schema, or not an event: the slow path says which.
        return _decode_slowly(raw)
    seq = record.seq
    if record.v != SCHEMA_VERSION or seq < 1:
        return _decode_slowly(raw)
    return Event(seq, record.ts, record.sandbox_id, record.by, record.data)


def _decode_slowly(raw: bytes | memoryview) -> Event:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"record is not JSON: {exc}") from None
    return event_from_dict(record)


def event_from_dict(record: Any) -> Event:
    """The event a record parsed to a dict holds: upcast if it is of an older schema
    version, and checked field by field; ``DecodeError`` saying what is wrong."""
    if type(record) is not dict:
        raise DecodeError("record is not a JSON object")
    if record.get("v") != SCHEMA_VERSION:
        record = _upcast(record)
    if record.keys() != _ENVELOPE_KEYS:
        raise DecodeError(f"envelope fields are {sorted(record)}, not {sorted(_ENVELOPE_KEYS)}")
    event_type = record["type"]
    cls = BY_TYPE.get(event_type) if type(event_type) is str else None
    if cls is None:
        raise DecodeError(f"unknown event type {event_type!r}")
    seq, ts, sandbox_id, by = record["seq"], record["ts"], record["sandbox_id"], record["by"]
    if type(seq) is not int or seq < 1 or type(ts) is not str:
        raise DecodeError("record has no valid seq or ts")
    if not (sandbox_id is None or type(sandbox_id) is str) or not (by is None or type(by) is str):
        raise DecodeError("sandbox_id and by must be strings or null")
    data = record["data"]
    wanted, required = _FIELDS[event_type], _REQUIRED[event_type]
    if type(data) is dict and not required <= data.keys() <= wanted:
        missing, unknown = sorted(required - data.keys()), sorted(data.keys() - wanted)
        raise DecodeError(
            f"bad {event_type} payload: missing fields {missing}, unknown fields {unknown}"
        )
    try:
        payload = msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"bad {event_type} payload: {exc}") from None
    return Event(seq, ts, sandbox_id, by, payload)


def _upcast(record: dict[str, Any]) -> dict[str, Any]:
    version, event_type = record.get("v"), record.get("type")
    while version != SCHEMA_VERSION:
        # (A list there is no version: it must not reach the dict as a key.)
        known = type(version) is int and type(event_type) is str
        lift = _upcasters.get((event_type, version)) if known else None  # type: ignore[arg-type]
        if lift is None and event_type not in BY_TYPE:
            raise DecodeError(f"unknown event type {event_type!r}")
        if lift is None:
            raise DecodeError(
                f"no upcaster for {event_type!r} records of schema version {version!r}"
            )
        record = lift(record)
        version, event_type = record.get("v"), record.get("type")
    return record


# -- upcasters: old records, read as the current version -------------------------------


def _v1_to_v2(record: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added optional fields only (the sandbox's uid and named ports, why it
    exited): absent, null."""
    data = record.get("data")
    if type(data) is dict:
        data = dict(data)
        for name in _ADDED_IN_V2.get(record.get("type"), ()):  # type: ignore[arg-type]
            data.setdefault(name, None)
    return {**record, "data": data, "v": 2}


_ADDED_IN_V2: dict[str, tuple[str, ...]] = {
    "sandbox.created": ("uid", "ports"),
    "sandbox.process_started": ("uid",),
    "sandbox.exited": ("reason", "memory_max"),
}
for _cls in PAYLOAD_TYPES:
    upcaster(_cls.TYPE, 1)(_v1_to_v2)
