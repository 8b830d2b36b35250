"""Where a start goes: a pure function of the projection and the nodes holding a lease.

Every node folds the whole stream, so every node counts every node's sandboxes
alike and a start through any node is placed by the same rule: the node that
names it, else the live node with the fewest sandboxes holding processes
(STARTING, RUNNING, PAUSED: a paused sandbox still holds its memory), ties going
to the first by name so that two nodes placing at once agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping

from sandboxd.events.projection import State, Status

#: The statuses that hold a process on their node, which placement balances.
HOLDS_A_PROCESS = frozenset({Status.STARTING, Status.RUNNING, Status.PAUSED})


class NoSuchNode(LookupError):
    """A start named a node that holds no lease (down, or never part of the cluster)."""


def running_by_node(state: State, *, unnamed: str) -> Counter[str]:
    """How many sandboxes hold a process on each node; a record older than nodes
    (``node`` None) counts for ``unnamed``, the node whose log it was."""
    return Counter(
        record.node or unnamed
        for record in state.sandboxes.values()
        if record.status in HOLDS_A_PROCESS
    )


def place(running: Mapping[str, int], live: Collection[str], requested: str | None) -> str:
    """The node a start runs on: ``requested`` if it is live, else the least busy live one."""
    if not live:
        raise NoSuchNode("no node of the cluster holds a lease")
    if requested is not None:
        if requested not in live:
            raise NoSuchNode(
                f"node {requested!r} is not a live node of the cluster"
                f" (live: {', '.join(sorted(live))})"
            )
        return requested
    return min(sorted(live), key=lambda node: running.get(node, 0))
