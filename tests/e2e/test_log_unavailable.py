"""A start whose events the log refuses half-way (disk full), made deterministic.

test_disk_full.py fills a real disk, where which event is the first refused
depends on how much room the log's last page has. Here the log refuses
exactly the event chosen, through the real store and registry, to pin down
what the client is told and what state the sandbox is left in each time.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from sandboxd.actors.errors import Unavailable
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.registry import Registry
from sandboxd.events import types as ev
from sandboxd.events.backend import Predicate, Store
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.projection import State, Status
from sandboxd.events.store import open_store
from sandboxd.events.subscriptions import Subscription
from tests.daemon_process import boundary_for
from tests.e2e.support import make_config
from tests.support import end_sandboxes, eventually, ids_of, sandbox_pids


@attrs.frozen
class Admin:
    id: str | None = None
    admin: bool = True


class Refusing:
    """The real store, refusing events of the given types while ``full`` is set."""

    def __init__(self, store: Store, types: set[str]) -> None:
        self._store = store
        self.types = types
        self.full = True
        self.refused = 0

    @property
    def state(self) -> State:
        return self._store.state

    async def append(self, pending: ev.PendingEvent) -> ev.Event:
        if self.full and pending.data.TYPE in self.types:
            self.refused += 1
            await trio.lowlevel.checkpoint()
            raise LogUnavailable("the log could not write: [Errno 28] No space left on device")
        return await self._store.append(pending)

    async def append_many(self, pendings: Sequence[ev.PendingEvent]) -> list[ev.Event]:
        return [await self.append(pending) for pending in pendings]

    async def read(
        self, after_seq: int, limit: int = 1000, event_filter: Predicate = None
    ) -> list[ev.Event]:
        return await self._store.read(after_seq, limit, event_filter)

    def subscribe(
        self, after_seq: int | None, event_filter: Predicate = None, *, buffer: int | None = None
    ) -> Subscription:
        return self._store.subscribe(after_seq, event_filter, buffer=buffer)


@asynccontextmanager
async def registry_refusing(
    tmp_path: Path, *types: str
) -> AsyncIterator[tuple[Registry, Refusing]]:
    config = make_config(tmp_path / "state")
    boundary = boundary_for(config)
    try:
        async with open_store(config.state_dir) as store, trio.open_nursery() as nursery:
            await nursery.start(boundary.run)
            refusing = Refusing(store, set(types))
            keys = SessionKeys.of_state_dir(config.state_dir)
            registry = Registry(config, refusing, keys, nursery, boundary)
            yield registry, refusing
            nursery.cancel_scope.cancel()
    finally:
        boundary.close()
        end_sandboxes(config.state_dir)


def marked(registry: Registry, sandbox_id: str) -> list[int]:
    """The sandbox's processes, on either boundary (its cgroup's, or its marked ones)."""
    return sandbox_pids(registry.config.state_dir).get(sandbox_id, [])


async def test_a_refused_process_started_undoes_the_spawn_and_leaves_a_deletable_sandbox(
    tmp_path: Path,
) -> None:
    async with registry_refusing(tmp_path, "sandbox.process_started") as (registry, log):
        with pytest.raises(Unavailable, match="No space left"):
            await registry.start_sandbox(Admin(), spec_id="sleep", sandbox_id="s")
        record = registry.state.sandboxes["s"]
        assert record.status is Status.STARTING and record.pid is None
        assert marked(registry, "s") == []  # nothing runs that the log does not know
        log.full = False
        assert await registry.delete(Admin(), "s") is True
        assert "s" not in registry.state.sandboxes


async def test_a_refused_running_answers_unavailable_and_the_start_finishes_with_room(
    tmp_path: Path,
) -> None:
    async with registry_refusing(tmp_path, "sandbox.running") as (registry, log):
        with trio.fail_after(10), pytest.raises(Unavailable, match="No space left"):
            await registry.start_sandbox(Admin(), spec_id="sleep", sandbox_id="s")
        record = registry.state.sandboxes["s"]
        assert record.status is Status.STARTING and record.pid is not None
        assert marked(registry, "s") == [record.pid]
        await eventually(lambda: log.refused >= 3, what="the actor to retry")
        log.full = False  # room again: its next retry records it
        await eventually(
            lambda: registry.state.sandboxes["s"].status is Status.RUNNING, what="RUNNING"
        )
        assert registry.state.sandboxes["s"].pid == record.pid


async def test_a_refused_exit_is_recorded_once_there_is_room(tmp_path: Path) -> None:
    async with registry_refusing(tmp_path, "sandbox.exited") as (registry, log):
        info = await registry.start_sandbox(Admin(), spec_id="sleep", sandbox_id="s")
        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)  # our child: its pid cannot be reused before we reap it
        await eventually(lambda: log.refused >= 2, what="the exit to be refused")
        assert registry.state.sandboxes["s"].status is Status.RUNNING  # the log's word, still
        log.full = False
        await eventually(lambda: registry.state.sandboxes["s"].status is Status.ERROR, what="ERROR")
        assert registry.state.sandboxes["s"].pid is None


async def test_a_refused_process_started_is_retried_until_the_start_finishes(
    tmp_path: Path,
) -> None:
    async with registry_refusing(tmp_path, "sandbox.process_started") as (registry, log):
        with pytest.raises(Unavailable, match="No space left"):
            await registry.start_sandbox(Admin(), spec_id="sleep", sandbox_id="s")
        await eventually(lambda: log.refused >= 3, what="the actor to retry")
        assert registry.state.sandboxes["s"].pid is None
        log.full = False  # room again: the next retry starts the process and records it
        await eventually(
            lambda: registry.state.sandboxes["s"].status is Status.RUNNING, what="RUNNING"
        )
        record = registry.state.sandboxes["s"]
        assert record.pid is not None
        assert marked(registry, "s") == [record.pid]  # the undone attempts left nothing
        # Started again, it keeps the uid it was created with.
        if registry.boundary.own_uids:
            assert record.uid is not None and ids_of(record.pid) == ({record.uid}, {record.uid})
