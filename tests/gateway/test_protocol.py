"""The sans-IO protocol layer, without a socket: parse_request never raises
anything but RequestError, blames the right field, and every frame encoded is JSON."""

import json
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.events.types import EVENT_TYPES
from sandboxd.gateway.protocol import (
    OPS,
    ErrorCode,
    EventsRead,
    EventsSubscribe,
    EventsUnsubscribe,
    Params,
    ProtocolError,
    Request,
    RequestError,
    SandboxBatchGet,
    SandboxDelete,
    SandboxFindBySessionKey,
    SandboxGet,
    SandboxLogs,
    SandboxPause,
    SandboxResume,
    SandboxSearch,
    SandboxStart,
    SandboxStats,
    ServerInfo,
    SpecGet,
    SpecList,
    encode_caught_up,
    encode_ended,
    encode_error,
    encode_event_frame,
    encode_ok,
    encode_request,
    parse_request,
)

# --- The contract of protocol.md, written out independently of the code under test.
# Kinds: "str", "int", "bool", "strs" (list of strings), "env" (object of strings);
# a trailing "?" means optional, where null means the same as absent.
SIGNATURES: dict[str, dict[str, str]] = {
    "sandbox.start": {
        "spec_id": "str?",
        "sandbox_id": "str?",
        "env": "env?",
        "wait": "bool?",
        "owner": "str?",
        "node": "str?",
    },
    "sandbox.get": {"sandbox_id": "str"},
    "sandbox.batch_get": {"sandbox_ids": "strs"},
    "sandbox.stats": {"sandbox_ids": "strs"},
    "sandbox.search": {"page_id": "str?", "limit": "int?", "status": "str?", "owner": "str?"},
    "sandbox.find_by_session_key": {"session_api_key": "str"},
    "sandbox.pause": {"sandbox_id": "str"},
    "sandbox.resume": {"sandbox_id": "str"},
    "sandbox.delete": {"sandbox_id": "str"},
    "sandbox.logs": {"sandbox_id": "str", "tail_bytes": "int?"},
    "spec.list": {},
    "spec.get": {"spec_id": "str"},
    "server.info": {},
    "events.subscribe": {
        "after_seq": "int?",
        "sandbox_id": "str?",
        "types": "strs?",
        "batch": "bool?",
    },
    "events.unsubscribe": {"subscription": "str"},
    "events.read": {"after_seq": "int", "limit": "int?", "sandbox_id": "str?", "types": "strs?"},
}
# One valid value per required field, so that a frame fails only where a test breaks it.
REQUIRED = {
    "sandbox_id": "sb-1",
    "sandbox_ids": ["a", "b"],
    "spec_id": "default",
    "subscription": "s1",
    "after_seq": 0,
    "session_api_key": "k" * 43,
}
# Fields that keep a default when absent and so do not take null.
NOT_NULLABLE = {("sandbox.start", "wait"), ("sandbox.search", "limit")}
NOT_NULLABLE |= {("sandbox.logs", "tail_bytes"), ("events.read", "limit")}


def minimal(op: str) -> dict[str, Any]:
    fields = SIGNATURES[op]
    return {"id": 7, "op": op} | {k: REQUIRED[k] for k, kind in fields.items() if "?" not in kind}


def has_kind(kind: str, value: object) -> bool:
    base = kind.rstrip("?")
    if value is None:
        return kind.endswith("?")
    if base == "strs":
        return type(value) is list and all(type(x) is str for x in value)
    if base == "env":
        return type(value) is dict and all(type(x) is str for x in value.values())
    return type(value) is {"str": str, "int": int, "bool": bool}[base]


def outcome(frame: str | bytes) -> Request | RequestError:
    """parse_request's answer; any exception but RequestError fails the test."""
    try:
        return parse_request(frame)
    except RequestError as exc:
        assert isinstance(exc, ProtocolError)
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_OP)
        assert exc.message.endswith(".")
        return exc


def error(frame: str | bytes | dict[str, Any]) -> RequestError:
    result = outcome(json.dumps(frame) if isinstance(frame, dict) else frame)
    assert isinstance(result, RequestError), result
    return result


