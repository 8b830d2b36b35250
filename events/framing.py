"""How records sit in a segment file: framing and scanning, with no I/O.

A segment file is a header and then frames, all little-endian::

    header = "SBXLOG" | format version (u16) | first seq (u64)            16 bytes
    frame  = crc32 (u32) | length (u32) | seq (u64) | payload (length bytes)

The payload is one event as ``codec.encode`` wrote it (JSON). The crc32
(zlib's CRC-32) covers length, seq and payload, so a frame whose length or
seq was damaged fails its check just like one whose payload was. It is
computed by zlib-ng's, which gives the standard library's values about three
times as fast (SIMD: 50 against 134 ns for a record of 200 bytes, for every
frame written and read). The seq in the frame header lets a reader check
contiguity, build a sparse index and find a seq without decoding any JSON.

A length of zero is never written (a payload is a JSON object), so zeroed
blocks (what a file system may leave after a crash) never parse as a frame.

``scan`` walks frames until the first one that is not whole and valid and says
why it stopped. Telling a torn tail (cut it) from damage in the middle (refuse
it) is ``find_frame``'s job: the tail is torn only if no valid frame with a
later seq follows the bad spot.
"""

from __future__ import annotations

import enum
import struct

import attrs
from zlib_ng.zlib_ng import crc32 as crc32  # re-exported: segments.py checks frames too

MAGIC = b"SBXLOG"
FORMAT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<6sHQ")
HEADER_SIZE = SEGMENT_HEADER.size  # 16
FRAME_HEADER = struct.Struct("<IIQ")  # crc32, payload length, seq
FRAME_OVERHEAD = FRAME_HEADER.size  # 16
_LENGTH_SEQ = struct.Struct("<IQ")
#: A bound on one record: a length above it is garbage, not a record.
MAX_PAYLOAD = 16 << 20


class FramingError(ValueError):
    """A segment header that is not one this code wrote."""


def segment_header(first_seq: int) -> bytes:
    return SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, first_seq)


