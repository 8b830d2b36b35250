"""The gateway on in-memory streams (tests/gateway/harness.py), the daemon's own wiring behind
it: concurrency, limits, slow and silent clients, failures contained, drain and shutdown.

The tests that start no sandbox run on virtual time (the autojump clock): their timeouts
are the real defaults, 20 s pings and 30 s send timeouts, and take no real time.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from sandboxd.events import types as ev
from sandboxd.gateway import connection, fanout, ops
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from sandboxd.gateway.errors import translate
from tests.gateway.harness import Harness, open_harness
from tests.gateway.support import masked_frame
from tests.support import TOKENS, eventually

ALICE, ROOT = TOKENS["alice"], TOKENS["root"]
registry_admin = User(None, admin=True)


def new_id() -> str:
    return "g-" + uuid.uuid4().hex[:12]


def control_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The whole frames at the start of ``data`` from the server (unmasked, payloads under
    126 bytes, as control frames are): (opcode, payload) each."""
    frames = []
    while len(data) >= 2 and len(data) >= 2 + (data[1] & 0x7F):
        size = data[1] & 0x7F
        frames.append((data[0] & 0x0F, data[2 : 2 + size]))
        data = data[2 + size :]
    return frames


def close_code(frame: bytes) -> int:
    """The status code of a close frame from the server (unmasked, payload under 126 bytes)."""
    assert frame[:1] == b"\x88", frame[:16]
    return int.from_bytes(frame[2:4], "big")


# --- Requests: concurrent, bounded, failures contained (real sandboxes: real time) --------


async def test_requests_on_one_connection_run_concurrently(harness: Harness) -> None:
    async with harness.peer(ALICE) as peer:
        # A start that waits out its ready_timeout, then a read behind it.
        await peer.send({"id": "slow", "op": "sandbox.start", "spec_id": "stuck"})
        await peer.send({"id": "fast", "op": "server.info"})
        first = await peer.recv()
        assert first["id"] == "fast" and first["ok"] is True
        slow = await peer.recv()
        assert slow["id"] == "slow"
        assert slow["error"]["code"] == "start_failed"
        assert slow["error"]["sandbox"]["status"] == "ERROR"


async def test_more_than_64_in_flight_get_busy_at_once(harness: Harness) -> None:
    requests = harness.gateway.requests
    async with harness.peer(ALICE) as peer:
        for i in range(p.MAX_IN_FLIGHT):
            await peer.send({"id": i, "op": "sandbox.start", "spec_id": "stuck"})
        # Every one of those is now in flight: read, and none can settle before its
        # child has waited out the spec's ready_timeout (3 s), however slow the spawns.
        await eventually(
            lambda: requests.in_flight == p.MAX_IN_FLIGHT, what="64 requests in flight"
        )
        for i in range(3):
            await peer.send({"id": f"extra-{i}", "op": "server.info"})
        with trio.fail_after(1):  # long before any start settles
            for i in range(3):
                reply = await peer.recv()
                assert reply["id"] == f"extra-{i}"
                assert reply["error"]["code"] == "busy"
        codes = [(await peer.recv())["error"]["code"] for _ in range(p.MAX_IN_FLIGHT)]
        assert codes == ["start_failed"] * p.MAX_IN_FLIGHT
        # Answered: room again.
        assert (await peer.call("server.info"))["user"] == "alice"


