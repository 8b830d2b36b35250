"""Placement: a start goes to the node it names, else to the least busy live node."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.cluster.placement import NoSuchNode, place, running_by_node
from sandboxd.events import types as ev
from sandboxd.events.projection import State, apply
from tests.events.strategies import stamp

nodes = st.sampled_from(["a", "b", "c", "d"])


def test_the_named_node_if_it_is_live() -> None:
    assert place({"a": 0, "b": 9}, {"a", "b"}, "b") == "b"
    with pytest.raises(
        NoSuchNode, match=r"node 'z' is not a live node of the cluster \(live: a, b\)"
    ):
        place({}, {"b", "a"}, "z")
    with pytest.raises(NoSuchNode, match="no node"):
        place({}, set(), None)


def test_the_fewest_running_ties_to_the_first_by_name() -> None:
    assert place({"a": 3, "b": 1, "c": 1}, {"a", "b", "c"}, None) == "b"
    assert place({"a": 3}, {"c", "a", "b"}, None) == "b"  # none counted: 0
    assert place({"a": 0, "b": 5}, {"b"}, None) == "b"  # a holds no lease


@given(st.dictionaries(nodes, st.integers(0, 1000)), st.sets(nodes, min_size=1))
def test_never_busier_than_another_live_node(running: dict[str, int], live: set[str]) -> None:
    chosen = place(running, live, None)
    assert chosen in live
    assert all(running.get(chosen, 0) <= running.get(other, 0) for other in live)
    # Every node computes the same, whatever the order it holds the live set in.
    assert place(running, sorted(live, reverse=True), None) == chosen


def test_counted_from_the_projection_what_holds_a_process() -> None:
    history = [
        ev.PendingEvent("s1", None, ev.SandboxCreated("d", None, "/w", 1, node="a")),
        ev.PendingEvent("s2", None, ev.SandboxCreated("d", None, "/w", 2, node="a")),
        ev.PendingEvent("s2", None, ev.StartFailed("boom", 1)),  # holds nothing
        ev.PendingEvent("s3", None, ev.SandboxCreated("d", None, "/w", 3, node="b")),
        ev.PendingEvent("s3", None, ev.SandboxRunning([])),
        ev.PendingEvent("s3", None, ev.SandboxPaused()),  # still holds its memory
        ev.PendingEvent("s4", None, ev.SandboxCreated("d", None, "/w", 4)),  # before nodes
    ]
    state = State()
    for event in stamp(history):
        apply(state, event)
    assert running_by_node(state, unnamed="c") == {"a": 1, "b": 1, "c": 1}
