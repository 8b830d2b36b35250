"""Events to bytes and back: the one converter, configured once, here.

A record on disk is one JSON object (the envelope of protocol.md plus ``v``,
the payload's schema version)::

    {"v":1,"seq":42,"ts":"...","type":"sandbox.running","sandbox_id":"a","by":null,"data":{...}}

Decoding is strict: an unknown type, a missing or unknown field, or a wrong
type raises ``DecodeError`` unless an upcaster for the record's version is
registered. The bytes are also what subscribers receive, so the gateway
forwards them without encoding an event twice.

How a payload may change (docs/events.md, "Changing an event"): a new field
with a default, which records written before it lack, keeps the schema
version (such a field may be absent, and decodes to its default); anything
else (a required field, a field renamed, removed or meaning something else)
raises ``SCHEMA_VERSION`` and registers an upcaster from the version before.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson
from cattrs.preconf.orjson import make_converter

from sandboxd.events.types import (
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    Event,
    Payload,
)

converter = make_converter(forbid_extra_keys=True, detailed_validation=False)

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
    result: dict[str, Any] = converter.unstructure(data)
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
    # The writer's hot path: the same record as event_to_dict, built in one step
    # with the payload's unstructure hook looked up once per class, not per call.
    data = event.data
    return orjson.dumps(
        {
            "seq": event.seq,
            "ts": event.ts,
            "type": data.TYPE,
            "sandbox_id": event.sandbox_id,
            "by": event.by,
            "data": _unstructure[data.__class__](data),
            "v": SCHEMA_VERSION,
        }
    )


class _Invalid(ValueError):
    pass


def _checker(tp: Any) -> Callable[[Any], Any]:
    """A strict check for one field type: no coercion, so a "1" is never an int."""
    if tp is int:

        def check_int(v: Any) -> Any:
            if type(v) is not int:
                raise _Invalid(f"expected an integer, got {v!r}")
            return v

        return check_int
    if tp is float:

        def check_float(v: Any) -> Any:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise _Invalid(f"expected a number, got {v!r}")

        return check_float
    if tp is str or tp is bool:

        def check_exact(v: Any) -> Any:
            if type(v) is not tp:
                raise _Invalid(f"expected {tp.__name__}, got {v!r}")
            return v

        return check_exact
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _checker(args[0] if args[1] is type(None) else args[1])

        def check_optional(v: Any) -> Any:
            return None if v is None else inner(v)

        return check_optional
    if typing.get_origin(tp) is list:
        item = _checker(args[0])

        def check_list(v: Any) -> Any:
            if type(v) is not list:
                raise _Invalid(f"expected a list, got {v!r}")
            return [item(x) for x in v]

        return check_list
    if typing.get_origin(tp) is dict and args == (str, str):

        def check_str_dict(v: Any) -> Any:
            if type(v) is not dict or not all(type(x) is str for x in v.values()):
                raise _Invalid(f"expected an object of strings, got {v!r}")
            return v  # JSON object keys are strings already

        return check_str_dict
    if attrs.has(tp):
        return _record_checker(tp)
    raise TypeError(f"the codec has no strict check for {tp!r}")


def _record_checker(cls: type[Any]) -> Callable[[Any], Any]:
    attrs.resolve_types(cls)
    fields = attrs.fields(cls)
    names = tuple(f.name for f in fields)
    wanted = frozenset(names)
    # Fields with a default were added later: older records lack them (see the docstring).
    required = frozenset(f.name for f in fields if f.default is attrs.NOTHING)
    checks = tuple((f.name, _checker(f.type)) for f in fields)

    def check_record(v: Any) -> Any:
        if type(v) is not dict:
            raise _Invalid(f"expected an object, got {v!r}")
        keys = v.keys()
        if keys == wanted:  # every record this version writes: the replay's hot path
            return cls(*[check(v[name]) for name, check in checks])
        if not required <= keys <= wanted:
            missing, unknown = sorted(required - keys), sorted(keys - wanted)
            raise _Invalid(f"missing fields {missing}, unknown fields {unknown}")
        return cls(**{name: check(v[name]) for name, check in checks if name in v})

    return check_record


_unstructure: dict[type[Any], Callable[[Any], Any]] = {
    cls: converter.get_unstructure_hook(cls) for cls in PAYLOAD_TYPES
}

# Strict structure hooks, built once from the attrs fields: the replay hot path,
# and stricter than cattrs' default, which would coerce "1" into 1.
_structure: dict[str, Callable[[Any], Any]] = {}
for _cls in PAYLOAD_TYPES:
    _structure[_cls.TYPE] = _record_checker(_cls)
    converter.register_structure_hook(
        _cls, lambda obj, _tp, check=_structure[_cls.TYPE]: check(obj)
    )


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


def decode(raw: bytes | memoryview) -> Event:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"record is not JSON: {exc}") from None
    return event_from_dict(record)


def event_from_dict(record: Any) -> Event:
    if type(record) is not dict:
        raise DecodeError("record is not a JSON object")
    if record.get("v") != SCHEMA_VERSION:
        record = _upcast(record)
    if record.keys() != _ENVELOPE_KEYS:
        raise DecodeError(f"envelope fields are {sorted(record)}, not {sorted(_ENVELOPE_KEYS)}")
    event_type = record["type"]
    structure = _structure.get(event_type)
    if structure is None:
        raise DecodeError(f"unknown event type {event_type!r}")
    seq, ts, sandbox_id, by = record["seq"], record["ts"], record["sandbox_id"], record["by"]
    if type(seq) is not int or seq < 1 or type(ts) is not str:
        raise DecodeError("record has no valid seq or ts")
    if not (sandbox_id is None or type(sandbox_id) is str) or not (by is None or type(by) is str):
        raise DecodeError("sandbox_id and by must be strings or null")
    try:
        data = structure(record["data"])
    except _Invalid as exc:
        raise DecodeError(f"bad {event_type} payload: {exc}") from None
    return Event(seq, ts, sandbox_id, by, data)


def _upcast(record: dict[str, Any]) -> dict[str, Any]:
    version, event_type = record.get("v"), record.get("type")
    while version != SCHEMA_VERSION:
        lift = _upcasters.get((event_type, version))  # type: ignore[arg-type]
        if lift is None and event_type not in _structure:
            raise DecodeError(f"unknown event type {event_type!r}")
        if lift is None:
            raise DecodeError(
                f"no upcaster for {event_type!r} records of schema version {version!r}"
            )
        record = lift(record)
        version, event_type = record.get("v"), record.get("type")
    return record
