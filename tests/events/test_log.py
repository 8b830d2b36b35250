"""The log on real files: group commit, durability, rollover, reads, recovery."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.events import framing, segments
from sandboxd.events import types as ev
from sandboxd.events.codec import encode
from sandboxd.events.errors import CorruptLog, Gone, LogUnavailable
from sandboxd.events.log import EventFilter, EventLog, open_event_log
from tests.events.strategies import sample_pending

TS_PATTERN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"


async def _fill(log: EventLog, count: int, start: int = 0) -> list[ev.Event]:
    return await log.append_many([sample_pending(start + i) for i in range(count)])


async def test_append_returns_the_durable_event(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        assert log.head_seq == 0
        first = await log.append(sample_pending(0))
        second = await log.append(sample_pending(1))
        assert (first.seq, second.seq) == (1, 2)
        assert first.data == sample_pending(0).data
        assert re.match(TS_PATTERN, first.ts)
        assert log.head_seq == 2
        assert await log.read(0) == [first, second]


async def test_concurrent_appends_share_fsyncs_and_are_folded_before_answered(
    tmp_path: Path,
) -> None:
    durable: list[int] = []
    batches = 0

    def on_durable(events: list[ev.Event]) -> None:
        nonlocal batches
        batches += 1
        durable.extend(e.seq for e in events)

    answered: list[int] = []

    async def appender(i: int) -> None:
        event = await log.append(sample_pending(i))
        assert event.seq in durable  # on_durable saw it before its appender was answered
        answered.append(event.seq)

    async with (
        open_event_log(tmp_path, on_durable=on_durable) as log,
        trio.open_nursery() as nursery,
    ):
        for i in range(300):
            nursery.start_soon(appender, i)
    assert sorted(answered) == list(range(1, 301))
    assert durable == list(range(1, 301))  # in seq order
    assert batches < 300  # group commit: appenders shared batches


async def test_append_many_is_one_atomic_batch(tmp_path: Path) -> None:
    calls: list[list[int]] = []
    async with open_event_log(
        tmp_path, on_durable=lambda es: calls.append([e.seq for e in es])
    ) as log:
        events = await _fill(log, 50)
        assert [e.seq for e in events] == list(range(1, 51))
        assert calls == [list(range(1, 51))]
        assert await log.append_many([]) == []


async def test_an_event_the_codec_cannot_write_fails_alone(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        bad = ev.PendingEvent("a", None, ev.SandboxAdopted(2**70))  # beyond 64 bits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.append, sample_pending(0))
            with pytest.raises(TypeError):
                await log.append_many([sample_pending(1), bad])
        after = await log.append(sample_pending(2))
        assert after.seq == 2  # the failed append used no seq
        assert [e.seq for e in await log.read(0)] == [1, 2]


async def test_reopen_sees_every_acknowledged_event(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        written = await _fill(log, 20)
        written.append(await log.append(sample_pending(20)))
    async with open_event_log(tmp_path) as log:
        assert log.head_seq == 21
        assert await log.read(0, limit=100) == written
        assert (await log.append(sample_pending(21))).seq == 22


CHILD = """
import sys, trio
from pathlib import Path
sys.path.append(sys.argv[2])  # for tests.events; last, so the installed sandboxd wins
from sandboxd.events.log import open_event_log
from tests.events.strategies import sample_pending

