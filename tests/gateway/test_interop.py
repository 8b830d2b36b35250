"""protocol.md, driven by a client that is not ours: the `websockets` package, by hand.

The daemon is `sandboxd serve --config F` in a subprocess, as a deployment runs
it; nothing of sandboxd is imported on the client's side of these tests.
"""

from __future__ import annotations

import http.client
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.daemon_process import DaemonProcess
from tests.gateway.support import Peer, make_config
from tests.support import TOKENS

ALICE, BOB, ROOT = TOKENS["alice"], TOKENS["bob"], TOKENS["root"]

SANDBOX_FIELDS = {
    "id",
    "created_by_user_id",
    "sandbox_spec_id",
    "status",
    "session_api_key",
    "exposed_urls",
    "created_at",
    "updated_at",
    "pid",
    "port",
    "working_dir",
    "error",
    "version",
}
EVENT_FIELDS = {"seq", "ts", "type", "sandbox_id", "by", "data"}


def new_id() -> str:
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture
def alice(daemon_process: DaemonProcess) -> Iterator[Peer]:
    with Peer(daemon_process.url, ALICE) as peer:
        yield peer


@pytest.fixture
def root(daemon_process: DaemonProcess) -> Iterator[Peer]:
    with Peer(daemon_process.url, ROOT) as peer:
        yield peer


# --- Transport and authentication -------------------------------------------------------


def handshake_status(port: int, path: str, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "GET",
            path,
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
                **headers,
            },
        )
        return connection.getresponse().status
    finally:
        connection.close()


def test_handshake_needs_a_token(daemon_process: DaemonProcess) -> None:
    port = daemon_process.port
    assert handshake_status(port, "/v1", {}) == 401
    assert handshake_status(port, "/v1", {"Authorization": "Bearer not-a-token"}) == 401
    assert handshake_status(port, "/v1", {"Authorization": f"Basic {ALICE}"}) == 401
    assert handshake_status(port, "/v1", {"Authorization": f"Bearer {ALICE}"}) == 101
    assert handshake_status(port, f"/v1?token={ALICE}", {}) == 101
    assert handshake_status(port, "/v1?token=wrong", {}) == 401
    # The one resource is /v1.
    assert handshake_status(port, "/v2", {"Authorization": f"Bearer {ALICE}"}) == 404
    assert handshake_status(port, "/", {"Authorization": f"Bearer {ALICE}"}) == 404


