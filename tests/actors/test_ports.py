"""PortAllocator with real sockets: distinct, free, round-robin, bounded."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from sandboxd.actors.ports import PortAllocator, PortsExhausted

# Below Linux's ephemeral range (32768+): no outgoing connection takes these meanwhile.
LOW, HIGH = 21000, 21199


@pytest.fixture
def listener() -> Iterator[int]:
    """A port of the range taken by another program (listening)."""
    for port in range(LOW, HIGH + 1):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        with sock:
            sock.listen()
            yield port
        return
    pytest.fail("no free port in the test range")


async def test_fifty_concurrent_reservations_get_distinct_free_ports() -> None:
    ports = PortAllocator(LOW, HIGH)
    got: list[int] = []

    async def reserve() -> None:
        await trio.lowlevel.checkpoint()  # all 50 tasks are started before any reserves
        got.append(ports.reserve())

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(reserve)
    assert len(got) == 50
    assert len(set(got)) == 50
    assert all(LOW <= port <= HIGH for port in got)
    assert ports.reserved == frozenset(got)
    for port in got:  # each one could really be bound, as a server binds
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_by_another_program_is_skipped(listener: int) -> None:
    ports = PortAllocator(listener, listener + 1)
    assert ports.reserve() == listener + 1
    with pytest.raises(PortsExhausted):
        ports.reserve()
    ports.release(listener + 1)
    assert ports.reserve(preferred=listener) == listener + 1  # preferred, but in use


def test_ports_are_handed_out_round_robin() -> None:
    ports = PortAllocator(LOW, LOW + 2)
    first = ports.reserve()
    ports.release(first)
    second = ports.reserve()
    # A released port comes back last, not at once.
    assert second != first
    third = ports.reserve()
    assert len({first, second, third}) == 3


def test_exhaustion_and_release() -> None:
    ports = PortAllocator(LOW, LOW + 2)
    taken = {ports.reserve() for _ in range(3)}
    assert len(taken) == 3
    with pytest.raises(PortsExhausted, match=f"{LOW}..{LOW + 2}"):
        ports.reserve()
    ports.release(LOW + 1)
    assert ports.reserve() == LOW + 1
    ports.release(12345)  # never reserved: no error


def test_several_ports_are_reserved_all_or_none() -> None:
    ports = PortAllocator(LOW, LOW + 4)
    first = ports.reserve_many(3)
    assert len(set(first)) == 3 and ports.reserved == frozenset(first)
    with pytest.raises(PortsExhausted):
        ports.reserve_many(3)  # two are left: neither is kept
    assert ports.reserved == frozenset(first)
    assert len(set(ports.reserve_many(2)) | set(first)) == 5


def test_preferred_port_is_used_when_free() -> None:
    ports = PortAllocator(LOW, HIGH)
    assert ports.reserve(preferred=LOW + 7) == LOW + 7
    other = ports.reserve(preferred=LOW + 7)  # taken now: another one
    assert other != LOW + 7
    assert ports.reserve(preferred=HIGH + 1) in range(LOW, HIGH + 1)  # out of range: ignored


def test_claim_marks_a_port_reserved_without_testing_it(listener: int) -> None:
    ports = PortAllocator(listener, listener)
    # Recovery: an adopted sandbox holds (listens on) its port.
    assert ports.claim(listener) is True
    assert ports.claim(listener) is False
    assert listener in ports.reserved
    with pytest.raises(PortsExhausted):
        ports.reserve()
    assert ports.claim(HIGH + 100) is True  # outside the range, e.g. the range changed
    with pytest.raises(ValueError):
        ports.claim(0)


def test_a_bad_range_is_refused() -> None:
    with pytest.raises(ValueError):
        PortAllocator(200, 100)
    with pytest.raises(ValueError):
        PortAllocator(0, 100)
    with pytest.raises(ValueError):
        PortAllocator(65000, 70000)


def time_wait_on(port: int) -> bool:
    """Whether a TCP connection with local port ``port`` sits in TIME_WAIT (proc(5): st 06)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, state = line.split()[1], line.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "06":
                return True
    return False


def leave_time_wait(port: int) -> None:
    """A connection to a server on ``port`` that the server closes first: TIME_WAIT on ``port``."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
    accepted.close()  # the server's side closes first, so its side waits
    assert client.recv(1) == b""  # its FIN arrived
    client.close()


def test_a_port_whose_old_connections_sit_in_time_wait_is_free() -> None:
    # A deleted sandbox's server leaves its closed connections in TIME_WAIT for 60 s:
    # the port is free for a new server (they set SO_REUSEADDR), and the check says so
    # (issue 8, defect 6d).
    ports = PortAllocator(LOW, HIGH)
    port = ports.reserve()
    ports.release(port)
    leave_time_wait(port)
    assert time_wait_on(port)
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the check did: refused while TIME_WAIT lasts
    assert PortAllocator(port, port).reserve() == port
    with socket.socket() as server:  # and a server can have it, as the check promised
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()


def test_a_port_held_by_a_listener_or_a_connection_is_not_free(listener: int) -> None:
    # SO_REUSEADDR lets Linux bind over TIME_WAIT, but not over a listener, nor over a
    # connection whose socket did not set it itself (an outgoing connection's port).
    with pytest.raises(PortsExhausted):
        PortAllocator(listener, listener).reserve()
    with socket.socket() as outgoing:
        # A port of the range that no connection holds, not even in TIME_WAIT.
        for port in range(LOW, HIGH + 1):
            try:
                outgoing.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        outgoing.connect(("127.0.0.1", listener))
        with pytest.raises(PortsExhausted):
            PortAllocator(port, port).reserve()
