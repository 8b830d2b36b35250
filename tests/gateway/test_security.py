"""Who sees what: another user's sandbox does not exist for you, and secrets stay secret.

The daemon runs as a subprocess so that its own log output can be searched
for secrets like its files are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.daemon_process import DaemonProcess
from tests.gateway.support import Peer, state_files
from tests.support import TOKENS

ALICE, BOB, ROOT = TOKENS["alice"], TOKENS["bob"], TOKENS["root"]


def new_id() -> str:
    return "s-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def peers(daemon_process: DaemonProcess) -> Iterator[dict[str, Peer]]:
    connected = {name: Peer(daemon_process.url, token) for name, token in TOKENS.items()}
    yield connected
    for peer in connected.values():
        peer.ws.close()


@pytest.fixture(scope="module")
def alices(peers: dict[str, Peer]) -> dict[str, Any]:
    """A running sandbox of alice's and one she deleted (its events remain hers)."""
    alice = peers["alice"]
    gone = alice.call("sandbox.start", spec_id="sleep", sandbox_id=new_id())
    alice.call("sandbox.delete", sandbox_id=gone["id"])
    running = alice.call("sandbox.start", spec_id="sleep", sandbox_id=new_id())
    return {"running": running, "deleted": gone}


def test_every_op_on_another_users_sandbox_is_not_found(
    peers: dict[str, Peer], alices: dict[str, Any]
) -> None:
    bob = peers["bob"]
    for sandbox_id in (alices["running"]["id"], alices["deleted"]["id"]):
        assert bob.call("sandbox.get", sandbox_id=sandbox_id) is None
        assert bob.call("sandbox.batch_get", sandbox_ids=[sandbox_id]) == [None]
        for op in ("sandbox.pause", "sandbox.resume", "sandbox.delete", "sandbox.logs"):
            error = bob.error(op, sandbox_id=sandbox_id)
            assert error["code"] == "not_found", (op, error)
        # Exactly what a sandbox that never existed gives.
        assert error["message"].replace(sandbox_id, "X") == bob.error(
            "sandbox.logs", sandbox_id="never-existed"
        )["message"].replace("never-existed", "X")
        assert bob.error("events.subscribe", sandbox_id=sandbox_id)["code"] == "not_found"
        assert bob.error("events.subscribe", after_seq=0, sandbox_id=sandbox_id)["code"] == (
            "not_found"
        )
        assert bob.error("events.read", after_seq=0, sandbox_id=sandbox_id)["code"] == "not_found"
    listed = [item["id"] for item in bob.call("sandbox.search")["items"]]
    assert alices["running"]["id"] not in listed
    # Nothing bob tried touched it.
    mine = peers["alice"].call("sandbox.get", sandbox_id=alices["running"]["id"])
    assert mine["status"] == "RUNNING"
    assert mine["version"] == alices["running"]["version"]


def test_ids_are_one_namespace(peers: dict[str, Peer], alices: dict[str, Any]) -> None:
    # protocol.md: a taken id is `conflict`, whoever holds it.
    error = peers["bob"].error("sandbox.start", spec_id="sleep", sandbox_id=alices["running"]["id"])
    assert error["code"] == "conflict"


def test_admin_sees_and_controls_every_sandbox(
    peers: dict[str, Peer], alices: dict[str, Any]
) -> None:
    root = peers["root"]
    sandbox_id = alices["running"]["id"]
    assert root.call("sandbox.get", sandbox_id=sandbox_id)["created_by_user_id"] == "alice"
    assert root.call("sandbox.pause", sandbox_id=sandbox_id)["status"] == "PAUSED"
    assert root.call("sandbox.resume", sandbox_id=sandbox_id)["status"] == "RUNNING"
    page = root.call("events.read", after_seq=0, sandbox_id=alices["deleted"]["id"])
    assert [e["type"] for e in page["events"]][-1] == "sandbox.deleted"


def events_seen(peer: Peer, **params: Any) -> list[dict[str, Any]]:
    sub = peer.call("events.subscribe", after_seq=0, **params)["subscription"]
    frames = peer.sub_frames(sub, lambda f: bool(f.get("caught_up")))
    peer.call("events.unsubscribe", subscription=sub)
    return [f["event"] for f in frames if "event" in f]


def test_a_user_sees_only_the_events_of_its_own_sandboxes(
    peers: dict[str, Peer], alices: dict[str, Any]
) -> None:
    bobs = peers["bob"].call("sandbox.start", spec_id="sleep", sandbox_id=new_id())
    alice_ids = {alices["running"]["id"], alices["deleted"]["id"]}

    seen_by_bob = events_seen(peers["bob"])
    assert seen_by_bob, "bob sees his own sandbox's events"
    assert {e["sandbox_id"] for e in seen_by_bob} == {bobs["id"]}

    seen_by_alice = events_seen(peers["alice"])
    assert {e["sandbox_id"] for e in seen_by_alice} == alice_ids
    # A deleted sandbox's history stays its owner's, to the end.
    assert [e["type"] for e in seen_by_alice if e["sandbox_id"] == alices["deleted"]["id"]][
        -1
    ] == "sandbox.deleted"
    seqs = [e["seq"] for e in seen_by_alice]
    assert seqs == sorted(set(seqs))

    seen_by_root = events_seen(peers["root"])
    assert {e["sandbox_id"] for e in seen_by_root} >= alice_ids | {bobs["id"], None}
    assert [e["seq"] for e in seen_by_root] == list(range(1, len(seen_by_root) + 1))

    read_by_bob = peers["bob"].call("events.read", after_seq=0)["events"]
    assert [e["seq"] for e in read_by_bob] == [e["seq"] for e in seen_by_bob]
    peers["bob"].call("sandbox.delete", sandbox_id=bobs["id"])


