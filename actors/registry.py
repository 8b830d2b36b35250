"""Registry: finds and creates sandbox actors, and owns what sandboxes share.

Ids, ports, uids and limits are decided here, synchronously, so two starts at
the same instant can never take the same port, uid or id; each sandbox's actor
then owns it, from ``sandbox.created`` on. Commands reach an actor through its mailbox
(``mailbox.py``). Reads (get, search) answer from the projection and never probe
a process; session keys are derived from it. This is the in-process API the
gateway exposes.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from sandboxd.actors import idle, output
from sandboxd.actors.actor import SandboxActor, SandboxContext
from sandboxd.actors.boundary.cgroupfs import Usage
from sandboxd.actors.boundary.identities import holders
from sandboxd.actors.boundary.in_force import Boundary, UidPoolExhausted
from sandboxd.actors.boundary.trees import SandboxTree
from sandboxd.actors.errors import (
    BadRequest,
    Conflict,
    LimitExceeded,
    NotFound,
    StartFailed,
    Unavailable,
)
from sandboxd.actors.exits import ExitWatcher
from sandboxd.actors.info import SandboxInfo, SandboxUsage, SpecInfo, sandbox_info, spec_info
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.labels import matches as label_matches
from sandboxd.actors.mailbox import Delete, IdleCheck, Pause, Resume, Start
from sandboxd.actors.output_follow import OutputFollow, OutputWatcher
from sandboxd.actors.ports import PortAllocator, PortsExhausted
from sandboxd.actors.specs import SpecConfig
from sandboxd.actors.visibility import sees_sandbox as visible
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.backend import Store
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.projection import SandboxRecord, State, Status

log = logging.getLogger(__name__)

#: A fault a test asks of a daemon it runs (never set in production): see _pause_for_room.
_FAULT = os.environ.get("SANDBOXD_TEST_FAULT")

MAX_PAGE = 100
#: Seconds between checks of every sandbox's output size: one thread hop per sweep for
#: all sandboxes, where a watcher per sandbox cost a wakeup each (4 % CPU idle at 1,000).
OUTPUT_SWEEP_INTERVAL = 1.0
#: Seconds between checks of the uids deleted sandboxes left draining: one scan of /proc,
#: of /tmp, /var/tmp and /dev/shm, and of System V IPC (tens of ms with 1,000 processes),
#: made only while some uid drains. The pool hands out never-used uids first, so a
#: drained uid is needed back only once the whole range has gone round.
UID_SWEEP_INTERVAL = 10.0
#: Idle verdicts told to actors at once (each may append an event): see _tell_idle_verdicts.
IDLE_VERDICTS_AT_ONCE = 50


class Caller(Protocol):
    """Who asks: a user id (None for the embedded admin) and whether it is an admin."""

    @property
    def id(self) -> str | None: ...

    @property
    def admin(self) -> bool: ...


def new_sandbox_id() -> str:
    """A fresh sandbox id: 16 random bytes, base64url (22 characters).

    Never with a leading "-": a command line would take such an id for an option
    (``sandboxd get -Xf...``), one id in 64 otherwise.
    """
    while (sandbox_id := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return sandbox_id


class Registry:
    def __init__(
        self,
        config: Config,
        store: Store,
        keys: SessionKeys,
        nursery: trio.Nursery,
        boundary: Boundary,
    ) -> None:
        self.config = config
        #: How sandboxes are held (cgroups or markers), who they run as, their limits.
        self.boundary = boundary
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
        #: Sandboxes being paused to make room (on_full = "pause_oldest"): no longer
        #: counted as running, never chosen twice.
        self._yielding: set[str] = set()
        #: Sandboxes being resumed (or run again): counted as running already.
        self._resuming: set[str] = set()
        self._uids_draining = trio.Event()
        #: Every sandbox's output file, reached through this directory's descriptor.
        self.outputs = output.OutputDir(config.state_dir / "output")
        #: Tells the actors when their main processes exit: one task for every sandbox.
        self.exits = ExitWatcher()
        self._context = SandboxContext(
            store=store,
            keys=keys,
            outputs=self.outputs,
            stop_timeout=config.stop_timeout,
            output_cap_bytes=config.output_cap_bytes,
            unhealthy_after=config.unhealthy_after,
            release=self._release,
            boundary=boundary,
            environ=os.environ,
            exits=self.exits,
            url_host=config.url_host,
            node=config.node_id,
        )
        #: Wakes the followers of output files (sandbox.logs with follow) as they grow.
        self.output_watcher = OutputWatcher()
        nursery.start_soon(self.output_watcher.run)
        nursery.start_soon(self.exits.run)
        nursery.start_soon(self.cap_outputs_forever)
        if boundary.uids is not None:
            nursery.start_soon(self.reclaim_uids_forever)
        if any(spec.idle_timeout is not None for spec in config.specs):
            nursery.start_soon(self.sweep_idle_forever)

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

    async def sweep_idle_forever(self) -> None:
        """Every ``idle_check_interval``: one sweep over every RUNNING sandbox whose spec has
        an idle_timeout, its verdicts told to their actors (actors/idle.py)."""
        sweep = idle.IdleSweep()
        try:
            while True:
                await trio.sleep(self.config.idle_check_interval)
                watched = self.idle_watched()
                # A cancel waits for the thread (run_sync's default), so the sweep's
                # descriptors are closed below only once it is done with them.
                samples = await trio.to_thread.run_sync(
                    sweep.measure, watched, time.time(), self.config.port_range
                )
                verdicts = sweep.sweep(watched, samples)
                with trio.move_on_after(self.config.idle_check_interval):
                    await self._tell_idle_verdicts(verdicts)
        finally:
            sweep.close()

    async def _tell_idle_verdicts(self, verdicts: list[tuple[str, idle.IdleVerdict]]) -> None:
        """Tell each actor its verdict, IDLE_VERDICTS_AT_ONCE at a time: a thousand sandboxes
        that fall idle together would otherwise be a thousand actors suspended in the log's
        append at once, whose frames the allocator keeps: measured at 1,000 (bench/
        sandboxes.py's scale role), 68-69 MB of RSS after told all at once, 63 MB told 50
        at a time, 62-63 MB told nothing. Bounded by the sweep's interval (the caller's
        deadline): a verdict not told by then is judged again at the next sweep."""
        for first in range(0, len(verdicts), IDLE_VERDICTS_AT_ONCE):
            told = []
            for sandbox_id, verdict in verdicts[first : first + IDLE_VERDICTS_AT_ONCE]:
                actor = self._actors.get(sandbox_id)
                check = IdleCheck(verdict)
                if actor is not None and actor.tell(check):
                    told.append(check)
            for check in told:
                await check.handled.wait()

    def idle_watched(self) -> list[idle.Watched]:
        """The sandboxes the idle sweep looks at: RUNNING, their spec has an idle_timeout."""
        return [
            idle.Watched(record, actor.spec, actor.tree)
            for actor in self._actors.values()
            if actor.spec.idle_timeout is not None
            and (record := self.state.sandboxes.get(actor.sandbox_id)) is not None
            and record.status is Status.RUNNING
        ]

    async def reclaim_uids_forever(self) -> None:
        """Give back to the pool each draining uid once nothing runs or remains under it."""
        uids = self.boundary.uids
        assert uids is not None
        while True:
            await self._uids_draining.wait()
            await trio.sleep(UID_SWEEP_INTERVAL)
            draining = uids.draining
            held = await trio.to_thread.run_sync(holders, draining)
            uids.reclaim(draining - held.keys())
            if not uids.draining:
                self._uids_draining = trio.Event()

    async def hold_unknown_uids(self) -> None:
        """At start-up (recovery): uids of the range in use by no sandbox of the log (a
        deleted sandbox's leftovers in /tmp, say) drain before anyone gets them again."""
        uids = self.boundary.uids
        if uids is None:
            return
        found = await trio.to_thread.run_sync(holders, range(uids.low, uids.high + 1))
        uids.hold(uid for uid in found if uids.owner_of(uid) is None)
        if uids.draining:
            self._uids_draining.set()

    # -- starting -----------------------------------------------------------------------

    async def start_sandbox(
        self,
        caller: Caller,
        *,
        spec_id: str | None = None,
        sandbox_id: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        owner: str | None = None,
        node: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> SandboxInfo:
        """``owner``: an admin's start for that user, whose sandbox it then is (its
        ``created_by_user_id``, who sees it, whose limit it counts against). ``node``:
        where to run it, which can only be here; a cluster routes a start to another node
        before it comes to this registry (daemon/cluster/). ``labels``: its tags, within
        actors/labels.py's bounds (the gateway checked them)."""
        if self._closed:
            raise Unavailable("the daemon is shutting down and starts no sandbox")
        if node is not None and node != self.config.node_id:
            raise NotFound(
                f"node {node!r} is not a node of this daemon's cluster; this node is"
                f" {self.config.node_id!r}"
            )
        _admin_only(caller, "owner", owner)
        creator = caller.id if owner is None else owner
        spec = self.specs.get(spec_id or self.default_spec.id)
        if spec is None:
            raise NotFound(f"spec {spec_id!r} does not exist; spec.list shows the specs")
        if sandbox_id is None:
            sandbox_id = new_sandbox_id()
        elif sandbox_id in self._actors or sandbox_id in self.state.sandboxes:
            raise Conflict(f"sandbox id {sandbox_id!r} is taken")
        self._check_limits(caller, creator)
        victims = self._make_room(creator, sandbox_id)
        try:
            ports = self.ports.reserve_many(len(spec.ports))
        except PortsExhausted:
            self._yielding.difference_update(victims)
            raise LimitExceeded(
                f"port_range has fewer than {len(spec.ports)} free ports, which spec"
                f" {spec.id} needs"
                if len(spec.ports) > 1
                else "every port of port_range is in use"
            ) from None
        try:
            uid = self.boundary.allocate_uid(sandbox_id)
        except UidPoolExhausted as exc:
            for port in ports:
                self.ports.release(port)
            self._yielding.difference_update(victims)
            raise LimitExceeded(str(exc)) from None
        # From the checks to here, no checkpoint: concurrent starts see this one's id,
        # ports, uid and place in the limits. The actor owns the rest, sandbox.created first.
        actor = SandboxActor(sandbox_id, spec, self._context, owner=creator)
        self._actors[sandbox_id] = actor
        working_dir = str(self.config.sandboxes_dir / sandbox_id)
        named = tuple(
            ev.NamedPort(name, port) for name, port in zip(spec.ports, ports, strict=True)
        )
        start = Start(caller.id, named, working_dir, uid, dict(env or {}), wait, dict(labels or {}))
        if victims:
            # The room first, then the start: until it is made, the actor holds the
            # id, ports and uid (and counts as running) with nothing to do.
            try:
                with trio.CancelScope(shield=True):
                    await self._pause_for_room(caller, victims, sandbox_id)
            except BaseException:
                self._release(sandbox_id, ports)
                raise
        actor.enqueue(start)
        # Not nursery.start: its task status would stay in the actor's frames for the
        # sandbox's whole life, and with it this (finished) task: 1.5 KB a sandbox.
        self._nursery.start_soon(self._run_actor, actor, False)
        info = self._info(await start.reply.receive())
        if wait and info.status is Status.ERROR:
            raise StartFailed(f"sandbox {sandbox_id} did not start: {info.error}", info)
        return info

    def _check_limits(self, caller: Caller, owner: str | None) -> None:
        """The limits for a sandbox ``caller`` starts for ``owner`` (itself, unless an admin
        gave one): the total, then the owner's own (none for the embedded admin)."""
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
                f"(you have {self._count_of(caller.id)})"
            )
        if owner is None:
            return
        mine = self._count_of(owner)
        if mine >= self.config.max_sandboxes_per_user:
            raise LimitExceeded(
                f"user {owner} has {mine} sandboxes, the limit max_sandboxes_per_user is "
                f"{self.config.max_sandboxes_per_user}"
            )

    # -- making room (max_running, on_full) --------------------------------------------

    def _runs(self, sandbox_id: str, record: SandboxRecord | None) -> bool:
        """Whether the sandbox counts against max_running: STARTING, RUNNING, or unhealthy
        with its process alive; one being created or resumed too; not one being paused."""
        if sandbox_id in self._yielding:
            return False
        if record is None or sandbox_id in self._resuming:
            return True  # its creation or resume is under way
        return record.status is Status.STARTING or (
            record.pid is not None and record.status is not Status.PAUSED
        )

    def _make_room(self, owner: str | None, sandbox_id: str) -> list[str]:
        """The sandboxes of ``owner`` to pause so that one more of its own runs (the
        oldest RUNNING first), marked as yielding; [] if it fits. LimitExceeded under
        on_full = "refuse", or if too few of its sandboxes are RUNNING to pause.

        Synchronous: what it counts and marks, no other start or resume sees half-done.
        One pass over the sandboxes (creation order is the map's), microseconds at 1,000.
        """
        limit = self.config.max_running
        if limit is None:
            return []
        state = self.state.sandboxes
        running = [
            i
            for i, actor in self._actors.items()
            if actor.owner == owner and i != sandbox_id and self._runs(i, state.get(i))
        ]
        excess = len(running) + 1 - limit
        if excess <= 0:
            return []
        whose = "the admin" if owner is None else f"user {owner}"
        if self.config.on_full == "refuse":
            raise LimitExceeded(
                f"{whose} has {len(running)} sandboxes running, the limit max_running is"
                f" {limit}; pause or delete one first"
            )
        oldest = [
            r.id
            for r in state.values()
            if r.created_by_user_id == owner
            and r.status is Status.RUNNING
            and r.id != sandbox_id
            and r.id in self._actors
            and r.id not in self._yielding
            and r.id not in self._resuming
        ][:excess]
        if len(oldest) < excess:
            raise LimitExceeded(
                f"{whose} has {len(running)} sandboxes running, the limit max_running is"
                f" {limit}, and too few of them are RUNNING to pause for room (the others"
                " are starting or being paused)"
            )
        self._yielding.update(oldest)
        return oldest

    async def _pause_for_room(self, caller: Caller, victims: list[str], for_id: str) -> None:
        """Pause ``victims`` (concurrently), each ``sandbox.paused`` with the reason "make
        room for ``for_id``". One that stopped running meanwhile (exited, deleted) made its
        room too; any other failure fails the start or resume that asked for the room."""
        failures: list[Exception] = []

        async def pause(victim: str) -> None:
            actor = self._actors.get(victim)
            try:
                if actor is None:
                    return  # deleted meanwhile: its room is free
                await actor.ask(Pause(caller.id, reason=f"make room for {for_id}"))
            except (Conflict, NotFound):
                return  # no longer RUNNING: room made all the same
            except Exception as exc:
                failures.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                for victim in victims:
                    nursery.start_soon(pause, victim)
        finally:
            self._yielding.difference_update(victims)
        if failures:
            raise failures[0]
        if _FAULT == "stop-after-make-room":
            # Test-only: the daemon stops itself (SIGSTOP) with the room made and the
            # start not begun, so that a test can kill -9 it exactly there.
            os.kill(os.getpid(), signal.SIGSTOP)

    def _count_of(self, owner: str | None) -> int:
        return sum(1 for actor in self._actors.values() if actor.owner == owner)

    async def _run_actor(self, actor: SandboxActor, adopted: bool) -> None:
        # A failing actor is logged and contained: it never takes its siblings down.
        try:
            await actor.run(adopted=adopted)
        except Exception:
            log.exception("sandbox %s: its actor failed", actor.sandbox_id)
        finally:
            if self._actors.get(actor.sandbox_id) is actor:
                del self._actors[actor.sandbox_id]

    def _release(self, sandbox_id: str, ports: Sequence[int]) -> None:
        """The sandbox is gone (deleted, or its creation refused): its id, ports and key are
        free, and its uid drains until nothing runs or remains under it."""
        for port in ports:
            self.ports.release(port)
        self.keys.forget(sandbox_id)
        self._actors.pop(sandbox_id, None)
        if self.boundary.release_uid(sandbox_id) is not None:
            self._uids_draining.set()

    # -- adoption (recovery) ------------------------------------------------------------

    async def record_events(self, items: Sequence[tuple[str, ev.Payload]]) -> list[ev.Event]:
        """Append events the daemon itself causes, durable together: one write, one fdatasync."""
        pendings = [ev.PendingEvent(sandbox_id, None, data) for sandbox_id, data in items]
        try:
            return await self._store.append_many(pendings)
        except LogUnavailable as exc:
            raise Unavailable(f"the event log cannot be written now: {exc}") from None

    def holds(self, sandbox_id: str) -> bool:
        """Whether this daemon has an actor for the sandbox (it runs, or is kept for delete)."""
        return sandbox_id in self._actors

    def adopt(
        self, record: SandboxRecord, *, tree: SandboxTree | None = None, lost: bool = False
    ) -> None:
        """Take back a sandbox the log knows of: watch its process again, or keep it for delete.

        ``tree``: what holds its processes, if not the boundary's own (recovery found
        its process outside any cgroup). ``lost``: recovery found its process gone
        and marked it MISSING (its restart policy may run it again). The actor's
        task starts soon (at the caller's next checkpoint); commands sent before
        then wait in its mailbox.
        """
        spec = self.specs.get(record.spec_id) or self.default_spec
        for named in record.named_ports:
            self.ports.claim(named.port)
        self.keys.remember(record.id, record.created_seq)
        self.boundary.assign_uid(record.id, record.uid)
        actor = SandboxActor(
            record.id, spec, self._context, owner=record.created_by_user_id, tree=tree, lost=lost
        )
        self._actors[record.id] = actor
        self._nursery.start_soon(self._run_actor, actor, True)

    # -- reading ------------------------------------------------------------------------

    def _info(self, record: SandboxRecord) -> SandboxInfo:
        return sandbox_info(record, self.keys.key_for(record.id, record.created_seq))

    def get(self, caller: Caller, sandbox_id: str, *, usage: bool = False) -> SandboxInfo | None:
        """The sandbox's info; with ``usage``, what its cgroup has used too (sandbox.get)."""
        record = self.state.sandboxes.get(sandbox_id)
        if record is None or not visible(caller, record):
            return None
        info = self._info(record)
        actor = self._actors.get(sandbox_id)
        if usage and actor is not None:
            info = attrs.evolve(info, usage=actor.usage())
        return info

    def batch_get(self, caller: Caller, sandbox_ids: list[str]) -> list[SandboxInfo | None]:
        return [self.get(caller, sandbox_id) for sandbox_id in sandbox_ids]

    def get_by_session_key(self, caller: Caller, key: str) -> SandboxInfo | None:
        """The sandbox whose session key ``key`` is, while RUNNING (the only status in which
        its key is shown) and visible to ``caller``; else None. One dict lookup and one
        constant-time comparison (``SessionKeys.sandbox_for``), however many sandboxes run."""
        sandbox_id = self.keys.sandbox_for(key)
        if sandbox_id is None:
            return None
        record = self.state.sandboxes.get(sandbox_id)
        if record is None or record.status is not Status.RUNNING or not visible(caller, record):
            return None
        return self._info(record)

    def search(
        self,
        caller: Caller,
        *,
        page_id: str | None = None,
        limit: int = MAX_PAGE,
        status: Status | None = None,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[list[SandboxInfo], str | None]:
        """Newest first. The cursor is the creation seq of the last item given, so paging
        while sandboxes come and go neither repeats nor skips one that existed throughout.
        ``owner`` (admins only): that user's sandboxes alone; ``labels``: those with every
        one of these labels."""
        _admin_only(caller, "owner", owner)
        before = _parse_cursor(page_id)
        page: list[SandboxRecord] = []
        next_page_id = None
        for record in self._newest_first(before):
            if (
                not visible(caller, record)
                or (status is not None and record.status is not status)
                or (owner is not None and record.created_by_user_id != owner)
                or (labels and not label_matches(record.labels, labels))
            ):
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

    def usage(self, caller: Caller, sandbox_id: str) -> Usage | None:
        """What the sandbox's cgroup has used (four small reads); None under markers.

        NotFound if no such sandbox is visible to ``caller``.
        """
        return self._visible_actor(caller, sandbox_id).usage()

    async def stats(self, caller: Caller, sandbox_ids: list[str]) -> list[SandboxUsage | None]:
        """sandbox.stats: each sandbox's usage, or None where none is visible; in order.

        The sandboxes are looked up here, their cgroups read in a worker thread: up to
        100 x 4 small kernfs reads, 4-18 ms measured, not to be spent on the event loop.
        """
        actors = [
            self._actors.get(i)
            if (r := self.state.sandboxes.get(i)) and visible(caller, r)
            else None
            for i in sandbox_ids
        ]

        def read() -> list[SandboxUsage | None]:
            return [
                None if actor is None else SandboxUsage(actor.sandbox_id, actor.usage())
                for actor in actors
            ]

        return await trio.to_thread.run_sync(read)

    def specs_for(self, caller: Caller) -> list[SpecInfo]:
        return [spec_info(s, mask_values=not caller.admin) for s in self.specs.values()]

    def spec_for(self, caller: Caller, spec_id: str) -> SpecInfo | None:
        spec = self.specs.get(spec_id)
        return None if spec is None else spec_info(spec, mask_values=not caller.admin)

    def logs(self, caller: Caller, sandbox_id: str, tail_bytes: int) -> tuple[str, bool]:
        actor = self._visible_actor(caller, sandbox_id)
        return actor.output.tail(tail_bytes)

    async def follow_logs(self, caller: Caller, sandbox_id: str, tail_bytes: int) -> OutputFollow:
        """The tail of the output, and a follower of what the sandbox writes after it."""
        actor = self._visible_actor(caller, sandbox_id)
        return await OutputFollow.open(actor.output, self.output_watcher, tail_bytes)

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
        """RUNNING again: a PAUSED sandbox thawed, one whose process is gone run again.

        Under max_running, it counts as running from here on; with on_full =
        "pause_oldest", the oldest RUNNING sandboxes of its owner are paused first.
        """
        actor = self._visible_actor(caller, sandbox_id)
        record = self.state.sandboxes[sandbox_id]
        counted = (
            self._runs(sandbox_id, record)
            or sandbox_id in self._yielding
            # A gone one whose spec is no longer configured cannot run: the actor says so.
            or (record.status is not Status.PAUSED and record.spec_id not in self.specs)
        )
        victims = [] if counted else self._make_room(actor.owner, sandbox_id)
        if not counted:
            self._resuming.add(sandbox_id)
        try:
            if victims:
                with trio.CancelScope(shield=True):
                    await self._pause_for_room(caller, victims, sandbox_id)
            record = await actor.ask(Resume(caller.id))
        finally:
            self._resuming.discard(sandbox_id)
        info = self._info(record)
        if info.status is Status.ERROR:
            raise StartFailed(f"sandbox {sandbox_id} did not start again: {info.error}", info)
        return info

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


def _admin_only(caller: Caller, name: str, value: str | None) -> None:
    if value is not None and not caller.admin:
        raise BadRequest(f"'{name}' may be given by an admin only; a user's sandboxes are its own")


def _parse_cursor(page_id: str | None) -> int | None:
    if page_id is None:
        return None
    if not page_id.isdecimal() or len(page_id) > 20:
        raise BadRequest(f"page_id {page_id!r} is not a cursor that search gave")
    return int(page_id)