# --- Strategies.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson reads as int
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
request_ids = st.text(max_size=10) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
param_names = st.sampled_from(sorted({k for f in SIGNATURES.values() for k in f})) | st.text(
    max_size=8
)
sandbox_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
event_type_lists = st.lists(st.sampled_from(sorted(EVENT_TYPES)), max_size=3)
env_names = st.text(min_size=1, max_size=8).filter(lambda k: "=" not in k and "\0" not in k)
envs = st.dictionaries(env_names, st.text(max_size=8).filter(lambda v: "\0" not in v), max_size=3)
statuses = st.sampled_from(["STARTING", "RUNNING", "PAUSED", "ERROR", "MISSING"])
seqs = st.integers(min_value=0, max_value=2**63 - 1)

owners = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1, max_size=40
).filter(str.isprintable)
VALID_PARAMS: dict[type[Any], st.SearchStrategy[Any]] = {
    SandboxStart: st.builds(
        SandboxStart,
        spec_id=st.none() | st.text(max_size=8),
        sandbox_id=st.none() | sandbox_ids,
        env=st.none() | envs,
        wait=st.booleans(),
        owner=st.none() | owners,
        node=st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    ),
    SandboxGet: st.builds(SandboxGet, sandbox_ids),
    SandboxBatchGet: st.builds(SandboxBatchGet, st.lists(sandbox_ids, max_size=100)),
    SandboxStats: st.builds(SandboxStats, st.lists(sandbox_ids, max_size=100)),
    SandboxSearch: st.builds(
        SandboxSearch,
        page_id=st.none() | st.text(max_size=8),
        limit=st.integers(1, 100),
        status=st.none() | statuses,
        owner=st.none() | owners,
    ),
    SandboxFindBySessionKey: st.builds(SandboxFindBySessionKey, st.text(min_size=1, max_size=64)),
    SandboxPause: st.builds(SandboxPause, sandbox_ids),
    SandboxResume: st.builds(SandboxResume, sandbox_ids),
    SandboxDelete: st.builds(SandboxDelete, sandbox_ids),
    SandboxLogs: st.builds(SandboxLogs, sandbox_ids, st.integers(0, 1 << 20)),
    SpecList: st.just(SpecList()),
    SpecGet: st.builds(SpecGet, st.text(max_size=8)),
    ServerInfo: st.just(ServerInfo()),
    EventsSubscribe: st.builds(
        EventsSubscribe,
        after_seq=st.none() | seqs,
        sandbox_id=st.none() | sandbox_ids,
        types=st.none() | event_type_lists,
        batch=st.none() | st.booleans(),
    ),
    EventsUnsubscribe: st.builds(EventsUnsubscribe, st.text(max_size=8)),
    EventsRead: st.builds(
        EventsRead,
        after_seq=seqs,
        limit=st.integers(1, 1000),
        sandbox_id=st.none() | sandbox_ids,
        types=st.none() | event_type_lists,
    ),
}


def test_the_contract_written_here_is_the_code_s() -> None:
    assert {op: cls.OP for op, cls in OPS.items()} == {op: op for op in SIGNATURES}
    for op, cls in OPS.items():
        assert [f.name for f in attrs.fields(cls)] == list(SIGNATURES[op])
    assert set(VALID_PARAMS) == set(OPS.values())


# --- Properties.


