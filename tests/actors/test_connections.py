"""Established connections by local port: the sock_diag dump against real sockets, its
bytes without one, and the /proc/net/tcp fallback."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from sandboxd.actors import connections as c

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:7531 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:7531 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:D431 0100007F:7531 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0100007F:7532 0100007F:D432 06 00000000:00000000 00:00000000 00000000     0        0 0 3
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000001000000:7533 00000000000000000000000001000000:D433 01 0000000
"""


def test_the_proc_tables_give_the_local_ports_of_established_sockets() -> None:
    # 30001 listens (0A) and has a connection (01); 54321 is the client's end;
    # 30002 is in TIME_WAIT (06), which is no connection.
    assert c.ports_of_table(TCP) == {30001, 54321}
    assert c.ports_of_table(TCP6) == {30003}
    assert c.ports_of_table("header only\n") == set()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener


def test_a_real_connection_is_seen_in_range_only(server: socket.socket) -> None:
    port = server.getsockname()[1]
    assert port not in c.established_ports(1, 65535)  # listening is not connected
    with socket.create_connection(("127.0.0.1", port)) as client:
        accepted, _ = server.accept()
        with accepted:
            mine = client.getsockname()[1]
            assert {port, mine} <= c.established_ports(1, 65535)
            assert port in c.established_ports(port, port)
            assert mine not in c.established_ports(port, port)  # the kernel's filter
            assert port not in c.established_ports(port + 1, 65535)
            assert port not in c.established_ports(1, port - 1)
            # The fallback says the same of these.
            assert {port, mine} <= c._from_proc_tables()
    assert port not in c.established_ports(1, 65535)


def test_ipv6_connections_are_seen() -> None:
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("::1", port)):
            accepted, _ = listener.accept()
            with accepted:
                assert port in c.established_ports(port, port)


def test_the_request_is_what_the_kernel_reads() -> None:
    request = c.dump_request(socket.AF_INET, 30000, 39999, seq=7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, seq) == (len(request), c.SOCK_DIAG_BY_FAMILY, 7)
    assert flags == c.NLM_F_REQUEST | c.NLM_F_DUMP
    family, protocol, _, states = struct.unpack_from("=BBBxI", request, 16)
    assert (family, protocol, states) == (socket.AF_INET, socket.IPPROTO_TCP, 1 << 1)
    # The filter: sport >= 30000 and sport <= 39999, after the 56-byte request.
    attr_len, attr_type = struct.unpack_from("=HH", request, 16 + 56)
    assert (attr_len, attr_type) == (4 + 16, c.INET_DIAG_REQ_BYTECODE)
    ops = struct.unpack_from("=BBHBBHBBHBBH", request, 16 + 56 + 4)
    assert ops == (c.INET_DIAG_BC_S_GE, 8, 20, 0, 0, 30000, c.INET_DIAG_BC_S_LE, 8, 12, 0, 0, 39999)


def _message(sport: int) -> bytes:
    body = struct.pack("!BBBBHH", socket.AF_INET, 1, 0, 0, sport, 40000) + bytes(64)
    return struct.pack("=IHHII", 16 + len(body), c.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def test_replies_are_read_to_done_and_errors_raised() -> None:
    done = struct.pack("=IHHII", 20, c.NLMSG_DONE, 2, 1, 0) + bytes(4)
    assert c.parse_replies(_message(30001) + _message(30002)) == ([30001, 30002], False)
    assert c.parse_replies(_message(30003) + done) == ([30003], True)
    error = struct.pack("=IHHIIi", 36, c.NLMSG_ERROR, 0, 1, 0, -1) + bytes(16)
    with pytest.raises(c.DiagError):
        c.parse_replies(error)
