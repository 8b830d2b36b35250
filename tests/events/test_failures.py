"""A full disk, for real: the batch fails, nothing of it survives, the log carries on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sandboxd.events import types as ev
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.log import EventLog, open_event_log
from tests.events.strategies import sample_pending

ROOT = Path(__file__).parents[2]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=10)


def _fill_disk(directory: Path) -> Path:
    """Write a file until the disk has no room left; return it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as file:
        chunk = b"\xff" * 4096
        try:
            while True:
                file.write(chunk)
        except OSError:
            pass
        try:
            while True:
                file.write(b"\xff")
        except OSError:
            pass
    return filler


async def _batch(log: EventLog, start: int, count: int = 200) -> list[ev.Event]:
    return await log.append_many([sample_pending(i) for i in range(start, start + count)])


async def test_a_full_disk_fails_the_batch_and_the_log_recovers(small_disk: Path) -> None:
    directory = small_disk / "log"
    async with open_event_log(directory) as log:
        good = await _batch(log, 0)
        filler = await trio.to_thread.run_sync(_fill_disk, small_disk)

        # One batch of several appenders: all of them are told, none succeeds.
        failures: list[BaseException] = []

        async def appender(start: int) -> None:
            try:
                await _batch(log, start, 50)
            except LogUnavailable as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(appender, 1000 + 50 * k)
        assert len(failures) == 4
        assert "No space left" in str(failures[0])
        with pytest.raises(LogUnavailable):
            await _batch(log, 2000)  # still full: still refused, and the log is still up
        assert log.head_seq == 200
        assert log.failed_batches >= 2
        assert await log.read(0, limit=1000) == good

        await trio.to_thread.run_sync(filler.unlink)
        after = await _batch(log, 3000)
        assert after[0].seq == 201  # the failed batches left no gap in the seqs
        good += after

    async with open_event_log(directory) as log:
        assert log.recovery.dropped_bytes == 0  # the failed batches were cut back, not torn
        assert await log.read(0, limit=1000) == good


CHILD = """
import json, resource, signal, sys, trio
from pathlib import Path
sys.path.append(sys.argv[2])  # for tests.events; last, so the installed sandboxd wins
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.log import open_event_log
from tests.events.strategies import sample_pending

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not a dead process

async def main():
    directory = Path(sys.argv[1])
    report = {"ok": [], "failed": 0}
    async with open_event_log(directory) as log:
        size = sum(p.stat().st_size for p in directory.iterdir())
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20_000, hard))
        i = 0
        while report["failed"] < 3:
            try:
                events = await log.append_many([sample_pending(i + k) for k in range(20)])
                report["ok"] += [e.seq for e in events]
            except LogUnavailable as exc:
                report["failed"] += 1
                report["error"] = str(exc)
            i += 20
        report["head_after_failures"] = log.head_seq
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
        events = await log.append_many([sample_pending(i + k) for k in range(20)])
        report["ok"] += [e.seq for e in events]
    print(json.dumps(report))

trio.run(main)
"""


def test_a_file_size_limit_fails_batches_and_appends_resume(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel refuse writes past a size: EFBIG, for real.
    directory = tmp_path / "log"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), str(ROOT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the project root, whose daemon/ folder once shadowed the package
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "File too large" in report["error"]
    ok = report["ok"]
    assert ok == list(range(1, len(ok) + 1))  # no seq lost or skipped around the failures
    assert report["head_after_failures"] == len(ok) - 20

    async def reopen() -> None:
        async with open_event_log(directory) as log:
            assert log.recovery.dropped_bytes == 0
            assert [e.seq for e in await log.read(0, limit=10_000)] == ok

    trio.run(reopen)
