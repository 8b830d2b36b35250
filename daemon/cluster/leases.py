"""A node's lease and its watch over the others, on a JetStream KV bucket: the I/O of lease.py.

``take_lease`` holds the start-up until this node's lease is its own (or
raises ``DuplicateNode``); ``keep_lease`` renews it for as long as the daemon
runs and raises ``LeaseLost`` when it cannot (the daemon then stops: see
lease.py for why); ``watch_losses`` reads which nodes hold a lease every
``interval`` seconds and, if this node is the recorder, appends the
``sandbox.missing`` of every lost node's sandboxes. Every decision is lease.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from sandboxd.cluster.lease import (
    Create,
    Lease,
    TakeOver,
    loss_events,
    lost_nodes,
    records_losses,
)
from sandboxd.events.backend import Store
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.nats.bridge import Kv, NatsUnavailable, WrongLastSequence

log = logging.getLogger(__name__)

#: The bucket of the leases, beside the stream ``STREAM``.
BUCKET_SUFFIX = "_nodes"


async def take_lease(kv: Kv, lease: Lease) -> None:
    """Make ``lease`` this node's in ``kv``; ``DuplicateNode`` if another daemon holds it."""
    node, value = lease.value.node, lease.value.encode()
    while True:
        entry = await kv.get(node)
        step = lease.found(None if entry is None else entry.revision, trio.current_time())
        try:
            if isinstance(step, Create):
                revision = await kv.create(node, value)
            elif isinstance(step, TakeOver):
                revision = await kv.update(node, value, step.revision)
            else:
                log.info("node %s: a lease is held under this id; waiting for it to expire", node)
                await trio.sleep(step.delay)
                continue
        except WrongLastSequence:
            continue  # someone wrote it between the read and the write: read again
        lease.held(revision, trio.current_time())
        return


async def keep_lease(
    kv: Kv, lease: Lease, retaken: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Renew ``lease`` every third of its TTL, forever; ``LeaseLost`` if another daemon
    wrote it. Expired meanwhile (NATS away for a TTL): taken again once NATS answers,
    then ``retaken()`` (the node adopts again what the others recorded lost)."""
    node, value = lease.value.node, lease.value.encode()
    while True:
        await trio.sleep(lease.renew_due(trio.current_time()))
        assert lease.revision is not None
        try:
            with trio.fail_after(lease.interval):
                revision = await kv.update(node, value, lease.revision)
        except WrongLastSequence:
            lease.renew_failed(trio.current_time(), refused=True)
        except (NatsUnavailable, trio.TooSlowError) as exc:
            log.warning("node %s: renewing its lease failed: %s", node, exc)
            if lease.renew_failed(trio.current_time(), refused=False):
                log.warning("node %s: its lease expired; taking it again", node)
                await _take_again(kv, lease)
                if retaken is not None:
                    await retaken()
            else:
                await trio.sleep(min(1.0, lease.interval / 2))
        else:
            lease.renewed(revision, trio.current_time())


async def _take_again(kv: Kv, lease: Lease) -> None:
    while True:
        try:
            await take_lease(kv, lease)
            return
        except NatsUnavailable as exc:
            log.warning("node %s: NATS still away: %s", lease.value.node, exc)
            await trio.sleep(min(1.0, lease.interval))


class Membership:
    """The nodes that held a lease at the last look (this one always): where starts go."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.live: frozenset[str] = frozenset({me})


async def watch_losses(kv: Kv, store: Store, membership: Membership, interval: float) -> None:
    """Every ``interval`` s: the nodes that own sandboxes and hold no lease are lost, and
    the recorder among the live ones records their sandboxes MISSING."""
    me = membership.me
    while True:
        await trio.sleep(interval)
        try:
            leased = set(await kv.keys())
        except NatsUnavailable as exc:
            log.warning("reading the nodes' leases failed: %s", exc)
            continue
        membership.live = frozenset({*leased, me})
        lost = lost_nodes(store.state, leased, me)
        if not lost or not records_losses(leased, me):
            continue
        for node in lost:
            events = list(loss_events(store.state, node))
            log.warning("node %s lost its lease: recording its %d sandboxes", node, len(events))
            try:
                await store.append_many(events)
            except LogUnavailable as exc:
                # Refused (another node recorded one of them first, or the log is away):
                # the next round sees what is left, from the projection.
                log.warning("recording node %s's sandboxes failed: %s", node, exc)
