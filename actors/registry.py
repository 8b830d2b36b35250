"""Registry: finds and creates sandbox actors, and owns what sandboxes share.

Ports, limits, ids and session keys are decided here, synchronously, so two
starts at the same instant can never take the same port or id. Reads (get,
search) answer from the projection and never probe a process. This is the
in-process API the gateway exposes.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Protocol

import trio

from sandboxd.actors import process
from sandboxd.actors.actor import (
    Append,
    SandboxActor,
    SandboxContext,
    StartPlan,
    build_env,
    fill,
)
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
from sandboxd.actors.ports import PortAllocator, PortsExhausted
from sandboxd.actors.specs import SpecConfig
from sandboxd.actors.visibility import sees_sandbox as visible
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.log import LogUnavailable
from sandboxd.events.projection import SandboxRecord, State, Status

log = logging.getLogger(__name__)

MAX_PAGE = 100
#: Seconds between checks of every sandbox's output size: one thread hop per sweep for
#: all sandboxes, where a watcher per sandbox cost a wakeup each (4 % CPU idle at 1,000).
OUTPUT_SWEEP_INTERVAL = 1.0

AppendMany = Callable[[Sequence[ev.PendingEvent]], Awaitable[list[ev.Event]]]


class Caller(Protocol):
    """Who asks: a user id (None for the embedded admin) and whether it is an admin."""

    @property
    def id(self) -> str | None: ...

    @property
    def admin(self) -> bool: ...


class Registry:
    def __init__(
        self,
        config: Config,
        state: State,
        append: Append,
        keys: SessionKeys,
        nursery: trio.Nursery,
        *,
        append_many: AppendMany | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.keys = keys
        self._append_many = append_many
        self.specs: dict[str, SpecConfig] = {spec.id: spec for spec in config.specs}
        self.default_spec = config.specs[0]
        self.ports = PortAllocator(*config.port_range)
        self._nursery = nursery
        self._actors: dict[str, SandboxActor] = {}
        #: Ids taken, and by whom, whose sandbox.created is not yet in the projection:
        #: the limits count them, or concurrent starts could all pass the same check.
        self._starting: dict[str, str | None] = {}
        self._closed = False
        #: Set in every sandbox's environment: which daemon's sandbox a process is.
        self.marker = str(config.state_dir.resolve())
        output_dir = config.state_dir / "output"
        output_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._context = SandboxContext(
            append=append,
            state=state,
            output_dir=output_dir,
            stop_timeout=config.stop_timeout,
            output_cap_bytes=config.output_cap_bytes,
            unhealthy_after=config.unhealthy_after,
            release=self._release,
            marker=self.marker,
        )
        nursery.start_soon(self.cap_outputs_forever)

    async def cap_outputs_forever(self) -> None:
        """Keep every sandbox's output within ``output_cap_bytes`` (and its one rotation)."""
        while True:
            paths = [actor.output_path for actor in self._actors.values()]
            await trio.to_thread.run_sync(process.cap_outputs, paths, self.config.output_cap_bytes)
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
        elif sandbox_id in self.state.sandboxes or sandbox_id in self._starting:
            raise Conflict(f"sandbox id {sandbox_id!r} is taken")
        self._check_limits(caller)
        try:
            port = self.ports.reserve()
        except PortsExhausted:
            raise LimitExceeded("every port of port_range is in use") from None
        self._starting[sandbox_id] = caller.id
        working_dir = self.config.sandboxes_dir / sandbox_id
        created = ev.SandboxCreated(spec.id, caller.id, str(working_dir), port)
        try:
            # Shielded: a cancelled append may still become durable, and a sandbox the
            # log holds must get its actor; the append itself is bounded by the disk.
            with trio.CancelScope(shield=True):
                event = await self._context.record(sandbox_id, caller.id, created)
        except BaseException:
            self.ports.release(port)
            raise
        finally:
            del self._starting[sandbox_id]
        # The key is derived from the created event's seq, so it exists only from here on.
        key = self.keys.key_for(sandbox_id, event.seq)
        self.keys.remember(sandbox_id, event.seq)
        placeholders = {
            "port": str(port),
            "sandbox_id": sandbox_id,
            "working_dir": str(working_dir),
            "session_api_key": key,
        }
        plan = StartPlan(
            command=[fill(arg, placeholders) for arg in spec.command],
            env=build_env(spec, os.environ, env or {}, placeholders, self.marker),
            cwd=fill(spec.working_dir, placeholders) if spec.working_dir else str(working_dir),
        )
        actor = SandboxActor(sandbox_id, spec, self._context)
        self._actors[sandbox_id] = actor
        with trio.CancelScope(shield=True):
            await self._nursery.start(self._run_actor, actor, plan)
        if wait:
            await actor.settled.wait()
            if actor.start_error is not None:
                raise actor.start_error
        info = self._info_or_none(sandbox_id)
        if info is None:  # deleted while starting
            raise NotFound(f"sandbox {sandbox_id} was deleted while it started")
        if wait and info.status is Status.ERROR:
            raise StartFailed(f"sandbox {sandbox_id} did not start: {info.error}", info)
        return info

    def _check_limits(self, caller: Caller) -> None:
        live = len(self.state.sandboxes) + len(self._starting)
        if live >= self.config.max_sandboxes:
            raise LimitExceeded(
                f"{live} sandboxes are live, the limit max_sandboxes is {self.config.max_sandboxes}"
            )
        if caller.id is None:
            return
        mine = sum(1 for r in self.state.sandboxes.values() if r.created_by_user_id == caller.id)
        mine += sum(1 for owner in self._starting.values() if owner == caller.id)
        if mine >= self.config.max_sandboxes_per_user:
            raise LimitExceeded(
                f"user {caller.id} has {mine} sandboxes, the limit max_sandboxes_per_user is "
                f"{self.config.max_sandboxes_per_user}"
            )

    async def _run_actor(
        self,
        actor: SandboxActor,
        plan: StartPlan | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # A failing actor is logged and contained: it never takes its siblings down.
        try:
            if plan is None:
                await actor.run_adopted(task_status=task_status)
            else:
                await actor.run_new(plan, task_status=task_status)
        except Exception:
            log.exception("sandbox %s: its actor failed", actor.sandbox_id)
        finally:
            actor.settled.set()
            if self._actors.get(actor.sandbox_id) is actor:
                del self._actors[actor.sandbox_id]

    def _release(self, sandbox_id: str, port: int) -> None:
        self.ports.release(port)
        self.keys.forget(sandbox_id)

    # -- adoption (recovery) ------------------------------------------------------------

    async def record_event(self, sandbox_id: str, data: ev.Payload) -> ev.Event:
        """Append an event the daemon itself causes (``by`` is null)."""
        return await self._context.record(sandbox_id, None, data)

    async def record_events(self, items: Sequence[tuple[str, ev.Payload]]) -> list[ev.Event]:
        """Append events the daemon itself causes, durable together: one write, one fdatasync."""
        pendings = [ev.PendingEvent(sandbox_id, None, data) for sandbox_id, data in items]
        try:
            if self._append_many is None:  # one at a time, as every event used to be
                return [await self._context.append(pending) for pending in pendings]
            return await self._append_many(pendings)
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
        actor = SandboxActor(record.id, spec, self._context)
        self._actors[record.id] = actor
        self._nursery.start_soon(self._run_actor, actor, None)

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
        return process.read_output_tail(actor.output_path, tail_bytes)

    # -- commands -----------------------------------------------------------------------

    def _visible_actor(self, caller: Caller, sandbox_id: str) -> SandboxActor:
        record = self.state.sandboxes.get(sandbox_id)
        actor = self._actors.get(sandbox_id)
        if record is None or actor is None or not visible(caller, record):
            raise NotFound(f"sandbox {sandbox_id} does not exist")
        return actor

    async def pause(self, caller: Caller, sandbox_id: str) -> SandboxInfo:
        record: SandboxRecord = await self._visible_actor(caller, sandbox_id).command(
            "pause", caller.id
        )
        return self._info(record)

    async def resume(self, caller: Caller, sandbox_id: str) -> SandboxInfo:
        record: SandboxRecord = await self._visible_actor(caller, sandbox_id).command(
            "resume", caller.id
        )
        return self._info(record)

    async def delete(self, caller: Caller, sandbox_id: str) -> bool:
        deleted: bool = await self._visible_actor(caller, sandbox_id).command("delete", caller.id)
        return deleted

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
