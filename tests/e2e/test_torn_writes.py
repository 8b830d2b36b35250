"""Torn and lost writes, at the daemon level: the daemon starts, its state is consistent.

tests/events covers the log itself (every cut of a segment is recovered to its
longest valid prefix). Here the whole daemon starts on such a state dir:
whatever the log lost, the state it serves is the fold of what the log kept,
the sandboxes of that prefix are adopted or MISSING, and the processes and
working dirs of sandboxes the shortened log no longer knows are ended and
removed. Each start says what it dropped (a torn tail cut, a snapshot set aside).

The daemon runs in this process (run_daemon, the real wiring): a start costs
milliseconds, so the log can be cut at every byte of its last records. The
template log comes from a real run: sandbox "early", then sandbox "late",
whose three records (created, process_started, running) end the log.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from sandboxd.config import Config
from sandboxd.events import framing, segments
from sandboxd.events.projection import State, Status, copy_state
from sandboxd.events.store import open_store
from tests.daemon_process import reachable_dir
from tests.e2e.support import (
    daemon_in_process,
    make_config,
    read_log,
    replay,
    sandbox_processes,
    spawn_stray,
    verify_log,
)
from tests.support import end_sandboxes


@attrs.frozen
class Admin:
    id: str | None = None
    admin: bool = True


ADMIN = Admin()


@attrs.frozen
class Template:
    """A state dir as a real daemon left it, and where the records of its last segment sit."""

    files: Path
    segment: Path  # relative to the state dir
    frames: list[tuple[int, int, int]]  # (offset, seq, end) of each record of the last segment
    early_pid: int
    late_pid: int


def config_of(state_dir: Path, **changes: Any) -> Config:
    """This suite's daemon, its working dirs in the state dir (the default): a restored
    state dir brings them along. The state dir is where sandbox uids reach them."""
    return make_config(state_dir, base_working_dir=None, **changes)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    state_dir = reachable_dir("torn-") / "state"
    yield state_dir
    end_sandboxes(state_dir)


@pytest.fixture
async def template(tmp_path: Path, state_dir: Path) -> Template:
    config = config_of(state_dir, snapshot_every=1_000_000)
    async with daemon_in_process(config) as gateway:
        registry = gateway.registry
        early = await registry.start_sandbox(ADMIN, spec_id="sleep", sandbox_id="early")
        late = await registry.start_sandbox(ADMIN, spec_id="sleep", sandbox_id="late")
    assert early.pid is not None and late.pid is not None
    async with open_store(state_dir):
        pass  # a clean close snapshots the state: at seq 7, "late" running
    files = tmp_path / "template"
    shutil.copytree(state_dir, files)
    (first_seq, last), *_ = reversed(segments.list_segments(files / "events"))
    buf = last.read_bytes()
    found = framing.scan(buf, framing.HEADER_SIZE, first_seq, collect=True)
    frames = [
        (offset, seq, offset + framing.FRAME_OVERHEAD + len(payload))
        for offset, seq, payload in found.frames
    ]
    return Template(files, last.relative_to(files), frames, early.pid, late.pid)


def restore(template: Template, state_dir: Path, *, cut: int | None, snapshots: bool) -> None:
    """The template's files in ``state_dir``, its last segment cut at ``cut``."""
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.copytree(template.files, state_dir)
    if cut is not None:
        os.truncate(state_dir / template.segment, cut)
    if not snapshots:
        shutil.rmtree(state_dir / "snapshots", ignore_errors=True)


async def start_and_check(config: Config) -> tuple[State, set[str]]:
    """Start the daemon, let adopted starts settle, stop it; check its state against the log.

    Returns the state it served, and the sandboxes that marked processes belong to.
    """
    async with daemon_in_process(config) as gateway:
        state = gateway.registry.state
        with trio.fail_after(10):
            # An adopted start becomes RUNNING by an event of its actor: poll for it.
            while any(r.status is Status.STARTING for r in state.sandboxes.values()):  # noqa: ASYNC110
                await trio.sleep(0.005)
        served = copy_state(state)
    # The state served is the fold of every event the log holds now, from seq 1.
    events = read_log(config.state_dir)
    replayed = replay(events)
    assert list(served.sandboxes) == list(replayed.sandboxes)
    assert served.head_seq == replayed.head_seq
    for sandbox_id, record in served.sandboxes.items():
        assert record == replayed.sandboxes[sandbox_id], sandbox_id
    # Only live sandboxes of the log own processes and working dirs.
    marked = set(sandbox_processes(config.state_dir))
    for sandbox_id in marked:
        owner = served.sandboxes.get(sandbox_id)
        assert owner is not None and owner.pid is not None, (sandbox_id, owner)
    dirs = {p.name for p in config.sandboxes_dir.iterdir()}
    assert dirs <= set(served.sandboxes), dirs
    code, text = verify_log(config.state_dir)
    assert code == 0, text
    return served, marked


def late_process(state_dir: Path, marked: set[str], strays: list[subprocess.Popen[bytes]]) -> None:
    """Make sure a process marked as "late" runs: the original, or a stray in its place."""
    if "late" not in marked:
        strays.append(spawn_stray(state_dir, "late"))


