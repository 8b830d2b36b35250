"""Start-up reconciliation: the projection the log rebuilt, checked against the OS.

A process with the recorded pid *and* start time is adopted; anything else is
MISSING. Processes that carry this daemon's marker but belong to no live
sandbox (a start that crashed before its process was recorded, a delete that
crashed half-way) are ended, and working directories without a sandbox are
removed, so after recovery the machine holds exactly what the log says.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import trio

from sandboxd.actors import process
from sandboxd.actors.registry import Registry
from sandboxd.events import types as ev
from sandboxd.events.projection import SandboxRecord, Status

log = logging.getLogger(__name__)

#: Statuses that promise a process: without one after a restart, the sandbox is MISSING.
_HAD_A_PROCESS = (Status.STARTING, Status.RUNNING, Status.PAUSED)


def _handle(record: SandboxRecord) -> process.ProcessHandle | None:
    if record.pid is None or record.pgid is None or record.create_time is None:
        return None
    return process.ProcessHandle(record.pid, record.pgid, record.create_time)


async def recover(registry: Registry) -> int:
    """Adopt or mark every sandbox of the projection; return how many were rebuilt."""
    state, record_event = registry.state, registry.record_event
    rebuilt = len(state.sandboxes)
    marked = await trio.to_thread.run_sync(process.find_marked_processes, registry.marker)
    for record in list(state.sandboxes.values()):
        handle = _handle(record)
        strays = marked.pop(record.id, [])
        if handle is not None and process.is_alive(handle):
            await record_event(record.id, ev.SandboxAdopted(handle.pid))
        else:
            if handle is not None or record.status in (
                Status.STARTING,
                Status.RUNNING,
                Status.PAUSED,
            ):
                reason = (
                    "its process was gone when the daemon started again"
                    if handle is not None
                    else "the daemon stopped before the sandbox's process was recorded"
                )
                if strays:
                    reason += f"; {len(strays)} leftover processes were ended"
                await process.kill_processes(strays)
                await record_event(record.id, ev.SandboxMissing(reason))
            elif strays:
                await process.kill_processes(strays)
        await registry.adopt(state.sandboxes[record.id])
    for sandbox_id, strays in marked.items():
        # Marked by this daemon, unknown to its log: a start or delete cut short by a crash.
        log.warning(
            "ending %d processes of sandbox %s, which the log does not hold",
            len(strays),
            sandbox_id,
        )
        await process.kill_processes(strays)
    await trio.to_thread.run_sync(
        _remove_orphan_dirs, registry.config.sandboxes_dir, set(state.sandboxes)
    )
    return rebuilt


def _remove_orphan_dirs(base: Path, live: set[str]) -> None:
    if not base.is_dir():
        return
    for entry in base.iterdir():
        if entry.is_dir() and entry.name not in live:
            log.warning("removing %s: no sandbox of the log owns it", entry)
            shutil.rmtree(entry, ignore_errors=True)