@given(json_values, st.booleans(), st.booleans())
def test_any_json_value_gives_a_request_or_a_request_error(
    value: object, ascii_only: bool, as_bytes: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    result = outcome(text.encode() if as_bytes else text)
    request_id = value.get("id") if isinstance(value, dict) else None
    usable_id = type(request_id) in (str, int)
    if isinstance(result, RequestError):
        assert result.request_id == (request_id if usable_id else None)
    else:
        assert usable_id


@given(
    request_ids,
    st.sampled_from(sorted(OPS)) | st.text(max_size=12),
    st.dictionaries(param_names, json_values, max_size=4),
)
def test_request_like_frames_are_judged_by_the_contract(
    request_id: str | int, op: str, params: dict[str, Any]
) -> None:
    params.pop("id", None)
    params.pop("op", None)
    result = outcome(json.dumps({"id": request_id, "op": op, **params}))
    if isinstance(result, RequestError):
        assert result.request_id == request_id
        assert (result.code == ErrorCode.UNKNOWN_OP) == (op not in OPS)
        return
    fields = SIGNATURES[op]
    assert (result.id, result.op, type(result.params)) == (request_id, op, OPS[op])
    assert set(params) <= set(fields)
    for name, kind in fields.items():
        if name in params:
            assert has_kind(kind, params[name])
            assert getattr(result.params, name) == params[name]
        else:
            assert "?" in kind


@given(
    st.sampled_from(sorted(OPS)).flatmap(lambda op: st.tuples(st.just(op), VALID_PARAMS[OPS[op]]))
)
def test_every_op_round_trips(case: tuple[str, Params]) -> None:
    op, params = case
    request = Request("r-1", op, params)
    assert parse_request(encode_request(request)) == request
    assert parse_request(encode_request(request).encode()) == request


WRONG_TYPE_CASES = [
    (op, name, kind) for op, fields in SIGNATURES.items() for name, kind in fields.items()
]


@given(st.sampled_from(WRONG_TYPE_CASES), json_values)
def test_a_wrong_type_is_a_bad_request_naming_the_field(
    case: tuple[str, str, str], value: object
) -> None:
    op, name, kind = case
    if (value is None and (op, name) not in NOT_NULLABLE) or has_kind(kind, value):
        return  # not a wrong type; the other tests cover right ones
    exc = error(minimal(op) | {name: value})
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, 7)
    assert exc.message.startswith(f"'{name}"), exc.message


@pytest.mark.parametrize(("op", "name"), [(op, n) for op, n in NOT_NULLABLE])
def test_null_is_wrong_for_a_field_with_a_default(op: str, name: str) -> None:
    exc = error(minimal(op) | {name: None})
    assert exc.message.startswith(f"'{name}' must be ") and exc.message.endswith(", not null.")


def test_null_is_absent_for_an_optional_field() -> None:
    request = parse_request('{"id": 1, "op": "events.subscribe", "after_seq": null, "types": null}')
    assert request.params == EventsSubscribe()


@pytest.mark.parametrize("op", sorted(SIGNATURES))
def test_each_required_field_is_required(op: str) -> None:
    for name, kind in SIGNATURES[op].items():
        if "?" not in kind:
            frame = minimal(op)
            del frame[name]
            exc = error(frame)
            assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, 7)
            assert exc.message == f"'{name}' is required by {op}."
    assert isinstance(outcome(json.dumps(minimal(op))), Request)


@given(st.sampled_from(sorted(OPS)), st.text(min_size=1, max_size=20))
def test_an_unknown_parameter_is_named(op: str, name: str) -> None:
    if name in SIGNATURES[op] or name in ("id", "op"):
        return
    exc = error(minimal(op) | {name: 1})
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, 7)
    assert exc.message.startswith(repr(name)[:20])


@given(request_ids, st.text(max_size=30))
def test_an_unknown_op_is_unknown_op_with_the_id(request_id: str | int, op: str) -> None:
    if op in OPS:
        return
    exc = error({"id": request_id, "op": op})
    assert (exc.code, exc.request_id) == (ErrorCode.UNKNOWN_OP, request_id)


@pytest.mark.parametrize(
    "frame",
    [
        "",
        "nope",
        "[1]",
        '"text"',
        "null",
        '{"op": "server.info"}',
        '{"id": null, "op": "server.info"}',
        '{"id": true, "op": "server.info"}',
        '{"id": 1.0, "op": "server.info"}',
        '{"id": 1e3, "op": "server.info"}',
        '{"id": 123456789012345678901234567890, "op": "server.info"}',  # beyond 64 bits
        '{"id": ["a"], "op": "server.info"}',
        '{"id": {}, "op": "server.info"}',
        '{"id": 1, "op": "server.info"',
        "[" * 5000,
    ],
)
def test_no_usable_id_replies_with_id_null(frame: str) -> None:
    exc = error(frame)
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, None)
    assert orjson.loads(encode_error(exc.request_id, exc))["id"] is None


