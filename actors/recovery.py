"""Start-up reconciliation: the projection the log rebuilt, checked against the OS.

By the time this runs the store has loaded the newest trustworthy snapshot and
replayed the log's tail, so ``registry.state`` is what the log says. Here that
is checked against the machine, so that afterwards the machine holds exactly
what the log says and every sandbox is in one state of the status machine.

With cgroups (the tree boundary of cgroup2 and cgroup1), a sandbox is its
cgroup, named for the sandbox and the daemon:

- one whose recorded process was started and whose cgroup still holds
  processes is adopted (``sandbox.adopted``): its actor watches its main
  process (through a pidfd) and its cgroup's ``populated`` again, its health
  checks resume, a PAUSED one stays frozen;
- one that had, or was promised, a process and whose cgroup is empty is
  MISSING (``sandbox.missing``); processes in the cgroup of a start cut short
  before its process was recorded are killed first: nothing runs that the log
  does not know of;
- a cgroup of this daemon that no sandbox of the log owns (a sandbox a
  truncated log no longer knows, a delete cut short) is killed and removed;
- a recorded process that is alive outside any cgroup (started by a version
  before cgroups, or while ``cgroup = "off"``) is adopted on markers.

Under markers, the recorded process (pid *and* start time) is looked for, and
the processes carrying this daemon's marker:

- alive: adopted; gone: MISSING;
- a marked process that no adopted sandbox owns (a start or delete cut short,
  a sandbox a truncated log no longer knows, the leftovers of one that is
  MISSING) is ended with SIGKILL.

On both, the pause state is the log's: a pause or resume cut short by a crash
(the tree frozen or stopped, its event not yet durable) was never
acknowledged, so it is undone. The same rule covers a person's ``kill -STOP``
or ``kill -CONT`` behind the daemon's back: a sandbox the log calls RUNNING
runs after a restart, one it calls PAUSED is frozen or stopped
(docs/operations.md). Each sandbox keeps the uid its events recorded, and uids
of the range that something no sandbox owns still holds drain before reuse.
Working dirs and output files that no sandbox of the log owns are removed.

The events are appended in batches (one fdatasync per batch, not per
sandbox), and the actors are started after that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import attrs
import trio

from sandboxd.actors import proctree
from sandboxd.actors.boundary.in_force import Boundary
from sandboxd.actors.boundary.trees import SandboxTree
from sandboxd.actors.boundary.workdirs import remove_tree
from sandboxd.actors.proctree import ProcessId
from sandboxd.actors.registry import Registry
from sandboxd.events import types as ev
from sandboxd.events.projection import SandboxRecord, Status

log = logging.getLogger(__name__)

#: Statuses that promise a process: without one after a restart, the sandbox is MISSING.
PROMISE_A_PROCESS = frozenset({Status.STARTING, Status.RUNNING, Status.PAUSED})
#: How many events one append carries (one write and one fdatasync each).
BATCH = 1024


@attrs.frozen
class RecoveryReport:
    """What start-up found and did; ``rebuilt`` is daemon.started's ``recovered``."""

    rebuilt: int  # sandboxes the log holds (not deleted), each with an actor again
    adopted: int  # found alive, watched again
    missing: int  # newly marked MISSING
    resumed: int  # RUNNING in the log, frozen or stopped in the OS: thawed, SIGCONT
    paused: int  # PAUSED in the log, running in the OS: frozen (markers: SIGSTOP) again
    strays_ended: int  # processes (cgroup members or marked) that no live sandbox owned
    leftovers_removed: int  # working dirs and output files that no sandbox owned
    seconds: float

    def describe(self) -> str:
        return (
            f"recovery: {self.rebuilt} sandboxes in the log, {self.adopted} adopted, "
            f"{self.missing} newly missing, {self.resumed} resumed and {self.paused} paused "
            f"again to match the log, {self.strays_ended} stray processes ended, "
            f"{self.leftovers_removed} leftover files and dirs removed, in {self.seconds:.3f} s"
        )


@attrs.frozen
class _Verdict:
    """What the survey decided for one sandbox."""

    record: SandboxRecord
    main: ProcessId | None  # set: adopt it
    strays: list[ProcessId]  # marked processes of this sandbox to end
    fix: str | None = None  # "resume" | "pause": the OS disagrees with the log's pause state
    tree: SandboxTree | None = None  # what it is adopted with (None: the boundary's own)
    kill_tree: bool = False  # its cgroup holds processes the log never recorded


def _logged_status(record: SandboxRecord) -> Status:
    """What the log says it is doing: while MISSING because its node was lost, the status
    it had then (which adopting it restores), so that a paused one stays paused."""
    return record.before_lost or record.status


def _main(record: SandboxRecord) -> ProcessId | None:
    if record.pid is None or record.create_time is None:
        return None
    return ProcessId.from_create_time(record.pid, record.create_time)