async def main():
    async with open_event_log(Path(sys.argv[1])) as log:
        async def appender(k):
            i = k
            while True:
                event = await log.append(sample_pending(i))
                print(event.seq, flush=True)
                i += 8
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(appender, k)
trio.run(main)
"""


def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    # A real crash: the writer dies mid-stream; what an appender was told stays.
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "log"), str(Path(__file__).parents[2])],
        stdout=subprocess.PIPE,
        cwd=tmp_path,  # not the project root, whose daemon/ folder once shadowed the package
        text=True,
    )
    assert child.stdout is not None
    acknowledged = 0
    for line in child.stdout:
        acknowledged = max(acknowledged, int(line))
        if acknowledged >= 400:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert acknowledged >= 400

    async def check() -> None:
        async with open_event_log(tmp_path / "log") as log:
            assert log.head_seq >= acknowledged
            events = await log.read(0, limit=log.head_seq)
            assert [e.seq for e in events] == list(range(1, log.head_seq + 1))

    trio.run(check)


async def test_segments_roll_over_and_reads_find_any_seq(tmp_path: Path) -> None:
    async with open_event_log(tmp_path, segment_bytes=4096) as log:
        written: list[ev.Event] = []
        for start in range(0, 600, 30):
            written += await _fill(log, 30, start)
        assert len(segments.list_segments(tmp_path)) > 10
        # Beside the segments: the closed ones' index files (<first seq>.idx).
        names = sorted(p.name for p in await trio.Path(tmp_path).iterdir() if p.suffix == ".log")
        firsts = [int(n.removesuffix(".log")) for n in names]
        assert firsts[0] == 1 and firsts == sorted(firsts)
        for after in (0, 1, 29, 30, 31, 299, 517, 599, 600, 700):
            assert await log.read(after, limit=45) == written[after : after + 45]
    # Reopened: the closed segments are indexed on first read.
    async with open_event_log(tmp_path, segment_bytes=4096) as log:
        for after in (555, 3, 250):
            assert await log.read(after, limit=100) == written[after : after + 100]
        assert await log.event_at(333) == written[332]
        assert await log.event_at(601) is None


async def test_read_page_filters_and_says_where_it_stopped(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        written = await _fill(log, 200)
        paused = EventFilter(types=frozenset({"sandbox.paused"}))
        page = await log.read_page(0, limit=5, event_filter=paused)
        assert [r.event for r in page.records] == [
            e for e in written if e.type == "sandbox.paused"
        ][:5]
        assert page.next_after_seq == page.records[-1].event.seq
        page = await log.read_page(0, limit=1000, event_filter=paused, max_scan=50)
        assert page.next_after_seq == 50
        assert [r.event.seq for r in page.records] == [4, 12, 20, 28, 36, 44]
        one = EventFilter(sandbox_ids=frozenset({"sbx-000003"}))
        mine = await log.read(0, limit=1000, event_filter=one)
        assert mine == [e for e in written if e.sandbox_id == "sbx-000003"]
        # A plain predicate works as a filter too (the gateway's visibility check).
        odd = await log.read(0, limit=1000, event_filter=lambda e: e.seq % 2 == 1)
        assert [e.seq for e in odd] == list(range(1, 201, 2))
        record = (await log.read_records(9, limit=1))[0]
        assert record.event == written[9]
        assert b'"seq":10' in record.raw


async def test_retention_makes_old_seqs_gone(tmp_path: Path) -> None:
    async with open_event_log(tmp_path, segment_bytes=2048) as log:
        for start in range(0, 200, 20):
            await _fill(log, 20, start)
        removed = await log.remove_segments_through(100)
        assert removed > 0
        oldest = log.oldest_seq
        assert 1 < oldest <= 101
        with pytest.raises(Gone) as caught:
            await log.read(oldest - 2)
        assert caught.value.oldest_seq == oldest
        with pytest.raises(Gone):
            log.subscribe(0)
        assert [e.seq for e in await log.read(oldest - 1, limit=3)] == [
            oldest,
            oldest + 1,
            oldest + 2,
        ]
    async with open_event_log(tmp_path, segment_bytes=2048) as log:
        assert log.oldest_seq == oldest
        assert log.head_seq == 200


async def test_appends_after_close_are_refused(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        pass
    with pytest.raises(LogUnavailable):
        await log.append(sample_pending(0))


async def test_an_error_in_the_body_comes_out_unwrapped(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        async with open_event_log(tmp_path):
            raise KeyError("mine")


def _write_and_close(directory: Path, count: int) -> list[ev.Event]:
    async def write() -> list[ev.Event]:
        async with open_event_log(directory) as log:
            return await _fill(log, count)

    return trio.run(write)


def _reopen(directory: Path) -> tuple[int, int, list[ev.Event]]:
    async def reopen() -> tuple[int, int, list[ev.Event]]:
        async with open_event_log(directory) as log:
            head = log.head_seq
            dropped = log.recovery.dropped_bytes
            appended = await log.append(sample_pending(999))
            assert appended.seq == head + 1  # appending goes on right after the cut
            return head, dropped, await log.read(0, limit=1000)

    return trio.run(reopen)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_torn_tail_is_cut_to_the_last_whole_record(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    directory = tmp_path_factory.mktemp("log")
    written = _write_and_close(directory, 10)
    path = directory / segments.segment_name(1)
    content = path.read_bytes()
    ends = [len(content)]
    # Where the last three records end, and the one before them.
    for event in reversed(written[-3:]):
        ends.insert(0, ends[0] - framing.FRAME_OVERHEAD - len(encode(event)))
    cut = data.draw(st.integers(min_value=ends[0], max_value=len(content)), label="cut")
    tail = data.draw(st.sampled_from(["none", "zeroes", "random"]), label="tail")
    extra = b""
    if tail == "zeroes":
        extra = bytes(data.draw(st.integers(1, 9000)))
    elif tail == "random":
        extra = data.draw(st.binary(min_size=1, max_size=2000))
    path.write_bytes(content[:cut] + extra)
    whole = 7 + sum(1 for end in ends[1:] if end <= cut)
    head, dropped, events = _reopen(directory)
    assert head == whole
    cut_at = ends[whole - 7]
    assert dropped == cut - cut_at + len(extra)
    assert events[:whole] == written[:whole]


def test_the_warning_says_how_many_bytes_were_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_and_close(tmp_path, 5)
    path = tmp_path / segments.segment_name(1)
    with path.open("ab") as file:
        file.write(b"\x01garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="sandboxd.events"):
        head, dropped, _ = _reopen(tmp_path)
    assert (head, dropped) == (5, 80)
    assert "torn tail of 80 bytes" in caplog.text


async def test_a_bad_record_in_the_middle_stops_the_open(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        await _fill(log, 10)
        middle = (await log.read_records(4, limit=1))[0]
    path = tmp_path / segments.segment_name(1)
    content = bytearray(path.read_bytes())
    offset = content.index(middle.raw) - 16
    content[offset + 20] ^= 0x20
    path.write_bytes(bytes(content))
    with pytest.raises(CorruptLog) as caught:
        async with open_event_log(tmp_path):
            pass
    assert (caught.value.path, caught.value.offset, caught.value.seq) == (path, offset, 5)
    assert path.read_bytes() == bytes(content)  # nothing was cut


async def test_a_read_that_reaches_a_damaged_record_gets_what_precedes_it_then_the_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A closed segment is not checked at open (a snapshot may cover it): readers find it.
    async with open_event_log(tmp_path, segment_bytes=4096) as log:
        for start in range(0, 60, 5):
            await _fill(log, 5, start)
        assert len(segments.list_segments(tmp_path)) > 1
        fifth = (await log.read_records(4, limit=1))[0]
        path = tmp_path / segments.segment_name(1)
        content = bytearray(path.read_bytes())
        offset = content.index(fifth.raw) - framing.FRAME_OVERHEAD
        content[offset + framing.FRAME_OVERHEAD + 2] ^= 0x01
        path.write_bytes(bytes(content))

        with caplog.at_level(logging.ERROR, logger="sandboxd.events"):
            page = await log.read_page(0)
            assert [r.event.seq for r in page.records] == [1, 2, 3, 4]
            assert page.next_after_seq == 4
            for _ in range(3):
                with pytest.raises(CorruptLog) as caught:
                    await log.read_page(page.next_after_seq)
                assert (caught.value.path, caught.value.offset, caught.value.seq) == (
                    path,
                    offset,
                    5,
                )
            subscription = log.subscribe(0)
            with pytest.raises(CorruptLog):
                async for _record in subscription:
                    pass
        assert caught.value.where == f"seq 5, offset {offset} of segment {path.name}"
        assert caplog.text.count(f"{path}: bad record at offset {offset} (seq 5)") == 1
        # The next segments read as ever.
        later = segments.list_segments(tmp_path)[1][0]
        assert [r.event.seq for r in (await log.read_page(later - 1, limit=2)).records] == [
            later,
            later + 1,
        ]


def test_a_segment_left_half_created_is_removed(tmp_path: Path) -> None:
    _write_and_close(tmp_path, 3)
    (tmp_path / segments.segment_name(4)).write_bytes(b"SBX")  # crash while creating it
    head, dropped, events = _reopen(tmp_path)
    assert (head, dropped, len(events)) == (3, 0, 4)


def test_a_crash_between_rollover_and_first_write(tmp_path: Path) -> None:
    _write_and_close(tmp_path, 3)
    (tmp_path / segments.segment_name(4)).write_bytes(framing.segment_header(4))
    head, _, events = _reopen(tmp_path)
    assert head == 3 and [e.seq for e in events] == [1, 2, 3, 4]
    assert os.path.getsize(tmp_path / segments.segment_name(4)) > 16
