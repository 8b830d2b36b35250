"""The server side of the websocket (gateway/websocket.py) on a real TCP socket: what the
socket does not take at once is written later, in order, and frames stay whole."""

from __future__ import annotations

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request, TextMessage

from sandboxd.gateway.websocket import ServerWebSocket


async def test_a_frame_the_socket_cannot_take_at_once_goes_out_whole_and_in_order() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:
        server = await listeners[0].accept()
        ws = ServerWebSocket(server, socket=server.socket, max_message_bytes=1 << 20)
        backlogs: list[bool] = []
        ws.on_backlog = lambda: backlogs.append(True)
        peer = WSConnection(ConnectionType.CLIENT)
        await client.send_all(peer.send(Request(host="127.0.0.1", target="/v1")))
        handshake = await ws.handshake()
        assert handshake is not None and handshake.path == "/v1"
        await ws.accept()

        # Far more than the socket's buffers hold while the peer reads nothing: the rest
        # waits in the websocket's buffer, behind which the next message queues.
        big = b"x" * (16 << 20)
        ws.write_text((b'"', big, b'"'))
        assert backlogs and not ws.idle
        ws.write_message('"after"')

        messages: list[str] = []
        parts: list[str] = []
        accepted = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.flush)
            while len(messages) < 2:
                peer.receive_data(await client.receive_some(1 << 20))
                for event in peer.events():
                    if isinstance(event, AcceptConnection):
                        accepted = True
                    elif isinstance(event, Message):
                        assert isinstance(event, TextMessage)
                        parts.append(event.data)
                        if event.message_finished:
                            messages.append("".join(parts))
                            parts = []
        assert accepted
        assert messages == [f'"{big.decode()}"', '"after"']
        assert ws.idle
        await server.aclose()
    for listener in listeners:
        await listener.aclose()
