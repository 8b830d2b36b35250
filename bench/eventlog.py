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
  events from disk (the start-up path without a snapshot); beside it
  read_check_events_per_s, the same records only read and checked (no decode).
- recovery_s_1m: start-up time of the store with 1,000,000 events in the log:
  open and check the log, load the newest snapshot, replay the tail after it
  (10,000 events: the most a snapshot every 10,000 events leaves).
- catchup_events_per_s_1m: one subscriber from seq 0 (``Subscription.next_batch``)
  until it has every one of the 1,000,000 events, the log reopened first (so
  nothing is in its live buffer); its reference is read_check_events_per_s.
- audit_one_sandbox_s_1m: ``sandboxd log dump --sandbox ID`` of one of the
  1,000 sandboxes (in-process, to a null sink: the dump itself); beside it
  audit_full_scan_s_1m, the same dump with the index files moved away (as an
  older log has none), and audit_one_sandbox_cli_s_1m, the whole command in a
  new process (Python's start-up and imports included).

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from sandboxd.events import audit, framing, snapshots
from sandboxd.events import types as ev
from sandboxd.events.codec import decode, encode, now_ts
from sandboxd.events.log import CaughtUp, EventLog, _in_thread, open_event_log
from sandboxd.events.projection import State, apply
from sandboxd.events.segments import Segment, iter_decoded, iter_records
from sandboxd.events.store import StoreConfig, open_store, replay

SANDBOXES = 1000  # the daemon's default limit, all live at once
#: Replay, catch-up and the indexed dump are timed this many times; the best counts
#: (the machine is shared: the best run is the one least disturbed by others).
ROUNDS = 3


def lifecycle_event(i: int) -> ev.PendingEvent:
    """Event ``i`` of the lives of 1,000 sandboxes, interleaved one event each in turn.

    Each is created, started and runs, then is paused, resumed, found unhealthy
    and healthy again, runs again, over and over: a million events are a
    thousand for each sandbox, which is the worst case for reading one
    sandbox's events without an index (one record in a thousand is its own).
    """
    step, n = divmod(i, SANDBOXES)
    sandbox_id = f"sbx-{n:08d}-Xb9qL2"
    port = 30000 + n
    data: ev.Payload
    match step if step < 3 else 3 + (step - 3) % 5:
        case 0:
            data = ev.SandboxCreated(
                "default", "alice", f"/var/lib/sandboxd/sandboxes/{sandbox_id}", port
            )
        case 1:
            data = ev.ProcessStarted(
                100000 + n,
                100000 + n,
                1764156739.25 + n,
                ["python3", "-m", "sandboxd.actors.agent_server", "--port", str(port)],
            )
        case 2 | 7:
            data = ev.SandboxRunning([ev.ExposedUrl("AGENT_SERVER", f"http://127.0.0.1:{port}")])
        case 3:
            data = ev.SandboxPaused()
        case 4:
            data = ev.SandboxResumed()
        case 5:
            data = ev.SandboxUnhealthy("the health check timed out after 2.0 s")
        case _:
            data = ev.SandboxHealthy()
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


def read_and_check(segment: Segment, chunk_bytes: int = 4 << 20) -> int:
    """Read a segment as replay does and check every frame (crc, seq), decoding nothing:
    the floor under replay and catch-up. Returns how many records it holds."""
    offset, next_seq = framing.HEADER_SIZE, segment.first_seq
    with open(segment.path, "rb", buffering=0) as file:
        while offset < segment.end:
            buf = os.pread(file.fileno(), min(chunk_bytes, segment.end - offset), offset)
            found = framing.scan(buf, 0, next_seq)
            offset += found.end
            next_seq = found.next_seq
    return next_seq - segment.first_seq


def replay_and_snapshot(state_dir: Path, total: int, tail: int) -> dict[str, float]:
    """Fold the whole log from disk with the store's own replay, timed (best of
    ``ROUNDS``); and write a snapshot ``tail`` events before its end, for recovery."""

    async def segment_table() -> Any:
        async with open_event_log(state_dir / "events") as log:
            return log.snapshot_segments()

    table = trio.run(segment_table)
    state = State()
    for i, segment in enumerate(table):
        following = table[i + 1] if i + 1 < len(table) else None
        for offset, event, _raw in iter_decoded(segment, 0, following):
            apply(state, event)
            if event.seq == total - tail:
                # What the store writes: with the position of the event's record.
                position = (segment.first_seq, offset)
                blob = snapshots.encode_snapshot(state, event.ts, position)
                snapshots.write_snapshot(state_dir / "snapshots", state.head_seq, blob)
    assert state.head_seq == total, (state.head_seq, total)
    elapsed = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        count, _ts = replay(State(), table, 0)  # start-up without a snapshot
        elapsed = min(elapsed, time.perf_counter() - started)
        assert count == total, (count, total)

    # Where the time goes: the same records read and checked only (the I/O floor),
    # read, checked and decoded, decoded alone, folded alone.
    started = time.perf_counter()
    assert sum(read_and_check(segment) for segment in table) == total
    read_check = time.perf_counter() - started
    started = time.perf_counter()
    raws = [raw for _event, raw in iter_records(table)]
    read_and_decode = time.perf_counter() - started
    sample = raws[:200_000]
    started = time.perf_counter()
    for raw in sample:
        decode(raw)
    decode_only = (time.perf_counter() - started) / len(sample) * total
    decoded = [decode(raw) for raw in sample]
    fold = State()
    started = time.perf_counter()
    for event in decoded:
        apply(fold, event)
    fold_only = (time.perf_counter() - started) / len(decoded) * total
    return {
        "replay_events_per_s": per_second(count, elapsed),
        "replay_s": elapsed,
        "read_check_events_per_s": per_second(total, read_check),
        "read_check_s": read_check,
        "read_check_decode_s": read_and_decode,
        "decode_s": decode_only,
        "fold_s": fold_only,
        "live_sandboxes": len(state.sandboxes),
    }


async def catch_up(events_dir: Path, total: int) -> float:
    """Events per second to one subscriber from seq 0 until it has all ``total``
    (best of ``ROUNDS`` subscriptions, each from seq 0)."""
    elapsed = float("inf")
    async with open_event_log(events_dir) as log:
        assert log.head_seq == total
        for _ in range(ROUNDS):
            got = 0
            started = time.perf_counter()
            async with log.subscribe(0) as subscription:
                async for batch in subscription.batches(4096):
                    if isinstance(batch, CaughtUp):
                        break
                    got += len(batch)
            elapsed = min(elapsed, time.perf_counter() - started)
            assert got == total, (got, total)
    return per_second(total, elapsed)


class _Null:
    """A text sink that only counts lines: the dump's output costs nothing to take."""

    lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return len(text)


def audit_one_sandbox(state_dir: Path, sandbox_id: str) -> tuple[float, int]:
    sink = _Null()
    started = time.perf_counter()
    code = audit.dump(state_dir, sink, sandbox_id=sandbox_id)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert code == 0
    return elapsed, sink.lines


def audit_cli(state_dir: Path, sandbox_id: str) -> tuple[float, int]:
    argv = [sys.executable, "-m", "sandboxd.cli", "log", "dump", "--state-dir", str(state_dir)]
    started = time.perf_counter()
    done = subprocess.run(
        [*argv, "--sandbox", sandbox_id], capture_output=True, check=True, cwd="/"
    )
    return time.perf_counter() - started, done.stdout.count(b"\n")


def import_floor() -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import sandboxd.cli, sandboxd.events.audit"], check=True, cwd="/"
    )
    return time.perf_counter() - started


