"""The daemon's wiring: which parts start in which nursery, in which order.

    state dir lock -> store (log writer, projection) -> actors + recovery
      -> daemon.started -> gateway ... SIGTERM/SIGINT -> graceful stop

The gateway opens only after recovery, so no client ever sees half-rebuilt
state; on shutdown it stops first, so no op arrives while actors stop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import trio

from sandboxd import __version__
from sandboxd.actors.errors import Unavailable
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.recovery import recover
from sandboxd.actors.registry import Registry
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.store import Store, StoreConfig, open_store
from sandboxd.gateway.auth import Authenticator, ensure_admin_token
from sandboxd.gateway.metrics import Metrics
from sandboxd.gateway.server import Gateway

log = logging.getLogger("sandboxd")


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """One daemon per state dir: two writers would interleave one log."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonError(
                f"another sandboxd is running on {state_dir}; stop it or pick another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


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
    config: Config, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully; ``started`` gives the gateway."""
    raise_open_files_limit()
    with (
        state_dir_lock(config.state_dir),
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
    ):
        keys = SessionKeys(config.state_dir)
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
            open_store(config.state_dir, store_config, on_applied=metrics.observe_events) as store,
            trio.open_nursery() as actors,
        ):
            # Counted from the first event of this run on: recovery's come next.
            metrics.watch_log(store.state, store.log)
            store.log.on_synced = metrics.observe_sync
            registry = Registry(
                config, store.state, store.append, keys, actors, append_many=store.append_many
            )
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
                await front.start(gateway.serve)
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
