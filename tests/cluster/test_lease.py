"""A node's lease and the losses its peers record, without I/O: every rule on a clock
the test moves."""

from __future__ import annotations

import pytest

from sandboxd.cluster.lease import (
    Create,
    DuplicateNode,
    Lease,
    LeaseLost,
    LeaseValue,
    Phase,
    TakeOver,
    Wait,
    loss_events,
    lost_nodes,
    readoption_events,
    records_losses,
)
from sandboxd.events import types as ev
from sandboxd.events.projection import State, Status, apply
from tests.events.strategies import stamp

TTL = 6.0


def lease() -> Lease:
    return Lease(LeaseValue("a", "run-1", "ws://127.0.0.1:1/v1"), TTL)


def test_the_value_round_trips_and_garbage_is_no_lease() -> None:
    value = LeaseValue("a", "run-1", "ws://x/v1")
    assert LeaseValue.decode(value.encode()) == value
    for raw in (b"", b"[]", b'{"node": "a"}', b"\xff"):
        assert LeaseValue.decode(raw) is None


def test_no_key_is_created_and_held_renewed_every_third_of_the_ttl() -> None:
    own = lease()
    assert own.found(None, 0.0) == Create()
    own.held(7, 0.0)
    assert own.phase is Phase.HELD and own.revision == 7
    assert own.renew_due(0.0) == pytest.approx(2.0)
    assert own.renew_due(2.5) == 0.0
    own.renewed(8, 2.5)
    assert own.revision == 8 and own.renew_due(2.5) == pytest.approx(2.0)


def test_a_crashed_runs_lease_is_waited_out_then_taken() -> None:
    own = lease()
    assert own.found(3, 0.0) == Wait(2.0)
    assert own.found(3, 2.0) == Wait(2.0)  # renewed by no one: the old run's
    assert own.found(None, 4.0) == Create()  # expired


def test_a_lease_that_never_expires_is_taken_over_after_two_ttls() -> None:
    own = lease()
    own.found(3, 0.0)
    assert own.found(3, 2 * TTL - 0.1) == Wait(2.0)
    assert own.found(3, 2 * TTL) == TakeOver(3)


def test_a_lease_renewed_meanwhile_is_another_daemons_with_this_node_id() -> None:
    own = lease()
    own.found(3, 0.0)
    with pytest.raises(DuplicateNode, match="node_id 'a' is held by another running daemon"):
        own.found(4, 2.0)


def test_refused_renewal_loses_it_at_once_errors_after_a_whole_ttl_take_it_again() -> None:
    own = lease()
    own.held(1, 0.0)
    assert own.renew_failed(2.0, refused=False) is False  # NATS away for a moment: still ours
    assert own.renew_failed(5.9, refused=False) is False
    assert own.phase is Phase.HELD
    assert own.renew_failed(6.0, refused=False) is True  # expired for everyone: take it again
    assert own.phase is Phase.TAKING and own.revision is None
    assert own.found(None, 7.0) == Create()
    other = lease()
    other.held(1, 0.0)
    with pytest.raises(LeaseLost, match="another daemon wrote it"):
        other.renew_failed(1.0, refused=True)


def _cluster_state() -> State:
    history = [
        ev.PendingEvent("a1", None, ev.SandboxCreated("d", None, "/w", 1, node="a")),
        ev.PendingEvent("b1", None, ev.SandboxCreated("d", None, "/w", 2, node="b")),
        ev.PendingEvent("b1", None, ev.ProcessStarted(50, 50, 1.5, ["x"])),
        ev.PendingEvent("b1", None, ev.SandboxRunning([])),
        ev.PendingEvent("b2", None, ev.SandboxCreated("d", None, "/w", 3, node="b")),
        ev.PendingEvent("b2", None, ev.StartFailed("boom", 1)),  # holds nothing
        ev.PendingEvent("c1", None, ev.SandboxCreated("d", None, "/w", 4, node="c")),
    ]
    state = State()
    for event in stamp(history):
        apply(state, event)
    return state


def test_a_node_with_sandboxes_and_no_lease_is_lost_and_the_first_live_records_it() -> None:
    state = _cluster_state()
    assert lost_nodes(state, {"a", "b", "c"}, "a") == []
    assert lost_nodes(state, {"a", "c"}, "a") == ["b"]
    assert lost_nodes(state, {"c"}, "a") == ["b"]  # never itself: its own lease is its
    assert records_losses({"a", "c"}, "a") and not records_losses({"a", "c"}, "c")
    assert records_losses({"c"}, "a")  # its lease not read back yet: it counts itself
    events = list(loss_events(state, "b"))
    assert [(e.sandbox_id, e.data) for e in events] == [
        ("b1", ev.SandboxMissing("node b lost", node_lost="b"))
    ]
    # Recorded, the node is no longer lost (it owns nothing that holds a process).
    for event in stamp(events, first_seq=state.head_seq + 1):
        apply(state, event)
    record = state.sandboxes["b1"]
    assert (record.status, record.pid, record.before_lost) == (Status.MISSING, 50, Status.RUNNING)
    assert lost_nodes(state, {"a", "c"}, "a") == []
    assert list(loss_events(state, "b")) == []
    # b back (its lease expired while NATS was away): what its actors still run, adopted.
    assert readoption_events(state, "b", lambda sandbox_id: False) == []
    again = readoption_events(state, "b", lambda sandbox_id: sandbox_id == "b1")
    assert [(e.sandbox_id, e.data) for e in again] == [("b1", ev.SandboxAdopted(50))]
    for event in stamp(again, first_seq=state.head_seq + 1):
        apply(state, event)
    assert state.sandboxes["b1"].status is Status.RUNNING
