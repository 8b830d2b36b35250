"""Where a segment's records are, by sandbox and by type: the segment index. Pure, no I/O.

A reader that wants the events of one sandbox (or of some types) in a long log
should not read, let alone decode, the records of the others. ``Postings``
lists, for each sandbox id (``None`` for the daemon's own events) and for each
event type, the offsets of its frames in one segment, ascending; a filtered
read asks it for the offsets of the frames that can match, and reads those.

Postings cover the frames of a segment from its header up to ``end``. The
log's writer adds each batch it makes durable to the active segment's
postings; a segment closed by a roll is written out as an *index file* beside
it, and so is the active one when the log closes. A segment without one (an
older log, or a crash) is indexed by reading it once, when a filtered read
first needs it. Index files are a cache: each is checked against its segment
before it is used (see ``IndexFile.last``), a bad one is ignored and rebuilt,
and removing them changes nothing but speed.

Measured (bench/eventlog.py, 1,000,000 events of 1,000 sandboxes): the index
files are 4.6 % of the log, and a dump of one sandbox takes 0.17 s through
them against 1.9 s scanning every record.

An index file ``<segment's name>.idx`` (little-endian)::

    "SBXIDX" | format version (u16) | crc32 of the body (u32) | body length (u64)
    body = meta length (u32) | meta (JSON) | numbers (``width`` bytes each)

``meta`` is ``{"first_seq", "end", "next_seq", "last", "width", "seqs",
"sandboxes", "types"}``: the frames covered are those before offset ``end``,
whose seqs run from ``first_seq`` to ``next_seq - 1``; ``last`` is ``[offset,
crc]`` of the last of them (``null`` if none); ``width`` is 4 or 8; ``seqs`` is
how many ``(seq, offset)`` pairs of the segment's sparse seq index the numbers
start with; ``sandboxes`` and ``types`` are ``[[key, count], ...]``, in the
order their offsets follow the pairs.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import orjson

from sandboxd.events.framing import HEADER_SIZE

MAGIC = b"SBXIDX"
FORMAT_VERSION = 1
HEADER = struct.Struct("<6sHIQ")  # magic, version, crc32 of the body, body length
_META_LENGTH = struct.Struct("<I")
SUFFIX = ".idx"

#: The sandbox_id of events that are about no sandbox (daemon.*).
DAEMON: None = None


class IndexFileError(ValueError):
    """An index file that does not decode: it is rebuilt, never trusted."""


@attrs.frozen
class Selection:
    """What postings can select: events of some sandboxes, of some types (None: any)."""

    sandbox_ids: frozenset[str] | None
    types: frozenset[str] | None


def _offsets() -> array[int]:
    return array("Q")


class Postings:
    """The offsets of a segment's frames by sandbox and by type, for frames before ``end``.

    The postings of a whole segment start at its header; a piece of them, made
    to be appended to others by ``extend``, starts at any frame. ``next_seq``
    is the seq of the frame at ``end``; ``last`` is the offset and crc of the
    frame before it (None while there is none). Mutable: the writer adds to the
    active segment's postings as it appends.
    """

    __slots__ = ("by_sandbox", "by_type", "end", "first_seq", "last", "next_seq")

    def __init__(self, first_seq: int, start: int = HEADER_SIZE) -> None:
        self.first_seq = first_seq  # the seq of the first frame covered, at ``start``
        self.end = start
        self.next_seq = first_seq
        self.last: tuple[int, int] | None = None
        self.by_sandbox: dict[str | None, array[int]] = {}
        self.by_type: dict[str, array[int]] = {}

    def __len__(self) -> int:
        return self.next_seq - self.first_seq

    def add(self, offset: int, sandbox_id: str | None, event_type: str) -> None:
        """Add one frame at ``offset``, past every frame added before (no bookkeeping of
        ``end``: ``advance`` says where the frames added so far end)."""
        offsets = self.by_sandbox.get(sandbox_id)
        if offsets is None:
            offsets = self.by_sandbox[sandbox_id] = _offsets()
        offsets.append(offset)
        offsets = self.by_type.get(event_type)
        if offsets is None:
            offsets = self.by_type[event_type] = _offsets()
        offsets.append(offset)

    def advance(self, end: int, next_seq: int, last: tuple[int, int]) -> None:
        """The frames added so far end at ``end``; the next one has seq ``next_seq``."""
        self.end, self.next_seq, self.last = end, next_seq, last

    def extend(self, later: Postings) -> None:
        """Append the postings of the frames that follow these (``later`` starts at ``end``)."""
        if later.first_seq != self.next_seq:
            raise ValueError(f"postings from seq {later.first_seq} cannot follow {self.next_seq}")
        for sandbox_id, offsets in later.by_sandbox.items():
            self.by_sandbox.setdefault(sandbox_id, _offsets()).extend(offsets)
        for event_type, offsets in later.by_type.items():
            self.by_type.setdefault(event_type, _offsets()).extend(offsets)
        if later.last is not None:
            self.advance(later.end, later.next_seq, later.last)

    def select(
        self,
        sandbox_ids: Iterable[str | None] | None,
        types: Iterable[str] | None,
        low: int,
        high: int,
    ) -> list[int]:
        """The offsets in ``[low, high)`` of the frames of any of ``sandbox_ids`` whose type
        is any of ``types`` (None: any), ascending. Costs what it returns, plus a bisect
        per key (and, with both, a bisect per offset of the smaller side)."""
        by_sandbox = by_type = None
        if sandbox_ids is not None:
            by_sandbox = _union(self.by_sandbox, sandbox_ids, low, high)
        if types is not None:
            by_type = _union(self.by_type, types, low, high)
        if by_sandbox is None or by_type is None:
            chosen = by_sandbox if by_sandbox is not None else by_type
            if chosen is None:
                raise ValueError("select needs sandbox_ids, types or both")
            return chosen
        small, large = sorted((by_sandbox, by_type), key=len)
        return [offset for offset in small if _contains(large, offset)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Postings):
            return NotImplemented
        return (
            self.first_seq == other.first_seq
            and self.end == other.end
            and self.next_seq == other.next_seq
            and self.last == other.last
            and _nonempty(self.by_sandbox) == _nonempty(other.by_sandbox)
            and _nonempty(self.by_type) == _nonempty(other.by_type)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"Postings(first_seq={self.first_seq}, next_seq={self.next_seq}, end={self.end},"
            f" {len(self.by_sandbox)} sandboxes, {len(self.by_type)} types)"
        )


def _nonempty(table: dict[Any, array[int]]) -> dict[Any, array[int]]:
    return {key: offsets for key, offsets in table.items() if offsets}


def _union(table: dict[Any, array[int]], keys: Iterable[Any], low: int, high: int) -> list[int]:
    runs = []
    for key in keys:
        offsets = table.get(key)
        if offsets:
            start = bisect.bisect_left(offsets, low)
            stop = bisect.bisect_left(offsets, high, start)
            if start < stop:
                runs.append(offsets[start:stop])
    if len(runs) == 1:
        return runs[0].tolist()
    # Sorted runs: timsort merges them in about linear time.
    return sorted(itertools.chain.from_iterable(runs))


def _contains(offsets: Sequence[int], offset: int) -> bool:
    i = bisect.bisect_left(offsets, offset)
    return i < len(offsets) and offsets[i] == offset


# -- index files -----------------------------------------------------------------------


@attrs.frozen
class IndexFile:
    """What an index file holds: the postings of a segment's first frames, and its sparse
    seq index (``(seq, offset)`` pairs) for the same frames."""

    postings: Postings
    seq_index: list[tuple[int, int]]


def encode_index(postings: Postings, seq_index: Sequence[tuple[int, int]]) -> bytes:
    """An index file's bytes for ``postings`` and the sparse seq index of the same frames."""
    sandboxes = [(key, offsets) for key, offsets in postings.by_sandbox.items() if offsets]
    types = [(key, offsets) for key, offsets in postings.by_type.items() if offsets]
    # Four bytes an offset when they fit (a segment under 4 GiB: always, unless a
    # batch of huge records ran it far past segment_bytes), else eight.
    small = postings.end < 1 << 32 and all(n < 1 << 32 for pair in seq_index for n in pair)
    width = "I" if small else "Q"
    meta = orjson.dumps(
        {
            "first_seq": postings.first_seq,
            "end": postings.end,
            "next_seq": postings.next_seq,
            "last": postings.last,
            "width": 4 if width == "I" else 8,
            "seqs": len(seq_index),
            "sandboxes": [[key, len(offsets)] for key, offsets in sandboxes],
            "types": [[key, len(offsets)] for key, offsets in types],
        }
    )
    numbers = array(width, itertools.chain.from_iterable(seq_index))
    for _key, offsets in itertools.chain(sandboxes, types):
        numbers.extend(offsets if width == "Q" else array(width, offsets))
    if sys.byteorder != "little":
        numbers.byteswap()
    body = _META_LENGTH.pack(len(meta)) + meta + numbers.tobytes()
    return HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)) + body


