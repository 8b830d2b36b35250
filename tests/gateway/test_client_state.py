"""What both clients remember without I/O (protocol/_exchanges.py, protocol/_resume.py):
replies routed by id whatever their order, and a subscription that resumes across any cuts
delivering each event once, in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.events import types as ev
from sandboxd.events.codec import encode
from sandboxd.gateway import protocol as p
from sandboxd.gateway.protocol import _resume as resume


def reply(request_id: int, result: object = True) -> str:
    return p.encode_ok(request_id, result)


def event_frame(subscription: str, seq: int) -> str:
    event = ev.Event(seq, "2026-11-26T11:32:19.123456Z", "a", None, ev.SandboxPaused())
    return p.encode_event_frame(subscription, encode(event))


@given(st.permutations(range(8)))
def test_replies_reach_their_callers_in_any_order(order: list[int]) -> None:
    exchanges: p.Exchanges[str] = p.Exchanges()
    ids = [exchanges.open(f"caller {i}") for i in range(8)]
    for i in order:
        routed = exchanges.route(reply(ids[i], i))
        assert routed is not None
        waiter, answer = routed
        assert waiter == f"caller {i}" and answer.result == i
    assert len(exchanges) == 0


def test_frames_that_are_nobody_s_are_dropped() -> None:
    exchanges: p.Exchanges[str] = p.Exchanges()
    gone = exchanges.open("gave up")
    waiting = exchanges.open("waits")
    exchanges.close(gone)
    assert exchanges.route(reply(gone)) is None  # its caller gave up
    assert exchanges.route(reply(999)) is None  # never asked
    assert exchanges.route(event_frame("s1", 4)) is None  # a subscription's
    assert exchanges.route(p.encode_caught_up("s1", 4)) is None
    with pytest.raises(p.MalformedFrameError):
        exchanges.route("[]")
    assert exchanges.drain() == ["waits"] and len(exchanges) == 0
    assert exchanges.route(reply(waiting)) is None


def subscribe(resumption: p.Resumption, subscription: str, head: int) -> int | None:
    """One (re)connect: the request resumption sends, and the server's reply to it."""
    call = resumption.subscribe_call()
    request = p.parse_request(call.encode(p.SUBSCRIBE_ID))
    assert isinstance(request.params, p.EventsSubscribe)
    frame = p.encode_ok(p.SUBSCRIBE_ID, p.Subscribed(subscription, head))
    answer = resumption.subscribe_reply(frame)
    assert answer is not None
    resumption.subscribed(call, answer)
    return request.params.after_seq


def record(seq: int) -> bytes:
    return encode(ev.Event(seq, "2026-11-26T11:32:19.123456Z", "a", None, ev.SandboxPaused()))


@given(
    st.integers(0, 50),
    st.lists(
        st.tuples(st.integers(1, 30), st.integers(0, 5), st.booleans(), st.integers(0, 40)),
        max_size=6,
    ),
)
def test_a_resumed_subscription_delivers_each_event_once_in_order(
    start: int, connections: list[tuple[int, int, bool, int]]
) -> None:
    """Each connection delivers some events, one a frame or several (a batch), then is
    cut, perhaps before the application took all it received; the server may repeat the
    last few (frames in flight when the client asked again): the application sees each
    event once, in order."""
    resumption = p.Resumption.of(start, batch=True)
    delivered: list[int] = []
    head = start
    for n, (fresh, repeated, batched, taken) in enumerate(connections):
        after = subscribe(resumption, f"s{n}", head)
        assert after == (delivered[-1] if delivered else start)
        assert after is not None
        # A frame of the connection before is not this subscription's.
        assert resumption.receive(event_frame(f"s{n - 1}", after + 1)) is None
        assert resumption.next_event() is None
        seqs = range(max(start + 1, after + 1 - repeated), after + 1 + fresh)
        if batched:
            frames = [p.encode_events_frame(f"s{n}", [record(seq) for seq in seqs])]
        else:
            frames = [event_frame(f"s{n}", seq) for seq in seqs]
        for frame in frames:
            assert resumption.receive(frame) is None
        # The application takes some of what came, then the connection is cut.
        for _ in range(taken):
            event = resumption.next_event()
            if event is None:
                break
            delivered.append(event.seq)
        head = after + fresh
    assert delivered == list(range(start + 1, start + 1 + len(delivered)))
    assert resumption.reconnects == max(0, len(connections) - 1)


def test_a_stream_from_now_resumes_from_where_it_began() -> None:
    resumption = p.Resumption.of(None, types=["sandbox.paused"])
    assert subscribe(resumption, "s1", 40) is None
    assert resumption.head_seq == 40 and resumption.last_seq == 40
    assert subscribe(resumption, "s1", 57) == 40  # not from the new now


def test_caught_up_and_ended() -> None:
    resumption = p.Resumption.of(0)
    subscribe(resumption, "s1", 3)
    assert resumption.receive(p.encode_caught_up("s1", 3)) is None
    assert resumption.caught_up
    ended = resumption.receive(p.encode_ended("s1", "shutdown", 3))
    assert isinstance(ended, p.Ended) and ended.reason == "shutdown"
    with pytest.raises(p.GoneError):
        call = resumption.subscribe_call()
        gone = p.ProtocolError(p.ErrorCode.GONE, "Too old.", oldest_seq=9)
        answer = resumption.subscribe_reply(p.encode_error(p.SUBSCRIBE_ID, gone))
        assert answer is not None
        resumption.subscribed(call, answer)


def test_the_reconnect_policy() -> None:
    assert list(p.reconnect_delays()) == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert len(list(p.reconnect_delays())) == resume.RECONNECT_ATTEMPTS
    assert p.worth_retrying(p.ConnectError("down", "ws://x"))
    assert p.worth_retrying(p.ConnectionLostError("cut"))
    assert p.worth_retrying(p.UnavailableError("shutting down"))
    assert p.worth_retrying(p.BusyError("busy"))
    assert not p.worth_retrying(p.AuthenticationError("token", "ws://x"))
    assert not p.worth_retrying(p.GoneError("old"))
    assert "gave up after 10 attempts: cut" in str(p.gave_up(p.ConnectionLostError("cut")))
