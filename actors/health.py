"""HTTP health checks of a sandbox: is ``GET http://127.0.0.1:{port}{path}`` answering 200?

A bare trio socket and h11 (no HTTP client library): a probe is one connect,
one request, one response, so that a refused connection, the common answer
while a sandbox is starting, costs a socket and a syscall or two.
"""

from __future__ import annotations

import h11
import trio

#: Bytes of response body read before giving up on reading the rest: only the
#: status matters, but reading a small body to its end lets the server finish
#: its write instead of getting a reset.
_BODY_LIMIT = 64 * 1024

#: Seconds between probes while a server is young: most are ready within half a
#: second, and each millisecond of lag is start latency (a refused probe costs ~0.1 ms).
_FAST_DELAY = 0.002
_FAST_PERIOD = 0.5
#: After that, backing off doubling up to this: a slow starter is not busy-polled.
_MAX_DELAY = 0.1


# The bounds below are part of the answer (a probe that times out is a failed
# probe), not a cancellation the caller would apply from outside.


async def probe(port: int, path: str, *, timeout: float) -> bool:  # noqa: ASYNC109
    """True only if the server on 127.0.0.1:``port`` answers ``GET path`` with 200."""
    with trio.move_on_after(timeout):
        try:
            return await _status(port, path or "/") == 200
        except (OSError, h11.ProtocolError):
            return False
    return False


async def _status(port: int, path: str) -> int | None:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(("127.0.0.1", port))
        conn = h11.Connection(our_role=h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=path,
            headers=[
                ("Host", f"127.0.0.1:{port}"),
                ("User-Agent", "sandboxd-health"),
                ("Connection", "close"),
            ],
        )
        await _send_all(sock, (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status: int | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await sock.recv(16384))  # b"" means EOF
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > _BODY_LIMIT:
                    return status
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) or event is h11.PAUSED:
                return status
            # InformationalResponse (1xx): keep reading for the final one.


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def wait_until_ready(
    port: int,
    path: str,
    *,
    timeout: float,  # noqa: ASYNC109
    exited: trio.Event | None = None,
    attempt_timeout: float = 2.0,
) -> bool:
    """Probe until the server answers 200; False on ``timeout`` or once ``exited`` is set.

    The first probe goes out at once (a fast server is ready within
    milliseconds of its spawn), then every 2 ms for half a second, then
    doubling up to 100 ms between probes. Each probe is bounded by
    ``attempt_timeout``, so a server that accepted a connection and hung does
    not hold the whole wait. Setting
    ``exited`` (the process is gone, it will never answer) ends the wait early,
    even in the middle of a probe.
    """
    ready = False
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            if exited is not None:
                nursery.start_soon(_cancel_when_set, exited, nursery.cancel_scope)
            delay, fast_until = _FAST_DELAY, trio.current_time() + _FAST_PERIOD
            while not await probe(port, path, timeout=attempt_timeout):
                await trio.sleep(delay)
                if trio.current_time() > fast_until:
                    delay = min(delay * 2, _MAX_DELAY)
            ready = True
            nursery.cancel_scope.cancel()
    return ready


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