class ServeSteps(trio.abc.Instrument):
    """The requests that got a task of their own (``Connection._serve``), by step."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if getattr(task.coro, "cr_code", None) is connection.Connection._serve.__code__:
            self.steps += 1


async def test_reads_of_the_projection_are_answered_by_the_reader(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness.peer(ALICE) as peer:
        steps = ServeSteps()
        trio.lowlevel.add_instrument(steps)
        assert (await peer.call("server.info"))["user"] == "alice"
        assert (await peer.call("sandbox.get", sandbox_id="g-none")) is None
        assert (await peer.call("spec.get", spec_id="no-such-spec")) is None
        assert (await peer.call("sandbox.search"))["items"] == []
        assert (await peer.call("spec.list")) is not None
        assert steps.steps == 0  # no task: answered as they were read
        reply = await peer.request("sandbox.pause", sandbox_id="g-none")
        assert reply["error"]["code"] == "not_found"
        assert steps.steps >= 1  # an op that may wait: a task of its own
        trio.lowlevel.remove_instrument(steps)


async def test_a_failing_handler_is_internal_and_contained(
    harness: Harness,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the registry")

    monkeypatch.setattr(harness.gateway.registry, "get", broken)
    async with harness.peer(ALICE) as peer, harness.peer(ROOT) as other:
        with caplog.at_level(logging.ERROR, logger="sandboxd.gateway.ops"):
            reply = await peer.request("sandbox.get", sandbox_id="x")
        assert reply["error"]["code"] == "internal"
        assert "registry" not in reply["error"]["message"]  # no internals on the wire
        assert any(
            r.exc_info and "a bug in the registry" in str(r.exc_info[1]) for r in caplog.records
        ), "logged with its traceback"
        # The connection, and every other, carry on.
        assert (await peer.call("server.info"))["user"] == "alice"
        assert (await other.call("server.info"))["user"] == "root"


async def test_an_op_runs_to_its_end_when_its_client_leaves(harness: Harness) -> None:
    sandbox_ids = [new_id() for _ in range(5)]
    async with harness.peer(ALICE) as peer:
        for sandbox_id in sandbox_ids:
            await peer.send({"id": sandbox_id, "op": "sandbox.start", "spec_id": "sleep",
                             "sandbox_id": sandbox_id})  # fmt: skip
    # Gone before any reply: every start still completes, and is whole.
    registry = harness.gateway.registry
    await eventually(
        lambda: all(
            (info := registry.get(registry_admin, i)) is not None and info.status == "RUNNING"
            for i in sandbox_ids
        ),
        what="every start to finish",
    )
    async with harness.peer(ALICE) as peer:
        for sandbox_id in sandbox_ids:
            assert await peer.call("sandbox.delete", sandbox_id=sandbox_id) is True


def test_errors_are_translated_once_by_name() -> None:
    from sandboxd.actors import errors
    from sandboxd.events.errors import Gone, LogUnavailable

    for exc, code in (
        (errors.BadRequest("b"), "bad_request"),
        (errors.NotFound("n"), "not_found"),
        (errors.Conflict("c"), "conflict"),
        (errors.LimitExceeded("l"), "limit_exceeded"),
        (errors.Unavailable("u"), "unavailable"),
        (LogUnavailable("the disk is full"), "unavailable"),
    ):
        translated = translate(exc)
        assert translated is not None and translated.code == code
        assert translated.message == str(exc)
    gone = translate(Gone(42))
    assert gone is not None and gone.code == "gone" and gone.extra == {"oldest_seq": 42}
    sandbox = object()
    failed = translate(errors.StartFailed("it exited", sandbox))  # type: ignore[arg-type]
    assert failed is not None and failed.code == "start_failed"
    assert failed.extra == {"sandbox": sandbox}
    # Anything else is a bug: the caller logs it and answers `internal`.
    assert translate(RuntimeError("bug")) is None
    assert translate(errors.SandboxError("no such code")) is None


# --- Subscriptions ------------------------------------------------------------------------


async def test_subscriptions_caught_up_once_and_unsubscribe(harness: Harness) -> None:
    async with harness.peer(ROOT) as peer:
        result = await peer.call("events.subscribe", after_seq=0)
        sub = result["subscription"]
        frames = await peer.sub_frames(sub, lambda f: bool(f.get("caught_up")))
        assert frames[-1]["seq"] >= result["head_seq"]
        sandbox_id = new_id()
        await peer.call("sandbox.start", spec_id="sleep", sandbox_id=sandbox_id)
        live = await peer.sub_frames(
            sub, lambda f: f.get("event", {}).get("type") == "sandbox.running"
        )
        assert not any(f.get("caught_up") for f in live)
        assert await peer.call("events.unsubscribe", subscription=sub) is True
        await peer.call("sandbox.delete", sandbox_id=sandbox_id)
        # After the reply to unsubscribe, no frame of it: a ping-pong proves the order.
        await peer.call("server.info")
        assert not [
            f
            for f in peer.frames
            if f.get("subscription") == sub
            and "event" in f
            and f["event"]["type"] == "sandbox.deleted"
        ]


async def test_subscription_limit_per_connection(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness.peer(ROOT) as peer:
        for _ in range(ops.MAX_SUBSCRIPTIONS):
            await peer.call("events.subscribe")
        reply = await peer.request("events.subscribe")
        assert reply["error"]["code"] == "limit_exceeded"


async def test_a_user_s_connections_are_capped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        open_harness(tmp_path / "state", max_connections_per_user=3) as harness,
        contextlib.AsyncExitStack() as alices,
    ):
        peers = [await alices.enter_async_context(harness.peer(ALICE)) for _ in range(3)]
        stream, refused = await harness.handshake(ALICE)
        assert refused.startswith(b"HTTP/1.1 429 "), refused
        assert refused.endswith(
            b"user alice has 3 connections open, the limit max_connections_per_user is 3;"
            b" close one first\n"
        )
        await stream.aclose()
        async with harness.peer(ROOT) as root:  # another user's are another count
            assert (await root.call("server.info"))["user"] == "root"
        # One closed, one may open.
        await peers[0].ws.aclose()
        await eventually(lambda: harness.gateway.connection_count == 2, what="the one closed")
        async with harness.peer(ALICE) as alice:
            assert (await alice.call("server.info"))["user"] == "alice"
        # The refusals counted nothing: all three places are free again.
        for peer in peers[1:]:
            await peer.ws.aclose()
        await eventually(lambda: harness.gateway.connection_count == 0, what="all closed")
        async with contextlib.AsyncExitStack() as again:
            for _ in range(3):
                peer = await again.enter_async_context(harness.peer(ALICE))
                assert (await peer.call("server.info"))["user"] == "alice"


# --- Silent and slow clients, on virtual time ---------------------------------------------


async def test_a_silent_client_is_pinged_then_closed(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    timeouts = harness.gateway.timeouts
    began = trio.current_time()  # before the handshake: the connection's silence starts after
    stream = await harness.raw(ALICE)
    got = b""
    # Read (so the server is not blocked writing) but never answer its ping. Frame by
    # frame: the ping's payload is random bytes, which may hold a close frame's 0x88.
    while 0x8 not in [opcode for opcode, _ in control_frames(got)]:
        got += await stream.receive_some(4096)
    frames = control_frames(got)
    assert frames[0][0] == 0x9, "a ping first"
    waited = trio.current_time() - began
    assert timeouts.ping_interval + timeouts.ping_timeout <= waited < 42, waited
    close = next(payload for opcode, payload in frames if opcode == 0x8)
    assert int.from_bytes(close[:2], "big") == p.CLOSE_NO_PONG
    await stream.send_all(masked_frame(0x8, close[:2]))  # answered, as a client must
    await eventually(lambda: harness.gateway.connection_count == 0, what="the connection closed")
    await stream.aclose()


async def test_a_client_that_answers_pings_stays(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    timeouts = harness.gateway.timeouts
    async with harness.peer(ALICE) as peer:
        # Many ping intervals of silence from the client's application; its
        # websocket answers every ping.
        await trio.sleep(10 * (timeouts.ping_interval + timeouts.ping_timeout))
        assert (await peer.call("server.info"))["user"] == "alice"
        assert harness.gateway.connection_count == 1


async def test_a_client_that_stops_reading_is_closed_and_slows_no_one(
    harness: Harness, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, log = harness.gateway, harness.gateway.log
    async with harness.peer(ROOT) as reader:
        head = log.head_seq
        # The stalled client subscribes, then never reads again: with no buffer
        # between it and the server, the server's very first write blocks.
        stalled = await harness.raw(ROOT, lockstep=True)
        began = trio.current_time()
        await stalled.send_all(masked_frame(0x1, b'{"id": 1, "op": "events.subscribe"}'))
        await eventually(lambda: log.subscriber_count >= 1, what="the subscription")
        sub = (await reader.call("events.subscribe"))["subscription"]
        count = 400  # more than the stalled connection's queue of 256 frames
        frames: list[dict[str, Any]] = []

        def last(frame: dict[str, Any]) -> bool:
            return bool(frame.get("event", {}).get("seq") == head + count)

        async def read_all() -> None:
            frames.extend(await reader.sub_frames(sub, last))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            for _ in range(count // 40):
                pending = ev.PendingEvent(None, None, ev.DaemonStopping("x" * 5000))
                await log.append_many([pending] * 40)
        # The reader gets every one, while the other connection is stuck.
        seqs = [f["event"]["seq"] for f in frames if "event" in f]
        assert seqs == list(range(head + 1, head + count + 1))
        # The stuck one is closed once it has taken nothing for send_timeout.
        await eventually(
            lambda: gateway.connection_count == 1, within=60, what="the stalled one closed"
        )
        assert trio.current_time() - began >= gateway.timeouts.send_timeout
        assert log.subscriber_count == 1  # the reader's: the stalled one's went with it
        await stalled.aclose()
    # Dropped, not failed: nothing was sent after the cut-off frame.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_peer_that_ignores_the_close_frame_is_dropped(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    # trio-websocket refuses a frame over the limit with 1009 and then waits on
    # the peer; the gateway closes the stream itself, Timeouts.close later.
    stream = await harness.raw(ALICE)
    await stream.send_all(masked_frame(0x1, b'"' + b"x" * (1 << 20) + b'"'))
    began = trio.current_time()
    got = b""
    while chunk := await stream.receive_some(65536):  # never answering the close
        got += chunk
    assert close_code(got) == p.CLOSE_TOO_BIG
    assert trio.current_time() - began >= harness.gateway.timeouts.close
    await eventually(lambda: harness.gateway.connection_count == 0, what="the connection gone")
    await stream.aclose()


# --- Drain and shutdown -------------------------------------------------------------------


async def test_drain_lets_in_flight_ops_finish_and_refuses_new_ones(harness: Harness) -> None:
    gateway = harness.gateway
    async with harness.peer(ALICE) as peer, trio.open_nursery() as nursery:
        await peer.send({"id": "in-flight", "op": "sandbox.start", "spec_id": "stuck"})
        await eventually(lambda: gateway.requests.in_flight == 1, what="the start in flight")
        drained = trio.Event()

        async def drain() -> None:
            await gateway.drain()
            drained.set()

        nursery.start_soon(drain)
        await eventually(lambda: gateway.draining, what="draining")
        refused = await peer.request("server.info")
        assert refused["error"]["code"] == "unavailable"
        # The listener is closed: new connections are refused.
        await eventually(lambda: harness.listener.closed, what="the listener closed")
        with pytest.raises(ConnectionRefusedError):
            harness.listener.connect()
        assert not drained.is_set()
        finished = await peer.reply_to("in-flight")
        assert finished["error"]["code"] == "start_failed"
        with trio.fail_after(5):
            await drained.wait()


async def test_close_all_ends_subscriptions_then_closes_1001(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness.peer(ROOT) as peer:
        subs = [(await peer.call("events.subscribe", after_seq=0))["subscription"]]
        await peer.sub_frames(subs[0], lambda f: bool(f.get("caught_up")))
        subs += [(await peer.call("events.subscribe"))["subscription"] for _ in range(15)]
        # As the daemon stops: its last event, then close_all at once. The event
        # was published before the pumps are cut: each delivers it, then `ended`.
        pending = ev.PendingEvent(None, None, ev.DaemonStopping("received SIGTERM"))
        stopping = await harness.gateway.log.append(pending)  # type: ignore[attr-defined]
        await harness.gateway.close_all()
        for sub in subs:
            frames = await peer.sub_frames(sub, lambda f: bool(f.get("ended")))
            assert frames[-2].get("event", {}).get("seq") == stopping.seq, (sub, frames[-2:])
            assert frames[-1]["reason"] == "shutdown"
            assert frames[-1]["last_seq"] == stopping.seq == harness.gateway.log.head_seq
        with pytest.raises(ConnectionClosed) as closed:
            await peer.recv()
        assert closed.value.reason.code == p.CLOSE_GOING_AWAY


# --- Batch frames, and replies ahead of subscription frames ---------------------------------


async def _append(harness: Harness, count: int, size: int = 10) -> list[int]:
    log = harness.gateway.log
    seqs: list[int] = []
    for _ in range(count // size):
        pending = ev.PendingEvent(None, None, ev.DaemonStopping("batch"))
        seqs += [e.seq for e in await log.append_many([pending] * size)]  # type: ignore[attr-defined]
    return seqs


def _seqs_of(frames: list[dict[str, Any]]) -> list[int]:
    seqs = []
    for frame in frames:
        if "events" in frame:
            seqs += [event["seq"] for event in frame["events"]]
        elif "event" in frame:
            seqs.append(frame["event"]["seq"])
    return seqs


async def test_a_batch_subscription_gets_its_events_several_to_a_frame(harness: Harness) -> None:
    # Real time: the pump's pace between frames is what gathers the live events.
    history = await _append(harness, 3000)
    async with harness.peer(ROOT) as peer:
        sub = (await peer.call("events.subscribe", after_seq=0, batch=True))["subscription"]
        frames = await peer.sub_frames(sub, lambda f: bool(f.get("caught_up")))
        head = frames[-1]["seq"]
        assert not any("event" in f for f in frames)  # only "events" frames
        assert _seqs_of(frames)[-len(history) :] == history
        assert _seqs_of(frames) == list(range(1, head + 1))
        assert len(frames) - 1 < head / 100  # catching up: pages of events a frame
        # Live: events gather while the pump waits between frames.
        live = await _append(harness, 400)
        frames = await peer.sub_frames(sub, lambda f: _seqs_of([f])[-1:] == live[-1:])
        assert _seqs_of(frames) == live
        assert len(frames) < len(live) / 10  # 40 appends of 10 take well under 4 s
        # Without "batch": an event a frame, as ever.
        plain = (await peer.call("events.subscribe", after_seq=head))["subscription"]
        frames = await peer.sub_frames(plain, lambda f: bool(f.get("caught_up")))
        assert [f["event"]["seq"] for f in frames[:-1]] == live


async def test_live_firehoses_get_whole_batches_joined_once_for_their_group(
    harness: Harness,
) -> None:
    # Real time, as above. A firehose in each of the fan-out's groups, two in the first
    # two groups: once live, each round takes the log's batches whole, and the two of a
    # group that stand at the same place write the same run's bytes, joined once.
    fan_out = harness.gateway.fanout
    peers = fan_out.GROUPS + 2  # within the user's 16 connections
    async with contextlib.AsyncExitStack() as stack:
        subs = []
        for _ in range(peers):
            peer = await stack.enter_async_context(harness.peer(ROOT))
            sub = (await peer.call("events.subscribe", batch=True))["subscription"]
            subs.append((peer, sub))
        live: list[int] = []
        for _ in range(4):  # bursts, so that runs of several batches gather in a round
            live += await _append(harness, 200)
        for peer, sub in subs:
            frames = await peer.sub_frames(sub, lambda f: _seqs_of([f])[-1:] == live[-1:])
            assert _seqs_of(frames) == live  # every event once, in order, each subscriber
    assert fan_out.runs.made > 0 and fan_out.runs.reused > 0


async def test_the_writer_takes_replies_ahead_of_subscription_frames() -> None:
    lanes = connection._Lanes(3)
    assert lanes.put_nowait(connection.SUBSCRIPTIONS, ("e1", 1))
    assert lanes.put_nowait(connection.SUBSCRIPTIONS, ("e2", 1))
    assert lanes.put_nowait(connection.REPLIES, ("r1", 1))
    assert [await lanes.get() for _ in range(2)] == [("r1", 1), ("e1", 1)]
    assert lanes.put_nowait(connection.SUBSCRIPTIONS, ("e3", 1))
    assert lanes.put_nowait(connection.SUBSCRIPTIONS, ("e4", 1))
    with pytest.raises(trio.WouldBlock):  # a full lane holds its producer back
        lanes.put_nowait(connection.SUBSCRIPTIONS, ("e5", 1))
    assert lanes.put_nowait(connection.REPLIES, ("r2", 1))  # the other lane has room
    assert [await lanes.get() for _ in range(4)] == [("r2", 1), ("e2", 1), ("e3", 1), ("e4", 1)]
    assert lanes.close() == []
    assert not lanes.put_nowait(connection.REPLIES, ("late", 1))  # the writer is gone


async def test_the_fan_out_serves_each_group_in_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fan_out = fanout.FanOut(0.1)
    assert [fan_out.group() for _ in range(12)] == [*range(10), 0, 1]
    served: list[tuple[int, float]] = []
    woken: list[int] = []

    def deliver(group: int, stir: fanout.Stir) -> fanout.Turn:
        # Stays parked on its first turn (it "sent" from there), woken on its second.
        served.append((group, round(trio.current_time() - started, 3)))
        second = sum(g == group for g, _ in served) == 2
        return fanout.Turn.WAKE if second else fanout.Turn.KEEP

    async def pump(group: int) -> None:
        await fan_out.park(object(), group, partial(deliver, group))
        woken.append(group)

    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(fan_out.run)
        async with trio.open_nursery() as pumps:
            for group in (7, 0, 3):
                pumps.start_soon(pump, group)
        nursery.cancel_scope.cancel()
    # One group every 10 ms, in turn: each parked pump served once per 100 ms, and
    # woken (its task scheduled again) only when its delivery asks for it.
    assert served == [(0, 0.01), (3, 0.04), (7, 0.08), (0, 0.11), (3, 0.14), (7, 0.18)]
    assert woken == [0, 3, 7]
    assert fan_out.woken == 3 and fan_out.parked == 0


class _StepsOf(trio.abc.Instrument):
    """Counts the steps of the tasks whose name ends with ``suffix``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task.name.endswith(self.suffix)


