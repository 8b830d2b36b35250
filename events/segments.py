"""Segment files on disk: naming, creating, recovering and reading them.

Everything here is blocking file I/O: the log runs it in worker threads, the
offline audit calls it directly. It knows frames (``framing``) and events
(``codec``), nothing of trio.

A segment is named for the seq of its first record, zero-padded so that names
sort like seqs (``00000000000000000001.log``): finding the segment of a seq is
a bisect over the names, and within a segment a sparse index (the offset of
every ``INDEX_EVERY``-th seq) bounds how much is read to reach it.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import attrs

from sandboxd.events import framing, index
from sandboxd.events.codec import DecodeError, decode
from sandboxd.events.errors import CorruptLog
from sandboxd.events.index import IndexFile, IndexFileError, Postings
from sandboxd.events.types import Event

logger = logging.getLogger(__name__)

SUFFIX = ".log"
#: One index entry per this many seqs: reading from a seq walks at most this many frames.
INDEX_EVERY = 64


class Record(NamedTuple):
    """An event as the log holds it: decoded, and the exact bytes it is stored as."""

    event: Event
    raw: bytes


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def index_path(segment_path: Path) -> Path:
    """Where a segment's index file is: beside it, ``<first seq>.idx``."""
    return segment_path.with_suffix(index.SUFFIX)


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """The segment files of ``directory`` as (first seq, path), in seq order."""
    found = []
    for path in directory.iterdir():
        stem = path.name.removesuffix(SUFFIX)
        if path.name.endswith(SUFFIX) and len(stem) == 20 and stem.isdigit():
            found.append((int(stem), path))
    found.sort()
    return found


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define
class Segment:
    """What the log knows of one segment file."""

    first_seq: int
    path: Path
    #: Bytes up to here are whole, valid frames, durable on disk. Readers never
    #: look past it, so they never see a batch that is still being synced.
    end: int
    #: The seq after the last record, once known (always, for the active segment).
    next_seq: int | None
    index_seqs: list[int] = attrs.Factory(list)
    index_offsets: list[int] = attrs.Factory(list)
    #: Where its records are by sandbox and type (``index.py``), from the header on;
    #: None until a filtered read first needs them. Complete once ``postings.end == end``.
    postings: Postings | None = None

    @property
    def indexed(self) -> bool:
        return self.next_seq is not None

    @property
    def index_path(self) -> Path:
        return index_path(self.path)

    def seq_index(self) -> list[tuple[int, int]]:
        return list(zip(self.index_seqs, self.index_offsets, strict=True))

    def merge_index(self, entries: list[tuple[int, int]]) -> None:
        """Take (seq, offset) entries of the sparse seq index learnt from elsewhere."""
        if not self.index_seqs:
            self.index_seqs = [seq for seq, _ in entries]
            self.index_offsets = [offset for _, offset in entries]
            return
        for seq, offset in entries:
            self.add_known(seq, offset)

    def add_index(self, entries: list[tuple[int, int]]) -> None:
        """Add (seq, offset) entries past the last one (as the writer appends)."""
        for seq, offset in entries:
            self.index_seqs.append(seq)
            self.index_offsets.append(offset)

    def add_known(self, seq: int, offset: int) -> None:
        """Add one entry anywhere, from a position learned elsewhere (a snapshot's)."""
        i = bisect.bisect_left(self.index_seqs, seq)
        if i == len(self.index_seqs) or self.index_seqs[i] != seq:
            self.index_seqs.insert(i, seq)
            self.index_offsets.insert(i, offset)

    def locate(self, seq: int) -> tuple[int, int]:
        """(offset, seq there) of a frame at or before ``seq``, to read forward from."""
        i = bisect.bisect_right(self.index_seqs, seq) - 1
        if i < 0:
            return framing.HEADER_SIZE, self.first_seq
        return self.index_offsets[i], self.index_seqs[i]

    def bound(self, seq: int) -> int:
        """An offset past every frame up to ``seq``: the next indexed frame's, or the end."""
        i = bisect.bisect_right(self.index_seqs, seq)
        return self.index_offsets[i] if i < len(self.index_seqs) else self.end


def create_segment(directory: Path, first_seq: int) -> int:
    """Create a segment file, durable with its directory entry; return a write fd."""
    path = directory / segment_name(first_seq)
    # Private, like every file of the state dir: sandboxes' output is quoted in events.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, 0, framing.segment_header(first_seq))
        os.fsync(fd)
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    return fd


def open_for_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CLOEXEC)


