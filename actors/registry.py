"""Registry: finds and creates sandbox actors, and owns what sandboxes share.

Ids, ports and limits are decided here, synchronously, so two starts at the
same instant can never take the same port or id; each sandbox's actor then owns
it, from ``sandbox.created`` on. Commands reach an actor through its mailbox
(``mailbox.py``). Reads (get, search) answer from the projection and never probe
a process; session keys are derived from it. This is the in-process API the
gateway exposes.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import trio

from sandboxd.actors import output
from sandboxd.actors.actor import SandboxActor, SandboxContext
from sandboxd.actors.errors import (
    BadRequest,
    Conflict,
    LimitExceeded,
    NotFound,
    StartFailed,
    Unavailable,
)
from sandboxd.actors.info import SandboxInfo, SpecInfo, sandbox_info, spec_info
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.mailbox import Delete, Pause, Resume, Start
from sandboxd.actors.ports import PortAllocator, PortsExhausted
from sandboxd.actors.specs import SpecConfig
from sandboxd.actors.visibility import sees_sandbox as visible
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.backend import Store
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.projection import SandboxRecord, State, Status

log = logging.getLogger(__name__)

MAX_PAGE = 100
#: Seconds between checks of every sandbox's output size: one thread hop per sweep for
#: all sandboxes, where a watcher per sandbox cost a wakeup each (4 % CPU idle at 1,000).
OUTPUT_SWEEP_INTERVAL = 1.0


class Caller(Protocol):
    """Who asks: a user id (None for the embedded admin) and whether it is an admin."""

    @property
    def id(self) -> str | None: ...

    @property
    def admin(self) -> bool: ...


class Registry:
    def __init__(
        self, config: Config, store: Store, keys: SessionKeys, nursery: trio.Nursery
    ) -> None:
        self.config = config
        self._store = store
        self.keys = keys
        self.specs: dict[str, SpecConfig] = {spec.id: spec for spec in config.specs}
        self.default_spec = config.specs[0]
        self.ports = PortAllocator(*config.port_range)
        self._nursery = nursery
        #: Every sandbox's actor, from the instant its id is taken to the instant its
        #: deletion is durable: what the limits count and what ids conflict with.
        self._actors: dict[str, SandboxActor] = {}
        self._closed = False
        #: Set in every sandbox's environment: which daemon's sandbox a process is.
        self.marker = str(config.state_dir.resolve())
        #: Every sandbox's output file, reached through this directory's descriptor.
        self.outputs = output.OutputDir(config.state_dir / "output")
        self._context = SandboxContext(
            store=store,
            keys=keys,
            outputs=self.outputs,
            stop_timeout=config.stop_timeout,
            output_cap_bytes=config.output_cap_bytes,
            unhealthy_after=config.unhealthy_after,
            release=self._release,
            marker=self.marker,
            environ=os.environ,
        )
        nursery.start_soon(self.cap_outputs_forever)

    @property
    def state(self) -> State:
        """The projection: every sandbox the log holds (deleted ones are not in it)."""
        return self._store.state

    async def cap_outputs_forever(self) -> None:
        """Keep every sandbox's output within ``output_cap_bytes`` (and its one rotation)."""
        while True:
            files = [actor.output for actor in self._actors.values()]
            await trio.to_thread.run_sync(output.cap_outputs, files, self.config.output_cap_bytes)
            await trio.sleep(OUTPUT_SWEEP_INTERVAL)

    # -- starting -----------------------------------------------------------------------

    async def start_sandbox(
        self,
        caller: Caller,
        *,
        spec_id: str | None = None,
        sandbox_id: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> SandboxInfo:
        if self._closed:
            raise Unavailable("the daemon is shutting down and starts no sandbox")
        spec = self.specs.get(spec_id or self.default_spec.id)
        if spec is None:
            raise NotFound(f"spec {spec_id!r} does not exist; spec.list shows the specs")
        if sandbox_id is None:
            sandbox_id = secrets.token_urlsafe(16)
        elif sandbox_id in self._actors or sandbox_id in self.state.sandboxes:
            raise Conflict(f"sandbox id {sandbox_id!r} is taken")
        self._check_limits(caller)
        try:
            port = self.ports.reserve()
        except PortsExhausted:
            raise LimitExceeded("every port of port_range is in use") from None
        # From the checks to here, no checkpoint: concurrent starts see this one's id,
        # port and place in the limits. The actor owns the rest, sandbox.created first.
        actor = SandboxActor(sandbox_id, spec, self._context, owner=caller.id)
        self._actors[sandbox_id] = actor
        working_dir = str(self.config.sandboxes_dir / sandbox_id)
        start = Start(caller.id, port, working_dir, dict(env or {}), wait)
        actor.enqueue(start)
        with trio.CancelScope(shield=True):  # an actor with its start queued must run
            await self._nursery.start(self._run_actor, actor, False)
        info = self._info(await start.reply.receive())
        if wait and info.status is Status.ERROR:
            raise StartFailed(f"sandbox {sandbox_id} did not start: {info.error}", info)
        return info

    def _check_limits(self, caller: Caller) -> None:
        live = len(self._actors)
        if live >= self.config.max_sandboxes:
            if caller.admin:
                raise LimitExceeded(
                    f"{live} sandboxes are live, the limit max_sandboxes is "
                    f"{self.config.max_sandboxes}"
                )
            # Only its own count: how many sandboxes others run is not a user's to know.
            raise LimitExceeded(
                "no room for another sandbox: the daemon's max_sandboxes is reached "
                f"(you have {self._count_of(caller)})"
            )
        if caller.id is None:
            return
        mine = self._count_of(caller)
        if mine >= self.config.max_sandboxes_per_user:
            raise LimitExceeded(
                f"user {caller.id} has {mine} sandboxes, the limit max_sandboxes_per_user is "
                f"{self.config.max_sandboxes_per_user}"
            )

    def _count_of(self, caller: Caller) -> int:
        return sum(1 for actor in self._actors.values() if actor.owner == caller.id)

    async def _run_actor(
        self,
        actor: SandboxActor,
        adopted: bool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # A failing actor is logged and contained: it never takes its siblings down.
        try:
            await actor.run(adopted=adopted, task_status=task_status)
        except Exception:
            log.exception("sandbox %s: its actor failed", actor.sandbox_id)
        finally:
            if self._actors.get(actor.sandbox_id) is actor:
                del self._actors[actor.sandbox_id]

    def _release(self, sandbox_id: str, port: int) -> None:
        """The sandbox is gone (deleted, or its creation refused): its id, port and key are free."""
        self.ports.release(port)
        self.keys.forget(sandbox_id)
        self._actors.pop(sandbox_id, None)

    # -- adoption (recovery) ------------------------------------------------------------

    async def record_events(self, items: Sequence[tuple[str, ev.Payload]]) -> list[ev.Event]:
        """Append events the daemon itself causes, durable together: one write, one fdatasync."""
        pendings = [ev.PendingEvent(sandbox_id, None, data) for sandbox_id, data in items]
        try:
            return await self._store.append_many(pendings)
        except LogUnavailable as exc:
            raise Unavailable(f"the event log cannot be written now: {exc}") from None

    def adopt(self, record: SandboxRecord) -> None:
        """Take back a sandbox the log knows of: watch its process again, or keep it for delete.

        The actor's task starts soon (at the caller's next checkpoint); commands sent
        before then wait in its mailbox.
        """
        spec = self.specs.get(record.spec_id) or self.default_spec
        self.ports.claim(record.port)
        self.keys.remember(record.id, record.created_seq)
        actor = SandboxActor(record.id, spec, self._context, owner=record.created_by_user_id)
        self._actors[record.id] = actor
        self._nursery.start_soon(self._run_actor, actor, True)

    # -- reading ------------------------------------------------------------------------

    def _info(self, record: SandboxRecord) -> SandboxInfo:
        return sandbox_info(record, self.keys.key_for(record.id, record.created_seq))

    def _info_or_none(self, sandbox_id: str) -> SandboxInfo | None:
        record = self.state.sandboxes.get(sandbox_id)
        return None if record is None else self._info(record)

    def get(self, caller: Caller, sandbox_id: str) -> SandboxInfo | None:
        record = self.state.sandboxes.get(sandbox_id)
        if record is None or not visible(caller, record):
            return None
        return self._info(record)

    def batch_get(self, caller: Caller, sandbox_ids: list[str]) -> list[SandboxInfo | None]:
        return [self.get(caller, sandbox_id) for sandbox_id in sandbox_ids]

    def get_by_session_key(self, key: str) -> SandboxInfo | None:
        sandbox_id = self.keys.sandbox_for(key)
        return None if sandbox_id is None else self._info_or_none(sandbox_id)

    def search(
        self,
        caller: Caller,
        *,
        page_id: str | None = None,
        limit: int = MAX_PAGE,
        status: Status | None = None,
    ) -> tuple[list[SandboxInfo], str | None]:
        """Newest first. The cursor is the creation seq of the last item given, so paging
        while sandboxes come and go neither repeats nor skips one that existed throughout."""
        before = _parse_cursor(page_id)
        page: list[SandboxRecord] = []
        next_page_id = None
        for record in self._newest_first(before):
            if not visible(caller, record) or (status is not None and record.status is not status):
                continue
            if len(page) == limit:
                next_page_id = str(page[-1].created_seq)
                break
            page.append(record)
        return [self._info(r) for r in page], next_page_id

    def _newest_first(self, before: int | None) -> Iterator[SandboxRecord]:
        # The map is in creation order: walking it backwards is newest first.
        for record in reversed(self.state.sandboxes.values()):
            if before is None or record.created_seq < before:
                yield record

    def specs_for(self, caller: Caller) -> list[SpecInfo]:
        return [spec_info(s, mask_values=not caller.admin) for s in self.specs.values()]

    def spec_for(self, caller: Caller, spec_id: str) -> SpecInfo | None:
        spec = self.specs.get(spec_id)
        return None if spec is None else spec_info(spec, mask_values=not caller.admin)

    def logs(self, caller: Caller, sandbox_id: str, tail_bytes: int) -> tuple[str, bool]:
        actor = self._visible_actor(caller, sandbox_id)
        return actor.output.tail(tail_bytes)

    # -- commands -----------------------------------------------------------------------

    def _visible_actor(self, caller: Caller, sandbox_id: str) -> SandboxActor:
        record = self.state.sandboxes.get(sandbox_id)
        actor = self._actors.get(sandbox_id)
        if record is None or actor is None or not visible(caller, record):
            raise NotFound(f"sandbox {sandbox_id} does not exist")
        return actor

    async def pause(self, caller: Caller, sandbox_id: str) -> SandboxInfo:
        record = await self._visible_actor(caller, sandbox_id).ask(Pause(caller.id))
        return self._info(record)

    async def resume(self, caller: Caller, sandbox_id: str) -> SandboxInfo:
        record = await self._visible_actor(caller, sandbox_id).ask(Resume(caller.id))
        return self._info(record)

    async def delete(self, caller: Caller, sandbox_id: str) -> bool:
        return await self._visible_actor(caller, sandbox_id).ask(Delete(caller.id))

    async def delete_all(self) -> None:
        """Stop every sandbox (``on_shutdown = "stop"``), concurrently."""
        admin = _Daemon()
        async with trio.open_nursery() as nursery:
            for sandbox_id in list(self.state.sandboxes):
                nursery.start_soon(self._delete_quietly, admin, sandbox_id)

    async def _delete_quietly(self, caller: Caller, sandbox_id: str) -> None:
        try:
            await self.delete(caller, sandbox_id)
        except NotFound:
            pass  # deleted meanwhile
        except Exception:
            log.exception("sandbox %s: delete at shutdown failed", sandbox_id)

    def close(self) -> None:
        """Refuse new starts from now on (shutdown)."""
        self._closed = True


class _Daemon:
    id: str | None = None
    admin: bool = True


def _parse_cursor(page_id: str | None) -> int | None:
    if page_id is None:
        return None
    if not page_id.isdecimal() or len(page_id) > 20:
        raise BadRequest(f"page_id {page_id!r} is not a cursor that search gave")
    return int(page_id)