async def test_the_fan_out_sleeps_while_no_pump_is_parked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fan_out = fanout.FanOut(0.1)
    steps = _StepsOf("FanOut.run")
    trio.lowlevel.add_instrument(steps)
    served: list[float] = []

    def deliver(stir: fanout.Stir) -> fanout.Turn:
        served.append(round(trio.current_time() - parked_at, 3))
        return fanout.Turn.WAKE

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fan_out.run)
            await trio.sleep(60)  # a minute with nothing parked: the task is not woken
            assert steps.steps == 1
            parked_at = trio.current_time()
            await fan_out.park(object(), 0, deliver)  # served within a pace once parked
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert served and served[0] <= 0.1


async def test_an_idle_pump_leaves_the_rounds_and_a_stir_serves_it_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fan_out = fanout.FanOut(0.1)
    steps = _StepsOf("FanOut.run")
    served: list[float] = []
    stirs: list[fanout.Stir] = []

    def deliver(stir: fanout.Stir) -> fanout.Turn:
        served.append(round(trio.current_time(), 3))
        if len(served) == 1:
            stirs.append(stir)  # as a subscription keeps it until its next event
            return fanout.Turn.IDLE
        return fanout.Turn.WAKE

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fan_out.run)
        async with trio.open_nursery() as pumps:
            pumps.start_soon(fan_out.park, object(), 5, deliver)
            await trio.sleep(0.5)
            assert served == [0.06] and fan_out.idle == 1  # its group's turn found nothing
            trio.lowlevel.add_instrument(steps)
            await trio.sleep(10)  # out of the rounds: nothing to serve, the task sleeps
            assert steps.steps == 0
            trio.lowlevel.remove_instrument(steps)
            stirs.pop()()  # an event came: served at once, not at group 5's next turn
        assert served == [0.06, 10.5]
        # A pump that left while idle: its stir, come late, finds nothing.
        with trio.move_on_after(1):
            await fan_out.park(object(), 0, lambda stir: stirs.append(stir) or fanout.Turn.IDLE)
        stirs.pop()()
        assert fan_out.parked == 0 and fan_out.woken == 1
        nursery.cancel_scope.cancel()


async def test_a_parked_pump_cancelled_leaves_the_fan_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fan_out = fanout.FanOut(0.1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fan_out.run)
        with trio.move_on_after(0.25):
            await fan_out.park(object(), 0, lambda stir: fanout.Turn.KEEP)
        assert fan_out.parked == 0
        nursery.cancel_scope.cancel()


async def test_a_delivery_that_raises_wakes_its_pump_and_the_fan_out_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fan_out = fanout.FanOut(0.1)
    turns: list[str] = []

    def broken(stir: fanout.Stir) -> fanout.Turn:
        turns.append("broken")
        raise RuntimeError("a bug")

    def fine(stir: fanout.Stir) -> fanout.Turn:
        turns.append("fine")
        return fanout.Turn.WAKE if len(turns) >= 4 else fanout.Turn.KEEP

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fan_out.run)
        async with trio.open_nursery() as pumps:
            pumps.start_soon(fan_out.park, object(), 0, broken)
            pumps.start_soon(fan_out.park, object(), 0, fine)
        nursery.cancel_scope.cancel()
    assert turns.count("broken") == 1 and turns.count("fine") >= 1
    assert fan_out.woken == 2 and fan_out.parked == 0
    assert "its pump takes over" in caplog.text