def parse_segment_header(buf: bytes | memoryview) -> int:
    """The first seq a segment header announces."""
    if len(buf) < HEADER_SIZE:
        raise FramingError(f"the header is {len(buf)} bytes, not {HEADER_SIZE}")
    magic, version, first_seq = SEGMENT_HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FramingError(f"not a sandboxd log segment (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise FramingError(f"segment format version {version}, this code reads {FORMAT_VERSION}")
    if first_seq < 1:
        raise FramingError(f"first seq {first_seq} is not positive")
    return int(first_seq)


def encode_frame(seq: int, payload: bytes) -> bytes:
    length_seq = _LENGTH_SEQ.pack(len(payload), seq)
    crc = crc32(payload, crc32(length_seq))
    return crc.to_bytes(4, "little") + length_seq + payload


def frame_crc(seq: int, payload: bytes) -> int:
    """The crc a frame of ``payload`` at ``seq`` carries."""
    return crc32(payload, crc32(_LENGTH_SEQ.pack(len(payload), seq)))


class Stop(enum.Enum):
    END = "end"  # the buffer ends right after a whole frame (or holds none)
    PARTIAL = "partial"  # a frame starts but the buffer ends inside it
    INVALID = "invalid"  # the bytes there are not the frame expected there
    LIMIT = "limit"  # the next frame's seq is past the ``last_seq`` asked for


#: One whole, valid frame: (offset of its header, seq, payload).
Frame = tuple[int, int, bytes]


@attrs.define
class Scan:
    end: int  # offset just past the last whole valid frame
    last: int  # offset of that frame, -1 if none
    next_seq: int  # the seq expected at ``end``
    stop: Stop
    reason: str  # why the scan stopped, empty for END
    need: int  # for PARTIAL: bytes from ``end`` that the unfinished frame spans
    # Filled only when scanning with collect=True: the frames' offsets and payloads,
    # the first of seq ``first_seq``. Two lists rather than a tuple per frame: the
    # cyclic GC tracks tuples, and 20,000 of them alive in a 4 MiB chunk made it
    # cost replay 0.25 us a record (bench/eventlog.py).
    first_seq: int
    offsets: list[int]
    payloads: list[bytes]
    index: list[tuple[int, int]]  # (seq, offset) of the frames whose seq % index_every == 0

    @property
    def frames(self) -> list[Frame]:
        """(offset, seq, payload) of each frame collected."""
        seqs = range(self.first_seq, self.first_seq + len(self.offsets))
        return list(zip(self.offsets, seqs, self.payloads, strict=True))


def scan(
    buf: bytes | memoryview,
    start: int,
    next_seq: int,
    *,
    collect: bool = False,
    index_every: int = 0,
    last_seq: int | None = None,
    check_crc: bool = True,
) -> Scan:
    """Walk the frames of ``buf`` from ``start``, expecting seqs from ``next_seq`` on.

    With ``last_seq``, stop (``Stop.LIMIT``) before any frame past it. Without
    ``check_crc`` only lengths and seqs are checked: enough to index frames
    that will be checked when they are read.

    This is the replay's inner loop: keep it to struct and crc32 calls.
    """
    # Bytes are sliced as they are (a copy of a few hundred bytes costs less than a
    # memoryview object); anything else through a memoryview.
    data = buf if type(buf) is bytes else memoryview(buf)
    size = len(data)
    unpack = FRAME_HEADER.unpack_from
    first_seq = next_seq
    offsets: list[int] = []
    payloads: list[bytes] = []
    index: list[tuple[int, int]] = []
    pos = start
    last = -1
    limit = (1 << 64) if last_seq is None else last_seq
    stop, reason, need = Stop.END, "", 0
    while True:
        if next_seq > limit:
            stop = Stop.LIMIT
            break
        if pos + FRAME_OVERHEAD > size:
            if pos != size:
                reason = f"{size - pos} bytes, less than a frame header"
                stop, need = Stop.PARTIAL, FRAME_OVERHEAD
            break
        crc, length, seq = unpack(data, pos)
        after = pos + FRAME_OVERHEAD + length
        if (
            length == 0
            or length > MAX_PAYLOAD
            or after > size
            or (check_crc and crc32(data[pos + 4 : after]) != crc)
            or seq != next_seq
        ):
            stop, reason, need = _why_not(data, pos, next_seq, check_crc)
            break
        if collect:
            payload = data[pos + FRAME_OVERHEAD : after]
            offsets.append(pos)
            payloads.append(payload if type(payload) is bytes else bytes(payload))
        if index_every and seq % index_every == 0:
            index.append((seq, pos))
        last = pos
        pos = after
        next_seq += 1
    return Scan(pos, last, next_seq, stop, reason, need, first_seq, offsets, payloads, index)


def _why_not(
    data: bytes | memoryview, pos: int, next_seq: int, check_crc: bool
) -> tuple[Stop, str, int]:
    """Why the frame at ``pos`` is not the whole valid frame of ``next_seq`` expected there."""
    crc, length, seq = FRAME_HEADER.unpack_from(data, pos)
    if length == 0 or length > MAX_PAYLOAD:
        return Stop.INVALID, f"impossible record length {length}", 0
    after = pos + FRAME_OVERHEAD + length
    if after > len(data):
        return Stop.PARTIAL, f"a record of {length} bytes that the data ends inside", after - pos
    if check_crc and crc32(data[pos + 4 : after]) != crc:
        return Stop.INVALID, "checksum mismatch", 0
    return Stop.INVALID, f"seq {seq} where {next_seq} was expected", 0


def is_frame_at(buf: bytes | memoryview, pos: int, after_seq: int) -> bool:
    """Whether a whole valid frame with a seq above ``after_seq`` starts at ``pos``."""
    if pos + FRAME_OVERHEAD > len(buf):
        return False
    crc, length, seq = FRAME_HEADER.unpack_from(buf, pos)
    # seq first: on garbage it is almost never in range, which keeps the search cheap.
    if not after_seq < seq <= after_seq + (1 << 32) or length == 0 or length > MAX_PAYLOAD:
        return False
    after = pos + FRAME_OVERHEAD + length
    return after <= len(buf) and crc32(memoryview(buf)[pos + 4 : after]) == int(crc)


def find_frame(buf: bytes | memoryview, start: int, after_seq: int) -> int | None:
    """The first offset at or after ``start`` where a valid frame with a later seq starts.

    Used where a scan stopped: finding one means the damage is in the middle of
    the log (records the log acknowledged follow it), not a torn tail. Every
    offset is tried, since the damage may have any length; the search stops at
    the last non-zero byte, as a frame always ends with one (its payload's
    closing brace), which keeps zero-filled tails cheap.
    """
    tail = bytes(memoryview(buf)[start:]).rstrip(b"\0")
    last = start + len(tail)
    if last - start <= FRAME_OVERHEAD:
        return None
    limited = memoryview(buf)[:last]
    unpack = FRAME_HEADER.unpack_from
    for pos in range(start, last - FRAME_OVERHEAD):
        seq = unpack(limited, pos)[2]
        if after_seq < seq <= after_seq + (1 << 32) and is_frame_at(limited, pos, after_seq):
            return pos
    return None
