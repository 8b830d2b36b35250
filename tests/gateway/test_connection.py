"""One connection (gateway/connection.py) on a real TCP socket, its ops a test's: how a
request's reply reaches the socket, and which requests get a task of their own."""

from __future__ import annotations

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request, TextMessage

from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from sandboxd.gateway.connection import Answer, AnswerNow, Connection, Requests, Then, Timeouts
from sandboxd.gateway.websocket import ServerWebSocket


class StepsOf(trio.abc.Instrument):
    """Counts the steps the scheduler gives the tasks running ``Connection._serve``."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if getattr(task.coro, "cr_code", None) is Connection._serve.__code__:
            self.steps += 1


async def exchange(
    frames: list[dict[str, object]],
    answer: Answer,
    requests: Requests,
    steps: StepsOf,
    answer_now: AnswerNow | None = None,
) -> list[dict[str, object]]:
    """A Connection on a real TCP socket: ``frames`` sent in turn, each one's reply read
    before the next goes; the replies. ``steps`` counts the requests' tasks' steps."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    replies: list[dict[str, object]] = []
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:
        server = await listeners[0].accept()
        ws = ServerWebSocket(server, socket=server.socket, max_message_bytes=1 << 20)
        peer = WSConnection(ConnectionType.CLIENT)
        await client.send_all(peer.send(Request(host="127.0.0.1", target="/v1")))
        assert await ws.handshake() is not None
        await ws.accept()
        peer.receive_data(await client.receive_some(1 << 16))
        assert isinstance(next(peer.events()), AcceptConnection)
        connection = Connection(
            ws, User(None, admin=True), "test", answer=answer, requests=requests,
            timeouts=Timeouts(), answer_now=answer_now,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            trio.lowlevel.add_instrument(steps)
            for sent, frame in enumerate(frames, 1):
                await client.send_all(peer.send(TextMessage(data=orjson.dumps(frame).decode())))
                while len(replies) < sent:
                    peer.receive_data(await client.receive_some(1 << 16))
                    for event in peer.events():
                        assert isinstance(event, Message) and event.message_finished
                        assert isinstance(event.data, str)
                        replies.append(orjson.loads(event.data))
            trio.lowlevel.remove_instrument(steps)
            nursery.cancel_scope.cancel()
        await server.aclose()
    for listener in listeners:
        await listener.aclose()
    return replies


async def test_a_reply_that_needs_no_wait_goes_out_in_the_step_that_answered_it() -> None:
    # Under fan-out every trip through the scheduler waits behind every task ready
    # before it (bench/gateway.py, docs/performance.md): a reply with nothing queued
    # before it is written by the step that made it, not after one more trip.
    requests = Requests()
    in_flight_seen: list[int] = []

    async def answer(connection: Connection, request: p.Request) -> tuple[str, str, Then]:
        in_flight_seen.append(requests.in_flight)
        return p.encode_ok(request.id, {"answered": request.id}), "ok", None

    steps = StepsOf()
    frames: list[dict[str, object]] = [{"id": i, "op": "server.info"} for i in (1, 2)]
    replies = await exchange(frames, answer, requests, steps)
    assert replies == [
        {"id": 1, "ok": True, "result": {"answered": 1}},
        {"id": 2, "ok": True, "result": {"answered": 2}},
    ]
    # Each request's task: one step, the answer and its reply written in it.
    assert steps.steps == 2
    # In flight while answered; not once the client has the reply.
    assert in_flight_seen == [1, 1] and requests.in_flight == 0


async def test_what_the_reader_can_answer_at_once_gets_no_task() -> None:
    requests = Requests()
    counted: list[str] = []

    def answer_now(connection: Connection, request: p.Request) -> tuple[str, str] | None:
        if request.op != "server.info":
            return None
        counted.append(request.op)
        return p.encode_ok(request.id, "now"), "ok"

    async def answer(connection: Connection, request: p.Request) -> tuple[str, str, Then]:
        assert request.op != "server.info"
        await trio.lowlevel.checkpoint()
        return p.encode_ok(request.id, "in a task"), "ok", None

    steps = StepsOf()
    frames: list[dict[str, object]] = [
        {"id": 1, "op": "server.info"},
        {"id": 2, "op": "spec.list"},
        {"id": 3, "op": "server.info"},
    ]
    replies = await exchange(frames, answer, requests, steps, answer_now)
    assert [reply["result"] for reply in replies] == ["now", "in a task", "now"]
    assert counted == ["server.info", "server.info"]
    # Only spec.list had a task (two steps: its checkpoint, then its reply).
    assert steps.steps == 2 and requests.in_flight == 0
