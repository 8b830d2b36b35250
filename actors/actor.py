"""SandboxActor: one trio task per sandbox, owning its whole process tree.

Commands (pause, resume, delete) and what the actor's own watchers notice
(ready, exited, unhealthy) arrive in one bounded mailbox and are handled one
at a time, so a pause racing a delete is never a crash or a half-state. The
actor acts on its processes first, then appends the event that records what
happened; its state is the projection's record, read back after each append.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from sandboxd.actors import health, output, proctree
from sandboxd.actors.errors import Conflict, NotFound, SandboxError, Unavailable
from sandboxd.actors.proctree import ExitStatus, ProcessId, TreeStateTimeout
from sandboxd.actors.spawn import Child, Launch, spawn
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.backend import Store
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.projection import SandboxRecord, State, Status

log = logging.getLogger(__name__)

MAILBOX_SIZE = 32
#: A notice whose event the log could not take (disk full) is handled again after a
#: backoff: RETRY_FIRST_DELAY, doubling up to RETRY_MAX_DELAY, RETRY_ATTEMPTS times at most.
RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 5.0
RETRY_ATTEMPTS = 100
OUTPUT_TAIL_FOR_ERRORS = 2048  # bytes of output quoted in a start_failed reason


@attrs.frozen
class SandboxContext:
    """What every actor shares with the registry: the log, the state, the config."""

    store: Store
    output_dir: Path
    stop_timeout: float
    output_cap_bytes: int
    unhealthy_after: int
    release: Callable[[str, int], None]  # frees (sandbox_id, port) once deleted
    marker: str  # this daemon's marker (proctree.DAEMON_MARKER) in every sandbox's environment

    @property
    def state(self) -> State:
        return self.store.state

    async def record(self, sandbox_id: str, by: str | None, data: ev.Payload) -> ev.Event:
        """Append an event about a sandbox; return once it is durable and folded."""
        try:
            return await self.store.append(ev.PendingEvent(sandbox_id, by, data))
        except LogUnavailable as exc:
            raise Unavailable(f"the event log cannot be written now: {exc}") from None


@attrs.frozen
class StartPlan:
    """How to spawn a new sandbox: decided by the registry once ``sandbox.created`` is durable."""

    launch: Launch  # cwd: the spec's working_dir, else the sandbox's own fresh directory
    command: list[str]  # as the log records it


class _Reply:
    """Where a command's outcome goes back to the task that sent it."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


@attrs.frozen
class _Command:
    name: str  # "pause" | "resume" | "delete"
    by: str | None
    reply: _Reply


@attrs.frozen
class _Notice:
    """Something the actor's own watchers saw; no one waits for a reply."""

    name: str  # "ready" | "ready_timeout" | "exited" | "unhealthy" | "healthy"
    detail: Any = None
    attempt: int = 0  # how many times its event could not be recorded


