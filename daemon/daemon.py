"""The daemon's wiring: which parts start in which nursery, in which order.

    boundary (cgroups, uids) -> state dir (private, locked) -> store (log writer,
      projection) -> [a cluster's node: its lease] -> actors + recovery ->
      daemon.started -> [forwarded commands] -> gateway -> READY=1
      ... SIGTERM/SIGINT -> graceful stop

The gateway opens only after recovery, so no client ever sees half-rebuilt
state; on shutdown it stops first, so no op arrives while actors stop.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from sandboxd import __version__, sdnotify
from sandboxd.actors.boundary.cgroups import CgroupError
from sandboxd.actors.boundary.in_force import Boundary, open_boundary
from sandboxd.actors.boundary.limits import LimitsNotEnforceable
from sandboxd.actors.boundary.workdirs import unreachable
from sandboxd.actors.errors import Unavailable
from sandboxd.actors.keys import SecretFileError, SessionKeys
from sandboxd.actors.recovery import recover
from sandboxd.actors.registry import Registry
from sandboxd.actors.specs import not_runnable_by_others
from sandboxd.cluster.lease import DuplicateNode, LeaseLost
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.errors import CorruptLog, LogUnavailable, only_exception
from sandboxd.events.store import Store, StoreConfig, open_store
from sandboxd.gateway.auth import Authenticator, ensure_admin_token
from sandboxd.gateway.metrics import Metrics
from sandboxd.gateway.server import Gateway, Listeners
from sandboxd.state_dir import open_state_dir

if TYPE_CHECKING:
    from sandboxd.cluster.node import Node

log = logging.getLogger("sandboxd")


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one.

    Every watched sandbox holds a pidfd (and a spawned one its process object):
    1,000 sandboxes, plus the log, sockets and threads, pass the common soft
    default of 1,024, and adopting them after a restart would fail with EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _open_boundary(config: Config) -> Boundary:
    """The boundary the config asks for, or a DaemonError saying in one sentence why not."""
    try:
        return open_boundary(
            config.boundary_settings,
            state_dir=config.state_dir,
            max_sandboxes=config.max_sandboxes,
        )
    except ValueError as exc:  # run_as: the user is gone, the range now overlaps accounts
        raise DaemonError(str(exc)) from None
    except CgroupError as exc:
        setting = str(config.cgroup)
        raise DaemonError(f"sandboxes.cgroup = {setting!r} cannot be used: {exc}") from None


def _check_reachable(config: Config, boundary: Boundary) -> None:
    """Sandboxes under uids of their own must reach their working dirs: else no start."""
    if not boundary.run_as.isolated_from_daemon:
        return
    blocked = unreachable(config.sandboxes_dir)
    if blocked is not None:
        raise DaemonError(
            f"sandboxes.base_working_dir {config.sandboxes_dir} is out of reach of the "
            f"sandboxes' own uids: {blocked}; set sandboxes.base_working_dir (or "
            "server.state_dir) to a place every user may pass through, such as /var/lib/sandboxd"
        )


async def run_daemon(
    config: Config,
    *,
    listeners: Listeners | None = None,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully; ``started`` gives the gateway.

    The gateway serves ``listeners`` if given (tests pass in-memory ones), else TCP
    on config.host and config.port.
    """
    raise_open_files_limit()
    boundary = _open_boundary(config)
    try:
        await _run(config, boundary, listeners, task_status)
    finally:
        boundary.close()
    log.info("sandboxd stopped")


async def _run(
    config: Config,
    boundary: Boundary,
    listeners: Listeners | None,
    task_status: trio.TaskStatus[Gateway],
) -> None:
    # Sandboxes under uids of their own pass through the state dir to their working dirs.
    shared = boundary.run_as.isolated_from_daemon
    with (
        open_state_dir(config.state_dir, config.sandboxes_dir, shared=shared),
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
    ):
        _check_reachable(config, boundary)
        try:
            keys = SessionKeys.of_state_dir(config.state_dir)
        except SecretFileError as exc:
            raise DaemonError(str(exc)) from None
        if config.users:
            authenticator = Authenticator(config.users)
        else:
            authenticator = Authenticator.embedded_admin(ensure_admin_token(config.state_dir))
        store_config = StoreConfig(
            segment_bytes=config.segment_bytes,
            snapshot_every=config.snapshot_every,
            retention=config.retention,
            nats=config.nats,
        )
        metrics = Metrics(
            specs=[spec.id for spec in config.specs], per_sandbox=config.metrics_per_sandbox
        )
        async with (
            _open_store(config.state_dir, store_config, metrics.observe_events) as store,
            _joined(config, store) as node,
            trio.open_nursery() as actors,
        ):
            # Counted from the first event of this run on: recovery's come next.
            metrics.watch_log(store.state, store.log)
            store.log.on_synced = metrics.observe_sync
            await actors.start(boundary.run)
            registry = Registry(config, store, keys, actors, boundary)
            try:
                recovered = (await recover(registry)).rebuilt
                await store.append(
                    ev.PendingEvent(
                        None, None, ev.DaemonStarted(__version__, os.getpid(), recovered)
                    )
                )
            except (Unavailable, LogUnavailable) as exc:
                if config.nats is not None:
                    raise DaemonError(
                        f"cannot record the recovery in NATS stream {config.nats.stream}: {exc};"
                        " check the NATS servers (docs/cluster.md) and start again"
                    ) from None
                raise DaemonError(
                    f"cannot record the recovery in {config.state_dir}: {exc}; "
                    "free some space (or fix the disk) and start again"
                ) from None
            if node is not None:
                await node.serve(registry)
            async with trio.open_nursery() as front:
                gateway = Gateway(
                    config,
                    registry,
                    store.log,
                    authenticator,
                    metrics=metrics,
                    forward=None if node is None else node.forward,
                    nodes=None if node is None else node.live_nodes,
                )
                await front.start(gateway.serve, listeners)
                for line in boundary.describe():
                    log.info("%s", line)
                _say_what_specs_get(config, boundary)
                log.info(
                    "sandboxd %s listening on ws://%s:%d/v1, dashboard at http://%s:%d/"
                    " (state in %s, %d sandboxes recovered)",
                    __version__,
                    config.host,
                    gateway.port,
                    config.host,
                    gateway.port,
                    config.state_dir,
                    recovered,
                )
                task_status.started(gateway)
                _tell_systemd("READY=1")
                async for signum in signals:
                    reason = f"received {signal.Signals(signum).name}"
                    break
                _tell_systemd("STOPPING=1")
                await _shut_down(config, registry, gateway, store, reason)
                if node is not None:
                    await node.leave()
                front.cancel_scope.cancel()
            actors.cancel_scope.cancel()


