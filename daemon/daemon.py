"""The daemon's wiring: which parts start in which nursery, in which order.

    state dir (private, locked) -> store (log writer, projection) -> actors + recovery
      -> daemon.started -> gateway ... SIGTERM/SIGINT -> graceful stop

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

import trio

from sandboxd import __version__
from sandboxd.actors.errors import Unavailable
from sandboxd.actors.keys import SecretFileError, SessionKeys
from sandboxd.actors.recovery import recover
from sandboxd.actors.registry import Registry
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.errors import CorruptLog, LogUnavailable
from sandboxd.events.store import Store, StoreConfig, open_store
from sandboxd.gateway.auth import Authenticator, ensure_admin_token
from sandboxd.gateway.metrics import Metrics
from sandboxd.gateway.server import Gateway, Listeners
from sandboxd.state_dir import open_state_dir

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
    with (
        open_state_dir(config.state_dir, config.sandboxes_dir),
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
    ):
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
        )
        metrics = Metrics(
            specs=[spec.id for spec in config.specs], per_sandbox=config.metrics_per_sandbox
        )
        async with (
            _open_store(config.state_dir, store_config, metrics.observe_events) as store,
            trio.open_nursery() as actors,
        ):
            # Counted from the first event of this run on: recovery's come next.
            metrics.watch_log(store.state, store.log)
            store.log.on_synced = metrics.observe_sync
            registry = Registry(config, store, keys, actors)
            try:
                recovered = (await recover(registry)).rebuilt
                await store.append(
                    ev.PendingEvent(
                        None, None, ev.DaemonStarted(__version__, os.getpid(), recovered)
                    )
                )
            except (Unavailable, LogUnavailable) as exc:
                raise DaemonError(
                    f"cannot record the recovery in {config.state_dir}: {exc}; "
                    "free some space (or fix the disk) and start again"
                ) from None
            async with trio.open_nursery() as front:
                gateway = Gateway(config, registry, store.log, authenticator, metrics=metrics)
                await front.start(gateway.serve, listeners)
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
                async for signum in signals:
                    reason = f"received {signal.Signals(signum).name}"
                    break
                await _shut_down(config, registry, gateway, store, reason)
                front.cancel_scope.cancel()
            actors.cancel_scope.cancel()
    log.info("sandboxd stopped")


@asynccontextmanager
async def _open_store(
    state_dir: Path, store_config: StoreConfig, on_applied: Callable[[list[ev.Event]], None]
) -> AsyncIterator[Store]:
    """``open_store``, and a damaged log said in one sentence: the daemon does not start on it.

    (Only opening raises ``CorruptLog`` here: readers get theirs, and the tasks
    of the body would raise theirs inside an exception group.)
    """
    try:
        async with open_store(state_dir, store_config, on_applied=on_applied) as store:
            yield store
    except CorruptLog as damage:
        raise DaemonError(
            f"the event log is damaged at offset {damage.offset} of {damage.path}"
            f" ({f'seq {damage.seq}: ' if damage.seq is not None else ''}{damage.reason}),"
            " and the daemon does not start on a damaged log: `sandboxd log verify"
            f" --state-dir {state_dir}` shows more, and docs/operations.md says what to do"
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