def decode_index(blob: bytes) -> IndexFile:
    """The index a file holds; ``IndexFileError`` if it is not one this code wrote whole."""
    if len(blob) < HEADER.size:
        raise IndexFileError(f"the file is {len(blob)} bytes, shorter than an index header")
    magic, version, crc, length = HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise IndexFileError("not a sandboxd segment index")
    if version != FORMAT_VERSION:
        raise IndexFileError(f"index format version {version}, this code reads {FORMAT_VERSION}")
    body = memoryview(blob)[HEADER.size :]
    if len(body) != length:
        raise IndexFileError(f"the body is {len(body)} bytes, the header says {length}")
    if zlib.crc32(body) != crc:
        raise IndexFileError("checksum mismatch")
    try:
        (meta_length,) = _META_LENGTH.unpack_from(body, 0)
        meta = orjson.loads(body[_META_LENGTH.size : _META_LENGTH.size + meta_length])
        width = {4: "I", 8: "Q"}[meta["width"]]
        numbers = array(width)
        numbers.frombytes(body[_META_LENGTH.size + meta_length :])
        if width != "Q":
            numbers = array("Q", numbers)  # in memory, one kind: the writer may go past 4 GiB
        if sys.byteorder != "little":
            numbers.byteswap()
        return _index_from(meta, numbers)
    except (ValueError, KeyError, TypeError) as exc:  # checksummed, yet not ours: a bug
        raise IndexFileError(f"the body does not decode: {exc!r}") from None


def _index_from(meta: Any, numbers: array[int]) -> IndexFile:
    postings = Postings(_int(meta["first_seq"]))
    end, next_seq, last = _int(meta["end"]), _int(meta["next_seq"]), meta["last"]
    if last is not None:
        postings.advance(end, next_seq, (_int(last[0]), _int(last[1])))
    elif end != HEADER_SIZE or next_seq != postings.first_seq:
        raise ValueError("an index of no frames must end at the header")
    pairs = _int(meta["seqs"])
    seq_index = [(numbers[2 * i], numbers[2 * i + 1]) for i in range(pairs)]
    at = 2 * pairs
    tables: list[tuple[dict[Any, array[int]], Any]] = [
        (postings.by_sandbox, meta["sandboxes"]),
        (postings.by_type, meta["types"]),
    ]
    for table, keys in tables:
        for key, count in keys:
            if not (key is None or type(key) is str):
                raise ValueError(f"key {key!r} is not a string")
            table[key] = numbers[at : at + _int(count)]
            at += count
    if at != len(numbers):
        raise ValueError(f"{len(numbers) - at} offsets more than the meta lists")
    return IndexFile(postings, seq_index)


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a count or an offset")
    return value
