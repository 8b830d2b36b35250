"""HTTP by hand over a real socket: h11 as the client, so the server's parser is not the judge."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import h11
import trio

from sandboxd.gateway import protocol as p


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case; the last value of a repeated one
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def http_get(
    port: int,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
) -> Reply:
    """One request on a fresh connection; the whole response, read until the server closes."""
    client = h11.Connection(h11.CLIENT)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request = h11.Request(
                method=method, target=target, headers=[("Host", "127.0.0.1"), *headers]
            )
            await stream.send_all(client.send(request) + (client.send(h11.EndOfMessage()) or b""))
            status, response_headers, body = 0, {}, b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(p.MAX_FRAME_BYTES))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return Reply(status, response_headers, body)


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")