class SandboxActor:
    def __init__(self, sandbox_id: str, spec: SpecConfig, context: SandboxContext) -> None:
        self.sandbox_id = sandbox_id
        self.spec = spec
        self._ctx = context
        #: Where the sandbox's stdout and stderr go (a str: every reader of it takes one).
        self.output_path = str(context.output_dir / f"{sandbox_id}.log")
        self._send, self._receive = trio.open_memory_channel[_Command | _Notice](MAILBOX_SIZE)
        #: The sandbox's main process, ours or adopted; None while it has none.
        self._process: ProcessId | None = None
        #: The same, if this daemon started it: our child, which we reap.
        self._child: Child | None = None
        self._readiness: trio.CancelScope | None = None
        self._liveness: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        #: Set once the sandbox has left STARTING (running, failed, or deleted), or once
        #: its start could not be recorded (``start_error``).
        self.settled = trio.Event()
        #: Why the start's outcome could not be recorded (the log is unavailable); the
        #: sandbox stays for delete, and the outcome is recorded once the log has room.
        self.start_error: Unavailable | None = None
        self.deleted = False

    # -- what the registry calls --------------------------------------------------------

    @property
    def record(self) -> SandboxRecord:
        record = self._ctx.state.sandboxes.get(self.sandbox_id)
        if record is None:
            raise NotFound(f"sandbox {self.sandbox_id} does not exist")
        return record

    async def command(self, name: str, by: str | None) -> Any:
        reply = _Reply()
        try:
            await self._send.send(_Command(name, by, reply))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise NotFound(f"sandbox {self.sandbox_id} does not exist") from None
        return await reply.wait()

    async def run_new(
        self, plan: StartPlan, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Spawn the sandbox's process and serve its mailbox until it is deleted."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._spawn(plan)
            except Unavailable as exc:
                # The spawn was undone; the sandbox (its created event is durable) stays,
                # so that it can be deleted.
                self.start_error = exc
            await self._serve()
            nursery.cancel_scope.cancel()

    async def run_adopted(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch a sandbox that a previous daemon started (or a dead one, until deleted)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            record = self.record
            if record.pid is not None and record.pgid is not None:
                assert record.create_time is not None
                self._process = ProcessId.from_create_time(record.pid, record.create_time)
                nursery.start_soon(self._watch_adopted_exit, self._process)
                if record.status is Status.STARTING:
                    self._start_readiness()
                else:
                    self._start_liveness()
            if record.status is not Status.STARTING:
                self.settled.set()
            task_status.started()
            await self._serve()
            nursery.cancel_scope.cancel()

    # -- the mailbox --------------------------------------------------------------------

    async def _serve(self) -> None:
        async with self._receive:
            try:
                async for message in self._receive:
                    if isinstance(message, _Command):
                        await self._handle_command(message)
                    else:
                        await self._handle_notice(message)
                    if self.deleted:
                        break
            finally:
                self._refuse_queued()
        self.settled.set()

    def _refuse_queued(self) -> None:
        """Answer the commands queued behind the end (a delete): their sandbox is gone."""
        while True:
            try:
                message = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if isinstance(message, _Command):
                message.reply.fail(NotFound(f"sandbox {self.sandbox_id} does not exist"))

    async def _post(self, notice: _Notice) -> None:
        # Once the actor has finished there is nothing left to tell.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._send.send(notice)

    async def _handle_command(self, command: _Command) -> None:
        try:
            if command.name == "pause":
                result: Any = await self._pause(command.by)
            elif command.name == "resume":
                result = await self._resume(command.by)
            elif command.name == "delete":
                result = await self._delete(command.by)
            else:
                raise AssertionError(f"unknown command {command.name}")
        except SandboxError as exc:
            command.reply.fail(exc)
        except TreeStateTimeout as exc:
            command.reply.fail(Unavailable(f"sandbox {self.sandbox_id}: {exc}; try again"))
        except Exception as exc:
            log.exception("sandbox %s: %s failed", self.sandbox_id, command.name)
            command.reply.fail(exc)
        else:
            command.reply.set(result)

    async def _record(self, data: ev.Payload, by: str | None = None) -> ev.Event:
        return await self._ctx.record(self.sandbox_id, by, data)

    # -- spawning and watching ----------------------------------------------------------

    async def _spawn(self, plan: StartPlan) -> None:
        try:
            fd = await trio.to_thread.run_sync(
                _prepare,
                Path(self.record.working_dir),
                plan,
                self.output_path,
                self._ctx.output_cap_bytes,
            )
            try:
                child = await spawn(plan.launch, output=fd)
            finally:
                os.close(fd)  # the child has its own copy
        except OSError as exc:
            await self._fail_start(
                f"cannot run {plan.launch.command[0]!r}: {exc.strerror or exc}", None
            )
            return
        self._child = child
        self._process = child.id
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_exit, child)
        try:
            await self._record(
                # The main process leads its own session: its group is its pid.
                ev.ProcessStarted(child.id.pid, child.id.pid, child.id.create_time, plan.command)
            )
        except Unavailable:
            # Nothing may run that the log does not know of: undo the spawn.
            await proctree.terminate_tree(
                self._process, self.sandbox_id, stop_timeout=0, daemon_marker=self._ctx.marker
            )
            self._process = None
            self.settled.set()
            raise
        self._start_readiness()

    def _start_readiness(self) -> None:
        assert self._nursery is not None
        self._readiness = trio.CancelScope()
        self._nursery.start_soon(self._wait_ready, self._readiness)

    async def _wait_ready(self, scope: trio.CancelScope) -> None:
        with scope:
            if not self.spec.health_check_path:
                await self._post(_Notice("ready"))
                return
            ready = await health.wait_until_ready(
                self.record.port, self.spec.health_check_path, timeout=self.spec.ready_timeout
            )
            await self._post(_Notice("ready" if ready else "ready_timeout"))

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
                    await self._post(_Notice("healthy"))
                elif failures == self._ctx.unhealthy_after:
                    reason = f"{failures} health checks in a row got no 200"
                    await self._post(_Notice("unhealthy", reason))

    async def _watch_exit(self, child: Child) -> None:
        status = await child.wait()
        await self._post(_Notice("exited", status))

    async def _watch_adopted_exit(self, adopted: ProcessId) -> None:
        status = await proctree.wait_for_exit(adopted)
        await self._post(_Notice("exited", status or ExitStatus(None, None)))

    # -- notices ------------------------------------------------------------------------

    async def _handle_notice(self, notice: _Notice) -> None:
        record = self._ctx.state.sandboxes.get(self.sandbox_id)
        if record is None:
            return
        try:
            await self._react(notice, record)
        except Unavailable:
            if notice.attempt + 1 >= RETRY_ATTEMPTS:
                log.error(
                    "sandbox %s: gave up recording %s: log unavailable", record.id, notice.name
                )
                return
            delay = min(RETRY_FIRST_DELAY * 2**notice.attempt, RETRY_MAX_DELAY)
            log.warning(
                "sandbox %s: could not record %s: log unavailable; trying again in %g s",
                record.id,
                notice.name,
                delay,
            )
            assert self._nursery is not None
            self._nursery.start_soon(
                self._post_later, attrs.evolve(notice, attempt=notice.attempt + 1), delay
            )
        except Exception:
            log.exception("sandbox %s: handling %s failed", record.id, notice.name)

    async def _post_later(self, notice: _Notice, delay: float) -> None:
        await trio.sleep(delay)
        await self._post(notice)

    async def _react(self, notice: _Notice, record: SandboxRecord) -> None:
        starting = record.status is Status.STARTING
        if notice.name == "ready" and starting:
            url = f"http://127.0.0.1:{record.port}"
            try:
                await self._record(ev.SandboxRunning([ev.ExposedUrl("AGENT_SERVER", url)]))
            except Unavailable as exc:
                self.start_error = exc  # the waiting start is answered `unavailable`
                self.settled.set()
                raise
            self.settled.set()
            self._start_liveness()
        elif notice.name == "ready_timeout" and starting:
            if self._process is not None:
                await proctree.terminate_tree(
                    self._process, self.sandbox_id, stop_timeout=0, daemon_marker=self._ctx.marker
                )
            await self._fail_start(
                f"the sandbox did not answer 200 on {self.spec.health_check_path} "
                f"within {self.spec.ready_timeout:g} s",
                None,
            )
        elif notice.name == "exited" and self._process is not None:
            status: ExitStatus = notice.detail
            self._cancel_watchers()
            if starting:
                tail, _ = await trio.to_thread.run_sync(
                    output.read_output_tail, self.output_path, OUTPUT_TAIL_FOR_ERRORS
                )
                await self._fail_start(_exit_reason(status, tail), status.exit_code)
            else:
                await self._record(ev.SandboxExited(status.exit_code, status.signal))
            self._process = None  # only now: if the log refused the event, a retry sees it
        elif notice.name == "unhealthy" and record.status is Status.RUNNING:
            await self._record(ev.SandboxUnhealthy(notice.detail))
        elif notice.name == "healthy" and record.status is Status.ERROR and record.pid is not None:
            await self._record(ev.SandboxHealthy())

    async def _fail_start(self, reason: str, exit_code: int | None) -> None:
        self._cancel_watchers()
        try:
            await self._record(ev.StartFailed(reason, exit_code))
        except Unavailable as exc:
            self.start_error = exc
            raise
        finally:
            self.settled.set()
        self._process = None

    def _cancel_watchers(self) -> None:
        for scope in (self._readiness, self._liveness):
            if scope is not None:
                scope.cancel()

    # -- commands -----------------------------------------------------------------------

    async def _pause(self, by: str | None) -> SandboxRecord:
        return await self._move(
            by, Status.RUNNING, Status.PAUSED, proctree.pause_tree, proctree.resume_tree
        )

    async def _resume(self, by: str | None) -> SandboxRecord:
        return await self._move(
            by, Status.PAUSED, Status.RUNNING, proctree.resume_tree, proctree.pause_tree
        )

    async def _move(
        self,
        by: str | None,
        source: Status,
        target: Status,
        act: Callable[..., Awaitable[None]],
        undo: Callable[..., Awaitable[None]],
    ) -> SandboxRecord:
        """Take the whole tree from ``source`` to ``target``: act, then record.

        Already at ``target`` is a no-op, as protocol.md says. If the log cannot
        record the change, the tree is put back, as if the op was never asked.
        """
        record = self.record
        if record.status is target:
            return record
        if record.status is not source or self._process is None:
            raise Conflict(
                f"sandbox {record.id} is {record.status}; only a {source} one becomes {target}"
            )
        await act(self._process, self.sandbox_id, daemon_marker=self._ctx.marker)
        try:
            await self._record(_EVENT_FOR[target], by)
        except Unavailable:
            await undo(self._process, self.sandbox_id, daemon_marker=self._ctx.marker)
            raise
        return self.record

    async def _delete(self, by: str | None) -> bool:
        record = self.record
        self._cancel_watchers()
        forced = await proctree.terminate_tree(
            self._process,
            self.sandbox_id,
            stop_timeout=self._ctx.stop_timeout,
            daemon_marker=self._ctx.marker,
        )
        if self._child is not None:
            await self._child.wait()  # reap our child so no zombie outlives the sandbox
        self._process = None
        await trio.to_thread.run_sync(_remove_sandbox_files, Path(record.working_dir), self)
        await self._record(ev.SandboxDeleted(forced), by)
        self.deleted = True
        self._ctx.release(self.sandbox_id, record.port)
        return True


#: What records a move of the whole tree into a status (see ``SandboxActor._move``).
_EVENT_FOR: dict[Status, ev.Payload] = {
    Status.PAUSED: ev.SandboxPaused(),
    Status.RUNNING: ev.SandboxResumed(),
}


def _exit_reason(status: ExitStatus, output_tail: str) -> str:
    if status.signal is not None:
        how = f"the process was killed by signal {status.signal} while starting"
    else:
        how = f"the process exited with code {status.exit_code} while starting"
    lines = output_tail.strip().splitlines()[-5:]
    return how + (": " + " | ".join(lines) if lines else "")


def _prepare(working_dir: Path, plan: StartPlan, output_path: str, output_cap_bytes: int) -> int:
    """The sandbox's own fresh directory, the spec's working_dir if it names one, and the
    descriptor of its output file: everything a spawn needs from the disk, in one thread hop."""
    if working_dir.exists():
        shutil.rmtree(working_dir)  # a leftover of an interrupted start: never reuse its files
    working_dir.mkdir(mode=0o700, parents=True)
    os.chmod(working_dir, 0o700)  # mkdir's mode is masked by the umask
    Path(plan.launch.cwd).mkdir(mode=0o700, parents=True, exist_ok=True)
    return output.open_for_child(output_path, output_cap_bytes)


def _remove_sandbox_files(working_dir: Path, actor: SandboxActor) -> None:
    shutil.rmtree(working_dir, ignore_errors=True)
    for path in (actor.output_path, output.rotated_path(actor.output_path)):
        Path(path).unlink(missing_ok=True)


def build_env(
    spec: SpecConfig,
    environ: Mapping[str, str],
    extra: Mapping[str, str],
    placeholders: Mapping[str, str],
    marker: str,
) -> dict[str, str]:
    """The sandbox's environment: only what config.md allows, the markers last so they hold.

    Every descendant inherits SANDBOX_ID (which sandbox) and SANDBOXD_STATE_DIR (which
    daemon: two daemons on one machine never take each other's processes for their own).
    """
    env = {name: environ[name] for name in spec.inherit_env if name in environ}
    env.update({k: fill(v, placeholders) for k, v in spec.initial_env.items()})
    env.update(extra)
    key = placeholders["session_api_key"]
    env.update(
        SANDBOX_ID=placeholders["sandbox_id"],
        PORT=placeholders["port"],
        SESSION_API_KEY=key,
        OH_SESSION_API_KEYS_0=key,
    )
    env[proctree.DAEMON_MARKER] = marker
    return env


def fill(template: str, placeholders: Mapping[str, str]) -> str:
    # Plain replacement, not str.format: a literal "{" elsewhere in a command must survive.
    for name, value in placeholders.items():
        template = template.replace("{" + name + "}", value)
    return template
