"""SandboxActor: one trio task per sandbox, the one owner of its processes and of its events.

Commands (start, pause, resume, delete) and what the actor's own watchers
notice (ready, exited, unhealthy) arrive in one bounded mailbox as the frozen
classes of ``mailbox.py`` and are handled one at a time, so a pause racing a
delete is never a crash or a half-state. The actor acts on its processes
first, then appends the event that records what happened; its state is the
projection's record, read back after each append. Every event of a sandbox,
from ``sandbox.created`` to ``sandbox.deleted``, is appended here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from sandboxd.actors import health, output, restarts
from sandboxd.actors.boundary.cgroupfs import Usage
from sandboxd.actors.boundary.cgroups import CgroupError
from sandboxd.actors.boundary.confine import Confinement, ConfinementError
from sandboxd.actors.boundary.identities import Identity
from sandboxd.actors.boundary.in_force import Boundary
from sandboxd.actors.boundary.limits import LimitsNotEnforceable, format_bytes
from sandboxd.actors.boundary.trees import SandboxTree
from sandboxd.actors.boundary.workdirs import make_working_dir, remove_tree
from sandboxd.actors.errors import Conflict, NotFound, SandboxError, Unavailable
from sandboxd.actors.exits import ExitWatch, ExitWatcher
from sandboxd.actors.idle import IdleVerdict
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.launch import Placeholders, StartPlan, plan_start
from sandboxd.actors.mailbox import (
    Asked,
    Delete,
    Exited,
    Healthy,
    IdleCheck,
    Lost,
    Mailbox,
    Message,
    Notice,
    Pause,
    Ready,
    ReadyTimeout,
    Relaunch,
    Reply,
    Resume,
    Start,
    Unhealthy,
)
from sandboxd.actors.proctree import ExitStatus, ProcessId, TreeStateTimeout
from sandboxd.actors.spawn import Child, spawn
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.backend import Store
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.projection import SandboxRecord, State, Status

log = logging.getLogger(__name__)

T = TypeVar("T")

MAILBOX_SIZE = 32
#: An event the log could not take (disk full) is tried again after a backoff:
#: RETRY_FIRST_DELAY, doubling up to RETRY_MAX_DELAY, RETRY_ATTEMPTS times at most
#: (about eight minutes in all).
RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 5.0
RETRY_ATTEMPTS = 100
OUTPUT_TAIL_FOR_ERRORS = 2048  # bytes of output quoted in a start_failed reason


@attrs.frozen
class SandboxContext:
    """What every actor shares with the registry: the log, the keys, the config."""

    store: Store
    keys: SessionKeys
    outputs: output.OutputDir
    stop_timeout: float
    output_cap_bytes: int
    unhealthy_after: int
    #: Frees (sandbox_id, its ports) once the sandbox is gone: deleted, or never created;
    #: and its uid, which drains until nothing runs or remains under it.
    release: Callable[[str, Sequence[int]], None]
    #: Its tree (cgroup or markers), who it runs as, how its limits are enforced.
    boundary: Boundary
    environ: Mapping[str, str]  # the daemon's environment, which a spec's inherit_env draws on
    #: Tells each actor when its main process has exited (one epoll for every sandbox).
    exits: ExitWatcher
    url_host: str = "127.0.0.1"  # the host of the URLs a running sandbox exposes
    node: str | None = None  # this daemon's node_id, recorded as each sandbox's owner

    @property
    def state(self) -> State:
        return self.store.state

    async def record(self, sandbox_id: str, by: str | None, data: ev.Payload) -> ev.Event:
        """Append an event about a sandbox; return once it is durable and folded."""
        try:
            return await self.store.append(ev.PendingEvent(sandbox_id, by, data))
        except LogUnavailable as exc:
            raise Unavailable(f"the event log cannot be written now: {exc}") from None


class SandboxActor:
    def __init__(
        self,
        sandbox_id: str,
        spec: SpecConfig,
        context: SandboxContext,
        *,
        owner: str | None,
        tree: SandboxTree | None = None,
        lost: bool = False,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.spec = spec
        #: Who created it: the registry's per-user limit counts actors by it.
        self.owner = owner
        self._ctx = context
        #: Where the sandbox's stdout and stderr go.
        self.output = context.outputs.file(sandbox_id)
        self._mailbox = Mailbox[Message](MAILBOX_SIZE)
        #: The sandbox's main process, ours or adopted; None while it has none.
        self._process: ProcessId | None = None
        #: The same, if this daemon started it: our child, which we reap.
        self._child: Child | None = None
        #: Its processes on the boundary in force; None until it first has one.
        self._tree: SandboxTree | None = tree
        #: The OOM kills its cgroup had counted when its process started (None: no count).
        self._oom_before: int | None = None
        #: Who its processes run as (None: the daemon's own user), for its whole life.
        self._identity: Identity | None = None
        #: The client's start ``env``, for its runs again while this daemon lives (never
        #: logged: it may hold secrets); None if it gave none.
        self._start_env: Mapping[str, str] | None = None
        #: The start waiting for its outcome (RUNNING, or start_failed).
        self._starting: Reply[SandboxRecord] | None = None
        self._readiness: trio.CancelScope | None = None
        self._liveness: trio.CancelScope | None = None
        #: Its main process's exit, watched; then, once it has exited, what reports it.
        self._exit_watch: ExitWatch | None = None
        self._exit_report: trio.CancelScope | None = None
        #: Recovery just marked it MISSING (adopted): a failure, to its restart policy.
        self._lost = lost
        self._nursery: trio.Nursery | None = None
        self._done = False  # deleted, or never created: the actor ends

    # -- what the registry calls --------------------------------------------------------

    @property
    def record(self) -> SandboxRecord:
        record = self._ctx.state.sandboxes.get(self.sandbox_id)
        if record is None:
            raise NotFound(f"sandbox {self.sandbox_id} does not exist")
        return record

    @property
    def tree(self) -> SandboxTree | None:
        """Its processes on the boundary in force; None until it first has some."""
        return self._tree

    def tell(self, notice: IdleCheck) -> bool:
        """Post ``notice`` if its mailbox has room now, without waiting; False if not (the
        idle sweep then judges the sandbox again at its next sweep)."""
        try:
            self._mailbox.post_nowait(notice)
        except (trio.WouldBlock, trio.BrokenResourceError):
            return False
        return True

    def usage(self) -> Usage | None:
        """What its cgroup has used so far (None under markers, or before it has a tree)."""
        return self._tree.usage() if self._tree is not None else None

    def enqueue(self, start: Start) -> None:
        """Put a new actor's start in its mailbox, without a checkpoint.

        A new actor's mailbox is empty, so this cannot block: the registry can
        make its decisions and hand them over in one step, never leaving an
        actor that holds an id and a port but has nothing to do.
        """
        self._mailbox.post_nowait(start)

    async def ask(self, command: Asked[T]) -> T:
        """Send a command and wait for its answer."""
        assert isinstance(command, Start | Pause | Resume | Delete)
        try:
            await self._mailbox.post(command)
        except trio.BrokenResourceError:
            raise NotFound(f"sandbox {self.sandbox_id} does not exist") from None
        return await command.reply.receive()

    async def run(self, *, adopted: bool) -> None:
        """Serve the mailbox until the sandbox is deleted (or its creation was refused).

        ``adopted``: the log already holds the sandbox (a previous daemon made
        it): watch its recorded process again, or keep it for delete.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if adopted:
                    record = self.record
                    self._identity = self._ctx.boundary.identity(record.uid)
                    self._tree = self._tree or self._ctx.boundary.adopted_tree(self.sandbox_id)
                    self._watch_again(record)
                    if self._lost:
                        nursery.start_soon(self._post, Lost())
                try:
                    await self._serve()
                finally:
                    # An actor that failed leaves no start waiting for ever.
                    self._answer_start(Unavailable(f"sandbox {self.sandbox_id}: its actor stopped"))
            finally:
                self._stop_watching_exit()
            nursery.cancel_scope.cancel()

    # -- the mailbox --------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while not self._done:
                await self._handle(await self._mailbox.get())
        finally:
            self._mailbox.close()
            self._refuse_queued()

    def _refuse_queued(self) -> None:
        """Answer the commands queued behind the end (a delete): their sandbox is gone."""
        while True:
            try:
                message = self._mailbox.get_nowait()
            except trio.WouldBlock:
                return
            if isinstance(message, Start | Pause | Resume | Delete):
                message.reply.fail(NotFound(f"sandbox {self.sandbox_id} does not exist"))
            elif isinstance(message, IdleCheck):
                message.handled.set()  # dropped: the sweep need not wait for it

    async def _handle(self, message: Message) -> None:
        match message:
            case Start():
                await self._start(message)
            case Pause(by=by, reason=reason, reply=reply):
                await self._answer(
                    reply,
                    self._move(
                        by,
                        Status.RUNNING,
                        ev.SandboxPaused(reason),
                        SandboxTree.pause,
                        SandboxTree.resume,
                    ),
                    "pause",
                )
            case Resume(by=by, reply=reply) if self._gone(self._ctx.state):
                await self._resume_gone(by, reply)
            case Resume(by=by, reply=reply):
                await self._answer(
                    reply,
                    self._move(
                        by,
                        Status.PAUSED,
                        ev.SandboxResumed(),
                        SandboxTree.resume,
                        SandboxTree.pause,
                    ),
                    "resume",
                )
            case Delete(by=by, reply=delete_reply):
                await self._answer(delete_reply, self._delete(by), "delete")
            case _:
                await self._notice(message)

    async def _answer(self, reply: Reply[T], work: Awaitable[T], what: str) -> None:
        try:
            result = await work
        except SandboxError as exc:
            reply.fail(exc)
        except TreeStateTimeout as exc:
            reply.fail(Unavailable(f"sandbox {self.sandbox_id}: {exc}; try again"))
        except Exception as exc:
            log.exception("sandbox %s: %s failed", self.sandbox_id, what)
            reply.fail(exc)
        else:
            reply.send(result)

    async def _post(self, notice: Notice) -> None:
        # Once the actor has finished there is nothing left to tell.
        with contextlib.suppress(trio.BrokenResourceError):
            await self._mailbox.post(notice)

    async def _post_later(self, notice: Notice, delay: float) -> None:
        await trio.sleep(delay)
        await self._post(notice)

    def _retry_later(self, notice: Notice) -> None:
        """Post ``notice`` again after a backoff: the log refused the event it leads to."""
        if notice.attempt + 1 >= RETRY_ATTEMPTS:
            log.error(
                "sandbox %s: gave up recording %s: log unavailable",
                self.sandbox_id,
                type(notice).__name__,
            )
            return
        delay = min(RETRY_FIRST_DELAY * 2**notice.attempt, RETRY_MAX_DELAY)
        log.warning(
            "sandbox %s: could not record %s: log unavailable; trying again in %g s",
            self.sandbox_id,
            type(notice).__name__,
            delay,
        )
        assert self._nursery is not None
        self._nursery.start_soon(
            self._post_later, attrs.evolve(notice, attempt=notice.attempt + 1), delay
        )

    async def _record(self, data: ev.Payload, by: str | None = None) -> ev.Event:
        return await self._ctx.record(self.sandbox_id, by, data)

    # -- starting -----------------------------------------------------------------------

    async def _start(self, start: Start) -> None:
        # Whose it is (an admin may start one for another user) and who did it (``by``).
        created = ev.SandboxCreated(
            self.spec.id,
            self.owner,
            start.working_dir,
            start.port,
            uid=start.uid,
            ports=list(start.ports),
            node=self._ctx.node,
            labels=dict(start.labels) or None,
        )
        try:
            event = await self._record(created, start.by)
        except Exception as exc:
            # Never created: the actor ends, and its id and ports are free again.
            start.reply.fail(exc)
            self._done = True
            self._ctx.release(self.sandbox_id, [named.port for named in start.ports])
            return
        # The key is derived from the created event's seq, so it exists only from here on.
        self._ctx.keys.remember(self.sandbox_id, event.seq)
        self._identity = self._ctx.boundary.identity(start.uid)
        self._start_env = dict(start.env) or None
        if start.wait:
            self._starting = start.reply
        else:
            start.reply.send(self.record)
        try:
            await self._launch(self._plan())
        except Unavailable as exc:
            # The sandbox (its created event is durable) stays, STARTING, and its
            # start finishes by itself once the log takes its next event.
            self._answer_start(exc)
            self._retry_later(Relaunch())

    async def _launch(self, plan: StartPlan) -> None:
        """Spawn the planned process in its boundary and record it, then watch for readiness.

        If the log refuses ``sandbox.process_started``, the spawn is undone and
        Unavailable raised: nothing may run that the log does not know of.
        """
        assert self._nursery is not None
        boundary = self._ctx.boundary
        try:
            enforcement = boundary.enforcement(self.spec.limits)
            tree = boundary.tree(self.sandbox_id, enforcement.cgroup)
        except (LimitsNotEnforceable, CgroupError) as exc:
            await self._fail_start(str(exc), None)
            return
        self._tree = tree
        confinement = Confinement(tree.cgroup_procs, self._identity, enforcement.rlimits)
        launch = attrs.evolve(plan.launch, confinement=confinement)
        try:
            fd = await trio.to_thread.run_sync(
                _prepare,
                self.record.restarts == 0,  # a restart keeps what its sandbox made
                Path(self.record.working_dir),
                Path(launch.cwd),
                self._identity,
                self.output,
                self._ctx.output_cap_bytes,
            )
            try:
                child = await spawn(launch, output=fd)
            finally:
                os.close(fd)  # the child has its own copy
        except (OSError, ConfinementError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            await self._fail_start(f"cannot run {launch.command[0]!r}: {why}", None)
            return
        self._child = child
        self._process = child.id
        self._oom_before = tree.oom_kills()
        self._watch_exit(child.id, child, tree)
        # Probing may begin while its event is written: RUNNING is recorded only once this
        # handler is done (the actor takes one message at a time), so after process_started.
        self._start_readiness()
        main = child.id
        try:
            # The main process leads its own session: its group is its pid.
            await self._record(
                ev.ProcessStarted(
                    main.pid,
                    main.pid,
                    main.create_time,
                    plan.recorded_command,
                    uid=self._identity.uid if self._identity else None,
                )
            )
        except Unavailable:
            self._cancel_watchers()
            await tree.terminate(main, stop_timeout=0)
            self._process = None
            raise

    def _answer_start(self, result: SandboxRecord | BaseException) -> None:
        """Answer the start waiting for its outcome, if one is."""
        reply, self._starting = self._starting, None
        if reply is None:
            return
        if isinstance(result, BaseException):
            reply.fail(result)
        else:
            reply.send(result)

    async def _fail_start(
        self, reason: str, exit_code: int | None, exit_signal: int | None = None
    ) -> None:
        self._cancel_watchers()
        if self._policy_starts_it:
            # The restart policy's own start failed: one more failure, restarted again
            # (one event, durable at once) unless the policy gives up.
            why = self._gives_up()
            if why is None:
                await self._restart(
                    f"restart = on-failure: {reason}",
                    ev.RESTART_ON_FAILURE,
                    None,
                    exit_code,
                    exit_signal,
                )
                return
            reason = f"{reason}; {why}"
        try:
            await self._record(ev.StartFailed(reason, exit_code))
        except Unavailable as exc:
            self._answer_start(exc)
            raise
        self._process = None
        self._answer_start(self.record)

    # -- running again ------------------------------------------------------------------

    def _gone(self, state: State) -> bool:
        """Whether its process is gone for good: ERROR after it ended or failed to start,
        or MISSING. Such a sandbox runs again on a resume or by its restart policy."""
        record = state.sandboxes.get(self.sandbox_id)
        return (
            record is not None
            and record.status in (Status.ERROR, Status.MISSING)
            and record.pid is None
            and self._process is None
        )

    async def _resume_gone(self, by: str | None, reply: Reply[SandboxRecord]) -> None:
        """``sandbox.resume`` of a sandbox whose process is gone: its command runs again, as
        `docker start` does, and the resume is answered as a start (RUNNING, or ERROR)."""
        record = self.record
        if record.spec_id != self.spec.id:
            reply.fail(
                Conflict(
                    f"sandbox {record.id} cannot run again: its spec {record.spec_id!r} is no"
                    " longer configured"
                )
            )
            return
        self._starting = reply
        try:
            await self._restart(
                f"resumed by {by or 'the admin'}",
                ev.RESTART_ON_RESUME,
                by,
                record.exit_code,
                record.exit_signal,
            )
        except SandboxError as exc:
            self._answer_start(exc)
        except Exception as exc:
            log.exception("sandbox %s: resume failed", self.sandbox_id)
            self._answer_start(exc)

    @property
    def _restarts_on_failure(self) -> bool:
        # A spec the config no longer has is not this one (the default stands in for it).
        return self.spec.restart == "on-failure" and self.record.spec_id == self.spec.id

    @property
    def _policy_starts_it(self) -> bool:
        """Whether the start under way is the restart policy's, whose failure is one more
        failure: no client waits on it and the policy restarted the sandbox since a person
        last started it (the start and a resume that runs it again empty that count).
        Read from the log, so a daemon restart in the middle does not change the answer."""
        return (
            self._starting is None
            and bool(self.record.failure_restarts)
            and self._restarts_on_failure
        )

    def _gives_up(self) -> str | None:
        """Why the restart policy restarts it no more; None if it restarts it once more."""
        return restarts.gave_up(self.spec, self.record, time.time())

    async def _restart(
        self,
        reason: str,
        trigger: str,
        by: str | None,
        exit_code: int | None,
        exit_signal: int | None,
    ) -> None:
        """Run the spec's command again, with the same id, ports, key and working dir.

        ``sandbox.restarted`` (STARTING) first: if the log refuses it, nothing has
        changed and Unavailable is raised. Then as a start: spawned, recorded,
        readiness awaited.
        """
        await self._record(ev.SandboxRestarted(reason, trigger, exit_code, exit_signal), by)
        # The process before has ended (or was ended: unhealthy, not ready in time): its
        # exit watch, which would wait for the new tree too, ends; the child is reaped.
        self._stop_watching_exit()
        if self._child is not None:
            await self._child.wait()
        self._process = None
        self._child = None
        await self._relaunch()

    async def _relaunch(self) -> None:
        try:
            await self._launch(self._plan())
        except Unavailable as exc:
            self._answer_start(exc)
            self._retry_later(Relaunch())

    def _plan(self) -> StartPlan:
        """What it runs, from the log: its command, ports, key and working dir, and the
        client's start ``env`` while this daemon lives (after a restart of the daemon, not:
        it is never logged). Made for each run, not kept: with its whole environment, a
        plan kept was 1 KB a sandbox (docs/performance.md)."""
        record = self.record
        keys = self._ctx.keys
        placeholders = Placeholders(
            record.named_ports,
            record.id,
            record.working_dir,
            keys.key_for(record.id, record.created_seq),
        )
        boundary = self._ctx.boundary
        return plan_start(
            self.spec,
            placeholders,
            environ=self._ctx.environ,
            extra_env=self._start_env or {},
            markers=boundary.marker_env(),
            home=boundary.home(self._identity, record.working_dir),
        )

    async def _restart_unhealthy(self, reason: str) -> None:
        """The restart policy's answer to an unhealthy sandbox: end its tree, run it again."""
        self._cancel_watchers()
        self._stop_watching_exit()  # this exit is ours, not a failure to react to
        if self._process is not None and self._tree is not None:
            await self._tree.terminate(self._process, stop_timeout=self._ctx.stop_timeout)
        if self._child is not None:
            await self._child.wait()  # reaped: no zombie of the process it replaces
        await self._restart(
            f"restart = on-failure: unhealthy: {reason}", ev.RESTART_ON_FAILURE, None, None, None
        )

    # -- watching -----------------------------------------------------------------------

    def _watch_again(self, record: SandboxRecord) -> None:
        """Watch the process a previous daemon recorded (recovery checked it is that one)."""
        assert self._nursery is not None
        if record.pid is None or record.create_time is None:
            return  # no process: the sandbox stays for delete
        self._process = ProcessId.from_create_time(record.pid, record.create_time)
        assert self._tree is not None
        self._oom_before = self._tree.oom_kills()
        self._watch_exit(self._process, None, self._tree)
        if record.status is Status.STARTING:
            self._start_readiness()
        else:
            self._start_liveness()

    def _start_readiness(self) -> None:
        assert self._nursery is not None
        self._readiness = trio.CancelScope()
        self._nursery.start_soon(self._wait_ready, self._readiness)

    async def _wait_ready(self, scope: trio.CancelScope) -> None:
        with scope:
            if not self.spec.health_check_path:
                await self._post(Ready())
                return
            ready = await health.wait_until_ready(
                self.record.port, self.spec.health_check_path, timeout=self.spec.ready_timeout
            )
            await self._post(Ready() if ready else ReadyTimeout())

    def _start_liveness(self) -> None:
        if self.spec.health_interval <= 0 or not self.spec.health_check_path:
            return
        assert self._nursery is not None
        self._liveness = trio.CancelScope()
        self._nursery.start_soon(self._watch_liveness, self._liveness)

    async def _watch_liveness(self, scope: trio.CancelScope) -> None:
        failures = 0
        with scope:
            while True:
                await trio.sleep(self.spec.health_interval)
                record = self._ctx.state.sandboxes.get(self.sandbox_id)
                if record is None or record.status not in (Status.RUNNING, Status.ERROR):
                    continue  # paused processes cannot answer; missing ones never will
                ok = await health.probe(
                    record.port,
                    self.spec.health_check_path,
                    timeout=min(self.spec.health_interval, 5.0),
                )
                failures = 0 if ok else failures + 1
                if ok and record.status is Status.ERROR:
                    await self._post(Healthy())
                elif failures == self._ctx.unhealthy_after:
                    await self._post(Unhealthy(f"{failures} health checks in a row got no 200"))

    def _watch_exit(self, process: ProcessId, child: Child | None, tree: SandboxTree) -> None:
        """Once the main process ``process`` (``child``, if ours) has exited: report it."""
        watch = self._ctx.exits.watch(process, partial(self._exited, process, child, tree))
        if watch is None:
            self._exited(process, child, tree)  # gone already (an adopted one, meanwhile)
        self._exit_watch = watch

    def _exited(self, process: ProcessId, child: Child | None, tree: SandboxTree) -> None:
        # From the exit watcher's task: what follows runs in a task of the actor's own.
        self._exit_watch = None
        if self._nursery is not None:
            self._exit_report = trio.CancelScope()
            self._nursery.start_soon(self._report_exit, process, child, tree, self._exit_report)

    async def _report_exit(
        self,
        process: ProcessId,
        child: Child | None,
        tree: SandboxTree,
        scope: trio.CancelScope,
    ) -> None:
        # The main process's end, then the tree's: with a cgroup, the sandbox lives
        # as long as any of its processes does (a server its main process left running).
        # How it ended is known of our child (reaped here) alone, not of an adopted one.
        with scope:
            status = await child.wait() if child is not None else ExitStatus(None, None)
            await tree.wait_gone()
            await self._post(Exited(process, status))

    def _stop_watching_exit(self) -> None:
        """No exit of the main process is reported from now on (it is ended on purpose)."""
        if self._exit_watch is not None:
            self._exit_watch.cancel()
            self._exit_watch = None
        if self._exit_report is not None:
            self._exit_report.cancel()
            self._exit_report = None

    def _cancel_watchers(self) -> None:
        for scope in (self._readiness, self._liveness):
            if scope is not None:
                scope.cancel()

    # -- notices ------------------------------------------------------------------------

    async def _notice(self, notice: Notice) -> None:
        try:
            record = self._ctx.state.sandboxes.get(self.sandbox_id)
            if record is None:
                return
            try:
                await self._react(notice, record)
            except Unavailable:
                self._retry_later(notice)
            except Exception:
                log.exception("sandbox %s: handling %s failed", record.id, type(notice).__name__)
        finally:
            if isinstance(notice, IdleCheck):
                notice.handled.set()

    async def _react(self, notice: Notice, record: SandboxRecord) -> None:
        """Record what a watcher saw, if it still applies to the sandbox as it is now."""
        starting = record.status is Status.STARTING
        match notice:
            case Ready() if starting and record.pid is not None:
                host = self._ctx.url_host
                urls = [
                    ev.ExposedUrl(named.name, f"http://{host}:{named.port}", named.port)
                    for named in record.named_ports
                ]
                try:
                    await self._record(ev.SandboxRunning(urls))
                except Unavailable as exc:
                    self._answer_start(exc)  # the waiting start is answered `unavailable`
                    raise
                self._answer_start(self.record)
                self._start_liveness()
            case ReadyTimeout() if starting:
                if self._process is not None and self._tree is not None:
                    await self._tree.terminate(self._process, stop_timeout=0)
                await self._fail_start(
                    f"the sandbox did not answer 200 on {self.spec.health_check_path} "
                    f"within {self.spec.ready_timeout:g} s",
                    None,
                )
            case Exited(process=process, status=status) if process == self._process:
                self._cancel_watchers()
                oom = self._out_of_memory(status)
                if starting:
                    tail, _ = await trio.to_thread.run_sync(
                        self.output.tail, OUTPUT_TAIL_FOR_ERRORS
                    )
                    await self._fail_start(
                        _exit_reason(status, tail, oom), status.exit_code, status.signal
                    )
                    return
                failed = restarts.is_failure(status.exit_code, status.signal)
                why = self._gives_up() if failed and self._restarts_on_failure else None
                if failed and self._restarts_on_failure and why is None:
                    # One event: the exit and the restart it causes are durable together.
                    await self._restart(
                        f"restart = on-failure: {_ended(status, oom)}",
                        ev.RESTART_ON_FAILURE,
                        None,
                        status.exit_code,
                        status.signal,
                    )
                    return
                await self._record(
                    ev.SandboxExited(
                        status.exit_code,
                        status.signal,
                        reason=None if oom is None else "oom",
                        memory_max=None if oom is None else oom.limit,
                        restart=why,
                    )
                )
                self._process = None  # only now: if the log refused the event, a retry sees it
            case Unhealthy(reason=reason) if record.status is Status.RUNNING:
                why = self._gives_up() if self._restarts_on_failure else None
                if why is not None:
                    reason = f"{reason}; {why}"
                await self._record(ev.SandboxUnhealthy(reason))
                if self._restarts_on_failure and why is None:
                    await self._restart_unhealthy(reason)
            case Unhealthy(reason=reason) if (
                record.status is Status.ERROR
                and record.pid is not None
                and self._restarts_on_failure
                and self._gives_up() is None
            ):
                # Unhealthy already recorded (a daemon stopped before restarting it).
                await self._restart_unhealthy(reason)
            case Lost() if (
                record.status is Status.MISSING
                and self._process is None
                and self._restarts_on_failure
                and self._gives_up() is None
            ):
                await self._restart(
                    f"restart = on-failure: {record.error}", ev.RESTART_ON_FAILURE, None, None, None
                )
            case Healthy() if record.status is Status.ERROR and record.pid is not None:
                await self._record(ev.SandboxHealthy())
            case Relaunch() if starting and record.pid is None and self._process is None:
                await self._relaunch()
            case IdleCheck(verdict=verdict) if (
                record.status is Status.RUNNING and record.version == verdict.version
            ):
                await self._idle_check(verdict, record)
            case _:
                pass  # no longer applies: the sandbox moved on since it was posted

    def _out_of_memory(self, status: ExitStatus) -> OutOfMemory | None:
        """Whether the OOM killer ended the main process, and under which limit.

        It did if the main process was killed by SIGKILL (or, adopted, ended how
        nobody can tell) while its cgroup's count of OOM kills rose since it started.
        """
        tree = self._tree
        if tree is None or self._oom_before is None:
            return None
        killed = status.signal == signal.SIGKILL or status == ExitStatus(None, None)
        kills = tree.oom_kills()
        if not killed or kills is None or kills <= self._oom_before:
            return None
        return OutOfMemory(tree.memory_limit())

    async def _idle_check(self, verdict: IdleVerdict, record: SandboxRecord) -> None:
        """Record what the idle sweep saw; once the idle period lasted idle_timeout, do
        on_idle. The verdict was made on this very record (its version), so it holds."""
        if not verdict.idle:
            await self._record(ev.SandboxActive(verdict.reason))
            return
        if record.idle_since is None:
            assert verdict.since is not None
            await self._record(ev.SandboxIdle(verdict.since, verdict.reason))
        if verdict.expired is None:
            return
        log.info("sandbox %s: %s: %s", self.sandbox_id, self.spec.on_idle, verdict.expired)
        if self.spec.on_idle == "delete":
            await self._delete(None, reason=verdict.expired)
        else:
            await self._move(
                None,
                Status.RUNNING,
                ev.SandboxPaused(verdict.expired),
                SandboxTree.pause,
                SandboxTree.resume,
            )

    # -- commands -----------------------------------------------------------------------

    async def _move(
        self,
        by: str | None,
        source: Status,
        event: ev.SandboxPaused | ev.SandboxResumed,
        act: Callable[[SandboxTree, ProcessId], Awaitable[None]],
        undo: Callable[[SandboxTree, ProcessId], Awaitable[None]],
    ) -> SandboxRecord:
        """Take the whole tree from ``source`` to the status ``event`` records: act, then
        record.

        Already at that status is a no-op, as protocol.md says. If the log cannot
        record the change, the tree is put back, as if the op was never asked.
        """
        record = self.record
        target = Status.PAUSED if isinstance(event, ev.SandboxPaused) else Status.RUNNING
        if record.status is target:
            return record
        if record.status is not source or self._process is None or self._tree is None:
            raise Conflict(
                f"sandbox {record.id} is {record.status}; only a {source} one becomes {target}"
            )
        await act(self._tree, self._process)
        try:
            await self._record(event, by)
        except Unavailable:
            await undo(self._tree, self._process)
            raise
        return self.record

    async def _delete(self, by: str | None, *, reason: str | None = None) -> bool:
        record = self.record
        self._cancel_watchers()
        boundary = self._ctx.boundary
        tree = self._tree or boundary.adopted_tree(self.sandbox_id)
        forced = await tree.terminate(self._process, stop_timeout=self._ctx.stop_timeout)
        if self._child is not None:
            await self._child.wait()  # reap our child so no zombie outlives the sandbox
        self._process = None
        await boundary.remove_tree(tree)
        await trio.to_thread.run_sync(_remove_sandbox_files, Path(record.working_dir), self.output)
        await self._record(ev.SandboxDeleted(forced, reason=reason), by)
        self._done = True
        self._answer_start(NotFound(f"sandbox {self.sandbox_id} was deleted while it started"))
        self._ctx.release(self.sandbox_id, [named.port for named in record.named_ports])
        return True


@attrs.frozen
class OutOfMemory:
    """The OOM killer ended the sandbox's main process, under this memory limit (bytes)."""

    limit: int | None

    def __str__(self) -> str:
        limit = "" if self.limit is None else f" (limit {format_bytes(self.limit)})"
        return f"killed: out of memory{limit}"


def _ended(status: ExitStatus, oom: OutOfMemory | None) -> str:
    """How a running process ended, in the words of a restart's reason."""
    if oom is not None:
        return str(oom)
    if status.signal is not None:
        return f"the process was killed by signal {status.signal}"
    if status.exit_code is None:
        return "the process exited (its exit status is unknown: it was adopted)"
    return f"the process exited with code {status.exit_code}"


def _exit_reason(status: ExitStatus, output_tail: str, oom: OutOfMemory | None = None) -> str:
    if oom is not None:
        how = f"{oom} while starting"
    elif status.signal is not None:
        how = f"the process was killed by signal {status.signal} while starting"
    else:
        how = f"the process exited with code {status.exit_code} while starting"
    lines = output_tail.strip().splitlines()[-5:]
    return how + (": " + " | ".join(lines) if lines else "")


def _prepare(
    fresh: bool,
    working_dir: Path,
    cwd: Path,
    identity: Identity | None,
    output_file: output.OutputFile,
    output_cap_bytes: int,
) -> int:
    """The sandbox's own directory (its uid's, 0700): ``fresh`` for a first start, kept as
    its processes left it for a restart; the spec's working_dir if it names one; and the
    descriptor of its output file: everything a spawn needs from the disk, in one hop."""
    if fresh and os.path.lexists(working_dir):
        remove_tree(working_dir)  # a leftover of an interrupted start: never reuse its files
    if fresh or not os.path.isdir(working_dir):
        working_dir.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        make_working_dir(working_dir, identity)
    if cwd != working_dir and not cwd.exists():
        # The spec's own place, made for it if missing (and then the sandbox's), never removed.
        cwd.mkdir(mode=0o700, parents=True, exist_ok=True)
        if identity is not None:
            os.chown(cwd, identity.uid, identity.gid, follow_symlinks=False)
    return output_file.open_for_child(output_cap_bytes)


def _remove_sandbox_files(working_dir: Path, output_file: output.OutputFile) -> None:
    """The working dir, whatever the sandbox did to it (modes, links, nesting), and its output."""
    remove_tree(working_dir)
    output_file.remove()