def write_all(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        written = os.pwrite(fd, view[done:], offset + done)
        if written == 0:
            raise OSError(f"no progress writing at offset {offset + done}")
        done += written


def append_durably(fd: int, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` and fdatasync: one group commit."""
    write_all(fd, offset, data)
    os.fdatasync(fd)


def cut_back(fd: int, size: int) -> None:
    """Make the file exactly ``size`` bytes again, durably, after a failed append.

    After a failed fdatasync the kernel may have dropped the dirty pages or
    marked them clean without writing them: what the page cache holds past
    ``size`` is unknown. Truncating discards exactly those pages (everything
    before ``size`` was synced by an earlier, successful batch), and the fsync
    makes the new size durable, so the failed batch cannot come back after a
    restart.
    """
    os.ftruncate(fd, size)
    os.fsync(fd)
    actual = os.fstat(fd).st_size
    if actual != size:
        raise OSError(f"the segment is {actual} bytes after truncating it to {size}")


@attrs.define
class Recovered:
    segment: Segment
    dropped: int  # bytes cut off a torn tail
    reason: str  # why the tail was judged torn
    last: int  # offset of the last whole record, -1 if none


def inspect_segment(
    path: Path, first_seq: int, is_last: bool, *, check_crc: bool = True
) -> Recovered:
    """Check every frame of a segment and index it, changing nothing on disk.

    Without ``check_crc`` only the frames' lengths and seqs are checked: the
    log indexes a closed segment so on its first read, since every record it
    reads is checked against its crc then anyway.

    A torn tail (a partial record, garbage or zeroes after the last whole one,
    with no valid later record after them) is what a crash during a write
    leaves, and only the last segment can have one: a segment is closed only
    after all its data was synced. Anything else is damage, and raises
    ``CorruptLog`` naming the first bad record rather than skipping it. A torn
    tail is reported in ``dropped``: the bytes recovery would cut.
    """
    buf = path.read_bytes()
    try:
        header_seq = framing.parse_segment_header(buf)
    except framing.FramingError as exc:
        raise CorruptLog(path, 0, None, str(exc)) from None
    if header_seq != first_seq:
        raise CorruptLog(path, 0, None, f"the header says first seq {header_seq}")
    found = framing.scan(
        buf, framing.HEADER_SIZE, first_seq, index_every=INDEX_EVERY, check_crc=check_crc
    )
    segment = Segment(first_seq, path, found.end, found.next_seq)
    segment.add_index(found.index)
    if found.stop is framing.Stop.END:
        return Recovered(segment, 0, "", found.last)
    later = framing.find_frame(buf, found.end, found.next_seq - 1)
    if later is not None or not is_last:
        why = found.reason
        if later is not None:
            why += f"; a valid record follows at offset {later}"
        else:
            why += " in a closed segment"
        raise CorruptLog(path, found.end, found.next_seq, why)
    return Recovered(segment, len(buf) - found.end, found.reason, found.last)


def recover_segment(path: Path, first_seq: int) -> Recovered:
    """Inspect the last segment and cut its torn tail, if it has one, durably."""
    recovered = inspect_segment(path, first_seq, is_last=True)
    if recovered.dropped:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            cut_back(fd, recovered.segment.end)
        finally:
            os.close(fd)
    return recovered


def is_torn_creation(path: Path) -> bool:
    """A file too short to hold a segment header: a crash while it was created."""
    return path.stat().st_size < framing.HEADER_SIZE


def remove_segment(path: Path) -> None:
    index_path(path).unlink(missing_ok=True)
    path.unlink()
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        logger.warning("could not remove the unfinished segment %s: %s", path, exc)


@attrs.define
class Span:
    records: list[Record]
    offset: int  # where the next read goes on
    next_seq: int  # the seq expected there


def read_span(
    path: Path,
    offset: int,
    next_seq: int,
    end: int,
    max_bytes: int,
    after_seq: int = 0,
    until_seq: int | None = None,
) -> Span:
    """Read, check and decode whole records from ``offset``, about ``max_bytes`` of them.

    ``offset`` must be the start of the frame holding ``next_seq``; nothing at
    or past ``end``, and no record past ``until_seq``, is read. Records up to
    ``after_seq`` are walked over without being decoded, and reading goes on
    until at least one record is returned or ``end`` (or ``until_seq``) is
    reached. Everything before ``end`` is durable and whole, so any frame
    there that does not check out is damage: ``CorruptLog``.
    """
    with open(path, "rb", buffering=0) as file:
        while True:
            found = _read_frames(file.fileno(), path, offset, next_seq, end, max_bytes, until_seq)
            records = _decode_frames(path, offset, found, after_seq)
            offset += found.end
            next_seq = found.next_seq
            if records or offset >= end or found.stop is framing.Stop.LIMIT:
                return Span(records, offset, next_seq)


def _read_frames(
    fd: int,
    path: Path,
    offset: int,
    next_seq: int,
    end: int,
    max_bytes: int,
    until_seq: int | None = None,
) -> framing.Scan:
    """The whole frames from ``offset`` on, read and checked (collected into the Scan)."""
    want = min(max_bytes, end - offset)
    buf = os.pread(fd, want, offset)
    found = framing.scan(buf, 0, next_seq, collect=True, last_seq=until_seq)
    if found.stop is framing.Stop.PARTIAL and not found.offsets and offset + found.need <= end:
        # One record larger than the read window: read exactly that record.
        want = found.need
        buf = os.pread(fd, want, offset)
        found = framing.scan(buf, 0, next_seq, collect=True, last_seq=until_seq)
    if len(buf) < want:
        reason = f"the file ends {want - len(buf)} bytes before the log's end"
        raise CorruptLog(path, offset + len(buf), found.next_seq, reason)
    # The records before a bad one are handed out first; the next read starts
    # at the bad one and raises then.
    if not found.offsets and want and found.stop is not framing.Stop.LIMIT:
        raise CorruptLog(path, offset + found.end, found.next_seq, found.reason)
    return found


def _decode_frames(path: Path, offset: int, found: framing.Scan, after_seq: int) -> list[Record]:
    skip = max(0, after_seq + 1 - found.first_seq)
    seqs = range(found.first_seq + skip, found.next_seq)
    offsets, payloads = found.offsets[skip:], found.payloads[skip:]
    return [
        decode_record(path, offset + at, seq, payload)
        for at, seq, payload in zip(offsets, seqs, payloads, strict=True)
    ]


def decode_record(path: Path, offset: int, seq: int, payload: bytes) -> Record:
    """Decode one framed payload; a failure names the file, offset and seq."""
    return Record(_decoded(path, offset, seq, payload), payload)


def _decoded(path: Path, offset: int, seq: int, payload: bytes) -> Event:
    try:
        event = decode(payload)
    except DecodeError as exc:
        raise CorruptLog(path, offset, seq, str(exc)) from None
    if event.seq != seq:
        raise CorruptLog(path, offset, seq, f"the frame says seq {seq}, its record {event.seq}")
    return event


def iter_records(
    segment_list: list[Segment], after_seq: int = 0, *, chunk_bytes: int = 4 << 20
) -> Iterator[Record]:
    """Every record after ``after_seq``, segment after segment (blocking: replay, audit).

    Checks that each segment ends right before the next one starts.
    """
    first_seqs = [s.first_seq for s in segment_list]
    start = max(bisect.bisect_right(first_seqs, after_seq + 1) - 1, 0)
    for i in range(start, len(segment_list)):
        following = segment_list[i + 1] if i + 1 < len(segment_list) else None
        for _offset, record in iter_segment(segment_list[i], after_seq, following, chunk_bytes):
            yield record


def iter_segment(
    segment: Segment,
    after_seq: int = 0,
    following: Segment | None = None,
    chunk_bytes: int = 4 << 20,
) -> Iterator[tuple[int, Record]]:
    """(offset, record) for each record of one segment after ``after_seq``, up to its end.

    With ``following``, the segment must end right before that one starts.
    """
    for offset, event, payload in iter_decoded(segment, after_seq, following, chunk_bytes):
        yield offset, Record(event, payload)


def iter_decoded(
    segment: Segment,
    after_seq: int = 0,
    following: Segment | None = None,
    chunk_bytes: int = 4 << 20,
) -> Iterator[tuple[int, Event, bytes]]:
    """(offset, event, stored bytes) for each record of one segment after ``after_seq``:
    ``iter_segment`` without a ``Record`` made for each (replay's read)."""
    path = segment.path
    offset, next_seq = segment.locate(after_seq + 1)
    with open(path, "rb", buffering=0) as file:
        while offset < segment.end:
            found = _read_frames(file.fileno(), path, offset, next_seq, segment.end, chunk_bytes)
            for at, seq, payload in found.frames:
                if seq > after_seq:
                    yield offset + at, _decoded(path, offset + at, seq, payload), payload
            offset += found.end
            next_seq = found.next_seq
    _check_hand_over(path, offset, next_seq, following)


def fold_segment(
    segment: Segment,
    fold: Callable[[Event], object],
    after_seq: int = 0,
    following: Segment | None = None,
    *,
    refused: type[Exception] = ValueError,
    chunk_bytes: int = 4 << 20,
) -> Event | None:
    """Hand each event of one segment after ``after_seq`` to ``fold``, in order, and
    return the last (None if none): replay's loop, with no generator step nor tuple
    per record (0.07 us of its 2). ``fold`` raising ``refused`` stops it as a
    ``CorruptLog`` naming that record."""
    path = segment.path
    offset, next_seq = segment.locate(after_seq + 1)
    event = None
    with open(path, "rb", buffering=0) as file:
        while offset < segment.end:
            found = _read_frames(file.fileno(), path, offset, next_seq, segment.end, chunk_bytes)
            first = found.first_seq
            seq = first - 1
            for payload in found.payloads:  # the frames' seqs are first, first + 1, ...
                seq += 1
                if seq <= after_seq:
                    continue
                try:
                    event = decode(payload)
                    if event.seq != seq:
                        raise DecodeError(f"the frame says seq {seq}, its record {event.seq}")
                    fold(event)
                except (DecodeError, refused) as exc:
                    at = offset + found.offsets[seq - first]
                    raise CorruptLog(path, at, seq, str(exc)) from None
            offset += found.end
            next_seq = found.next_seq
    _check_hand_over(path, offset, next_seq, following)
    return event


def _check_hand_over(path: Path, offset: int, next_seq: int, following: Segment | None) -> None:
    if following is not None and next_seq != following.first_seq:
        reason = (
            f"the segment ends before seq {next_seq}, the next one starts at {following.first_seq}"
        )
        raise CorruptLog(path, offset, next_seq, reason)


# -- index files and filtered reads --------------------------------------------------------


def write_index(path: Path, postings: Postings, seq_index: list[tuple[int, int]]) -> None:
    """Write the index file of the segment at ``path``: its postings (from its header on)
    and the entries of its sparse seq index for the same frames.

    Written to a temporary file, fsynced and renamed, so a reader finds the
    old file or the new one; the directory is not fsynced: an index lost in a
    crash is only rebuilt.
    """
    covered = [(seq, offset) for seq, offset in seq_index if offset < postings.end]
    blob = index.encode_index(postings, covered)
    final = index_path(path)
    partial = final.with_name(final.name + ".partial")
    partial.unlink(missing_ok=True)  # a crash's leftover
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, 0, blob)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, final)


def load_index(path: Path, first_seq: int, size: int) -> IndexFile | None:
    """The index file of the segment at ``path`` (``size`` bytes durable), if there is one
    that describes it; None if there is none, or (with a warning) if it does not."""
    try:
        return check_index(path, first_seq, size)
    except FileNotFoundError:
        return None
    except IndexFileError as exc:
        logger.warning("%s: ignoring the index (%s); it will be rebuilt", index_path(path), exc)
        return None


def check_index(path: Path, first_seq: int, size: int) -> IndexFile:
    """The index file of the segment at ``path``, if it describes the segment; else
    ``IndexFileError`` saying why (``FileNotFoundError`` if there is none).

    An index is tied to the segment's bytes by its last frame: that frame must be at
    the offset the index says, end where the index ends, and carry the crc and seq it
    says. (A crc covers a record's seq and payload, so a segment of another history,
    say one restored from a backup beside a newer index, does not pass.)
    """
    found = index.decode_index(index_path(path).read_bytes())
    postings = found.postings
    if postings.first_seq != first_seq:
        raise IndexFileError(f"it is of a segment starting at seq {postings.first_seq}")
    if postings.end > size:
        raise IndexFileError(f"it covers {postings.end} bytes, the segment has {size}")
    if postings.last is not None:
        at, crc = postings.last
        with open(path, "rb", buffering=0) as file:
            head = os.pread(file.fileno(), framing.FRAME_OVERHEAD, at)
        if len(head) < framing.FRAME_OVERHEAD:
            raise IndexFileError(f"its last record at offset {at} is past the segment's end")
        frame_crc, length, seq = framing.FRAME_HEADER.unpack(head)
        expected = (crc, postings.end, postings.next_seq - 1)
        if (frame_crc, at + framing.FRAME_OVERHEAD + length, seq) != expected:
            raise IndexFileError(f"its last record (offset {at}) is not the segment's")
    return found


def build_postings(
    path: Path, start: int, next_seq: int, end: int, chunk_bytes: int = 4 << 20
) -> IndexFile:
    """Read the frames of the segment at ``path`` in ``[start, end)`` (``start`` being the
    frame of ``next_seq``), check and decode each, and index them: their postings and
    their entries of the sparse seq index. ``CorruptLog`` on a bad record."""
    postings = Postings(next_seq, start)
    seq_index: list[tuple[int, int]] = []
    offset = start
    with open(path, "rb", buffering=0) as file:
        while offset < end:
            found = _read_frames(file.fileno(), path, offset, next_seq, end, chunk_bytes)
            for at, seq, payload in found.frames:
                event = _decoded(path, offset + at, seq, payload)
                postings.add(offset + at, event.sandbox_id, event.data.TYPE)
                if seq % INDEX_EVERY == 0:
                    seq_index.append((seq, offset + at))
            at, seq, payload = found.offsets[-1], found.next_seq - 1, found.payloads[-1]
            last = (offset + at, framing.frame_crc(seq, payload))
            offset += found.end
            next_seq = found.next_seq
            postings.advance(offset, next_seq, last)
    return IndexFile(postings, seq_index)


def read_frames_at(
    path: Path,
    offsets: list[int],
    end: int,
    after_seq: int,
    until_seq: int,
    max_bytes: int,
) -> tuple[list[Record], int]:
    """Read, check and decode the records at ``offsets`` (frame starts, ascending, all
    before ``end``), keeping those with ``after_seq < seq <= until_seq``.

    Stops once about ``max_bytes`` of records are in hand; returns them and how many
    offsets it went through. Nearby records are read in one ``pread`` (a window
    spans gaps of up to ``GAP`` bytes), a lone one in one of ``SLACK`` bytes, and
    a record longer than that with one more.
    """
    records: list[Record] = []
    taken = 0
    used = 0
    with open(path, "rb", buffering=0) as file:
        fd = file.fileno()
        while taken < len(offsets) and used < max_bytes:
            first = offsets[taken]
            last = taken
            while (
                last + 1 < len(offsets)
                and offsets[last + 1] - offsets[last] <= GAP
                and offsets[last + 1] - first < max_bytes
            ):
                last += 1
            window_end = min(end, offsets[last] + SLACK)
            buf = os.pread(fd, window_end - first, first)
            for i in range(taken, last + 1):
                at = offsets[i]
                frame = _frame_at(fd, path, buf, first, at, end)
                seq = frame[0]
                if seq > until_seq:
                    return records, len(offsets)  # the rest are later still
                taken = i + 1
                if seq > after_seq:
                    records.append(decode_record(path, at, seq, frame[1]))
                    used += len(frame[1])
                    if used >= max_bytes:
                        break
    return records, taken


#: A filtered read reads through gaps this small between records rather than make
#: another call; a record read alone is read with this much, which most records fit.
GAP = 16 << 10
SLACK = 4 << 10


def _frame_at(fd: int, path: Path, buf: bytes, base: int, at: int, end: int) -> tuple[int, bytes]:
    """(seq, payload) of the frame at offset ``at``, from ``buf`` (read from ``base``) or,
    when it runs past it, from the file; checked against its crc."""
    pos = at - base
    if pos + framing.FRAME_OVERHEAD > len(buf):
        buf, pos = os.pread(fd, framing.FRAME_OVERHEAD, at), 0
    if len(buf) - pos < framing.FRAME_OVERHEAD:
        raise CorruptLog(path, at, None, "the index points past the segment's end")
    crc, length, seq = framing.FRAME_HEADER.unpack_from(buf, pos)
    stop = at + framing.FRAME_OVERHEAD + length
    if length == 0 or length > framing.MAX_PAYLOAD or stop > end:
        raise CorruptLog(path, at, seq, f"impossible record length {length}")
    if pos + framing.FRAME_OVERHEAD + length > len(buf):
        buf, pos = os.pread(fd, framing.FRAME_OVERHEAD + length, at), 0
    body = buf[pos + 4 : pos + framing.FRAME_OVERHEAD + length]
    if len(body) != 12 + length or framing.crc32(body) != crc:
        raise CorruptLog(path, at, seq, "checksum mismatch")
    return seq, body[12:]


def iter_selected(
    path: Path, offsets: list[int], end: int, after_seq: int = 0, chunk_bytes: int = 4 << 20
) -> Iterator[Record]:
    """The records at ``offsets`` (ascending, before ``end``) with seq above ``after_seq``,
    read ``chunk_bytes`` at a time (blocking: the audit's filtered dump)."""
    done = 0
    while done < len(offsets):
        records, taken = read_frames_at(path, offsets[done:], end, after_seq, 1 << 64, chunk_bytes)
        yield from records
        done += taken