def _say_what_specs_get(config: Config, boundary: Boundary) -> None:
    """Per spec, how its limits are enforced here (or that its starts will be refused),
    and whether a sandbox's uid can run its program at all: said once, at start-up."""
    for spec in config.specs:
        if spec.limits.set_keys():
            try:
                notes = boundary.enforcement(spec.limits).notes
            except LimitsNotEnforceable as exc:
                log.warning("spec %s: its starts will fail: %s", spec.id, exc)
            else:
                log.info("spec %s: %s", spec.id, "; ".join(notes))
        program = spec.command[0]
        if boundary.run_as.isolated_from_daemon and os.path.isabs(program):
            blocked = not_runnable_by_others(program)
            if blocked is not None:
                log.warning(
                    "spec %s: its sandboxes' uids cannot run %s: %s", spec.id, program, blocked
                )


def _tell_systemd(state: str) -> None:
    """sd_notify, when systemd runs the daemon (Type=notify); a failure is only logged."""
    try:
        sdnotify.notify(state)
    except (OSError, ValueError) as exc:
        log.warning("could not tell systemd %s: %s", state, exc)


@asynccontextmanager
async def _open_store(
    state_dir: Path, store_config: StoreConfig, on_applied: Callable[[list[ev.Event]], None]
) -> AsyncIterator[Store]:
    """``open_store``, and a damaged log said in one sentence: the daemon does not start on it.

    (Only opening raises ``CorruptLog`` here: readers get theirs, and the tasks
    of the body would raise theirs inside an exception group.)
    """
    opened = False
    try:
        async with open_store(state_dir, store_config, on_applied=on_applied) as store:
            opened = True
            yield store
    except CorruptLog as damage:
        if store_config.nats is not None:
            raise DaemonError(
                f"the NATS stream {store_config.nats.stream} holds an event this daemon cannot"
                f" fold (seq {damage.seq}: {damage.reason}), and the daemon does not start on"
                " it: `sandboxd log verify --config FILE` shows more"
            ) from None
        raise DaemonError(
            f"the event log is damaged at offset {damage.offset} of {damage.path}"
            f" ({f'seq {damage.seq}: ' if damage.seq is not None else ''}{damage.reason}),"
            " and the daemon does not start on a damaged log: `sandboxd log verify"
            f" --state-dir {state_dir}` shows more, and docs/operations.md says what to do"
        ) from None
    except LogUnavailable as exc:
        if opened or store_config.nats is None:
            raise
        # NATS did not answer at start-up: the one sentence names the servers (it is in exc).
        raise DaemonError(
            f'{exc}; log.backend is "nats": start the NATS servers of log.nats.servers'
            " (docs/cluster.md), or check that they are reachable from here"
        ) from None


@asynccontextmanager
async def _joined(config: Config, store: Store) -> AsyncIterator[Node | None]:
    """This daemon as a node of its cluster when the log is a JetStream stream (its lease
    taken before recovery: docs/cluster.md), else None; a lease refused or lost said in one
    sentence."""
    if config.nats is None:
        yield None
        return
    # nats-py and its asyncio only where the log is on NATS: they were 3-5 MB of a file
    # daemon's RSS otherwise (bench/sandboxes.py's rss_mb_1000, docs/performance.md).
    from sandboxd.cluster.node import join_cluster
    from sandboxd.events.nats.bridge import NatsUnavailable

    url = f"ws://{config.host}:{config.port}/v1"
    try:
        try:
            async with join_cluster(config, config.nats, store, url=url) as node:
                yield node
        except BaseExceptionGroup as group:
            raise only_exception(group) from None
    except (DuplicateNode, LeaseLost) as exc:
        raise DaemonError(str(exc)) from None
    except NatsUnavailable as exc:
        raise DaemonError(
            f"{exc}; check the NATS servers of log.nats.servers (docs/cluster.md)"
        ) from None


async def _shut_down(
    config: Config, registry: Registry, gateway: Gateway, store: Store, reason: str
) -> None:
    registry.close()
    with trio.move_on_after(config.shutdown_grace):
        await gateway.drain()  # stop accepting; let in-flight ops finish
    try:
        await store.append(ev.PendingEvent(None, None, ev.DaemonStopping(reason)))
    except Exception:
        log.exception("could not record daemon.stopping")
    await gateway.close_all()
    if config.on_shutdown == "stop":
        await registry.delete_all()