def bench_audit(state_dir: Path, total: int) -> dict[str, float]:
    """Dump one sandbox's events: through the index files, then (moved away) by a full scan."""
    sandbox_id = lifecycle_event(SANDBOXES // 2).sandbox_id
    assert sandbox_id is not None
    expected = len(range(SANDBOXES // 2, total, SANDBOXES))
    indexed = float("inf")
    for _ in range(ROUNDS):
        seconds, lines = audit_one_sandbox(state_dir, sandbox_id)
        indexed = min(indexed, seconds)
        assert lines == expected, (lines, expected)
    cli, cli_lines = audit_cli(state_dir, sandbox_id)
    assert cli_lines == expected
    floor = import_floor()
    aside = state_dir / "index-aside"
    aside.mkdir()
    for path in (state_dir / "events").glob("*.idx"):
        path.rename(aside / path.name)
    try:
        full_scan, lines = audit_one_sandbox(state_dir, sandbox_id)
        assert lines == expected
    finally:
        for path in aside.iterdir():
            path.rename(state_dir / "events" / path.name)
        aside.rmdir()
    index_bytes = sum(p.stat().st_size for p in (state_dir / "events").glob("*.idx"))
    return {
        "audit_one_sandbox_s_1m": indexed,
        "audit_full_scan_s_1m": full_scan,
        "audit_one_sandbox_cli_s_1m": cli,
        "import_floor_s": floor,
        "audit_events": lines,
        "index_bytes": index_bytes,
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
        results["read_check_events_per_s"] = replay["read_check_events_per_s"]
        step("  recovering the store ...")
        recovery_s, snapshot_seq, replayed = trio.run(time_recovery, state_dir)
        results["recovery_s_1m"] = recovery_s
        step("  catching up from seq 0 ...")
        results["catchup_events_per_s_1m"] = trio.run(catch_up, state_dir / "events", history)
        step("  dumping one sandbox ...")
        audit_results = bench_audit(state_dir, history)
        results.update(audit_results)
        results["history_events"] = history
        results["load_average"] = os.getloadavg()[0]
        log_bytes = sum(p.stat().st_size for p in (state_dir / "events").glob("*.log"))
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
    print(f"  read+check alone                {results['read_check_events_per_s']:>8,.0f} events/s")
    print(f"  catch-up from seq 0             {results['catchup_events_per_s_1m']:>8,.0f} events/s")
    print(
        f"  dump of one sandbox ({audit_results['audit_events']:,.0f} events):"
        f" {audit_results['audit_one_sandbox_s_1m']:.3f} s through the index,"
        f" {audit_results['audit_full_scan_s_1m']:.3f} s by a full scan;"
        f" the command {audit_results['audit_one_sandbox_cli_s_1m']:.3f} s"
        f" (Python and imports alone {audit_results['import_floor_s']:.3f} s)"
    )
    print(
        f"  index files: {audit_results['index_bytes'] / 1e6:,.1f} MB"
        f" ({audit_results['index_bytes'] / log_bytes:.1%} of the log)"
    )
    print(
        f"  recovery: {recovery_s:.3f} s (snapshot at seq {snapshot_seq:,},"
        f" {replayed:,} events replayed after it)"
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
