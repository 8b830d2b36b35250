"""Offline audit of a state dir: ``sandboxd log dump`` and ``sandboxd log verify``.

Both read the files of a state dir with no daemon running, and change
nothing: a torn tail that the daemon would cut on its next start is reported,
not cut. Plain blocking code: no trio.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from sandboxd.events import framing, segments, snapshots
from sandboxd.events.errors import CorruptLog
from sandboxd.events.index import IndexFileError, Postings, Selection
from sandboxd.events.projection import ProjectionError, State, apply, state_to_dict
from sandboxd.events.segments import Record, Segment


class _NoLog(Exception):
    pass


def _checked_segments(
    state_dir: Path, *, inspect_all: bool
) -> Iterator[tuple[Segment, Segment | None, str | None]]:
    """Each segment, with the next one (for the seq hand-over) and a note on a torn tail.

    The last segment is always checked frame by frame first, to tell a torn
    tail from damage; the others too with ``inspect_all`` (else reading them
    checks them as it goes, which lets dump print everything before a bad
    record). Read-only.
    """
    directory = state_dir / "events"
    found = segments.list_segments(directory) if directory.is_dir() else []
    if not found:
        raise _NoLog(f"no event log in {directory}")
    if segments.is_torn_creation(found[-1][1]):
        path = found.pop()[1]
        note = f"{path}: a segment whose creation was cut short (the daemon removes it)"
        if not found:
            raise _NoLog(note)
    else:
        note = None
    previous: Segment | None = None
    for i, (first_seq, path) in enumerate(found):
        is_last = i == len(found) - 1
        if previous is not None and previous.next_seq != first_seq:
            raise CorruptLog(
                path,
                0,
                first_seq,
                f"the segment starts at seq {first_seq} but {previous.path.name} "
                f"ends before seq {previous.next_seq}",
            )
        if not (inspect_all or is_last):
            segment = Segment(first_seq, path, path.stat().st_size, None)
            following = Segment(found[i + 1][0], found[i + 1][1], 0, None)
            yield segment, following, None
            previous = Segment(first_seq, path, 0, following.first_seq)
            continue
        inspected = segments.inspect_segment(path, first_seq, is_last)
        if inspected.dropped:
            note = (
                f"{path}: {inspected.dropped} bytes of a torn write after offset "
                f"{inspected.segment.end} ({inspected.reason}); the daemon cuts them on start"
            )
        after = None
        if not is_last:
            after = Segment(found[i + 1][0], found[i + 1][1], 0, None)
        yield inspected.segment, after, note if is_last else None
        previous = inspected.segment


def dump(
    state_dir: Path,
    out: TextIO,
    *,
    after_seq: int = 0,
    sandbox_id: str | None = None,
    types: set[str] | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the events after ``after_seq`` matching the filters, one JSON object a line.

    Each line is the record exactly as stored (protocol.md's event plus ``v``,
    its schema version). Returns the exit code: 1 if the log cannot be read
    to its end, after printing what came before the bad record.
    """
    err = err or sys.stderr
    note = None
    selection = None
    if sandbox_id is not None or types is not None:
        selection = Selection(
            None if sandbox_id is None else frozenset({sandbox_id}),
            None if types is None else frozenset(types),
        )
    try:
        for segment, following, segment_note in _checked_segments(state_dir, inspect_all=False):
            note = segment_note or note
            if following is not None and following.first_seq <= after_seq + 1:
                continue
            for event, raw in _records(segment, following, after_seq, selection):
                if sandbox_id is not None and event.sandbox_id != sandbox_id:
                    continue
                if types is not None and event.type not in types:
                    continue
                out.write(raw.decode())
                out.write("\n")
    except _NoLog as exc:
        print(f"sandboxd log dump: {exc}", file=err)
        return 1
    except CorruptLog as exc:
        print(f"sandboxd log dump: bad record: {exc}", file=err)
        return 1
    if note:
        print(f"note: {note}", file=err)
    return 0


def _records(
    segment: Segment, following: Segment | None, after_seq: int, selection: Selection | None
) -> Iterator[Record]:
    """The segment's records after ``after_seq``; with a selection, through the segment's
    index file where it has a good one: only the records that can match are read."""
    found = None
    if selection is not None:
        found = segments.load_index(segment.path, segment.first_seq, segment.end)
    if found is None or selection is None:
        for _offset, record in segments.iter_segment(segment, after_seq, following):
            yield record
        return
    postings = found.postings
    if (
        postings.end == segment.end
        and following is not None
        and postings.next_seq != following.first_seq
    ):
        raise CorruptLog(
            segment.path,
            postings.end,
            postings.next_seq,
            f"the segment ends before seq {postings.next_seq}, "
            f"the next one starts at {following.first_seq}",
        )
    offsets = postings.select(selection.sandbox_ids, selection.types, 0, postings.end)
    yield from segments.iter_selected(segment.path, offsets, postings.end, after_seq)
    if postings.end < segment.end:  # the index covers the segment's first frames only
        rest = Segment(segment.first_seq, segment.path, segment.end, None)
        rest.add_known(postings.next_seq, postings.end)
        start = max(after_seq, postings.next_seq - 1)
        for _offset, record in segments.iter_segment(rest, start, following):
            yield record