def test_live_events_of_others_are_not_delivered(
    peers: dict[str, Peer], alices: dict[str, Any]
) -> None:
    bob, alice = peers["bob"], peers["alice"]
    sub = bob.call("events.subscribe")["subscription"]
    bob.sub_frames(sub, lambda f: bool(f.get("caught_up")))
    alice.call("sandbox.pause", sandbox_id=alices["running"]["id"])
    alice.call("sandbox.resume", sandbox_id=alices["running"]["id"])
    marker = bob.call("sandbox.start", spec_id="sleep", sandbox_id=new_id())
    frames = bob.sub_frames(sub, lambda f: f.get("event", {}).get("type") == "sandbox.running")
    assert {f["event"]["sandbox_id"] for f in frames if "event" in f} == {marker["id"]}
    bob.call("events.unsubscribe", subscription=sub)
    bob.call("sandbox.delete", sandbox_id=marker["id"])


def test_server_info_names_the_user(peers: dict[str, Peer]) -> None:
    assert peers["bob"].call("server.info")["user"] == "bob"
    assert peers["bob"].call("server.info")["admin"] is False
    assert peers["root"].call("server.info")["admin"] is True


def test_tokens(daemon_process: DaemonProcess) -> None:
    for token in (None, "", "wrong-token-0123456789", ALICE + "x", ALICE[:-1], ALICE.upper()):
        with pytest.raises(InvalidStatus) as refused:
            Peer(daemon_process.url, token)
        assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        Peer(daemon_process.url, "wrong-token-0123456789", query=True)
    assert refused.value.response.status_code == 401
    with Peer(daemon_process.url, ALICE, query=True) as alice:
        assert alice.call("server.info")["user"] == "alice"


def test_secrets_are_in_no_file_and_no_log_line(
    daemon_process: DaemonProcess, peers: dict[str, Peer], alices: dict[str, Any]
) -> None:
    alice = peers["alice"]
    running = alice.call("sandbox.get", sandbox_id=alices["running"]["id"])
    keys = {running["session_api_key"], alices["running"]["session_api_key"]}
    assert all(keys)
    # A spec env value that only admins may see.
    masked = "hunter2-value"
    assert peers["bob"].call("spec.get", spec_id="fails")["initial_env"] == {
        "SECRET_SETTING": "***"
    }
    secrets = {*TOKENS.values(), *keys}
    files = list(state_files(daemon_process.state_dir))
    assert files, "the daemon keeps its log in the state dir"
    for path in files:
        if path.parent.name == "sandboxes":
            continue  # a sandbox's own files are the sandbox's
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret[:6]}... found in {path}"
    output = daemon_process.output()
    assert "listening on" in output
    for secret in secrets | {masked}:
        assert secret not in output, f"{secret[:6]}... found in the daemon's output"


def test_a_reused_id_shows_each_owner_only_its_own_incarnation(peers: dict[str, Peer]) -> None:
    # issue 8, defect 1: visibility follows who owned the sandbox when the event happened.
    alice, bob, root = peers["alice"], peers["bob"], peers["root"]
    reused = new_id()
    alice.call("sandbox.start", spec_id="sleep", sandbox_id=reused)
    alice.call("sandbox.delete", sandbox_id=reused)
    alices = alice.call("events.read", after_seq=0, sandbox_id=reused)["events"]
    assert (alices[0]["type"], alices[-1]["type"]) == ("sandbox.created", "sandbox.deleted")
    bob.call("sandbox.start", spec_id="sleep", sandbox_id=reused)

    for params in ({}, {"sandbox_id": reused}, {"types": ["sandbox.created"]}):
        for seen in (
            bob.call("events.read", after_seq=0, **params)["events"],
            events_seen(bob, **params),
        ):
            bobs = [e for e in seen if e["sandbox_id"] == reused]
            assert bobs, params
            assert bobs[0]["type"] == "sandbox.created" and bobs[0]["by"] == "bob"
            assert min(e["seq"] for e in bobs) > alices[-1]["seq"], "none of alice's"
        # alice keeps her whole history of the id, and gets none of bob's.
        expected = [e for e in alices if e["type"] in params.get("types", [e["type"]])]
        for seen in (
            alice.call("events.read", after_seq=0, **params)["events"],
            events_seen(alice, **params),
        ):
            assert [e for e in seen if e["sandbox_id"] == reused] == expected, params
    # The admin sees both incarnations.
    both = root.call("events.read", after_seq=0, sandbox_id=reused)["events"]
    assert [e["by"] for e in both if e["type"] == "sandbox.created"] == ["alice", "bob"]
    bob.call("sandbox.delete", sandbox_id=reused)