def test_no_websocket_without_a_token(daemon_process: DaemonProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        Peer(daemon_process.url, None)
    assert refused.value.response.status_code == 401


def test_token_in_the_query_for_browsers(daemon_process: DaemonProcess) -> None:
    with Peer(daemon_process.url, BOB, query=True) as bob:
        info = bob.call("server.info")
    assert info["user"] == "bob"
    assert info["admin"] is False


def test_server_info(root: Peer) -> None:
    info = root.call("server.info")
    assert set(info) == {
        "version",
        "protocol",
        "user",
        "admin",
        "head_seq",
        "started_at",
        "boundary",  # the extensions of docs/protocol.md: the boundary in force, ...
        "isolation",
        "limits",
        "node",  # ... and this daemon's node id, the live nodes of its cluster (none here)
        "nodes",
    }
    assert isinstance(info["node"], str) and info["node"] and info["nodes"] is None
    assert info["boundary"] in ("cgroup2", "cgroup1", "markers")
    assert info["isolation"] == ("dynamic" if os.geteuid() == 0 else "none (daemon not root)")
    assert set(info["limits"]) == {"memory_max", "pids_max", "cpu_max"}
    assert info["protocol"] == 1
    assert info["user"] == "root"
    assert info["admin"] is True
    assert isinstance(info["head_seq"], int) and info["head_seq"] >= 1  # daemon.started
    assert info["started_at"].endswith("Z")


def test_binary_frame_closes_with_1003(alice: Peer) -> None:
    alice.ws.send(b'{"id": 1, "op": "server.info"}')
    with pytest.raises(ConnectionClosed) as closed:
        alice.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


def test_frame_over_1_mib_closes_with_1009(alice: Peer) -> None:
    alice.send({"id": 1, "op": "server.info", "pad": "x" * (1 << 20)})
    with pytest.raises(ConnectionClosed) as closed:
        alice.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_frame_of_1_mib_in_bytes_but_fewer_characters_closes_with_1009(alice: Peer) -> None:
    # 2 bytes per character: under the limit in characters, over it in bytes.
    alice.ws.send(
        json.dumps({"id": 1, "op": "server.info", "pad": "é" * 600_000}, ensure_ascii=False)
    )
    with pytest.raises(ConnectionClosed) as closed:
        alice.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_a_frame_just_under_1_mib_is_a_request(alice: Peer) -> None:
    frame = json.dumps({"id": 7, "op": "server.info", "pad": ""})
    frame = frame.replace('""', '"' + "x" * ((1 << 20) - len(frame)) + '"')
    assert len(frame.encode()) == 1 << 20
    alice.send(frame)
    reply = alice.reply_to(7)
    assert reply["error"]["code"] == "bad_request"
    assert "pad" in reply["error"]["message"]


# --- Requests and replies ---------------------------------------------------------------


def test_ids_are_echoed_strings_or_integers(alice: Peer) -> None:
    for request_id in ("a-string", 0, -5, 2**53, "", "ünïcödé"):
        alice.send({"id": request_id, "op": "server.info"})
        assert alice.reply_to(request_id)["ok"] is True


def test_bad_frames_get_bad_request_with_id_null(alice: Peer) -> None:
    for frame in (
        "not json",
        "[1, 2]",
        '"text"',
        "{}",
        '{"id": 1.5, "op": "server.info"}',
        '{"id": null, "op": "server.info"}',
        '{"id": [1], "op": "server.info"}',
    ):
        alice.send(frame)
        reply = alice.recv()
        assert reply["id"] is None, frame
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        assert reply["error"]["message"]
    # The connection stays open after every error.
    assert alice.call("server.info")["user"] == "alice"


def test_params_are_checked_and_named(alice: Peer) -> None:
    error = alice.error("sandbox.get")
    assert error["code"] == "bad_request" and "sandbox_id" in error["message"]
    error = alice.error("sandbox.get", sandbox_id=5)
    assert error["code"] == "bad_request" and "sandbox_id" in error["message"]
    error = alice.error("sandbox.get", sandbox_id="x", color="red")
    assert error["code"] == "bad_request" and "color" in error["message"]
    error = alice.error("sandbox.search", limit=0)
    assert error["code"] == "bad_request" and "limit" in error["message"]
    error = alice.error("sandbox.batch_get", sandbox_ids=["a"] * 101)
    assert error["code"] == "bad_request" and "sandbox_ids" in error["message"]
    error = alice.error("no.such.op")
    assert error["code"] == "unknown_op"


# --- Sandboxes --------------------------------------------------------------------------


def test_sandbox_life(alice: Peer) -> None:
    sandbox_id = new_id()
    info = alice.call("sandbox.start", spec_id="sleep", sandbox_id=sandbox_id, env={"A": "1"})
    assert set(info) >= SANDBOX_FIELDS
    assert info["id"] == sandbox_id
    assert info["status"] == "RUNNING"
    assert info["created_by_user_id"] == "alice"
    assert info["sandbox_spec_id"] == "sleep"
    assert info["session_api_key"]
    assert info["exposed_urls"] and info["exposed_urls"][0]["url"].startswith("http://127.0.0.1:")
    assert isinstance(info["pid"], int)

    assert alice.call("sandbox.get", sandbox_id=sandbox_id)["status"] == "RUNNING"
    batch = alice.call("sandbox.batch_get", sandbox_ids=[sandbox_id, "nope", sandbox_id])
    assert [b and b["id"] for b in batch] == [sandbox_id, None, sandbox_id]

    paused = alice.call("sandbox.pause", sandbox_id=sandbox_id)
    assert paused["status"] == "PAUSED"
    assert paused["session_api_key"] is None and paused["exposed_urls"] is None
    assert alice.call("sandbox.pause", sandbox_id=sandbox_id)["status"] == "PAUSED"  # no-op
    assert alice.call("sandbox.resume", sandbox_id=sandbox_id)["status"] == "RUNNING"
    assert alice.call("sandbox.resume", sandbox_id=sandbox_id)["status"] == "RUNNING"  # no-op

    logs = alice.call("sandbox.logs", sandbox_id=sandbox_id, tail_bytes=10)
    assert set(logs) == {"data", "truncated"}

    error = alice.error("sandbox.start", spec_id="sleep", sandbox_id=sandbox_id)
    assert error["code"] == "conflict"

    assert alice.call("sandbox.delete", sandbox_id=sandbox_id) is True
    assert alice.call("sandbox.get", sandbox_id=sandbox_id) is None
    assert alice.error("sandbox.delete", sandbox_id=sandbox_id)["code"] == "not_found"
    assert alice.error("sandbox.pause", sandbox_id=sandbox_id)["code"] == "not_found"
    assert alice.error("sandbox.logs", sandbox_id=sandbox_id)["code"] == "not_found"


def test_start_without_wait_replies_starting(alice: Peer) -> None:
    sandbox_id = new_id()
    info = alice.call("sandbox.start", spec_id="stuck", sandbox_id=sandbox_id, wait=False)
    assert info["status"] == "STARTING"
    assert alice.error("sandbox.pause", sandbox_id=sandbox_id)["code"] == "conflict"
    assert alice.call("sandbox.delete", sandbox_id=sandbox_id) is True


def test_start_failed_carries_the_sandbox(alice: Peer) -> None:
    sandbox_id = new_id()
    error = alice.error("sandbox.start", spec_id="fails", sandbox_id=sandbox_id)
    assert error["code"] == "start_failed"
    assert error["message"]
    assert error["sandbox"]["id"] == sandbox_id
    assert error["sandbox"]["status"] == "ERROR"
    assert error["sandbox"]["error"]
    assert alice.call("sandbox.delete", sandbox_id=sandbox_id) is True


def test_unknown_spec_is_not_found(alice: Peer) -> None:
    assert alice.error("sandbox.start", spec_id="no-such-spec")["code"] == "not_found"


def test_search_pages_newest_first(alice: Peer) -> None:
    ids = [new_id() for _ in range(5)]
    for sandbox_id in ids:
        alice.call("sandbox.start", spec_id="sleep", sandbox_id=sandbox_id)
    seen: list[str] = []
    page_id = None
    while True:
        params = {"limit": 2} if page_id is None else {"limit": 2, "page_id": page_id}
        page = alice.call("sandbox.search", **params)
        assert set(page) == {"items", "next_page_id"}
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        page_id = page["next_page_id"]
        if page_id is None:
            break
        # Paging while sandboxes come and go neither repeats nor skips.
        alice.call("sandbox.start", spec_id="sleep", sandbox_id=new_id())
    mine = [i for i in seen if i in ids]
    assert mine == list(reversed(ids))
    assert len(seen) == len(set(seen))
    running = alice.call("sandbox.search", status="RUNNING")["items"]
    assert all(item["status"] == "RUNNING" for item in running)
    assert alice.call("sandbox.search", status="PAUSED")["items"] == [] or all(
        item["status"] == "PAUSED"
        for item in alice.call("sandbox.search", status="PAUSED")["items"]
    )
    for item in alice.call("sandbox.search")["items"]:
        alice.call("sandbox.delete", sandbox_id=item["id"])


def test_specs(alice: Peer, root: Peer) -> None:
    specs = alice.call("spec.list")
    assert [s["id"] for s in specs] == ["sleep", "stuck", "fails"]
    fields = {
        "id",
        "command",
        "initial_env",
        "working_dir",
        "health_check_path",
        "ready_timeout",
        "created_at",
    }
    assert all(set(s) >= fields for s in specs)
    # Values of the environment are an admin's to see.
    assert alice.call("spec.get", spec_id="fails")["initial_env"] == {"SECRET_SETTING": "***"}
    assert root.call("spec.get", spec_id="fails")["initial_env"] == {
        "SECRET_SETTING": "hunter2-value"
    }
    assert alice.call("spec.get", spec_id="nope") is None


# --- Events -----------------------------------------------------------------------------


def test_subscription_history_then_live(alice: Peer) -> None:
    sandbox_id = new_id()
    alice.call("sandbox.start", spec_id="sleep", sandbox_id=sandbox_id)
    result = alice.call("events.subscribe", after_seq=0, sandbox_id=sandbox_id)
    sub = result["subscription"]
    assert isinstance(result["head_seq"], int)
    history = alice.sub_frames(sub, lambda f: bool(f.get("caught_up")))
    caught_up = history.pop()
    assert caught_up["seq"] >= max(f["event"]["seq"] for f in history)
    events = [f["event"] for f in history]
    assert [e["type"] for e in events] == [
        "sandbox.created",
        "sandbox.process_started",
        "sandbox.running",
    ]
    assert all(set(e) >= EVENT_FIELDS for e in events)
    assert events[0]["by"] == "alice" and events[0]["data"]["created_by_user_id"] == "alice"
    # Live from here, in seq order, no gap at the switch.
    alice.call("sandbox.pause", sandbox_id=sandbox_id)
    alice.call("sandbox.delete", sandbox_id=sandbox_id)
    live = alice.sub_frames(sub, lambda f: f.get("event", {}).get("type") == "sandbox.deleted")
    assert [f["event"]["type"] for f in live] == ["sandbox.paused", "sandbox.deleted"]
    seqs = [e["seq"] for e in events] + [f["event"]["seq"] for f in live]
    assert seqs == sorted(set(seqs))
    assert alice.call("events.unsubscribe", subscription=sub) is True
    assert alice.error("events.unsubscribe", subscription=sub)["code"] == "not_found"


def test_subscription_from_now_and_by_type(root: Peer) -> None:
    result = root.call("events.subscribe", types=["sandbox.deleted"])
    sub = result["subscription"]
    root.sub_frames(sub, lambda f: bool(f.get("caught_up")))
    sandbox_id = new_id()
    root.call("sandbox.start", spec_id="sleep", sandbox_id=sandbox_id)
    root.call("sandbox.delete", sandbox_id=sandbox_id)
    frames = root.sub_frames(sub, lambda f: "event" in f)
    event = frames[-1]["event"]
    assert event["type"] == "sandbox.deleted" and event["sandbox_id"] == sandbox_id
    assert event["seq"] > result["head_seq"]
    root.call("events.unsubscribe", subscription=sub)


def test_events_read_pages(root: Peer) -> None:
    head = root.call("server.info")["head_seq"]
    page = root.call("events.read", after_seq=0, limit=2)
    assert set(page) == {"events", "next_after_seq"}
    assert [e["seq"] for e in page["events"]] == [1, 2]
    assert page["next_after_seq"] == 2
    seqs: list[int] = []
    after = 0
    while after < head:
        page = root.call("events.read", after_seq=after, limit=1000)
        seqs += [e["seq"] for e in page["events"]]
        after = page["next_after_seq"]
    assert seqs[:head] == list(range(1, head + 1))
    first = root.call("events.read", after_seq=0, types=["daemon.started"])["events"][0]
    assert first["type"] == "daemon.started" and first["sandbox_id"] is None
    assert root.error("events.read", after_seq=0, limit=1001)["code"] == "bad_request"
    assert root.error("events.read")["code"] == "bad_request"


def test_graceful_shutdown_ends_subscriptions_and_closes_1001(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, make_config(tmp_path / "state"))
    daemon.start_blocking()
    try:
        with Peer(daemon.url, ROOT) as peer:
            sub = peer.call("events.subscribe", after_seq=0)["subscription"]
            peer.sub_frames(sub, lambda f: bool(f.get("caught_up")))
            daemon.process.send_signal(15)  # type: ignore[union-attr]
            frames = peer.sub_frames(sub, lambda f: bool(f.get("ended")))
            ended = frames[-1]
            assert ended["reason"] == "shutdown"
            assert isinstance(ended["last_seq"], int)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    peer.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert daemon.process.wait(20) == 0  # type: ignore[union-attr]
    finally:
        daemon.stop()
