"""A start cut by a full disk between sandbox.created and sandbox.process_started finishes
by itself once there is room again (issue 8, defect 5), on a real full disk.

The state dir is a small tmpfs mounted here. The disk is filled the instant
sandbox.created is durable (the store below does it, around the real one), and
the spec's command is longer than a page, so its sandbox.process_started
cannot fit in what the log's last page has left: the log refuses exactly that
event, with the kernel's own ENOSPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import trio

from sandboxd.actors.errors import Unavailable
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.registry import Registry
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.backend import Predicate, Store
from sandboxd.events.projection import State, Status
from sandboxd.events.store import open_store
from sandboxd.events.subscriptions import Subscription
from tests.daemon_process import SANDBOX_PYTHON, boundary_for, daemon_config
from tests.e2e.support import fill, tmpfs
from tests.support import end_sandboxes, eventually, sandbox_pids

#: Its process_started record is over a page: a full disk has no room for it.
LONG = SpecConfig(
    id="long",
    command=(SANDBOX_PYTHON, "-c", "import time; time.sleep(60)", "x" * 6000),
    health_check_path="",
)


@attrs.frozen
class Admin:
    id: str | None = None
    admin: bool = True


class FillingAfterCreated:
    """The real store; the disk under it is filled once a sandbox.created is durable."""

    def __init__(self, store: Store, mount: Path) -> None:
        self._store = store
        self._mount = mount
        self.filler: Path | None = None

    @property
    def state(self) -> State:
        return self._store.state

    async def append(self, pending: ev.PendingEvent) -> ev.Event:
        event = await self._store.append(pending)
        if isinstance(pending.data, ev.SandboxCreated) and self.filler is None:
            self.filler = fill(self._mount)
        return event

    async def append_many(self, pendings: Sequence[ev.PendingEvent]) -> list[ev.Event]:
        return await self._store.append_many(pendings)

    async def read(
        self, after_seq: int, limit: int = 1000, event_filter: Predicate = None
    ) -> list[ev.Event]:
        return await self._store.read(after_seq, limit, event_filter)

    def subscribe(
        self, after_seq: int | None, event_filter: Predicate = None, *, buffer: int | None = None
    ) -> Subscription:
        return self._store.subscribe(after_seq, event_filter, buffer=buffer)


async def test_a_start_cut_before_its_process_is_recorded_finishes_once_there_is_room(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        config = daemon_config(disk / "state", (LONG,), on_shutdown="keep")
        boundary = boundary_for(config)
        try:
            async with open_store(config.state_dir) as real, trio.open_nursery() as nursery:
                await nursery.start(boundary.run)
                store = FillingAfterCreated(real, disk)
                keys = SessionKeys.of_state_dir(config.state_dir)
                registry = Registry(config, store, keys, nursery, boundary)
                with pytest.raises(Unavailable, match="No space left on device"):
                    await registry.start_sandbox(Admin(), sandbox_id="s")
                record = registry.state.sandboxes["s"]
                assert record.status is Status.STARTING and record.pid is None
                assert store.filler is not None

                store.filler.unlink()  # room again: the start goes on by itself
                await eventually(
                    lambda: registry.state.sandboxes["s"].status is Status.RUNNING,
                    within=15,
                    what="the start to finish",
                )
                record = registry.state.sandboxes["s"]
                assert record.pid is not None
                assert sandbox_pids(config.state_dir)["s"] == [record.pid]

                assert await registry.delete(Admin(), "s") is True
                nursery.cancel_scope.cancel()
        finally:
            boundary.close()
            end_sandboxes(config.state_dir)
