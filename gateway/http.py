"""HTTP/1.1 on the websocket's port, as plain code: a request head in, bytes of a response out.

The front door (front_door.py) feeds the first bytes of every new connection to a
``HeadReader`` until it yields the request's head. Then the connection either goes to the
websocket server, with every byte read so far replayed (``HeadReader.received``), or is
answered here with one response and closed (``Connection: close``: no keep-alive, so a
connection holds at most one request and nothing of it outlives the answer).

h11 does the parsing and the writing, in the manner of wsproto: it holds at most
``MAX_HEAD_BYTES`` of an unfinished head (431 beyond that), refuses what is not HTTP/1.x
(400), and frames the response. Nothing here touches a socket, so every rule is tested
without one.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

import attrs
import h11

#: The most of a request head held before it is complete: a websocket handshake with a
#: token in its query is well under 1 KiB; a longer head is refused with 431.
MAX_HEAD_BYTES: Final = 64 << 10


class MalformedRequest(Exception):
    """The bytes are not an HTTP/1.x request head this server takes; answer ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attrs.frozen
class RequestHead:
    """A parsed request line and headers (names in lower case, as h11 gives them)."""

    method: str
    target: str  # path and query, as sent
    headers: tuple[tuple[bytes, bytes], ...]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header ``name`` (lower case), or None."""
        return next((value for key, value in self.headers if key == name), None)

    @property
    def wants_websocket(self) -> bool:
        """Whether it asks to upgrade to a websocket (RFC 6455 4.2.1: ``Upgrade: websocket``)."""
        return any(
            key == b"upgrade" and token.strip().lower() == b"websocket"
            for key, value in self.headers
            for token in value.split(b",")
        )


@attrs.frozen
class Response:
    """What to answer; ``encode`` adds Content-Length, Connection: close and the defaults."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def text(status: int, message: str, *headers: tuple[str, str]) -> Response:
    """A plain-text response of one line."""
    return Response(status, (message + "\n").encode(), headers=headers)


#: Sent with every response: the daemon's answers are never sniffed, framed, or cached
#: by a proxy on the way (they change with every request: metrics, a live page).
DEFAULT_HEADERS: Final = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
)


class HeadReader:
    """One connection's first request head, fed in pieces as they arrive."""

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._received = bytearray()
        self._method = b""

    @property
    def received(self) -> bytes:
        """Every byte fed so far: what the websocket server must read first."""
        return bytes(self._received)

    def feed(self, data: bytes) -> RequestHead | None:
        """Add bytes (b"" for the end of the stream); the head once it is complete, else None.

        None after the end of the stream means the peer left before sending anything.
        Raises ``MalformedRequest`` for anything else that is not a whole request head.
        """
        self._received += data
        self._h11.receive_data(data)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
                raise MalformedRequest(
                    status, f"the request head is over {MAX_HEAD_BYTES} bytes"
                ) from None
            # h11 says what is wrong, quoting the client's bytes: cut short, as they may be long.
            reason = str(exc) if len(str(exc)) <= 100 else str(exc)[:97] + "..."
            raise MalformedRequest(status, f"this is not an HTTP/1.1 request: {reason}") from None
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):  # h11 gives a Request first, or an error
            raise MalformedRequest(400, "this is not an HTTP/1.1 request")
        self._method = event.method
        try:
            target = event.target.decode("ascii")
        except UnicodeDecodeError:  # h11 allows obs-text in the target; URLs are ASCII
            raise MalformedRequest(400, "the request target must be ASCII") from None
        return RequestHead(event.method.decode("ascii"), target, tuple(event.headers))

    def encode(self, response: Response) -> bytes:
        """The bytes of ``response`` to this connection's request (or to its malformed head)."""
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Connection", "close"),
            *DEFAULT_HEADERS,
            *response.headers,
        ]
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        data = self._h11.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        assert data is not None
        # h11 knows a HEAD response has no body, and refuses one.
        if self._method != b"HEAD" and response.body:
            data += self._h11.send(h11.Data(data=response.body)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        return data
