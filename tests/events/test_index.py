"""The segment index: postings against a full scan, index files, and the reads that use them
(a filtered read, subscription and dump read only the records that can match)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given, settings

from sandboxd.events import audit, framing, index, segments
from sandboxd.events import types as ev
from sandboxd.events.errors import CorruptLog
from sandboxd.events.index import Postings
from sandboxd.events.log import CaughtUp, EventFilter, EventLog, open_event_log
from sandboxd.events.segments import Record
from tests.events.strategies import sample_pending

SANDBOXES = ["a", "b", "c", "d", None]
TYPES = sorted(ev.EVENT_TYPES)

# -- postings, pure ------------------------------------------------------------------------

frames = st.lists(st.tuples(st.sampled_from(SANDBOXES), st.sampled_from(TYPES)), max_size=80)


def _postings(keys: list[tuple[str | None, str]]) -> tuple[Postings, list[int]]:
    postings = Postings(7)
    offsets = []
    offset = framing.HEADER_SIZE
    for sandbox_id, event_type in keys:
        postings.add(offset, sandbox_id, event_type)
        offsets.append(offset)
        offset += 100 + len(offsets) % 7
    if offsets:
        postings.advance(offset, 7 + len(offsets), (offsets[-1], 1234))
    return postings, offsets


@given(
    keys=frames,
    sandbox_ids=st.none() | st.frozensets(st.sampled_from(SANDBOXES)),
    types=st.none() | st.frozensets(st.sampled_from(TYPES)),
    bounds=st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)),
)
def test_select_is_what_a_full_scan_finds(
    keys: list[tuple[str | None, str]],
    sandbox_ids: frozenset[str | None] | None,
    types: frozenset[str] | None,
    bounds: tuple[int, int],
) -> None:
    postings, offsets = _postings(keys)
    low, high = sorted(bounds)
    scan = [
        offset
        for offset, (sandbox_id, event_type) in zip(offsets, keys, strict=True)
        if low <= offset < high
        and (sandbox_ids is None or sandbox_id in sandbox_ids)
        and (types is None or event_type in types)
    ]
    if sandbox_ids is None and types is None:
        with pytest.raises(ValueError, match="select needs"):
            postings.select(sandbox_ids, types, low, high)
    else:
        assert postings.select(sandbox_ids, types, low, high) == scan


@given(keys=frames, split=st.integers(0, 80))
def test_postings_extended_by_a_piece_equal_them_built_at_once(
    keys: list[tuple[str | None, str]], split: int
) -> None:
    whole, offsets = _postings(keys)
    split = min(split, len(keys))
    head = Postings(7)
    for offset, (sandbox_id, event_type) in zip(offsets[:split], keys[:split], strict=True):
        head.add(offset, sandbox_id, event_type)
    if split:
        head.advance(offsets[split] if split < len(keys) else whole.end, 7 + split, (0, 0))
    piece = Postings(7 + split, head.end)
    for offset, (sandbox_id, event_type) in zip(offsets[split:], keys[split:], strict=True):
        piece.add(offset, sandbox_id, event_type)
    if split < len(keys):
        piece.advance(whole.end, whole.next_seq, (offsets[-1], 1234))
    head.extend(piece)
    if keys and split < len(keys):
        assert head == whole
    with pytest.raises(ValueError, match="cannot follow"):
        head.extend(Postings(head.next_seq + 1))


@given(keys=frames, seq_index=st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40))))
def test_an_index_file_holds_what_was_written(
    keys: list[tuple[str | None, str]], seq_index: list[tuple[int, int]]
) -> None:
    postings, _ = _postings(keys)
    found = index.decode_index(index.encode_index(postings, seq_index))
    assert found.postings == postings
    assert found.seq_index == seq_index


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:10], "shorter than an index header"),
        (lambda b: b"SBXLOG" + b[6:], "not a sandboxd segment index"),
        (lambda b: b[:6] + b"\x09\x00" + b[8:], "format version 9"),
        (lambda b: b[:-1], "the header says"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),
    ],
)
def test_a_damaged_index_file_is_refused(damage: object, message: str) -> None:
    postings, _ = _postings([("a", "sandbox.paused"), (None, "daemon.started")])
    blob = index.encode_index(postings, [(64, 16)])
    with pytest.raises(index.IndexFileError, match=message):
        index.decode_index(damage(blob))  # type: ignore[operator]


# -- the log's filtered reads, against a full scan --------------------------------------------

SEGMENT_BYTES = 3000


def _pending(i: int, sandbox: str) -> ev.PendingEvent:
    pending = sample_pending(i)
    if i % 11 == 10:
        return ev.PendingEvent(None, None, ev.DaemonStarted("1", 1, 0))
    return ev.PendingEvent(sandbox, pending.by, pending.data)


histories = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=120)
selections = st.tuples(
    st.none() | st.frozensets(st.sampled_from(["a", "b", "c", "x"]), min_size=1),
    st.none() | st.frozensets(st.sampled_from(TYPES), min_size=1),
).filter(lambda s: s != (None, None))


async def _append(log: EventLog, sandboxes: list[str], start: int) -> None:
    for i in range(0, len(sandboxes), 7):
        chunk = sandboxes[i : i + 7]
        await log.append_many([_pending(start + i + k, s) for k, s in enumerate(chunk)])


def _expected(events: list[ev.Event], after: int, wanted: EventFilter) -> list[ev.Event]:
    return [e for e in events if e.seq > after and wanted.matches(e)]


async def _check(log: EventLog, wanted: EventFilter, after: int) -> None:
    everything = await log.read(0, limit=100_000)
    # The index answers the EventFilter; the same test as a plain predicate scans all.
    through_index = await log.read(after, limit=100_000, event_filter=wanted)
    assert through_index == _expected(everything, after, wanted)
    async with log.subscribe(after, wanted) as subscription:
        seen = []
        async for item in subscription.items():
            if isinstance(item, CaughtUp):
                break
            seen.append(item.event)
    assert seen == through_index


@settings(max_examples=30, deadline=None)
@given(
    first=histories,
    second=histories,
    selection=selections,
    after=st.integers(0, 130),
    forget=st.sampled_from(["nothing", "index files", "damage them", "older ones"]),
)
def test_filtered_reads_find_what_a_full_scan_finds(
    tmp_path_factory: pytest.TempPathFactory,
    first: list[str],
    second: list[str],
    selection: tuple[frozenset[str] | None, frozenset[str] | None],
    after: int,
    forget: str,
) -> None:
    """Through the writer's postings, index files written at a roll and at close, index
    files missing or damaged (rebuilt from the segments), and index files from an earlier
    close (as a crash leaves them: the active segment's covers only its first records)."""
    directory = tmp_path_factory.mktemp("log")
    wanted = EventFilter(sandbox_ids=selection[0], types=selection[1])

    async def run() -> None:
        async with open_event_log(directory, segment_bytes=SEGMENT_BYTES) as log:
            await _append(log, first, 0)
            await _check(log, wanted, after)
        earlier = {path: path.read_bytes() for path in directory.glob("*.idx")}
        for path in earlier:
            if forget == "index files":
                path.unlink()
            elif forget == "damage them":
                path.write_bytes(earlier[path][:-1] + bytes([earlier[path][-1] ^ 0xFF]))
        async with open_event_log(directory, segment_bytes=SEGMENT_BYTES) as log:
            await _check(log, wanted, after)
            await _append(log, second, len(first))
            await _check(log, wanted, after)
        if forget == "older ones":
            for path, blob in earlier.items():
                path.write_bytes(blob)
        async with open_event_log(directory, segment_bytes=SEGMENT_BYTES) as log:
            await _check(log, wanted, after)
            await _append(log, first, len(first) + len(second))
            await _check(log, wanted, after)

    trio.run(run)


async def test_a_filtered_read_reads_no_record_of_other_sandboxes(tmp_path: Path) -> None:
    """A damaged record of sandbox b stops a read that reaches it, and no read of sandbox a:
    the index sends a's readers past b's records without reading them."""
    async with open_event_log(tmp_path, segment_bytes=SEGMENT_BYTES) as log:
        await _append(log, ["a", "b"] * 60, 0)
        victim = next(r for r in await log.read_records(0, limit=200) if r.event.sandbox_id == "b")
    path = tmp_path / segments.segment_name(1)
    content = bytearray(path.read_bytes())
    at = content.index(victim.raw)
    content[at + 5] ^= 0xFF  # inside its payload: its crc no longer matches
    path.write_bytes(bytes(content))
    only_a = EventFilter(sandbox_ids=frozenset({"a"}))
    async with open_event_log(tmp_path, segment_bytes=SEGMENT_BYTES) as log:
        with pytest.raises(CorruptLog):
            await log.read(0, limit=1000)
        mine = await log.read(0, limit=1000, event_filter=only_a)
        assert [e.seq - 1 for e in mine] == [i for i in range(0, 120, 2) if i % 11 != 10]
        assert {e.sandbox_id for e in mine} == {"a"}
        async with log.subscribe(0, only_a) as subscription:
            batch = await subscription.next_batch(1000)
            assert isinstance(batch, list) and len(batch) > 1
            assert all(r.event.sandbox_id == "a" for r in batch)


async def test_a_closed_segment_without_an_index_gets_one_on_the_first_filtered_read(
    tmp_path: Path,
) -> None:
    async with open_event_log(tmp_path, segment_bytes=SEGMENT_BYTES) as log:
        await _append(log, ["a", "b", "c"] * 40, 0)
    closed = [path for _, path in segments.list_segments(tmp_path)][:-1]
    indexes = {path: segments.index_path(path).read_bytes() for path in closed}
    for path in closed:
        segments.index_path(path).unlink()
    async with open_event_log(tmp_path, segment_bytes=SEGMENT_BYTES) as log:
        await log.read(0, limit=1000, event_filter=EventFilter(sandbox_ids=frozenset({"c"})))
    for path in closed:
        assert segments.index_path(path).read_bytes() == indexes[path]


async def test_an_index_of_another_history_is_not_used(tmp_path: Path) -> None:
    """A segment restored from elsewhere beside a newer index: the index's last record is
    not the segment's, so it is rebuilt, and the reads stay right."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    async with open_event_log(ours) as log:
        await _append(log, ["a", "b"] * 20, 0)
    async with open_event_log(theirs) as log:
        await _append(log, ["b", "a"] * 20, 0)
    name = segments.index_path(Path(segments.segment_name(1))).name
    shutil.copy(theirs / name, ours / name)
    async with open_event_log(ours) as log:
        everything = await log.read(0, limit=1000)
        only_a = await log.read(0, limit=1000, event_filter=EventFilter(frozenset({"a"})))
        assert only_a == [e for e in everything if e.sandbox_id == "a"]


async def test_next_batch_hands_out_what_items_would(tmp_path: Path) -> None:
    async with open_event_log(tmp_path, subscriber_buffer=64) as log:
        await _append(log, ["a", "b", "c"] * 100, 0)
        subscription = log.subscribe(0)
        got: list[Record] = []
        caught_up = []

        async def follow() -> None:
            async for batch in subscription.batches(50):
                if isinstance(batch, CaughtUp):
                    caught_up.append(batch.seq)
                    continue
                assert 1 <= len(batch) <= 50
                got.extend(batch)
                if got[-1].event.seq == 600:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await _append(log, ["d"] * 300, 300)  # live, and more than the buffer holds
        assert [r.event.seq for r in got] == list(range(1, 601))
        assert len(caught_up) == 1
        assert subscription.position == 600


# -- the offline dump --------------------------------------------------------------------------


def _dump(state_dir: Path, **filters: object) -> list[dict[str, object]]:
    out, err = io.StringIO(), io.StringIO()
    assert audit.dump(state_dir, out, err=err, **filters) == 0, err.getvalue()  # type: ignore[arg-type]
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.parametrize("index_files", ["kept", "removed"])
async def test_dump_of_one_sandbox_is_the_filtered_full_dump(
    tmp_path: Path, index_files: str
) -> None:
    events_dir = tmp_path / "events"
    async with open_event_log(events_dir, segment_bytes=SEGMENT_BYTES) as log:
        await _append(log, ["a", "b", "c"] * 50, 0)
    earlier = {path: path.read_bytes() for path in events_dir.glob("*.idx")}
    async with open_event_log(events_dir, segment_bytes=SEGMENT_BYTES) as log:
        await _append(log, ["a", "b"] * 10, 150)
    for path, blob in earlier.items():
        if index_files == "removed":
            path.unlink()
        else:  # as a crash leaves them: the active segment's covers only its first records
            path.write_bytes(blob)
    everything = await trio.to_thread.run_sync(_dump, tmp_path)
    for after, sandbox_id, types in [
        (0, "a", None),
        (40, "b", None),
        (0, None, {"sandbox.paused"}),
        (17, "c", {"sandbox.running", "sandbox.deleted"}),
    ]:
        dumped = await trio.to_thread.run_sync(
            lambda: _dump(tmp_path, after_seq=after, sandbox_id=sandbox_id, types=types)  # noqa: B023
        )
        assert dumped == [
            e
            for e in everything
            if e["seq"] > after  # type: ignore[operator]
            and (sandbox_id is None or e["sandbox_id"] == sandbox_id)
            and (types is None or e["type"] in types)
        ]


async def test_verify_checks_the_index_files(tmp_path: Path) -> None:
    events_dir = tmp_path / "events"
    async with open_event_log(events_dir, segment_bytes=SEGMENT_BYTES) as log:
        for start in range(0, 96, 8):  # a history the projection folds: verify folds it
            await log.append_many([sample_pending(i) for i in range(start, start + 8)])
    out = io.StringIO()
    assert await trio.to_thread.run_sync(audit.verify, tmp_path, out) == 0, out.getvalue()
    # An index that matches its segment's last record but not its content: what a bug
    # in the writer would leave. verify fails on it, naming it; the daemon would use it.
    path = segments.index_path(events_dir / segments.segment_name(1))
    found = index.decode_index(path.read_bytes())
    postings = found.postings
    one, other = sorted(key for key in postings.by_sandbox if key)[:2]
    postings.by_sandbox[one], postings.by_sandbox[other] = (
        postings.by_sandbox[other],
        postings.by_sandbox[one],
    )
    path.write_bytes(index.encode_index(postings, found.seq_index))
    out = io.StringIO()
    assert await trio.to_thread.run_sync(audit.verify, tmp_path, out) == 1
    assert f"bad index: {path}: it differs from its segment" in out.getvalue()
    # One of another segment is only a note: the daemon would not use it.
    shutil.copy(segments.index_path(events_dir / segments.segment_name(postings.next_seq)), path)
    out = io.StringIO()
    assert await trio.to_thread.run_sync(audit.verify, tmp_path, out) == 0, out.getvalue()
    assert f"note: {path}: not used (it is of a segment starting at seq" in out.getvalue()


# -- live batches routed by sandbox ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.lists(st.sampled_from("abcd"), min_size=1, max_size=9)),
            st.tuples(st.just("take"), st.integers(0, 3)),
        ),
        max_size=40,
    ),
    buffer=st.integers(1, 12),
    history=st.lists(st.sampled_from("abcd"), max_size=30),
)
def test_a_subscription_by_sandbox_gets_its_events_once_in_order(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, object]],
    buffer: int,
    history: list[str],
) -> None:
    """Subscriptions filtered by sandbox get only their sandboxes' records from the writer,
    and a batch of others' records does not reach them at all; whatever the timing, the
    size of their buffer and the history before them, each gets exactly a full scan's."""
    directory = tmp_path_factory.mktemp("log")
    filters = [frozenset("a"), frozenset("ab"), frozenset("d"), None]

    async def run() -> None:
        async with open_event_log(directory, subscriber_buffer=buffer) as log:
            await _append(log, history, 0)
            subs = [
                log.subscribe(0 if i % 2 else None, EventFilter(sandbox_ids=f))
                for i, f in enumerate(filters)
            ]
            starts = [0 if i % 2 else len(history) for i in range(len(filters))]
            got: list[list[int]] = [[] for _ in subs]
            appended = len(history)
            for kind, arg in steps:
                if kind == "append":
                    sandboxes = arg
                    assert isinstance(sandboxes, list)
                    await _append(log, sandboxes, appended)
                    appended += len(sandboxes)
                else:
                    assert isinstance(arg, int)
                    # Take what is there; if nothing is, this cancels the wait (a
                    # cancelled take must lose and repeat nothing either).
                    with trio.move_on_after(0.01):
                        batch = await subs[arg].next_batch(5)
                        if isinstance(batch, list):
                            got[arg] += [r.event.seq for r in batch]
            # A last event of every sandbox: each subscription has all once it has it.
            last = [ev.PendingEvent(x, None, ev.SandboxPaused()) for x in "abcd"]
            await log.append_many(last)
            everything = await log.read(0, limit=100_000)
            for i, sub in enumerate(subs):
                wanted = EventFilter(sandbox_ids=filters[i])
                expected = [e.seq for e in _expected(everything, starts[i], wanted)]
                while not got[i] or got[i][-1] < expected[-1]:
                    batch = await sub.next_batch(1000)
                    if isinstance(batch, list):
                        got[i] += [r.event.seq for r in batch]
                assert got[i] == expected
                await sub.aclose()

    trio.run(run)


async def test_a_batch_of_other_sandboxes_costs_a_subscription_nothing(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        mine = log.subscribe(None, EventFilter(sandbox_ids=frozenset({"a"})))
        assert await mine.next_batch() == CaughtUp(0)
        await _append(log, ["b", "c"] * 50, 0)
        assert mine.buffered == 0  # the writer gave it nothing
        await _append(log, ["a"], 100)
        batch = await mine.next_batch()
        assert isinstance(batch, list) and [r.event.seq for r in batch] == [101]
        assert mine.disk_reads == 0  # the others' 100 records in between: no read needed
        assert log.subscriber_count == 1
        await mine.aclose()
        assert log.subscriber_count == 0
