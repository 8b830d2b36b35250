"""What one websocket frame costs the server: trio-websocket's ``send_message`` beside the
gateway's ``ServerWebSocket.write_text`` (gateway/websocket.py), in the same run.

    cd /tmp && /work/main/.venv/bin/python /work/main/bench/frames.py [--events 20]

The server sends ``--rounds`` batch frames of ``--events`` stored events to each of
``--conns`` websockets, one connection after the other, and counts its own thread's CPU
time (``time.thread_time``: the peers, in another process, are not in it; the kernel's
work for a send on loopback, the receiver's TCP included, is). The peers handshake by
hand and read and drop bytes, so they cost the server nothing but the reads.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import socket
import sys
import time

import trio
from trio_websocket import WebSocketConnection, wrap_server_stream

from sandboxd.gateway import protocol as p
from sandboxd.gateway.websocket import ServerWebSocket

#: A stored record of about the size of the bench's failing starts' events.
EVENT = json.dumps(
    {
        "seq": 123456,
        "ts": "2026-11-29T18:30:28.698251Z",
        "sandbox_id": "V-BYPWyOx20hOeh0DlLFEw",
        "by": "alice",
        "data": {"type": "sandbox.start_failed", "reason": "cannot run: no such file"},
    }
).encode()


def peers(port: int, count: int) -> None:
    """Open ``count`` websockets by hand, then read and drop everything until closed."""
    selector = selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    left = count
    while left:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                selector.unregister(sock)
                sock.close()
                left -= 1


async def measure(kind: str, args: argparse.Namespace) -> dict[str, float]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    command = [sys.executable, __file__, "--peers", str(port), "--conns", str(args.conns)]
    peer_process = await trio.lowlevel.open_process(command)
    streams: list[trio.SocketStream] = []
    library: list[WebSocketConnection] = []
    ours: list[ServerWebSocket] = []
    events = [EVENT] * args.events
    async with trio.open_nursery() as nursery:
        for _ in range(args.conns):
            stream = await listeners[0].accept()
            assert isinstance(stream, trio.SocketStream)
            streams.append(stream)
            if kind == "trio-websocket":
                request = await wrap_server_stream(nursery, stream)
                library.append(await request.accept())
            else:
                ws = ServerWebSocket(stream, socket=stream.socket, max_message_bytes=1 << 20)
                assert await ws.handshake() is not None
                await ws.accept()
                ours.append(ws)
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(args.rounds):
            if kind == "trio-websocket":
                for i, connection in enumerate(library):
                    await connection.send_message(p.encode_events_frame(f"s{i}", events))
            else:
                for i, ws in enumerate(ours):
                    ws.write_text(p.events_frame_parts(f"s{i}", events))
                    if not ws.idle:
                        await ws.flush()
            await trio.lowlevel.checkpoint()
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        # The peers never answer a close: the sockets are simply closed.
        for stream in streams:
            stream.socket.close()
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    with trio.fail_after(30):
        await peer_process.wait()
    frames = args.rounds * args.conns
    return {"cpu_us_per_frame": cpu / frames * 1e6, "wall_us_per_frame": wall / frames * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--events", type=int, default=20, help="events per frame (default 20)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, alternating")
    parser.add_argument(
        "--quick", action="store_true", help="100 websockets, 5 rounds, one run of each"
    )
    parser.add_argument("--peers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.conns, args.rounds, args.repeat = 100, 5, 1
    if args.peers:
        peers(args.peers, args.conns)
        return 0
    results: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for kind in ("trio-websocket", "sandboxd"):
            measured = trio.run(measure, kind, args)
            for name, value in measured.items():
                results.setdefault(f"{kind}_{name}", []).append(round(value, 1))
    line: dict[str, object] = {k.replace("-", "_"): v for k, v in results.items()}
    line.update(
        events_per_frame=args.events,
        conns=args.conns,
        quick=args.quick,
        load_average=os.getloadavg()[0],
    )
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