def test_a_missing_or_malformed_op_is_a_bad_request_with_the_id() -> None:
    for frame in ({"id": "a"}, {"id": "a", "op": None}, {"id": "a", "op": 3}):
        exc = error(frame)
        assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, "a")
        assert exc.message.startswith("'op'")


@given(st.binary(max_size=40))
def test_arbitrary_bytes_never_raise_anything_else(frame: bytes) -> None:
    outcome(frame)


@given(st.characters(categories=["Cs"]), st.text("aé😀 ", max_size=3), st.booleans())
def test_lone_surrogates_are_bad_requests(surrogate: str, around: str, escaped: bool) -> None:
    # Raw in the str a text frame decodes to, or escaped as \ud800 in the JSON text.
    if escaped:
        surrogate = surrogate.encode("ascii", "backslashreplace").decode()
    inner = around + surrogate + around[::-1]
    frame = '{"id": 1, "op": "spec.get", "spec_id": "' + inner + '"}'
    exc = error(frame)
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, None)


def test_invalid_utf8_is_a_bad_request() -> None:
    exc = error(b'{"id": 1, "op": "spec.get", "spec_id": "\xff"}')
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, None)
    assert "JSON" in exc.message


@pytest.mark.parametrize(
    ("op", "params", "blamed"),
    [
        ("sandbox.get", {"sandbox_id": ""}, "'sandbox_id'"),
        ("sandbox.get", {"sandbox_id": "a" * 65}, "'sandbox_id'"),
        ("sandbox.get", {"sandbox_id": "a b"}, "'sandbox_id'"),
        ("sandbox.get", {"sandbox_id": "a\n"}, "'sandbox_id'"),
        ("sandbox.get", {"sandbox_id": "é"}, "'sandbox_id'"),
        ("sandbox.start", {"sandbox_id": "../x"}, "'sandbox_id'"),
        ("sandbox.start", {"env": {"A=B": "c"}}, "'env'"),
        ("sandbox.start", {"env": {"": "c"}}, "'env'"),
        ("sandbox.start", {"env": {"A": "c\0"}}, "'env['A']'"),
        ("sandbox.start", {"env": {"A": 1}}, "'env['A']'"),
        ("sandbox.batch_get", {"sandbox_ids": ["a"] * 101}, "'sandbox_ids'"),
        ("sandbox.batch_get", {"sandbox_ids": ["a", "b/c"]}, "'sandbox_ids[1]'"),
        ("sandbox.batch_get", {"sandbox_ids": ["a", 2]}, "'sandbox_ids[1]'"),
        ("sandbox.search", {"limit": 0}, "'limit'"),
        ("sandbox.search", {"limit": 101}, "'limit'"),
        ("sandbox.search", {"limit": 50.0}, "'limit'"),
        ("sandbox.search", {"limit": "50"}, "'limit'"),
        ("sandbox.search", {"status": "running"}, "'status'"),
        ("sandbox.search", {"owner": ""}, "'owner'"),
        ("sandbox.start", {"owner": "a" * 257}, "'owner'"),
        ("sandbox.start", {"owner": "alice\n"}, "'owner'"),
        ("sandbox.start", {"node": "a.b"}, "'node'"),
        ("sandbox.start", {"node": ""}, "'node'"),
        ("sandbox.start", {"node": "n" * 65}, "'node'"),
        ("sandbox.find_by_session_key", {"session_api_key": ""}, "'session_api_key'"),
        ("sandbox.find_by_session_key", {"session_api_key": "k" * 257}, "'session_api_key'"),
        ("sandbox.logs", {"sandbox_id": "a", "tail_bytes": -1}, "'tail_bytes'"),
        ("sandbox.logs", {"sandbox_id": "a", "tail_bytes": (1 << 20) + 1}, "'tail_bytes'"),
        ("events.subscribe", {"after_seq": -1}, "'after_seq'"),
        ("events.subscribe", {"types": ["sandbox.running", "sandbox.nope"]}, "'types[1]'"),
        ("events.subscribe", {"sandbox_id": "a b"}, "'sandbox_id'"),
        ("events.read", {"after_seq": 0, "limit": 1001}, "'limit'"),
        ("events.read", {"after_seq": True}, "'after_seq'"),
        ("events.read", {"after_seq": 0, "types": "sandbox.running"}, "'types'"),
    ],
)
def test_values_out_of_bounds_are_bad_requests_naming_the_field(
    op: str, params: dict[str, Any], blamed: str
) -> None:
    exc = error({"id": "x", "op": op} | params)
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, "x")
    assert exc.message.startswith(blamed), exc.message


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("sandbox.get", {"sandbox_id": "A" * 64}),
        ("sandbox.batch_get", {"sandbox_ids": ["a"] * 100}),
        ("sandbox.batch_get", {"sandbox_ids": []}),
        ("sandbox.search", {"limit": 1, "status": "MISSING"}),
        ("sandbox.search", {"limit": 100}),
        ("sandbox.search", {"owner": "o" * 256}),
        ("sandbox.start", {"owner": "user@example.com"}),
        ("sandbox.find_by_session_key", {"session_api_key": "k"}),
        ("sandbox.logs", {"sandbox_id": "a", "tail_bytes": 0}),
        ("sandbox.logs", {"sandbox_id": "a", "tail_bytes": 1 << 20}),
        ("events.subscribe", {"after_seq": 0, "types": sorted(EVENT_TYPES)}),
        ("events.read", {"after_seq": 2**63 - 1, "limit": 1}),
    ],
)
def test_values_on_the_bounds_are_accepted(op: str, params: dict[str, Any]) -> None:
    assert isinstance(outcome(json.dumps({"id": 1, "op": op} | params)), Request)


