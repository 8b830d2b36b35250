"""Who sees what: the one rule, for the registry's reads and the gateway's events alike.

An admin sees every sandbox and every event. Any other user sees the sandboxes
it created, and the events of a sandbox id while that id was its own: ids are
reused (a deleted sandbox's id may be created again by someone else), so an
event belongs to the life of its sandbox id that was current at its seq, and
is seen by whoever owned that life (``projection.incarnation_at``). A
``daemon.*`` event (no sandbox) is nobody's: admins only.

Another user's sandbox must look exactly like one that does not exist, so the
callers answer ``not_found`` or ``null`` where these say no. Pure functions
over the projection: no I/O, no trio.
"""

from __future__ import annotations

from typing import Protocol

from sandboxd.events.projection import SandboxRecord, State, incarnation_at
from sandboxd.events.types import Event


class Viewer(Protocol):
    """Who asks: a user id (None for the embedded admin) and whether it is an admin."""

    @property
    def id(self) -> str | None: ...

    @property
    def admin(self) -> bool: ...


def owns(viewer: Viewer, owner: str | None) -> bool:
    """Whether ``viewer`` may see what ``owner`` created (None: the embedded admin's)."""
    return viewer.admin or (viewer.id is not None and viewer.id == owner)


def sees_sandbox(viewer: Viewer, record: SandboxRecord) -> bool:
    """A live sandbox: its creator's and the admins'."""
    return owns(viewer, record.created_by_user_id)


def sees_event(viewer: Viewer, state: State, event: Event) -> bool:
    """An event: seen by whoever owned its sandbox id's life at the event's seq."""
    if viewer.admin:
        return True
    if event.sandbox_id is None:
        return False
    life = incarnation_at(state, event.sandbox_id, event.seq)
    return life is not None and owns(viewer, life.owner)


def knows_sandbox_id(viewer: Viewer, state: State, sandbox_id: str) -> bool:
    """Whether some life of ``sandbox_id``, live or deleted, is ``viewer``'s: the events of
    that id are then worth asking for (an admin: any id the daemon ever knew)."""
    return any(owns(viewer, life.owner) for life in state.owners.get(sandbox_id, ()))
