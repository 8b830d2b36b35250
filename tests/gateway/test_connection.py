"""One connection (gateway/connection.py) on a real TCP socket, its ops a test's: how a
request's reply reaches the socket."""

from __future__ import annotations

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request, TextMessage

from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from sandboxd.gateway.connection import Connection, Requests, Then, Timeouts
from sandboxd.gateway.websocket import ServerWebSocket


class StepsOf(trio.abc.Instrument):
    """Counts the steps the scheduler gives the tasks running ``Connection._serve``."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if getattr(task.coro, "cr_code", None) is Connection._serve.__code__:
            self.steps += 1


async def test_a_reply_that_needs_no_wait_goes_out_in_the_step_that_answered_it() -> None:
    # Under fan-out every trip through the scheduler waits behind every task ready
    # before it (bench/gateway.py, docs/performance.md): a reply with nothing queued
    # before it is written by the step that made it, not after one more trip.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    requests = Requests()
    in_flight_seen: list[int] = []

    async def answer(connection: Connection, request: p.Request) -> tuple[str, str, Then]:
        in_flight_seen.append(requests.in_flight)
        return p.encode_ok(request.id, {"answered": request.id}), "ok", None

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
            timeouts=Timeouts(),
        )  # fmt: skip
        steps = StepsOf()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            trio.lowlevel.add_instrument(steps)
            replies: list[dict[str, object]] = []
            for request_id in (1, 2):
                frame = orjson.dumps({"id": request_id, "op": "server.info"}).decode()
                await client.send_all(peer.send(TextMessage(data=frame)))
                while len(replies) < request_id:
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

    assert replies == [
        {"id": 1, "ok": True, "result": {"answered": 1}},
        {"id": 2, "ok": True, "result": {"answered": 2}},
    ]
    # Each request's task: one step, the answer and its reply written in it.
    assert steps.steps == 2
    # In flight while answered; not once the client has the reply.
    assert in_flight_seen == [1, 1] and requests.in_flight == 0