def verify(state_dir: Path, out: TextIO) -> int:
    """Check every record and snapshot; return 0 if all is well, 1 naming the first bad record.

    Checked: each segment's header, every frame's checksum, seq contiguity
    within and across segments, that every record decodes (with the seq its
    frame says), that the projection folds every event, that every snapshot
    decodes, checks out and equals the fold of the log at its seq, and that
    every index file the daemon would use says what the segment holds.
    """
    saved = {seq: path for seq, path in snapshots.list_snapshots(state_dir / "snapshots")}
    state = State()
    count = segment_count = 0
    first = last = None
    bad_snapshots: list[str] = []  # ones the daemon would trust: verify fails
    bad_indexes: list[str] = []  # the same for index files
    notes: list[str] = []  # ones it would set aside: worth knowing, not a failure
    try:
        if 0 in saved:
            compare_snapshot(saved.pop(0), state, None, bad_snapshots, notes)
        for segment, following, note in _checked_segments(state_dir, inspect_all=True):
            segment_count += 1
            if note:
                notes.append(note)
            held = _index_held(segment, notes)
            found = Postings(segment.first_seq)
            for offset, (event, raw) in segments.iter_segment(segment, 0, following):
                try:
                    apply(state, event)
                except ProjectionError as exc:
                    raise CorruptLog(segment.path, offset, event.seq, str(exc)) from None
                if held is not None and offset < held.end:
                    found.add(offset, event.sandbox_id, event.type)
                    end = offset + framing.FRAME_OVERHEAD + len(raw)
                    found.advance(end, event.seq + 1, (offset, framing.frame_crc(event.seq, raw)))
                count += 1
                first = event.seq if first is None else first
                last = event.seq
                if event.seq in saved:
                    compare_snapshot(saved.pop(event.seq), state, event.ts, bad_snapshots, notes)
            if held is not None and found != held:
                bad_indexes.append(
                    f"{segments.index_path(segment.path)}: it differs from its segment"
                    " (filtered reads would miss records); remove it, and the daemon"
                    " rebuilds it"
                )
    except _NoLog as exc:
        print(f"sandboxd log verify: {exc}", file=out)
        return 1
    except CorruptLog as exc:
        print(
            f"bad record: {exc.path} offset {exc.offset} seq {exc.seq}: {exc.reason}",
            file=out,
        )
        return 1
    for seq, path in saved.items():
        if last is None or seq > last:
            # Snapshots only ever cover durable events: the log lost some it had.
            bad_snapshots.append(
                f"{path}: covers seq {seq}, but the log ends at seq {last or 0}:"
                " events the log had acknowledged are missing"
            )
        else:
            notes.append(f"{path}: covers seq {seq}, before the log's start (not used)")
    for note in notes:
        print(f"note: {note}", file=out)
    if bad_snapshots or bad_indexes:
        for problem in bad_snapshots:
            print(f"bad snapshot: {problem}", file=out)
        for problem in bad_indexes:
            print(f"bad index: {problem}", file=out)
        return 1
    span = f"seqs {first}..{last}" if count else "no records"
    print(
        f"ok: {count} records ({span}) in {segment_count} segments; "
        f"{len(state.sandboxes)} sandboxes live at the end",
        file=out,
    )
    return 0


def _index_held(segment: Segment, notes: list[str]) -> Postings | None:
    """The postings of the segment's index file if the daemon would use them."""
    try:
        return segments.check_index(segment.path, segment.first_seq, segment.end).postings
    except FileNotFoundError:
        return None
    except IndexFileError as exc:
        notes.append(
            f"{segments.index_path(segment.path)}: not used ({exc}); the daemon rebuilds it"
        )
        return None


def compare_snapshot(
    path: Path, state: State, ts: str | None, bad: list[str], notes: list[str]
) -> None:
    """Check a snapshot against the fold at its seq (``state``, the event there at ``ts``):
    a difference goes to ``bad``, one the daemon would not use anyway to ``notes``."""
    try:
        snapshot = snapshots.decode_snapshot(path.read_bytes(), path)
    except (snapshots.SnapshotError, OSError) as exc:
        notes.append(f"{path}: {exc} (the daemon does not use it)")
        return
    if snapshot.anchor_ts != ts:
        notes.append(f"{path}: taken after another event at seq {snapshot.seq} (not used)")
        return
    held, folded = state_to_dict(snapshot.state), state_to_dict(state)
    if snapshot.format < snapshots.FORMAT_VERSION:
        # Its owners were upcast to the safe side: they differ from the fold by design.
        notes.append(
            f"{path}: in snapshot format {snapshot.format}, which knows each sandbox's last"
            " owner only (the daemon replays the log instead while the log reaches seq 1)"
        )
        del held["owners"], folded["owners"]
    if held != folded:
        bad.append(f"{path}: its state differs from the fold of the log up to seq {snapshot.seq}")
