"""The store: the log, and the projection it keeps current, rebuilt at start-up.

``open_store`` opens the log in ``STATE_DIR/events`` (cutting a torn tail),
loads the newest snapshot from ``STATE_DIR/snapshots`` that checks out,
replays only the events after it, and from then on folds every durable batch
into ``store.state`` (the log's ``on_durable``, before any appender is
answered). Every ``snapshot_every`` events a task snapshots the projection:
the copy and its JSON are made on the event loop (a shallow copy: records are
immutable), the write and fsyncs in a worker thread, so the writer never
waits for it. With ``retention = "snapshots"`` the whole segments below the
oldest kept snapshot are deleted after each snapshot; by default nothing is,
since the log is the audit trail.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

import attrs
import trio

from sandboxd.events import log as event_log
from sandboxd.events import snapshots
from sandboxd.events.errors import CorruptLog, only_exception
from sandboxd.events.log import EventLog, open_event_log
from sandboxd.events.log import replay as replay  # the file log's, for bench/eventlog.py
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.projection import (
    ProjectionError,
    SandboxRecord,
    State,
    apply,
    copy_state,
    step,
)
from sandboxd.events.subscriptions import Filter, Subscription
from sandboxd.events.types import Event, PendingEvent

if TYPE_CHECKING:
    from sandboxd.events.nats.log import NatsEventLog

logger = logging.getLogger(__name__)

#: Either backend's log: the same names, the same promises (backend.py).
Log: TypeAlias = "EventLog | NatsEventLog"


@attrs.frozen
class StoreConfig:
    """The store's settings; each one is a key of the daemon's config (docs/events.md)."""

    segment_bytes: int = event_log.DEFAULT_SEGMENT_BYTES
    snapshot_every: int = 10_000  # events between snapshots; 0: only at shutdown
    snapshots_kept: int = 2
    retention: Literal["all", "snapshots"] = "all"
    subscriber_buffer: int = event_log.DEFAULT_SUBSCRIBER_BUFFER
    max_batch: int = event_log.DEFAULT_MAX_BATCH
    #: None: the file log in STATE_DIR/events; else the JetStream log these settings name.
    nats: NatsSettings | None = None


@attrs.frozen
class Startup:
    """How the state was rebuilt: from which snapshot, and how many events after it."""

    snapshot_seq: int  # 0: no snapshot was used, the whole log was replayed
    replayed: int
    rejected: int  # snapshots set aside as untrustworthy
    seconds: float


class Store:
    """The event log and the projection of it. Made by ``open_store``."""

    def __init__(self, state_dir: Path, config: StoreConfig) -> None:
        self.config = config
        self.snapshot_dir = state_dir / "snapshots"
        self.state = State()
        self.startup = Startup(0, 0, 0, 0.0)
        self._log: Log | None = None
        self._last_ts: str | None = None  # ts of the event at state.head_seq
        self._snapshot_seq = 0  # the seq the newest snapshot written or loaded covers
        self._snapshot_due = trio.Event()
        self._snapshotting = trio.Lock()
        self._on_applied: Callable[[list[Event]], None] | None = None
        self.snapshots_written = 0

    @property
    def log(self) -> Log:
        assert self._log is not None, "the store is not open"
        return self._log

    # -- reading: the log's own (``backend.Store`` names these five) ---------------------

    async def read(
        self, after_seq: int, limit: int = 1000, event_filter: Filter = None
    ) -> list[Event]:
        return await self.log.read(after_seq, limit, event_filter)

    def subscribe(
        self, after_seq: int | None, event_filter: Filter = None, *, buffer: int | None = None
    ) -> Subscription:
        return self.log.subscribe(after_seq, event_filter, buffer=buffer)

    # -- appending, checked -------------------------------------------------------------

    async def append(self, pending: PendingEvent) -> Event:
        """Append after checking that the projection accepts the event.

        A rejected event raises ``ProjectionError`` and is never written: once
        durable, an event the fold refuses would stop every later start-up.
        The check sees the state as of the last durable batch, which is exact
        as long as one task appends for a sandbox at a time (its actor).
        """
        self._check((pending,))
        return await self.log.append(pending)

    async def append_many(self, pendings: Sequence[PendingEvent]) -> list[Event]:
        self._check(pendings)
        return await self.log.append_many(pendings)

    def _check(self, pendings: Sequence[PendingEvent]) -> None:
        seq = self.log.head_seq + 1
        after: dict[str, SandboxRecord | None] = {}
        for pending in pendings:
            if pending.sandbox_id is None:
                continue
            sandbox_id = pending.sandbox_id
            record = (
                after[sandbox_id] if sandbox_id in after else self.state.sandboxes.get(sandbox_id)
            )
            provisional = Event(seq, "", sandbox_id, pending.by, pending.data)
            after[sandbox_id] = step(record, provisional)
            seq += 1

    # -- folding --------------------------------------------------------------------------

    def _on_durable(self, events: list[Event]) -> None:
        state = self.state
        for event in events:
            try:
                apply(state, event)
            except ProjectionError:
                # Durable all the same; the next start-up will stop on it too.
                logger.exception("the projection refused a durable event")
        self._last_ts = events[-1].ts
        every = self.config.snapshot_every
        if every and state.head_seq - self._snapshot_seq >= every:
            self._snapshot_due.set()
        if self._on_applied is not None:
            self._on_applied(events)

    async def _rebuild(self) -> None:
        """Newest trustworthy snapshot, then the tail of the log after it."""
        log = self.log
        started = trio.current_time()
        head = log.head_seq
        chosen: snapshots.Snapshot | None = None
        rejected = 0
        # Newest first, each read and decoded only if the newer ones were refused.
        found = snapshots.candidates(self.snapshot_dir, head)
        while (snapshot := await trio.to_thread.run_sync(next, found, None)) is not None:
            reason = await self._distrust(snapshot)
            if reason is None:
                chosen = snapshot
                break
            rejected += 1
            await trio.to_thread.run_sync(snapshots.reject, snapshot.path, reason)
        state = chosen.state if chosen is not None else State()
        if state.head_seq + 1 < log.oldest_seq:
            raise CorruptLog(
                log.directory,
                0,
                log.oldest_seq,
                f"no usable snapshot reaches seq {log.oldest_seq - 1}, and retention "
                "removed the events before it: the state cannot be rebuilt",
            )
        # The state is the store's before the replay: a log that follows a shared
        # stream (NATS) may fold what others append as soon as its replay ends.
        self.state = state
        replayed, last_ts = await log.replay(state, state.head_seq)
        self._last_ts = last_ts if replayed else (chosen.anchor_ts if chosen else None)
        self._snapshot_seq = chosen.seq if chosen else 0
        self.startup = Startup(
            chosen.seq if chosen else 0, replayed, rejected, trio.current_time() - started
        )
        logger.info(
            "rebuilt the state from snapshot %d and %d events after it (%d sandboxes, seq %d)",
            self.startup.snapshot_seq,
            replayed,
            len(state.sandboxes),
            state.head_seq,
        )

    async def _distrust(self, snapshot: snapshots.Snapshot) -> str | None:
        """Why the log does not back this snapshot up, or None if it does."""
        log = self.log
        if snapshot.format < snapshots.FORMAT_VERSION and log.oldest_seq <= 1:
            return (
                f"it is in snapshot format {snapshot.format}, which knows only each sandbox's"
                " last owner; the whole log is replayed instead"
            )
        if snapshot.seq == 0:
            return None
        if snapshot.seq < log.oldest_seq:
            # Its event is gone but its tail may not be: trust the checksum alone.
            return None if snapshot.seq + 1 >= log.oldest_seq else "the log no longer reaches it"
        event = None
        if snapshot.position is not None:
            event = await log.check_position(snapshot.seq, *snapshot.position)
        if event is None:
            event = await log.event_at(snapshot.seq)  # finding it may index a segment
        if event is None or event.ts != snapshot.anchor_ts:
            return f"the log's event at seq {snapshot.seq} is not the one it was taken after"
        return None

    # -- snapshots and retention ---------------------------------------------------------

    async def _snapshot_when_due(self) -> None:
        while True:
            await self._snapshot_due.wait()
            self._snapshot_due = trio.Event()
            try:
                await self.snapshot()
            except OSError as exc:
                # The log still holds everything; the next snapshot will try again.
                logger.warning("could not write a snapshot: %s", exc)

    @property
    def snapshot_seq(self) -> int:
        """The seq covered by the newest snapshot written (or loaded at start-up)."""
        return self._snapshot_seq

    async def snapshot(self) -> int:
        """Snapshot the projection now; return the seq it covers."""
        async with self._snapshotting:  # one at a time: prune must not race a write
            return await self._snapshot()

    async def _snapshot(self) -> int:
        state = copy_state(self.state)
        anchor_ts = self._last_ts
        log = self.log
        position = log.head_position if log.head_seq == state.head_seq else None
        blob = snapshots.encode_snapshot(state, anchor_ts, position)
        await trio.to_thread.run_sync(
            snapshots.write_snapshot, self.snapshot_dir, state.head_seq, blob
        )
        self.snapshots_written += 1
        self._snapshot_seq = max(self._snapshot_seq, state.head_seq)
        kept = await trio.to_thread.run_sync(
            snapshots.prune, self.snapshot_dir, self.config.snapshots_kept
        )
        if self.config.retention == "snapshots" and kept:
            await self.log.remove_segments_through(min(kept))
        return state.head_seq


@asynccontextmanager
async def open_store(
    state_dir: Path,
    config: StoreConfig = StoreConfig(),
    *,
    on_applied: Callable[[list[Event]], None] | None = None,
) -> AsyncIterator[Store]:
    """Open the log, rebuild the state, and keep both current until exit.

    ``on_applied`` (the metrics) is called after each durable batch has been folded
    into ``store.state``, before its appenders are answered. On a clean exit a last
    snapshot is taken, so the next start-up replays nothing.
    """
    if config.snapshot_every < 0 or config.snapshots_kept < 1:
        raise ValueError("snapshot_every must be >= 0 and snapshots_kept >= 1")
    if config.nats is not None and config.retention != "all":
        raise ValueError("retention must be 'all' on a shared stream: it is the stream's to limit")
    store = Store(state_dir, config)
    try:
        async with _open_log(state_dir, config, store._on_durable) as log:
            store._log = log
            await store._rebuild()
            store._on_applied = on_applied
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._snapshot_when_due)
                yield store
                nursery.cancel_scope.cancel()
            if store.state.head_seq != store._snapshot_seq:
                try:
                    await store.snapshot()
                except OSError as exc:
                    logger.warning("could not write the shutdown snapshot: %s", exc)
    except BaseExceptionGroup as group:
        raise only_exception(group) from None


def _open_log(
    state_dir: Path, config: StoreConfig, on_durable: Callable[[list[Event]], None]
) -> AbstractAsyncContextManager[Log]:
    """The file log in ``state_dir/events``, or the JetStream log ``config.nats`` names."""
    if config.nats is None:
        return open_event_log(
            state_dir / "events",
            segment_bytes=config.segment_bytes,
            on_durable=on_durable,
            max_batch=config.max_batch,
            subscriber_buffer=config.subscriber_buffer,
        )
    from sandboxd.events.nats.log import open_nats_log  # nats-py only where it is used

    return open_nats_log(
        config.nats,
        on_durable=on_durable,
        max_batch=config.max_batch,
        subscriber_buffer=config.subscriber_buffer,
    )
