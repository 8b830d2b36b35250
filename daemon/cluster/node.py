"""This daemon as a node of a cluster: its lease, its watch, and routing, wired in one place.

``join_cluster`` is what daemon.py calls when the log is a JetStream stream:

1. connect to NATS (a connection of its own, beside the log's: leases and
   forwarded requests never wait behind a batch of appends) and take this
   node's lease, before recovery, so that a second daemon with the same
   node id is refused before it adopts or marks anything (``DuplicateNode``);
2. keep the lease, and watch the others' (lease.py's rules, leases.py's I/O);
3. after recovery, ``Node.serve(registry)`` answers what other nodes forward here;
   ``Node.forward`` is the gateway's hook that forwards what another must answer.

Leaving (the block ends) stops all that and lets the lease expire by itself, so
that the others see the node gone within a TTL; a graceful stop deletes it at
once instead, which the others see at their next look: its sandboxes, kept
running by ``on_shutdown = "keep"``, are then recorded MISSING ("node X lost")
and adopted again by its next start.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio

from sandboxd.actors.registry import Registry
from sandboxd.cluster.lease import Lease, LeaseValue, readoption_events
from sandboxd.cluster.leases import (
    BUCKET_SUFFIX,
    Membership,
    keep_lease,
    take_lease,
    watch_losses,
)
from sandboxd.cluster.routing import Forwarder, serve_forwarded
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.backend import Store
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.nats.bridge import Kv, Nats, NatsUnavailable, connect, patiently
from sandboxd.events.nats.settings import NatsSettings

log = logging.getLogger(__name__)

#: Seconds a forwarded request may take: a start that waits for its sandbox to be ready
#: (a spec's ready_timeout is 30 s by default), or a delete that waits out stop_timeout.
ANSWER_WITHIN: Final = 120.0


class Node:
    """This daemon's part in the cluster, while ``join_cluster``'s block runs."""

    def __init__(
        self,
        config: Config,
        settings: NatsSettings,
        nats: Nats,
        kv: Kv,
        store: Store,
        nursery: trio.Nursery,
    ) -> None:
        self.id = config.node_id
        self.membership = Membership(config.node_id)
        self._settings = settings
        self._nats = nats
        self._kv = kv
        self._store = store
        self._registry: Registry | None = None  # once recovery has run: serve()
        self._nursery = nursery
        self.forward = Forwarder(
            nats,
            settings.stream,
            config.node_id,
            store,
            lambda: self.membership.live,
            answer_within=ANSWER_WITHIN,
            look_again=self.look_again,
        )

    def live_nodes(self) -> frozenset[str]:
        """The nodes that held a lease at the last look, this one too."""
        return self.membership.live

    async def look_again(self) -> None:
        """Read which nodes hold a lease now, not at the watch's next look."""
        try:
            self.membership.live = frozenset({*await self._kv.keys(), self.id})
        except NatsUnavailable as exc:
            log.warning("reading the nodes' leases failed: %s", exc)

    async def serve(self, registry: Registry) -> None:
        """Answer what other nodes forward here, from now on (after recovery), and know the
        session keys of every node's sandboxes."""
        self._registry = registry
        await self._nursery.start(know_every_key, self._store, registry)
        await self._nursery.start(
            serve_forwarded, self._nats, self._settings.stream, self.id, registry
        )

    async def readopt(self) -> None:
        """Adopt again what the others recorded lost while this node's lease had lapsed
        (before recovery has run there is nothing to adopt again: recovery adopts)."""
        if self._registry is None:
            return
        events = readoption_events(self._store.state, self.id, self._registry.holds)
        if not events:
            return
        log.warning("node %s: adopting again %d sandboxes recorded lost", self.id, len(events))
        try:
            await self._store.append_many(events)
        except LogUnavailable as exc:
            log.warning("node %s: recording the adoptions failed: %s", self.id, exc)

    async def readopt_forever(self, interval: float) -> None:
        """``readopt`` every ``interval`` s: a loss recorded by a peer that looked before
        this node took its lease again may be folded here after the ``readopt`` that
        followed; so is one a peer recorded from a stale look. Both undone within a look."""
        while True:
            await trio.sleep(interval)
            await self.readopt()

    async def leave(self) -> None:
        """Give the lease up now (a graceful stop): the others need not wait out its TTL."""
        with trio.move_on_after(2), trio.CancelScope(shield=True):
            try:
                await self._kv.delete(self.id)
            except NatsUnavailable as exc:
                log.warning("node %s: could not give its lease up: %s", self.id, exc)


async def know_every_key(
    store: Store,
    registry: Registry,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Make the registry's session keys know every sandbox of the stream, not only those
    this node runs, for as long as this runs: ``sandbox.find_by_session_key`` (the
    OpenHands adapter's lookup) then answers for any node's sandbox through any node.

    A key is the HMAC of the sandbox's id and created seq under the secret the nodes
    share (docs/cluster.md), so any node can derive it: from the projection at first,
    then from each ``sandbox.created`` and ``sandbox.deleted`` as it is folded (the
    registry remembers and forgets its own sandboxes' keys too; both are idempotent).
    """
    keys = registry.keys
    async with store.subscribe(store.state.head_seq) as folded:
        # No checkpoint between the subscription's seq and this walk: nothing is missed.
        for record in store.state.sandboxes.values():
            keys.remember(record.id, record.created_seq)
        task_status.started()
        async for item in folded:
            event = item.event
            if event.sandbox_id is None:
                continue
            if isinstance(event.data, ev.SandboxCreated):
                keys.remember(event.sandbox_id, event.seq)
            elif isinstance(event.data, ev.SandboxDeleted):
                keys.forget(event.sandbox_id)


async def _take(nats: Nats, settings: NatsSettings, config: Config, lease: Lease) -> Kv:
    """The leases' bucket, and this node's lease in it. NATS may not answer at once (nodes
    starting together, the stream's replicas being placed): tried again for a while."""

    async def take() -> Kv:
        kv = await nats.key_value(
            settings.stream + BUCKET_SUFFIX, ttl=config.lease_ttl, replicas=settings.replicas
        )
        await take_lease(kv, lease)
        return kv

    return await patiently(
        take,
        within=max(10.0, 3 * config.lease_ttl),
        what=f"node {config.node_id} could not take its lease",
    )


@asynccontextmanager
async def join_cluster(
    config: Config, settings: NatsSettings, store: Store, *, url: str
) -> AsyncIterator[Node]:
    """Connect, take this node's lease (``DuplicateNode`` if another daemon holds it,
    ``NatsUnavailable`` if NATS does not let it), and keep it and watch the others' while
    the block runs. ``LeaseLost`` comes out of the block if another daemon writes it."""
    async with connect(
        settings.servers, credentials=settings.credentials, name=f"sandboxd {config.node_id}"
    ) as nats:
        lease = Lease(LeaseValue(config.node_id, secrets.token_hex(8), url), config.lease_ttl)
        kv = await _take(nats, settings, config, lease)
        log.info("node %s holds its lease (ttl %.1f s)", config.node_id, config.lease_ttl)
        async with trio.open_nursery() as nursery:
            node = Node(config, settings, nats, kv, store, nursery)
            # Where starts may go from the first one on, not from the watch's first look.
            await node.look_again()
            nursery.start_soon(keep_lease, kv, lease, node.readopt)
            nursery.start_soon(watch_losses, kv, store, node.membership, lease.interval)
            nursery.start_soon(node.readopt_forever, lease.interval)
            yield node
            nursery.cancel_scope.cancel()
