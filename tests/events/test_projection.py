"""The fold: replaying any prefix from any snapshot gives what live application gave."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.events import snapshots
from sandboxd.events import types as ev
from sandboxd.events.projection import (
    Incarnation,
    ProjectionError,
    State,
    Status,
    apply,
    copy_state,
    incarnation_at,
    labels_at,
    state_from_dict,
    state_to_dict,
)
from tests.events.strategies import histories, stamp


def _live(events: list[ev.Event]) -> list[State]:
    """The state after each prefix, as the daemon would have had it live."""
    state = State()
    states = [copy_state(state)]
    for event in events:
        apply(state, event)
        states.append(copy_state(state))
    return states


@settings(max_examples=100)
@given(history=histories(), data=st.data())
def test_replay_from_any_snapshot_equals_live(
    history: list[ev.PendingEvent], data: st.DataObject
) -> None:
    events = stamp(history)
    live = _live(events)
    end = data.draw(st.integers(min_value=0, max_value=len(events)), label="prefix")
    start = data.draw(st.integers(min_value=0, max_value=end), label="snapshot at")
    # Through the snapshot file format, checksum and JSON included.
    anchor = events[start - 1].ts if start else None
    blob = snapshots.encode_snapshot(live[start], anchor)
    restored = snapshots.decode_snapshot(blob, Path("snapshot")).state
    for event in events[start:end]:
        apply(restored, event)
    assert state_to_dict(restored) == state_to_dict(live[end])
    assert restored.head_seq == (events[end - 1].seq if end else 0)


@settings(max_examples=25)
@given(history=histories())
def test_a_copied_state_does_not_change_with_later_events(history: list[ev.PendingEvent]) -> None:
    # What snapshots rely on: copy_state is a full copy, though a shallow one.
    events = stamp(history)
    live = _live(events)
    for i in range(0, len(events) + 1, 7):
        fresh = State()
        for event in events[:i]:
            apply(fresh, event)
        assert state_to_dict(live[i]) == state_to_dict(fresh)


def _sandbox_events(*payloads: ev.Payload) -> list[ev.Event]:
    created = ev.SandboxCreated("default", "alice", "/w", 30001)
    return stamp([ev.PendingEvent("a", "alice", p) for p in (created, *payloads)])


@pytest.mark.parametrize(
    ("payloads", "status"),
    [
        ((), Status.STARTING),
        ((ev.ProcessStarted(5, 5, 1.5, ["x"]),), Status.STARTING),
        ((ev.SandboxRunning([]),), Status.RUNNING),
        ((ev.StartFailed("boom", 1),), Status.ERROR),
        ((ev.SandboxRunning([]), ev.SandboxPaused()), Status.PAUSED),
        ((ev.SandboxPaused(), ev.SandboxResumed()), Status.RUNNING),
        ((ev.SandboxUnhealthy("slow"),), Status.ERROR),
        ((ev.SandboxUnhealthy("slow"), ev.SandboxHealthy()), Status.RUNNING),
        ((ev.SandboxExited(None, 9),), Status.ERROR),
        ((ev.SandboxRunning([]), ev.SandboxAdopted(5)), Status.RUNNING),
        ((ev.SandboxMissing("gone"),), Status.MISSING),
    ],
)
def test_status_after_events(payloads: tuple[ev.Payload, ...], status: Status) -> None:
    state = State()
    events = _sandbox_events(*payloads)
    for event in events:
        apply(state, event)
    assert state.sandboxes["a"].status is status
    # version: the seq of the last event that changed the record (adoption does not).
    changing = [e for e in events if not isinstance(e.data, ev.SandboxAdopted)]
    assert state.sandboxes["a"].version == changing[-1].seq


def test_a_sandbox_whose_node_was_lost_is_missing_until_the_node_adopts_it_again() -> None:
    created = ev.SandboxCreated("default", "alice", "/w", 30001, node="a")
    started = ev.ProcessStarted(5, 5, 1.5, ["x"])
    lost = ev.SandboxMissing("node a lost", node_lost="a")
    state = State()
    events = stamp(
        [
            ev.PendingEvent("s", "alice", p)
            for p in (created, started, ev.SandboxRunning([]), ev.SandboxPaused(), lost, lost)
        ]
        + [ev.PendingEvent("s", None, ev.SandboxAdopted(5))]
    )
    for event in events[:-1]:
        apply(state, event)
    record = state.sandboxes["s"]
    assert (record.status, record.error, record.node) == (Status.MISSING, "node a lost", "a")
    # Its process is kept: it was not seen gone, only its node; recorded twice, once kept.
    assert (record.pid, record.before_lost) == (5, Status.PAUSED)
    assert state_from_dict(state_to_dict(state)).sandboxes["s"] == record
    apply(state, events[-1])
    record = state.sandboxes["s"]
    assert (record.status, record.error, record.pid, record.before_lost) == (
        Status.PAUSED,
        None,
        5,
        None,
    )
    # Seen gone afterwards (a plain sandbox.missing): nothing is kept.
    for event in stamp(
        [ev.PendingEvent("s", None, lost), ev.PendingEvent("s", None, ev.SandboxMissing("gone"))],
        first_seq=state.head_seq + 1,
    ):
        apply(state, event)
    assert state.sandboxes["s"].pid is None and state.sandboxes["s"].before_lost is None


def test_deleted_sandboxes_leave_the_state_but_not_their_owner() -> None:
    state = State()
    for event in _sandbox_events(ev.SandboxDeleted(False)):
        apply(state, event)
    assert state.sandboxes == {}
    # Their events stay in the log, visible to whoever created them, across snapshots too.
    assert state.owners == {"a": (Incarnation(1, "alice"),)}
    assert state_from_dict(state_to_dict(state)).owners == {"a": (Incarnation(1, "alice"),)}


@settings(max_examples=200)
@given(history=histories())
def test_every_sandbox_event_belongs_to_the_life_current_at_its_seq(
    history: list[ev.PendingEvent],
) -> None:
    events = stamp(history)
    state = State()
    for event in events:
        apply(state, event)
    restored = state_from_dict(state_to_dict(state))
    # The model, written out plainly: the last creation of the id at or before the event.
    current: dict[str, Incarnation] = {}
    for event in events:
        if isinstance(event.data, ev.SandboxCreated):
            assert event.sandbox_id is not None
            current[event.sandbox_id] = Incarnation(event.seq, event.data.created_by_user_id)
        if event.sandbox_id is not None:
            expected = current[event.sandbox_id]
            assert incarnation_at(state, event.sandbox_id, event.seq) == expected
            assert incarnation_at(restored, event.sandbox_id, event.seq) == expected
            # Before its first creation an id belongs to no one.
            first = state.owners[event.sandbox_id][0].created_seq
            assert incarnation_at(state, event.sandbox_id, first - 1) is None


@pytest.mark.parametrize(
    "owners",
    [
        [],
        {"a": "alice"},  # format 1's shape: one owner per id
        {"a": [[1, "alice", "x"]]},
        {"a": [[True, "alice"]]},
        {"a": [[1, 2]]},
        {"a": [[5, "alice"], [3, "bob"]]},
    ],
)
def test_malformed_owners_are_refused(owners: object) -> None:
    with pytest.raises(ValueError, match="owners"):
        state_from_dict({"head_seq": 0, "sandboxes": [], "owners": owners})


@pytest.mark.parametrize(
    "history",
    [
        [ev.PendingEvent("a", None, ev.SandboxPaused())],
        [
            ev.PendingEvent("a", None, ev.SandboxCreated("d", None, "/w", 1)),
            ev.PendingEvent("a", None, ev.SandboxCreated("d", None, "/w", 1)),
        ],
        [ev.PendingEvent("a", None, ev.DaemonStopping("x"))],
    ],
)
def test_inconsistent_events_are_refused(history: list[ev.PendingEvent]) -> None:
    state = State()
    with pytest.raises(ProjectionError, match="seq"):
        for event in stamp(history):
            apply(state, event)


def test_seqs_must_increase() -> None:
    state = State()
    (event,) = stamp([ev.PendingEvent(None, None, ev.DaemonStopping("x"))], first_seq=5)
    apply(state, event)
    with pytest.raises(ProjectionError, match="does not follow"):
        apply(state, event)


@pytest.mark.parametrize(
    ("exited", "reason"),
    [
        (ev.SandboxExited(3, None), "the process exited with code 3"),
        (ev.SandboxExited(None, 9), "the process was killed by signal 9"),
        (ev.SandboxExited(None, None), "exit status is unknown"),
        (ev.SandboxExited(None, 9, "oom", 512 << 20), "killed: out of memory (limit 512 MiB)"),
        (ev.SandboxExited(None, None, "oom", 3 << 29), "killed: out of memory (limit 1.5 GiB)"),
    ],
)
def test_an_exit_says_why(exited: ev.SandboxExited, reason: str) -> None:
    state = State()
    for event in _sandbox_events(ev.ProcessStarted(5, 5, 1.5, ["x"]), exited):
        apply(state, event)
    error = state.sandboxes["a"].error
    assert error is not None and reason in error


def test_the_sandboxs_uid_is_kept_from_its_creation() -> None:
    state = State()
    created = ev.SandboxCreated("spec", None, "/w", 30000, uid=600123)
    events = stamp(
        [
            ev.PendingEvent("a", None, created),
            ev.PendingEvent("a", None, ev.ProcessStarted(5, 5, 1.5, ["x"], uid=600123)),
            ev.PendingEvent("a", None, ev.SandboxExited(0, None)),
        ]
    )
    for event in events:
        apply(state, event)
        assert state.sandboxes["a"].uid == 600123


# --- Idle periods and labels (issue 10) -----------------------------------------------------


@pytest.mark.parametrize(
    ("payloads", "idle_since"),
    [
        ((ev.SandboxRunning([]), ev.SandboxIdle("T1", "quiet")), "T1"),
        # Adoption by a restarted daemon changes nothing: the period goes on.
        ((ev.SandboxRunning([]), ev.SandboxIdle("T1", "quiet"), ev.SandboxAdopted(5)), "T1"),
        ((ev.SandboxRunning([]), ev.SandboxIdle("T1", "quiet"), ev.SandboxActive("busy")), None),
        # Any other change of the sandbox ends the period too.
        ((ev.SandboxRunning([]), ev.SandboxIdle("T1", "q"), ev.SandboxPaused("idle")), None),
        ((ev.SandboxRunning([]), ev.SandboxIdle("T1", "q"), ev.SandboxUnhealthy("x")), None),
        ((ev.SandboxRunning([]), ev.SandboxIdle("T1", "q"), ev.SandboxExited(0, None)), None),
    ],
)
def test_idle_since_follows_the_idle_events(
    payloads: tuple[ev.Payload, ...], idle_since: str | None
) -> None:
    state = State()
    events = _sandbox_events(*payloads)
    for event in events:
        apply(state, event)
    record = state.sandboxes["a"]
    assert record.idle_since == idle_since
    assert state_from_dict(state_to_dict(state)).sandboxes["a"] == record


def test_labels_stay_with_their_life_after_delete_and_across_snapshots() -> None:
    labelled = ev.SandboxCreated("default", "alice", "/w", 30001, labels={"team": "a"})
    plain = ev.SandboxCreated("default", "bob", "/w", 30001)
    events = stamp(
        [
            ev.PendingEvent("a", "alice", labelled),
            ev.PendingEvent("a", "alice", ev.SandboxDeleted(False)),
            ev.PendingEvent("a", "bob", plain),  # the id again: a life with no labels
        ]
    )
    state = State()
    for event in events:
        apply(state, event)
    assert state.sandboxes["a"].labels == {}
    for restored in (state, state_from_dict(state_to_dict(state))):
        assert labels_at(restored, "a", events[0].seq) == {"team": "a"}
        assert labels_at(restored, "a", events[1].seq) == {"team": "a"}  # its deletion
        assert labels_at(restored, "a", events[2].seq) == {}
        assert labels_at(restored, "b", events[2].seq) == {}


def test_a_snapshot_older_than_labels_reads_with_none() -> None:
    state = State()
    for event in _sandbox_events(ev.SandboxRunning([])):
        apply(state, event)
    raw = state_to_dict(state)
    del raw["labels"]
    for record in raw["sandboxes"]:
        del record["labels"], record["idle_since"]
    restored = state_from_dict(raw)
    assert restored.labels == {} and restored.sandboxes["a"] == state.sandboxes["a"]


def test_a_restart_is_starting_again_and_the_policys_are_remembered_bounded() -> None:
    created = ev.SandboxCreated("s", "alice", "/w", 30000)
    events = [ev.Event(1, "2026-01-01T00:00:00.000000Z", "a", "alice", created)]

    def add(data: ev.Payload, ts: str = "2026-01-01T00:00:01.000000Z") -> None:
        events.append(ev.Event(len(events) + 1, ts, "a", None, data))

    add(ev.ProcessStarted(5, 5, 1.5, ["x"]))
    add(ev.SandboxExited(3, None))
    restarted = ev.SandboxRestarted("r", ev.RESTART_ON_FAILURE, 3, None)
    for i in range(105):
        add(restarted, f"2026-01-01T00:01:{i % 60:02d}.{i:06d}Z")
    state = State()
    for event in events:
        apply(state, event)
    record = state.sandboxes["a"]
    assert record.status is Status.STARTING and record.pid is None and record.error is None
    assert record.restarts == 105 and record.exit_code == 3
    assert len(record.failure_restarts) == 100  # the bound of restart_max
    assert record.failure_restarts[-1] == events[-1].ts
    assert record.failure_restarts[0] == events[-100].ts
    # A resume's restart is a person's: the policy's count starts again.
    add(ev.SandboxRestarted("resumed by alice", ev.RESTART_ON_RESUME))
    apply(state, events[-1])
    assert state.sandboxes["a"].failure_restarts == () and state.sandboxes["a"].restarts == 106
    # Its verdict, when the policy gives up, is in the error.
    add(ev.SandboxExited(None, 9, restart="restart = on-failure gave up: ..."))
    apply(state, events[-1])
    assert state.sandboxes["a"].error == (
        "the process was killed by signal 9; restart = on-failure gave up: ..."
    )
