"""One protocol model for both ends, without a socket: what the server encodes, a client's
parse_frame and Call.result read back as the same typed values, or as one exception per code.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.events import types as ev
from sandboxd.events.codec import encode
from sandboxd.events.projection import Status
from sandboxd.gateway import protocol as p
from sandboxd.gateway.protocol import calls
from tests.events.strategies import events, records

texts = st.text(max_size=12)
usages = st.builds(
    p.Usage,
    cpu_seconds=st.none() | st.floats(0, 1e6),
    memory_bytes=st.none() | st.integers(0, 2**40),
    pids=st.integers(0, 2**22),
)
sandbox_infos = st.builds(
    p.SandboxInfo,
    id=texts,
    created_by_user_id=st.none() | texts,
    sandbox_spec_id=texts,
    status=st.sampled_from(Status),
    session_api_key=st.none() | texts,
    exposed_urls=st.none() | st.lists(records(ev.ExposedUrl), max_size=2),
    created_at=texts,
    updated_at=texts,
    pid=st.none() | st.integers(1, 2**22),
    port=st.integers(1, 65535),
    working_dir=texts,
    error=st.none() | texts,
    version=st.integers(1, 2**40),
    usage=st.none() | usages,
)
spec_infos = st.builds(
    p.SpecInfo,
    id=texts,
    command=st.lists(texts, min_size=1, max_size=3),
    initial_env=st.dictionaries(texts, texts, max_size=2),
    working_dir=texts,
    health_check_path=texts,
    ready_timeout=st.floats(0.1, 600),
    created_at=texts,
)

# Each op's call, and what its result may be: the server's values, encoded as the server does.
CASES: list[tuple[p.Call[Any], st.SearchStrategy[Any]]] = [
    (calls.start(spec_id="s", owner="oh-user"), sandbox_infos),
    (calls.get("a"), st.none() | sandbox_infos),
    (calls.find_by_session_key("k"), st.none() | sandbox_infos),
    (calls.batch_get(["a", "b"]), st.lists(st.none() | sandbox_infos, max_size=3)),
    (
        calls.stats(["a", "b"]),
        st.lists(st.none() | st.builds(p.SandboxUsage, texts, st.none() | usages), max_size=3),
    ),
    (
        calls.search(limit=5, owner="oh-user"),
        st.builds(p.SearchPage, st.lists(sandbox_infos, max_size=3), st.none() | texts),
    ),
    (calls.pause("a"), sandbox_infos),
    (calls.resume("a"), sandbox_infos),
    (calls.delete("a"), st.just(True)),
    (calls.logs("a", tail_bytes=10), st.builds(p.Logs, st.text(), st.booleans())),
    (calls.spec_list(), st.lists(spec_infos, max_size=3)),
    (calls.spec_get("s"), st.none() | spec_infos),
    (
        calls.server_info(),
        st.builds(
            p.ServerDetails,
            version=texts,
            protocol=st.just(1),
            user=st.none() | texts,
            admin=st.booleans(),
            head_seq=st.integers(0, 2**40),
            started_at=texts,
            boundary=st.none() | st.sampled_from(["cgroup2", "cgroup1", "markers"]),
            isolation=st.none() | texts,
            limits=st.none() | st.dictionaries(texts, texts, max_size=3),
        ),
    ),
    (calls.subscribe(0), st.builds(p.Subscribed, texts, st.integers(0, 2**40))),
    (calls.unsubscribe("s1"), st.just(True)),
]


def test_every_op_has_a_call() -> None:
    assert {call.op for call, _ in CASES} | {"events.read"} == set(p.OPS)


@given(st.sampled_from(range(len(CASES))).flatmap(lambda i: st.tuples(st.just(i), CASES[i][1])))
def test_what_the_server_encodes_a_client_reads_back(case: tuple[int, Any]) -> None:
    index, value = case
    call = CASES[index][0]
    # The request goes out as the server parses it...
    assert p.parse_request(call.encode(7)) == p.Request(7, call.op, call.params)
    # ... and the reply comes back as the value the server had.
    reply = p.parse_frame(p.encode_ok(7, value))
    assert reply == p.Reply(7, True, result=orjson.loads(p.encode_ok(7, value))["result"])
    assert isinstance(reply, p.Reply)
    assert call.result(reply) == value


@given(st.lists(events(), max_size=4), st.integers(0, 2**40))
def test_an_event_page_is_the_log_s_records_decoded(page: list[ev.Event], after: int) -> None:
    stored = [orjson.Fragment(encode(event)) for event in page]
    reply = p.parse_frame(p.encode_ok("r", p.EventPage(stored, after)))
    assert isinstance(reply, p.Reply)
    decoded = calls.read_events(0).result(reply)
    assert decoded == p.EventPage(page, after)


@given(st.sampled_from(p.ErrorCode), st.text(max_size=20))
def test_an_error_reply_is_the_exception_of_its_code(code: p.ErrorCode, message: str) -> None:
    reply = p.parse_frame(p.encode_error("r", p.ProtocolError(code, message, oldest_seq=3)))
    assert isinstance(reply, p.Reply) and not reply.ok
    with pytest.raises(p.ClientError) as raised:
        calls.server_info().result(reply)
    assert raised.value.code == code
    assert raised.value.message == (message or code)
    assert raised.value.error["oldest_seq"] == 3


def test_start_failed_carries_the_sandbox() -> None:
    info = p.SandboxInfo("a", "u", "s", Status.ERROR, None, None, "t", "t", None, 1, "/w", "x", 2)
    error = p.ProtocolError(p.ErrorCode.START_FAILED, "It exited.", sandbox=info)
    reply = p.parse_frame(p.encode_error(1, error))
    assert isinstance(reply, p.Reply)
    with pytest.raises(p.StartFailedError) as failed:
        calls.start().result(reply)
    assert failed.value.sandbox == info


@given(texts, st.integers(0, 2**40), texts)
def test_subscription_frames_round_trip(subscription: str, seq: int, reason: str) -> None:
    assert p.parse_frame(p.encode_caught_up(subscription, seq)) == p.CaughtUpFrame(
        subscription, seq
    )
    assert p.parse_frame(p.encode_ended(subscription, reason, seq)) == p.EndedFrame(
        subscription, reason, seq
    )


@given(events())
def test_an_event_frame_holds_the_stored_event(event: ev.Event) -> None:
    frame = p.parse_frame(p.encode_event_frame("s1", encode(event)))
    assert isinstance(frame, p.EventFrame)
    assert (frame.subscription, frame.seq) == ("s1", event.seq)
    assert frame.event() == event


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)


@given(
    json_values
    | st.fixed_dictionaries(
        {"id": json_values, "ok": json_values},
        optional={"result": json_values, "error": json_values},
    )
    | st.fixed_dictionaries(
        {"subscription": json_values},
        optional={
            "event": json_values,
            "caught_up": json_values,
            "seq": json_values,
            "ended": json_values,
            "last_seq": json_values,
        },
    )
)
def test_any_frame_gives_a_frame_or_a_malformed_frame_error(value: Any) -> None:
    try:
        frame = p.parse_frame(orjson.dumps(value))
    except p.MalformedFrameError as exc:
        assert "protocol.md" in exc.message
    else:
        assert isinstance(frame, p.Reply | p.EventFrame | p.CaughtUpFrame | p.EndedFrame)


@pytest.mark.parametrize("text", ["", "nope", "[1]", '{"id": 1}', '{"id": 1.5, "ok": true}'])
def test_frames_that_are_none_of_protocol_md_s(text: str) -> None:
    with pytest.raises(p.MalformedFrameError, match=r"protocol\.md"):
        p.parse_frame(text)


def test_a_result_of_the_wrong_shape_is_malformed() -> None:
    reply = p.Reply(1, True, result={"items": "not a list"})
    with pytest.raises(p.MalformedFrameError, match=r"sandbox\.search"):
        calls.search().result(reply)
    with pytest.raises(p.MalformedFrameError):
        calls.delete("a").result(p.Reply(1, True, result="yes"))


def test_a_call_is_checked_before_it_is_sent() -> None:
    with pytest.raises(p.BadRequestError, match="'sandbox_id'"):
        calls.get("not an id")
    with pytest.raises(p.BadRequestError, match="'limit'"):
        calls.search(limit=500)
    with pytest.raises(p.BadRequestError, match=r"'types\[0\]'"):
        calls.subscribe(types=["sandbox.nope"])


def test_errors_from_replies() -> None:
    for code, cls in (
        ("bad_request", p.BadRequestError),
        ("unknown_op", p.UnknownOpError),
        ("not_found", p.NotFoundError),
        ("conflict", p.ConflictError),
        ("start_failed", p.StartFailedError),
        ("limit_exceeded", p.LimitExceededError),
        ("gone", p.GoneError),
        ("busy", p.BusyError),
        ("unavailable", p.UnavailableError),
        ("internal", p.InternalError),
    ):
        error = p.error_from_reply({"code": code, "message": "Why."})
        assert type(error) is cls and error.code == code and str(error) == "Why."
    gone = p.error_from_reply({"code": "gone", "message": "Old.", "oldest_seq": 7})
    assert isinstance(gone, p.GoneError) and gone.oldest_seq == 7
    # A code of a newer server is still a ClientError, with its fields.
    newer = p.error_from_reply({"code": "quota", "message": "Later.", "retry_after": 3})
    assert type(newer) is p.ClientError and newer.error["retry_after"] == 3


def test_events_of_a_newer_server_decode() -> None:
    raw = {
        "seq": 3,
        "ts": "2026-11-26T11:32:19.123456Z",
        "type": "sandbox.paused",
        "sandbox_id": "a",
        "by": None,
        "data": {},
    }
    event = p.decode_event(raw)  # without "v"
    assert event is not None and event.seq == 3 and isinstance(event.data, ev.SandboxPaused)
    assert p.decode_event({**raw, "v": 1, "trace_id": "x"}) == event  # a new envelope field
    assert p.decode_event({**raw, "type": "sandbox.hibernated"}) is None  # a new type: skipped
    with pytest.raises(p.ClientError, match="event 3"):
        p.decode_event({**raw, "data": {"unexpected": 1}})


def test_the_protocol_needs_no_trio() -> None:
    # What an asyncio client builds on: importing the model starts no trio.
    code = "import sys, sandboxd.gateway.protocol; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_sandbox_of_a_newer_server_decodes() -> None:
    """Fields the protocol grows are skipped, in an exposed URL (a msgspec Struct of the
    event catalogue) as in the SandboxInfo around it; a missing one is malformed."""
    info = p.converter.unstructure(
        p.SandboxInfo(
            "a",
            None,
            "s",
            Status.RUNNING,
            "k",
            [ev.ExposedUrl("A", "u")],
            "t",
            "t",
            1,
            80,
            "/w",
            None,
            7,
        )
    )
    info["exposed_urls"][0]["label"] = "new"
    info["region"] = "new"
    sandbox = calls.get("a").result(p.Reply(1, True, result=info))
    assert sandbox is not None and sandbox.exposed_urls == [ev.ExposedUrl("A", "u")]
    del info["exposed_urls"][0]["url"]
    with pytest.raises(p.MalformedFrameError, match=r"sandbox\.get"):
        calls.get("a").result(p.Reply(1, True, result=info))
