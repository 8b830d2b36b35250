"""Benchmark of the event log: durable appends, its SQLite peer, replay and recovery.

    python bench/eventlog.py [--quick] [--dir DIR]

Measured in one run, on the same disk (DIR, default a temporary directory):

- fdatasync_per_s: a bare loop of one record's write + fdatasync: the disk's floor.
- appends_per_s_c1/c16/c256: durable appends per second with 1, 16 and 256
  concurrent appenders, each awaiting the durability of its own event
  (realistic events: a sandbox's lifecycle), through EventLog.append.
- sqlite_appends_per_s_c256: the same workload and the same group commit
  (the very same queue and batching code), each batch one transaction on
  stdlib sqlite3 in WAL mode with synchronous=FULL; ratio_vs_sqlite is ours
  over it.
- sqlite_txn_per_event_per_s: SQLite with one transaction per event.
- replay_events_per_s: reading, checking, decoding and folding 1,000,000
  events from disk (the start-up path without a snapshot).
- recovery_s_1m: start-up time of the store with 1,000,000 events in the log:
  open and check the log, load the newest snapshot, replay the tail after it
  (10,000 events: the most a snapshot every 10,000 events leaves).

Prints a readable summary, then one JSON object as its last line. ``--quick``
runs each part briefly, and replay and recovery on 100,000 events.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from sandboxd.events import snapshots
from sandboxd.events import types as ev
from sandboxd.events.codec import decode, encode, now_ts
from sandboxd.events.log import EventLog, _in_thread, open_event_log
from sandboxd.events.projection import State, apply
from sandboxd.events.segments import iter_records, iter_segment
from sandboxd.events.store import StoreConfig, open_store

LIFECYCLE = 10  # events per sandbox


def lifecycle_event(i: int) -> ev.PendingEvent:
    """Event ``i`` of a stream of sandbox lifecycles, 64 sandboxes interleaved.

    Each sandbox is created, started, runs, is paused and resumed twice,
    and is deleted, except one in a hundred, which exits and stays: a million
    events leave about a thousand sandboxes live, the daemon's default limit.
    """
    block, rest = divmod(i, 64 * LIFECYCLE)
    step, lane = divmod(rest, 64)
    n = block * 64 + lane
    sandbox_id = f"sbx-{n:08d}-Xb9qL2"
    port = 30000 + n % 9999
    data: ev.Payload
    match step:
        case 0:
            data = ev.SandboxCreated(
                "default", "alice", f"/var/lib/sandboxd/sandboxes/{sandbox_id}", port
            )
        case 1:
            data = ev.ProcessStarted(
                100000 + n % 800000,
                100000 + n % 800000,
                1764156739.25 + n,
                ["python3", "-m", "sandboxd.actors.agent_server", "--port", str(port)],
            )
        case 2 | 5 | 8:
            data = ev.SandboxRunning([ev.ExposedUrl("AGENT_SERVER", f"http://127.0.0.1:{port}")])
        case 3 | 6:
            data = ev.SandboxPaused()
        case 4 | 7:
            data = ev.SandboxResumed()
        case _:
            data = ev.SandboxExited(None, 9) if n % 100 == 0 else ev.SandboxDeleted(False)
    return ev.PendingEvent(sandbox_id, "alice", data)


def per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds else 0.0


# -- the disk's floor ------------------------------------------------------------------


def bench_fdatasync(directory: Path, seconds: float) -> float:
    record = encode(ev.Event(1, now_ts(), *_unpack(lifecycle_event(1))))
    path = directory / "fdatasync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            os.write(fd, record)
            os.fdatasync(fd)
            count += 1
        return per_second(count, time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()


def _unpack(pending: ev.PendingEvent) -> tuple[str | None, str | None, ev.Payload]:
    return pending.sandbox_id, pending.by, pending.data


# -- durable appends ---------------------------------------------------------------------


async def drive(log: EventLog, concurrency: int, seconds: float) -> float:
    """Appends per second, ``concurrency`` appenders each awaiting its own event."""
    pool = [lifecycle_event(i) for i in range(4096)]
    count = 0
    stop = False

    async def appender(k: int) -> None:
        nonlocal count
        events = itertools.cycle(pool[k % len(pool) :] + pool[: k % len(pool)])
        while not stop:
            await log.append(next(events))
            count += 1

    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(appender, k)
        await trio.sleep(seconds / 5)  # warm up
        before, started = count, time.perf_counter()
        await trio.sleep(seconds)
        measured = per_second(count - before, time.perf_counter() - started)
        stop = True
    return measured


async def bench_appends(directory: Path, concurrency: int, seconds: float) -> float:
    target = directory / f"log-c{concurrency}"
    async with open_event_log(target) as log:
        result = await drive(log, concurrency, seconds)
    shutil.rmtree(target)
    return result


class SqliteLog(EventLog):
    """The same queue, batching and answering as EventLog; each batch one SQLite transaction."""

    db: sqlite3.Connection

    async def _write(self, batch: Any) -> None:
        rows = [(r.event.seq, r.raw) for r in batch.records]
        await _in_thread(self._commit_rows, rows)

    def _commit_rows(self, rows: list[tuple[int, bytes]]) -> None:
        with self.db:  # one transaction: BEGIN ... COMMIT, synced to the WAL
            self.db.executemany("INSERT INTO events (seq, record) VALUES (?, ?)", rows)


def open_sqlite(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, record BLOB NOT NULL)")
    db.commit()
    return db


async def bench_sqlite_group_commit(directory: Path, concurrency: int, seconds: float) -> float:
    target = directory / "sqlite-group"
    # The log's machinery around a SQLite sink: open_event_log with the class swapped.
    from sandboxd.events import log as log_module

    original = log_module.EventLog
    log_module.EventLog = SqliteLog  # type: ignore[misc]
    try:
        async with open_event_log(target) as log:
            assert isinstance(log, SqliteLog)
            log.db = open_sqlite(target / "events.sqlite")
            try:
                result = await drive(log, concurrency, seconds)
            finally:
                log.db.close()
    finally:
        log_module.EventLog = original  # type: ignore[misc]
    shutil.rmtree(target)
    return result


def bench_sqlite_txn_per_event(directory: Path, seconds: float) -> float:
    path = directory / "sqlite-single.sqlite"
    db = open_sqlite(path)
    ts = now_ts()
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        count += 1
        record = encode(ev.Event(count, ts, *_unpack(lifecycle_event(count))))
        with db:
            db.execute("INSERT INTO events (seq, record) VALUES (?, ?)", (count, record))
    result = per_second(count, time.perf_counter() - started)
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return result


# -- replay and recovery -----------------------------------------------------------------


async def write_history(events_dir: Path, total: int) -> None:
    async with open_event_log(events_dir) as log:
        for start in range(0, total, 4096):
            end = min(start + 4096, total)
            await log.append_many([lifecycle_event(i) for i in range(start, end)])


def replay_and_snapshot(state_dir: Path, total: int, tail: int) -> dict[str, float]:
    """Fold the whole log from disk, timed; write a snapshot ``tail`` events before its end."""

    async def segment_table() -> Any:
        async with open_event_log(state_dir / "events") as log:
            return log.snapshot_segments()

    table = trio.run(segment_table)
    state = State()
    snapshot_at = total - tail
    count = 0
    snapshot_seconds = 0.0
    started = time.perf_counter()
    for i, segment in enumerate(table):
        following = table[i + 1] if i + 1 < len(table) else None
        for offset, (event, _raw) in iter_segment(segment, 0, following):
            apply(state, event)
            count += 1
            if count == snapshot_at:
                # What the store writes: with the position of the event's record.
                paused = time.perf_counter()
                position = (segment.first_seq, offset)
                blob = snapshots.encode_snapshot(state, event.ts, position)
                snapshots.write_snapshot(state_dir / "snapshots", state.head_seq, blob)
                snapshot_seconds = time.perf_counter() - paused
    elapsed = time.perf_counter() - started - snapshot_seconds
    assert count == total, (count, total)

    # Where the time goes: the same records, read alone, then decoded alone.
    started = time.perf_counter()
    raws = [raw for _event, raw in iter_records(table)]
    read_and_decode = time.perf_counter() - started
    started = time.perf_counter()
    decoded = [decode(raw) for raw in raws[:200_000]]
    decode_only = (time.perf_counter() - started) / len(decoded) * total
    fold = State()
    started = time.perf_counter()
    for event in decoded:
        apply(fold, event)
    fold_only = (time.perf_counter() - started) / len(decoded) * total
    return {
        "replay_events_per_s": per_second(count, elapsed),
        "replay_s": elapsed,
        "read_check_decode_s": read_and_decode,
        "decode_s": decode_only,
        "fold_s": fold_only,
        "live_sandboxes": len(state.sandboxes),
        "snapshot_write_s": snapshot_seconds,
    }


async def time_recovery(state_dir: Path) -> tuple[float, int, int]:
    started = time.perf_counter()
    async with open_store(state_dir, StoreConfig()) as store:
        elapsed = time.perf_counter() - started
        startup = store.startup
    return elapsed, startup.snapshot_seq, startup.replayed


# -- the run -----------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, point, fstype, *_ = line.split()
                if str(path).startswith(point) and len(point) > len(best):
                    best, kind = point, f"{fstype} on {device}"
    except OSError:
        pass
    return kind


def step(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run, in seconds")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary dir)")
    args = parser.parse_args(argv)
    seconds = 0.5 if args.quick else 3.0
    history = 100_000 if args.quick else 1_000_000
    tail = 10_000
    base = Path(tempfile.mkdtemp(prefix="sandboxd-bench-", dir=args.dir))
    results: dict[str, Any] = {}
    try:
        print(f"sandboxd event log benchmark ({'quick' if args.quick else 'full'} run)")
        print(f"  directory: {base} ({filesystem_of(base)}), {os.cpu_count()} CPUs")
        step("  fdatasync ...")
        results["fdatasync_per_s"] = bench_fdatasync(base, seconds)
        for concurrency in (1, 16, 256):
            step(f"  appends, {concurrency} appenders ...")
            results[f"appends_per_s_c{concurrency}"] = trio.run(
                bench_appends, base, concurrency, seconds
            )
        step("  sqlite, same group commit ...")
        results["sqlite_appends_per_s_c256"] = trio.run(
            bench_sqlite_group_commit, base, 256, seconds
        )
        step("  sqlite, one transaction per event ...")
        results["sqlite_txn_per_event_per_s"] = bench_sqlite_txn_per_event(base, seconds)
        results["ratio_vs_sqlite"] = results["appends_per_s_c256"] / max(
            results["sqlite_appends_per_s_c256"], 1e-9
        )
        state_dir = base / "state"
        step(f"  writing {history:,} events ...")
        started = time.perf_counter()
        trio.run(write_history, state_dir / "events", history)
        written_s = time.perf_counter() - started
        step("  replaying them ...")
        replay = replay_and_snapshot(state_dir, history, tail)
        results["replay_events_per_s"] = replay["replay_events_per_s"]
        step("  recovering the store ...")
        recovery_s, snapshot_seq, replayed = trio.run(time_recovery, state_dir)
        results["recovery_s_1m"] = recovery_s
        results["history_events"] = history
        log_bytes = sum(p.stat().st_size for p in (state_dir / "events").iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)

    fsync = results["fdatasync_per_s"]
    print()
    print(f"  bare write+fdatasync       {fsync:>12,.0f} /s")
    for c in (1, 16, 256):
        rate = results[f"appends_per_s_c{c}"]
        print(f"  durable appends, c{c:<4}     {rate:>12,.0f} /s")
    print(f"    c1 / fdatasync           {results['appends_per_s_c1'] / fsync:>12.2f}")
    print(f"  sqlite group commit, c256  {results['sqlite_appends_per_s_c256']:>12,.0f} /s")
    print(f"    ours / sqlite            {results['ratio_vs_sqlite']:>12.2f}")
    print(f"  sqlite txn per event       {results['sqlite_txn_per_event_per_s']:>12,.0f} /s")
    print(f"  history: {history:,} events, {log_bytes / 1e6:,.0f} MB, written in {written_s:.1f} s")
    print(f"  replay (read+check+decode+fold) {results['replay_events_per_s']:>8,.0f} events/s")
    print(
        f"    of which, for {history:,} events:"
        f" read+check+decode {replay['read_check_decode_s']:.2f} s,"
        f" decode alone {replay['decode_s']:.2f} s, fold alone {replay['fold_s']:.2f} s"
    )
    print(f"    {replay['live_sandboxes']:,.0f} sandboxes live at the end")
    print(
        f"  recovery: {recovery_s:.3f} s (snapshot at seq {snapshot_seq:,},"
        f" {replayed:,} events replayed after it)"
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