def _states(processes: Iterable[ProcessId]) -> list[str]:
    """The state letters of those still alive (the same processes: pid and start time)."""
    return [state for p in processes if (state := proctree.state_of(p)) is not None]


def _survey_markers(
    records: list[SandboxRecord], marker: str
) -> tuple[list[_Verdict], dict[str, list[ProcessId]]]:
    """Decide every sandbox's fate from one scan of /proc (blocking: run it in a thread).

    Returns the verdicts and the marked processes of sandboxes the log does not hold.
    """
    marked = proctree.find_marked(marker)
    verdicts = []
    for record in records:
        main = _main(record)
        procs = marked.pop(record.id, [])
        if main is None or not proctree.is_alive(main):
            # Nothing of it may run on: its process is not the one recorded, or none is.
            verdicts.append(_Verdict(record, None, procs))
            continue
        # The main process alone if the scan found none (it cleared its environment).
        live = _states(procs) or _states([main])
        fix = None
        paused = _logged_status(record) is Status.PAUSED
        if paused and not all(map(proctree.is_stopped, live)):
            fix = "pause"  # a resume cut short, or SIGCONT by hand
        elif not paused and any(map(proctree.is_stopped, live)):
            fix = "resume"  # a pause cut short, or SIGSTOP by hand
        verdicts.append(_Verdict(record, main, [], fix))
    return verdicts, marked


def _survey_cgroups(boundary: Boundary, records: list[SandboxRecord]) -> list[_Verdict]:
    """Decide every sandbox's fate from its cgroup: a few kernfs reads each, microseconds."""
    verdicts = []
    for record in records:
        tree = boundary.adopted_tree(record.id)
        main = _main(record)
        if tree.populated():
            if main is None:
                # A start cut short before its process was recorded.
                verdicts.append(_Verdict(record, None, [], tree=tree, kill_tree=True))
                continue
            fix = None
            paused = _logged_status(record) is Status.PAUSED
            if paused and not tree.frozen():
                fix = "pause"  # a resume cut short
            elif not paused and (tree.frozen() or tree.stopped()):
                fix = "resume"  # a pause cut short, or SIGSTOP by hand
            verdicts.append(_Verdict(record, main, [], fix, tree=tree))
        elif main is not None and proctree.is_alive(main):
            # Alive outside its cgroup: started before this daemon had cgroups.
            log.warning(
                "sandbox %s: its process %d runs outside any cgroup (started by an earlier "
                'version, or with cgroup = "off"): adopted on markers',
                record.id,
                main.pid,
            )
            verdicts.append(_Verdict(record, main, [], tree=boundary.marked_tree(record.id)))
        else:
            verdicts.append(_Verdict(record, None, []))
    return verdicts


def _missing_reason(record: SandboxRecord, strays: int) -> str:
    if record.pid is not None:
        reason = f"its process {record.pid} was gone when the daemon started again"
    else:
        reason = "the daemon stopped before the sandbox's process was recorded"
    if strays:
        reason += f"; {strays} leftover processes were ended"
    return reason


async def _end(strays: list[ProcessId]) -> None:
    if not strays:
        return
    try:
        await proctree.kill_processes(strays)
    except proctree.TreeStateTimeout as exc:
        # Uninterruptible sleep, typically: they go when the kernel lets them.
        log.warning("stray sandbox processes survived SIGKILL: %s", exc)


async def _match_pause_state(registry: Registry, verdict: _Verdict) -> None:
    assert verdict.main is not None
    record, marker = verdict.record, registry.boundary.marker
    log.warning(
        "sandbox %s is %s in the log but %s in the OS: %s its processes to match the log",
        record.id,
        _logged_status(record),
        "running" if verdict.fix == "pause" else "stopped",
        "stopping" if verdict.fix == "pause" else "continuing",
    )
    tree = verdict.tree
    try:
        if tree is not None and tree.cgroup is not None:
            if verdict.fix == "pause":
                await tree.pause(verdict.main)
            else:
                if tree.frozen():
                    await tree.resume(verdict.main)
                tree.continue_all()  # a kill -STOP by hand: the freezer does not undo it
        elif verdict.fix == "pause":
            await proctree.pause_tree(verdict.main, record.id, daemon_marker=marker)
        else:
            await proctree.resume_tree(verdict.main, record.id, daemon_marker=marker)
    except proctree.TreeStateTimeout as exc:
        log.warning("sandbox %s: %s", record.id, exc)