def test_a_params_object_built_in_python_is_held_to_the_same_rules() -> None:
    with pytest.raises(ProtocolError) as caught:
        SandboxLogs("a", tail_bytes=-5)
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert "'tail_bytes'" in caught.value.message


# --- Encoding.


@given(request_ids, json_values)
def test_encode_ok_is_json(request_id: str | int, result: object) -> None:
    assert orjson.loads(encode_ok(request_id, result)) == {
        "id": request_id,
        "ok": True,
        "result": orjson.loads(orjson.dumps(result)),  # floats as orjson writes them
    }


@attrs.frozen
class Info:
    id: str
    urls: list[str] | None


def test_encode_ok_converts_attrs_results() -> None:
    result = [Info("a", ["u"]), None, {"nested": Info("b", None)}]
    assert orjson.loads(encode_ok(1, result))["result"] == [
        {"id": "a", "urls": ["u"]},
        None,
        {"nested": {"id": "b", "urls": None}},
    ]


@given(st.none() | request_ids, st.sampled_from(ErrorCode), st.text(max_size=20))
def test_encode_error_is_json(request_id: str | int | None, code: ErrorCode, message: str) -> None:
    extra = {"oldest_seq": 3, "sandbox": Info("a", None)}
    assert orjson.loads(encode_error(request_id, ProtocolError(code, message, **extra))) == {
        "id": request_id,
        "ok": False,
        "error": {
            "code": code.value,
            "message": message,
            "oldest_seq": 3,
            "sandbox": {"id": "a", "urls": None},
        },
    }


@given(st.text(max_size=10), json_values)
def test_event_frames_splice_the_logged_bytes(subscription: str, data: object) -> None:
    event = {"seq": 1, "data": data}
    expected = {"subscription": subscription, "event": orjson.loads(orjson.dumps(event))}
    assert orjson.loads(encode_event_frame(subscription, orjson.dumps(event))) == expected
    assert orjson.loads(encode_event_frame(subscription, event)) == expected


@given(st.text(max_size=10), st.text(max_size=10), seqs)
def test_caught_up_and_ended_frames_are_json(subscription: str, reason: str, seq: int) -> None:
    assert orjson.loads(encode_caught_up(subscription, seq)) == {
        "subscription": subscription,
        "caught_up": True,
        "seq": seq,
    }
    assert orjson.loads(encode_ended(subscription, reason, seq)) == {
        "subscription": subscription,
        "ended": True,
        "reason": reason,
        "last_seq": seq,
    }
