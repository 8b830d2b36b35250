"""Who sees what: one rule for sandboxes and events, per life of a reused sandbox id."""

from __future__ import annotations

import attrs
from hypothesis import given, settings

from sandboxd.actors.info import spec_info
from sandboxd.actors.specs import SpecConfig
from sandboxd.actors.visibility import knows_sandbox_id, owns, sees_event, sees_sandbox
from sandboxd.events import types as ev
from sandboxd.events.projection import State, apply
from tests.events.strategies import histories, stamp


@attrs.frozen
class Viewer:
    id: str | None
    admin: bool = False


ALICE, BOB = Viewer("alice"), Viewer("bob")
ROOT, EMBEDDED_ADMIN = Viewer("root", admin=True), Viewer(None, admin=True)


def test_owns() -> None:
    assert owns(ALICE, "alice")
    assert not owns(ALICE, "bob")
    assert not owns(ALICE, None)
    assert not owns(Viewer(None), None)
    assert all(owns(admin, who) for admin in (ROOT, EMBEDDED_ADMIN) for who in ("bob", None))


def _fold(history: list[ev.PendingEvent]) -> tuple[State, list[ev.Event]]:
    events = stamp(history)
    state = State()
    for event in events:
        apply(state, event)
    return state, events


def _created(sandbox_id: str, owner: str) -> ev.PendingEvent:
    return ev.PendingEvent(sandbox_id, owner, ev.SandboxCreated("d", owner, "/w", 1))


def test_a_reused_id_s_events_stay_with_the_owner_of_their_life() -> None:
    state, events = _fold(
        [
            _created("x", "alice"),
            ev.PendingEvent("x", "alice", ev.SandboxDeleted(False)),
            _created("x", "bob"),
            ev.PendingEvent("x", None, ev.SandboxPaused()),
            ev.PendingEvent(None, None, ev.DaemonStopping("bye")),
        ]
    )
    seen = {
        viewer.id: [e.seq for e in events if sees_event(viewer, state, e)]
        for viewer in (ALICE, BOB, ROOT)
    }
    assert seen == {"alice": [1, 2], "bob": [3, 4], "root": [1, 2, 3, 4, 5]}
    assert knows_sandbox_id(ALICE, state, "x") and knows_sandbox_id(BOB, state, "x")
    assert not knows_sandbox_id(Viewer("carol"), state, "x")
    assert not knows_sandbox_id(ROOT, state, "never")
    assert sees_sandbox(BOB, state.sandboxes["x"]) and not sees_sandbox(ALICE, state.sandboxes["x"])


@settings(max_examples=200)
@given(history=histories())
def test_a_user_sees_exactly_the_events_of_the_lives_it_created(
    history: list[ev.PendingEvent],
) -> None:
    state, events = _fold(history)
    creator: dict[str, str | None] = {}  # the model: who created the id last, so far
    for event in events:
        if isinstance(event.data, ev.SandboxCreated):
            assert event.sandbox_id is not None
            creator[event.sandbox_id] = event.data.created_by_user_id
        owner = None if event.sandbox_id is None else creator[event.sandbox_id]
        for viewer in (Viewer(owner), Viewer("someone-else"), ROOT):
            expected = viewer.admin or (event.sandbox_id is not None and viewer.id == owner)
            assert sees_event(viewer, state, event) is (expected and viewer.id is not None)


def test_a_spec_s_values_are_an_admin_s() -> None:
    # The one masking of a spec's environment (info.py); the gateway had a twin.
    spec = SpecConfig(id="s", command=("x",), initial_env={"A": "secret", "B": ""})
    assert spec_info(spec, mask_values=True).initial_env == {"A": "***", "B": "***"}
    assert spec_info(spec, mask_values=False).initial_env == {"A": "secret", "B": ""}
