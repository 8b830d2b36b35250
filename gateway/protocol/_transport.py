"""The transport's numbers: how big a frame may be, how many requests may wait, close codes."""

from typing import Final

#: A text frame's UTF-8 payload may be this long (a frame of exactly 1 MiB is accepted).
MAX_FRAME_BYTES: Final = 1 << 20
#: Unanswered requests one connection may have before the next ones get `busy`.
MAX_IN_FLIGHT: Final = 64

CLOSE_GOING_AWAY: Final = 1001  # the daemon shuts down
CLOSE_UNSUPPORTED: Final = 1003  # a binary frame
CLOSE_NOT_READING: Final = 1008  # the client stopped reading (docs/protocol.md)
CLOSE_TOO_BIG: Final = 1009  # a frame over MAX_FRAME_BYTES
CLOSE_NO_PONG: Final = 1011  # no pong to a ping in time

#: A client's limit on one handshake: past it the daemon counts as unreachable.
CONNECT_TIMEOUT: Final = 10.0
#: A client's limit on a frame it receives: replies may be far bigger than a request may be
#: (events.read's pages, sandbox.logs once escaped as JSON).
MAX_REPLY_BYTES: Final = 64 << 20