def cuts(template: Template, every_byte: bool) -> list[int]:
    """Where to cut the last segment, longest prefix first.

    Every byte of the last record; of the two before it, every byte with
    ``--every-byte``, else the places where a cut means something different to
    the reader: a record's start (a clean end), inside its frame header (length,
    seq, crc torn), right after it (a payload of zero bytes), inside the payload.
    (Within one part of one record every cut is the same case to the daemon;
    tests/events cuts the log itself at every byte.)
    """
    created, started, running = template.frames[-3:]
    chosen = set(range(running[0], running[2] + 1))
    for start, _seq, end in (created, started):
        if every_byte:
            chosen.update(range(start, end))
        else:
            header = start + framing.FRAME_OVERHEAD
            chosen.update({start, start + 1, start + 4, start + 8, header - 1, header})
            chosen.update({header + 1, (header + end) // 2, end - 1})
    return sorted(chosen, reverse=True)


async def test_the_log_cut_at_every_byte_of_its_last_records(
    template: Template, state_dir: Path, caplog: pytest.LogCaptureFixture, every_byte: bool
) -> None:
    created, started, running = template.frames[-3:]
    assert created[1] + 2 == started[1] + 1 == running[1]
    config = config_of(state_dir)
    strays: list[subprocess.Popen[bytes]] = []
    outcomes: dict[str, int] = {}
    marked = set(sandbox_processes(state_dir))  # then as the last check found them
    try:
        # Longest prefix first: the original "late" process is adopted while the log
        # holds its record, ended once it does not (then a stray stands in for it).
        for cut in cuts(template, every_byte):
            restore(template, state_dir, cut=cut, snapshots=False)
            late_process(state_dir, marked, strays)
            caplog.clear()
            with caplog.at_level(logging.INFO):
                state, marked = await start_and_check(config)
            torn = cut not in (running[2], running[0], started[0], created[0])
            cut_logged = any("cut a torn tail" in r.getMessage() for r in caplog.records)
            assert cut_logged == torn, cut
            early = state.sandboxes["early"]
            assert early.status is Status.RUNNING and early.pid == template.early_pid, cut
            late = state.sandboxes.get("late")
            if cut >= running[0]:  # its process_started survived: adopted
                assert late is not None and late.status is Status.RUNNING, (cut, late)
                assert late.pid == template.late_pid, (cut, late)
                outcome = "adopted"
            elif cut >= started[0]:  # created survived: its start was cut short
                assert late is not None and late.status is Status.MISSING, (cut, late)
                assert late.error is not None and "before the sandbox's process" in late.error
                outcome = "missing"
            else:  # the log no longer knows it
                assert late is None, (cut, late)
                assert not (state_dir / "sandboxes" / "late").exists()
                assert not (state_dir / "output" / "late.log").exists()
                outcome = "unknown"
            if outcome != "adopted":
                assert "late" not in marked, cut
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        for stray in strays:
            stray.kill()
            stray.wait()
    assert set(outcomes) == {"adopted", "missing", "unknown"}, outcomes


@pytest.mark.parametrize("tail", [b"\0" * 4096, os.urandom(300), b"\xff" * 17])
async def test_garbage_or_zeroes_after_the_last_record_are_cut(
    template: Template, state_dir: Path, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    restore(template, state_dir, cut=None, snapshots=False)
    with (state_dir / template.segment).open("ab") as segment:
        segment.write(tail)
    with caplog.at_level(logging.INFO):
        state, _ = await start_and_check(config_of(state_dir))
    assert any("cut a torn tail" in r.getMessage() for r in caplog.records)
    assert {s: r.status for s, r in state.sandboxes.items()} == {
        "early": Status.RUNNING,
        "late": Status.RUNNING,
    }
    assert state.sandboxes["late"].pid == template.late_pid


async def test_a_corrupted_snapshot_is_set_aside(
    template: Template, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    restore(template, state_dir, cut=None, snapshots=True)
    (snapshot,) = (state_dir / "snapshots").glob("*.snap")
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x40
    snapshot.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO):
        state, _ = await start_and_check(config_of(state_dir))
    assert any("snapshot not used" in r.getMessage() for r in caplog.records)
    assert snapshot.with_name(snapshot.name + ".rejected").exists()
    assert state.sandboxes["late"].pid == template.late_pid
    assert state.sandboxes["early"].pid == template.early_pid


async def test_a_snapshot_newer_than_the_log_is_not_trusted(
    template: Template, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The log lost what it had not synced when the power went (the snapshot, synced
    # later, still describes it): here, every record of "late".
    created = template.frames[-3]
    restore(template, state_dir, cut=created[0], snapshots=True)
    assert "late" in sandbox_processes(state_dir)
    with caplog.at_level(logging.INFO):
        state, _ = await start_and_check(config_of(state_dir))
    assert any("past the log's end" in r.getMessage() for r in caplog.records)
    assert list(state.sandboxes) == ["early"]
    assert "late" not in sandbox_processes(state_dir)
    assert not (state_dir / "sandboxes" / "late").exists()
    assert not (state_dir / "output" / "late.log").exists()