async def recover(registry: Registry) -> RecoveryReport:
    """Adopt or mark every sandbox of this node in the projection, end what no sandbox owns.

    In a cluster the projection holds every node's sandboxes; this node's are those it
    created (``node``, or none named: a log older than nodes, this daemon's alone). One
    that another node recorded MISSING while this one was lost (``before_lost``) kept
    its process in the record: found alive, it is adopted as after a crash of its own.
    """
    started = time.monotonic()
    state = registry.state
    boundary = registry.boundary
    here = registry.config.node_id
    records = [r for r in state.sandboxes.values() if r.node is None or r.node == here]

    # Act first, then record (the actors' rule): a crash in between makes the
    # next start-up find the same and do the same.
    strays: list[ProcessId] = []
    ended = 0
    killed: dict[str, int] = {}  # cgroups: processes a start cut short left in its tree
    if boundary.cgroups is None:
        verdicts, unknown = await trio.to_thread.run_sync(_survey_markers, records, boundary.marker)
        strays = [p for v in verdicts for p in v.strays]
        for sandbox_id, procs in unknown.items():
            # Marked by this daemon, unknown to its log: a start or delete cut short,
            # or a sandbox whose events a truncated log lost.
            log.warning(
                "ending %d processes of sandbox %s, which the log does not hold",
                len(procs),
                sandbox_id,
            )
            strays.extend(procs)
        await _end(strays)
        ended = len(strays)
    else:
        verdicts = _survey_cgroups(boundary, records)
        for verdict in verdicts:
            if verdict.kill_tree and verdict.tree is not None:
                killed[verdict.record.id] = len(verdict.tree.members())
                await _end_tree(verdict.tree)
        ended += sum(killed.values())
        cgroups = boundary.cgroups
        for sandbox_id in boundary.sandboxes_with_cgroups():
            if sandbox_id not in state.sandboxes and (pids := cgroups.members(sandbox_id)):
                log.warning(
                    "ending %d processes of sandbox %s, which the log does not hold",
                    len(pids),
                    sandbox_id,
                )
                ended += len(pids)
        await boundary.remove_strays(keep=state.sandboxes.keys())
    fixes = [v for v in verdicts if v.fix is not None]
    for verdict in fixes:
        await _match_pause_state(registry, verdict)

    events: list[tuple[str, ev.Payload]] = []
    #: Newly MISSING that ran or were starting: a failure, to a restart policy (a PAUSED
    #: one stays as the client left it).
    lost: set[str] = set()
    for verdict in verdicts:
        record = verdict.record
        if verdict.main is not None:
            events.append((record.id, ev.SandboxAdopted(verdict.main.pid)))
        elif record.pid is not None or record.status in PROMISE_A_PROCESS:
            reason = _missing_reason(record, len(verdict.strays) or killed.get(record.id, 0))
            events.append((record.id, ev.SandboxMissing(reason)))
            if record.status is not Status.PAUSED:
                lost.add(record.id)
        elif verdict.strays:
            log.warning(
                "sandbox %s (%s): ended %d leftover processes",
                record.id,
                record.status,
                len(verdict.strays),
            )
    for i in range(0, len(events), BATCH):
        await registry.record_events(events[i : i + BATCH])

    for verdict in verdicts:
        sandbox_id = verdict.record.id
        registry.adopt(state.sandboxes[sandbox_id], tree=verdict.tree, lost=sandbox_id in lost)
    await trio.lowlevel.checkpoint()
    await registry.hold_unknown_uids()

    live = set(state.sandboxes)
    removed = await trio.to_thread.run_sync(_remove_leftovers, registry.config.sandboxes_dir, live)
    removed += await trio.to_thread.run_sync(registry.outputs.remove_unowned, live)
    adopted = sum(1 for v in verdicts if v.main is not None)
    report = RecoveryReport(
        rebuilt=len(records),
        adopted=adopted,
        missing=len(events) - adopted,
        resumed=sum(1 for v in fixes if v.fix == "resume"),
        paused=sum(1 for v in fixes if v.fix == "pause"),
        strays_ended=ended,
        leftovers_removed=removed,
        seconds=time.monotonic() - started,
    )
    log.info("%s", report.describe())
    return report


async def _end_tree(tree: SandboxTree) -> None:
    try:
        await tree.kill()
    except proctree.TreeStateTimeout as exc:
        log.warning("sandbox %s: processes survived SIGKILL: %s", tree.sandbox_id, exc)


def _remove_leftovers(sandboxes_dir: Path, live: set[str]) -> int:
    """Remove working dirs of sandboxes the log does not hold.

    scandir's entry types come with the listing: no stat per entry, which
    matters with a thousand sandboxes.
    """
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(sandboxes_dir) as entries:
        for entry in entries:
            if entry.name not in live and entry.is_dir(follow_symlinks=False):
                log.warning("removing %s: no sandbox of the log owns it", entry.path)
                try:
                    remove_tree(entry.path)
                except OSError as exc:
                    log.warning("could not remove %s: %s", entry.path, exc)
                removed += 1
    return removed
