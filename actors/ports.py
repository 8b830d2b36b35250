"""Ports for sandboxes: never two live sandboxes on one port.

Synchronous on purpose: a reservation is one step with no checkpoint in it, so
two tasks of the trio thread can never be handed the same port. (Not for use
from other threads.)
"""

from __future__ import annotations

import socket


class PortsExhausted(Exception):
    """Every port of the range is reserved or in use by another program."""


class PortAllocator:
    """Hands out ports of ``[low, high]`` round-robin, each free on 127.0.0.1 when handed out.

    Round-robin rather than lowest-first: a port just released is handed out
    last, so a client still talking to the deleted sandbox on it does not reach
    the next one. A port whose old connections sit in TIME_WAIT counts as free
    (see ``_bindable``).
    """

    def __init__(self, low: int, high: int) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port range [{low}, {high}] is not within 1..65535")
        self.low = low
        self.high = high
        self._reserved: set[int] = set()
        self._next = low

    @property
    def reserved(self) -> frozenset[int]:
        return frozenset(self._reserved)

    def reserve(self, preferred: int | None = None) -> int:
        """Reserve and return a port: ``preferred`` if it is in range and free, else the
        next free one after the last handed out. Raises PortsExhausted if none is."""
        if preferred is not None and self._is_available(preferred):
            return self._take(preferred)
        size = self.high - self.low + 1
        if len(self._reserved) < size:  # else every port is ours already: skip the scan
            for i in range(size):
                port = self.low + (self._next - self.low + i) % size
                if self._is_available(port):
                    return self._take(port)
        raise PortsExhausted(
            f"no free port in {self.low}..{self.high} "
            f"({len(self._reserved)} reserved by sandboxes, the rest in use)"
        )

    def reserve_many(self, count: int) -> list[int]:
        """Reserve ``count`` distinct ports, all or none (PortsExhausted, with none kept)."""
        taken: list[int] = []
        try:
            for _ in range(count):
                taken.append(self.reserve())
        except PortsExhausted:
            for port in taken:
                self.release(port)
            raise
        return taken

    def release(self, port: int) -> None:
        """Make ``port`` available again (no error if it was not reserved)."""
        self._reserved.discard(port)

    def claim(self, port: int) -> bool:
        """Mark a port reserved without testing it: recovery, for a sandbox that
        already holds it. Any port is accepted, even outside the range (the range
        may have changed since). Returns False if it was reserved already."""
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not within 1..65535")
        if port in self._reserved:
            return False
        self._reserved.add(port)
        return True

    def _take(self, port: int) -> int:
        self._reserved.add(port)
        self._next = port + 1 if port < self.high else self.low
        return port

    def _is_available(self, port: int) -> bool:
        return self.low <= port <= self.high and port not in self._reserved and _bindable(port)


def _bindable(port: int) -> bool:
    # Bound with SO_REUSEADDR, as servers bind (http.server, trio, uvicorn, nginx all
    # set it): Linux then lets the bind pass over connections in TIME_WAIT, which a
    # deleted sandbox's server leaves behind for 60 s, but not over a listener, nor over
    # a connection whose own socket did not set it (an outgoing connection's local port).
    # So a port that passes here is one the sandbox's server can bind, and a small
    # port_range is not used up by the ghosts of deleted sandboxes. (A server that does
    # not set SO_REUSEADDR cannot bind over TIME_WAIT: round-robin hands a freed port
    # out last, which keeps that case to a range with no other free port.)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
