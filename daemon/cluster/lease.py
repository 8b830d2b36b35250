"""A node's lease, and the nodes its peers see lost: state machines with no I/O.

Each node holds one key, its node id, in a KV bucket whose entries live
``lease_ttl`` seconds unless written again (JetStream KV's ``ttl``, the
bucket's max age). The I/O around this (reading, creating and updating the
key, the clock) is the caller's; here are the decisions:

- **Taking it** (``Lease.found``). No key: create it (a create fails if
  another node created it meanwhile; then read again). A key already there is
  either the lease of this node's previous run, killed before it could let go
  (it is renewed no more and expires within a TTL), or the lease of another
  daemon running with the same node id (it keeps being renewed). So wait and
  look again: gone, create it; its revision moved, refuse to start with
  ``DuplicateNode``; still the same after two TTLs (a bucket that does not
  expire it), take it over, conditionally on that revision. A restart after a
  crash therefore waits up to one TTL for the old lease to expire.
- **Keeping it** (``Lease.renew_due``, ``renewed``, ``renew_failed``). Renewed
  every third of the TTL, conditionally on the revision this node last wrote,
  so that it never renews a lease another node took. A refused update means
  another daemon wrote this node's key: ``LeaseLost``, and the node stops (its
  processes run on; the next start re-adopts them). No successful renewal for
  a whole TTL (NATS unreachable) means the lease has expired for everyone:
  peers may record this node's sandboxes MISSING, and the node takes its lease
  again once NATS answers (``Phase.TAKING``), then re-adopts those of its
  sandboxes it still runs (``readoption_events``), as a restart would.
- **Seeing others lost** (``lost_nodes``, ``records_losses``, ``loss_events``).
  A node that owns sandboxes holding processes but has no lease is lost. The
  first live node by name records it (one recorder, so the others do not
  append the same events for nothing; the log's per-sandbox conditional append
  is what keeps two recorders from conflicting), once per sandbox:
  ``sandbox.missing`` with reason ``node X lost`` and ``node_lost`` set, which
  keeps the process in the record for the node to adopt if it comes back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable

import attrs
import orjson

from sandboxd.cluster.placement import HOLDS_A_PROCESS
from sandboxd.events import types as ev
from sandboxd.events.projection import State


class DuplicateNode(Exception):
    """Another running daemon holds this node id's lease."""


class LeaseLost(Exception):
    """This node's lease could not be kept: it must stop recording its sandboxes."""


@attrs.frozen
class LeaseValue:
    """What a lease says: whose it is, which run of that node, where it answers."""

    node: str
    token: str  # unique per run of the daemon: a lease is this run's only if it holds it
    url: str = ""

    def encode(self) -> bytes:
        return orjson.dumps(attrs.asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> LeaseValue | None:
        """The value, or None for bytes that are no lease (never trusted as one)."""
        try:
            fields = orjson.loads(raw)
            return cls(str(fields["node"]), str(fields["token"]), str(fields.get("url", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None


class Phase(enum.Enum):
    TAKING = "taking"
    HELD = "held"
    LOST = "lost"


@attrs.frozen
class Create:
    """No lease: create the key (it fails if someone else just did; then read again)."""


@attrs.frozen
class Wait:
    """Someone's lease is there: read it again after ``delay`` seconds."""

    delay: float


@attrs.frozen
class TakeOver:
    """A lease renewed by no one for two TTLs: write ours over that revision."""

    revision: int


Step = Create | Wait | TakeOver


class Lease:
    """This node's lease, from taking it to losing it."""

    def __init__(self, value: LeaseValue, ttl: float) -> None:
        self.value = value
        self.ttl = ttl
        self.phase = Phase.TAKING
        #: The revision this node last wrote; updates are conditional on it.
        self.revision: int | None = None
        self._renewed_at = 0.0
        #: While taking it: the revision of the lease found there, and since when.
        self._found: tuple[int, float] | None = None

    @property
    def interval(self) -> float:
        """Seconds between renewals: a third of the TTL, so that two may fail in a row."""
        return self.ttl / 3

    def found(self, revision: int | None, now: float) -> Step:
        """What to do when the key holds a lease of ``revision`` (None: no key)."""
        assert self.phase is Phase.TAKING
        if revision is None:
            self._found = None
            return Create()
        if self._found is None or self._found[0] != revision:
            if self._found is not None:
                raise DuplicateNode(
                    f"node_id {self.value.node!r} is held by another running daemon (its lease"
                    " was renewed while this one waited for it to expire): give every daemon"
                    " of the cluster its own cluster.node_id"
                )
            self._found = (revision, now)
            return Wait(self.interval)
        if now - self._found[1] >= 2 * self.ttl:
            return TakeOver(revision)
        return Wait(self.interval)

    def held(self, revision: int, now: float) -> None:
        """The create or take-over succeeded at ``revision``."""
        self.phase = Phase.HELD
        self.revision = revision
        self._renewed_at = now
        self._found = None

    def renew_due(self, now: float) -> float:
        """Seconds until the next renewal (0: now)."""
        return max(0.0, self._renewed_at + self.interval - now)

    def renewed(self, revision: int, now: float) -> None:
        assert self.phase is Phase.HELD
        self.revision = revision
        self._renewed_at = now

    def renew_failed(self, now: float, *, refused: bool) -> bool:
        """A renewal did not succeed. ``refused`` (the revision moved: another daemon wrote
        the key) raises ``LeaseLost``. An error (NATS away) is tried again until a whole
        TTL has passed since the last renewal, when the lease has expired for everyone:
        then True, and the lease is to be taken again (``found``) once NATS answers."""
        if refused:
            self.phase = Phase.LOST
            raise LeaseLost(
                f"node {self.value.node!r} lost its lease: another daemon wrote it; this one"
                " stops (its sandboxes run on, and its next start adopts them again)"
            )
        if now - self._renewed_at >= self.ttl:
            self.phase = Phase.TAKING
            self.revision = None
            return True
        return False


def owners(state: State) -> set[str]:
    """The nodes that own sandboxes holding a process, by the projection."""
    return {
        record.node
        for record in state.sandboxes.values()
        if record.node is not None and record.status in HOLDS_A_PROCESS
    }


def lost_nodes(state: State, leased: Collection[str], me: str) -> list[str]:
    """The nodes, other than this one, that own sandboxes holding a process and no lease."""
    return sorted(owners(state) - set(leased) - {me})


def records_losses(leased: Collection[str], me: str) -> bool:
    """Whether this node is the one that records lost nodes: the first live one by name."""
    return min({*leased, me}) == me


def readoption_events(state: State, me: str, runs: Callable[[str], bool]) -> list[ev.PendingEvent]:
    """``sandbox.adopted`` for each of this node's sandboxes that another node recorded lost
    while this one could not renew its lease, and that it still ``runs`` (by its actor)."""
    return [
        ev.PendingEvent(record.id, None, ev.SandboxAdopted(record.pid))
        for record in state.sandboxes.values()
        if record.node == me
        and record.before_lost is not None
        and record.pid is not None
        and runs(record.id)
    ]


def loss_events(state: State, node: str) -> Iterable[ev.PendingEvent]:
    """``sandbox.missing`` for each sandbox of ``node`` that holds a process, by the log."""
    reason = f"node {node} lost"
    for record in state.sandboxes.values():
        if record.node == node and record.status in HOLDS_A_PROCESS:
            yield ev.PendingEvent(record.id, None, ev.SandboxMissing(reason, node_lost=node))
