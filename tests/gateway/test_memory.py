"""Memory stays bounded whatever a client does: issue 8, defect 4, against a real daemon.

One user opens the most connections it may, each with the most subscriptions
a connection may hold, all from seq 0 over a history of a few MB, and reads
nothing. The daemon's RSS, measured by psutil from outside, must stay within
the bounds docs/protocol.md gives, and one more connection of that user is
refused.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import psutil
import trio

from sandboxd.events import types as ev
from sandboxd.events.store import open_store
from sandboxd.gateway.connection import READ_SLOTS, SEND_QUEUE_BYTES
from sandboxd.gateway.ops import MAX_SUBSCRIPTIONS
from tests.daemon_process import DaemonProcess
from tests.gateway.support import Peer, make_config, masked_frame
from tests.support import TOKENS

ALICE, BOB, ROOT = TOKENS["alice"], TOKENS["bob"], TOKENS["root"]
CONNECTIONS = 6
HISTORY_BYTES = 2_500_000
MiB = 1 << 20


async def write_history(state_dir: Path) -> int:
    """alice's sandboxes, started and deleted, until the log holds HISTORY_BYTES."""
    command = ["/opt/agent/bin/python3", "-m", "agent_server.main"] + [
        f"--option-{i}=value-{i}-of-a-realistic-length" for i in range(10)
    ]
    i = 0
    async with open_store(state_dir) as store:
        while sum(p.stat().st_size for p in (state_dir / "events").iterdir()) < HISTORY_BYTES:
            batch = []
            for _ in range(100):
                sandbox_id = f"history-{i:06d}"
                working_dir = f"/var/lib/sandboxd/sandboxes/{sandbox_id}"
                batch += [
                    ev.PendingEvent(
                        sandbox_id,
                        "alice",
                        ev.SandboxCreated("sleep", "alice", working_dir, 30000 + i % 1000),
                    ),
                    ev.PendingEvent(
                        sandbox_id, "alice", ev.ProcessStarted(4000 + i, 4000 + i, 1.5, command)
                    ),
                    ev.PendingEvent(sandbox_id, "alice", ev.SandboxDeleted(False)),
                ]
                i += 1
            await store.append_many(batch)
        return store.log.head_seq


def handshake(port: int, token: str) -> tuple[socket.socket, bytes]:
    """A websocket by hand whose receive buffer is small: the kernel keeps little of what
    the daemon sends, so what the client does not read stays in the daemon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            "GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        assert chunk, response
        response += chunk
    if match := re.search(rb"(?i)content-length: *(\d+)", response):  # a refusal's body
        while len(response.partition(b"\r\n\r\n")[2]) < int(match[1]):
            response += sock.recv(4096)
    return sock, response


def frames(sock: socket.socket) -> list[bytes]:
    """The text frames the server sends, read one at a time (server frames are unmasked)."""

    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "the daemon closed the connection"
            data += chunk
        return data

    while True:
        head = exactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", exactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", exactly(8))[0]
        payload = exactly(size)
        if head[0] & 0x0F == 0x1:
            yield payload


def quiet_rss(process: psutil.Process, *, within: float) -> float:
    """The daemon's peak RSS until its CPU has been idle for a second (its work is done or
    blocked on the clients), in MiB; fails if it is not idle within ``within`` s."""
    deadline = time.monotonic() + within
    peak = 0.0
    cpu = sum(process.cpu_times()[:2])
    idle_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)  # a sampling interval of the measurement, not a synchronisation
        peak = max(peak, process.memory_info().rss / MiB)
        now = sum(process.cpu_times()[:2])
        if now - cpu > 0.02:
            cpu, idle_since = now, time.monotonic()
        elif time.monotonic() - idle_since >= 1.0:
            return peak
    raise AssertionError(f"the daemon did not settle within {within} s")


def test_unread_subscriptions_hold_bounded_memory_and_connections_are_capped(
    tmp_path: Path,
) -> None:
    daemon = DaemonProcess(
        tmp_path, make_config(tmp_path / "state", max_connections_per_user=CONNECTIONS)
    )
    head = trio.run(write_history, daemon.state_dir)
    daemon.start_blocking()
    attackers: list[socket.socket] = []
    try:
        assert daemon.process is not None
        process = psutil.Process(daemon.process.pid)
        with Peer(daemon.url, ROOT) as root:  # every code path the attack takes, warmed up
            after = 0
            while after < head:
                after = root.call("events.read", after_seq=after)["next_after_seq"]
            sub = root.call("events.subscribe", after_seq=0)["subscription"]
            root.sub_frames(sub, lambda f: bool(f.get("caught_up")), timeout=60)
        before = quiet_rss(process, within=20)

        for _ in range(CONNECTIONS):
            sock, response = handshake(daemon.port, ALICE)
            assert response.startswith(b"HTTP/1.1 101"), response
            attackers.append(sock)
            for i in range(MAX_SUBSCRIPTIONS):
                frame = b'{"id": %d, "op": "events.subscribe", "after_seq": 0}' % i
                sock.sendall(masked_frame(0x1, frame))
        peak = quiet_rss(process, within=30)
        grown = peak - before

        # The bound docs/protocol.md gives per connection, and some room for the
        # subscriptions' own objects, the tasks and the allocator.
        per_connection = SEND_QUEUE_BYTES + READ_SLOTS * 4 * MiB
        bound = CONNECTIONS * per_connection / MiB + 16
        assert grown < bound, f"RSS grew by {grown:.0f} MiB under the attack (bound {bound:.0f})"

        # The attack was real: every subscription was taken and is sending history.
        replies = 0
        for payload in frames(attackers[0]):
            if payload.startswith(b'{"id":'):
                assert b'"ok":true' in payload, payload
                replies += 1
                if replies == MAX_SUBSCRIPTIONS:
                    break
        # One more connection of alice's is refused; bob is another user.
        sock, response = handshake(daemon.port, ALICE)
        sock.close()
        assert response.startswith(b"HTTP/1.1 429"), response
        assert b"max_connections_per_user" in response
        with Peer(daemon.url, BOB) as bob:
            assert bob.call("server.info")["user"] == "bob"
    finally:
        for sock in attackers:
            sock.close()
        daemon.stop()
    assert "Traceback" not in daemon.output(), daemon.output()
