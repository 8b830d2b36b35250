"""Framing and segment recovery: torn tails are cut to the last whole record,
damage in the middle is refused naming the record."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.events import framing, segments
from sandboxd.events.codec import encode
from sandboxd.events.errors import CorruptLog
from tests.events.strategies import sample_pending, stamp


def _segment_bytes(count: int, first_seq: int = 1) -> tuple[bytes, list[int]]:
    """A segment of ``count`` realistic records; and the offset where each record ends."""
    events = stamp([sample_pending(i) for i in range(count)], first_seq)
    buf = bytearray(framing.segment_header(first_seq))
    ends = []
    for event in events:
        buf += framing.encode_frame(event.seq, encode(event))
        ends.append(len(buf))
    return bytes(buf), ends


def _write(tmp_path: Path, data: bytes, first_seq: int = 1) -> Path:
    path = tmp_path / segments.segment_name(first_seq)
    path.write_bytes(data)
    return path


@given(payloads=st.lists(st.binary(min_size=1, max_size=300), max_size=20))
def test_scan_finds_every_frame(payloads: list[bytes]) -> None:
    buf = b"".join(framing.encode_frame(7 + i, p) for i, p in enumerate(payloads))
    found = framing.scan(buf, 0, 7, collect=True)
    assert found.stop is framing.Stop.END
    assert [(seq, payload) for _, seq, payload in found.frames] == [
        (7 + i, p) for i, p in enumerate(payloads)
    ]
    assert found.next_seq == 7 + len(payloads)


def test_header_round_trip_and_foreign_files() -> None:
    assert framing.parse_segment_header(framing.segment_header(42)) == 42
    with pytest.raises(framing.FramingError, match="not a sandboxd log segment"):
        framing.parse_segment_header(b"SQLite format 3\x00")
    with pytest.raises(framing.FramingError, match="version"):
        framing.parse_segment_header(struct.pack("<6sHQ", b"SBXLOG", 9, 1))


def test_zeroes_are_never_a_frame() -> None:
    found = framing.scan(bytes(4096), 0, 1)
    assert found.stop is framing.Stop.INVALID
    assert framing.find_frame(bytes(4096), 0, 0) is None


def test_a_damaged_length_or_seq_fails_the_checksum() -> None:
    frame = bytearray(framing.encode_frame(5, b'{"a":1}'))
    frame[8] ^= 1  # the seq
    assert framing.scan(bytes(frame), 0, 5).reason == "checksum mismatch"


def test_cut_at_every_byte_of_the_last_three_records(tmp_path: Path) -> None:
    data, ends = _segment_bytes(12)
    start = ends[-4]  # where the third-last record begins
    for cut in range(start, len(data) + 1):
        path = _write(tmp_path, data[:cut])
        recovered = segments.recover_segment(path, 1)
        whole = sum(1 for end in ends if end <= cut)
        assert recovered.segment.next_seq == whole + 1, cut
        assert recovered.segment.end == (ends[whole - 1] if whole else framing.HEADER_SIZE)
        assert recovered.dropped == cut - recovered.segment.end
        assert path.stat().st_size == recovered.segment.end  # cut back on disk


@settings(max_examples=60)
@given(garbage=st.binary(min_size=1, max_size=3000) | st.integers(1, 20000).map(bytes))
def test_random_or_zeroed_bytes_after_the_last_record_are_cut(
    tmp_path_factory: pytest.TempPathFactory, garbage: bytes
) -> None:
    data, _ = _segment_bytes(6)
    path = _write(tmp_path_factory.mktemp("segment"), data + garbage)
    recovered = segments.recover_segment(path, 1)
    assert recovered.segment.next_seq == 7
    assert recovered.dropped == len(garbage)
    assert path.read_bytes() == data


def test_a_partial_record_then_zeroes_is_a_torn_tail(tmp_path: Path) -> None:
    data, ends = _segment_bytes(6)
    path = _write(tmp_path, data[: ends[-1] - 40] + bytes(8192))
    recovered = segments.recover_segment(path, 1)
    assert recovered.segment.next_seq == 6
    assert recovered.segment.end == ends[-2]


@pytest.mark.parametrize("where", ["payload", "length", "zeroed"])
def test_a_bad_record_in_the_middle_is_named(tmp_path: Path, where: str) -> None:
    data, ends = _segment_bytes(10)
    bad = bytearray(data)
    offset = ends[3]  # record 5 starts here
    if where == "payload":
        bad[offset + 30] ^= 0x40
    elif where == "length":
        bad[offset + 4 : offset + 8] = struct.pack("<I", 1 << 30)
    else:
        bad[offset : ends[5]] = bytes(ends[5] - offset)  # records 5 and 6 zeroed
    path = _write(tmp_path, bytes(bad))
    with pytest.raises(CorruptLog) as caught:
        segments.recover_segment(path, 1)
    assert caught.value.path == path
    assert caught.value.offset == offset
    assert caught.value.seq == 5
    assert str(path) in str(caught.value) and "seq 5" in str(caught.value)
    assert path.read_bytes() == bytes(bad)  # nothing cut


def test_a_missing_record_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    data, ends = _segment_bytes(8)
    path = _write(tmp_path, data[: ends[2]] + data[ends[3] :])  # record 4 gone
    with pytest.raises(CorruptLog, match="seq 5 where 4 was expected"):
        segments.recover_segment(path, 1)


def test_a_torn_tail_in_a_closed_segment_is_damage(tmp_path: Path) -> None:
    data, _ = _segment_bytes(5)
    path = _write(tmp_path, data[:-3])
    with pytest.raises(CorruptLog, match="closed segment"):
        segments.inspect_segment(path, 1, is_last=False)


def test_a_header_that_disagrees_with_the_name(tmp_path: Path) -> None:
    data, _ = _segment_bytes(2, first_seq=1)
    path = _write(tmp_path, data, first_seq=9)
    with pytest.raises(CorruptLog, match="first seq 1"):
        segments.recover_segment(path, 9)


def test_reading_a_span_checks_and_decodes(tmp_path: Path) -> None:
    data, ends = _segment_bytes(40)
    path = _write(tmp_path, data)
    span = segments.read_span(path, framing.HEADER_SIZE, 1, len(data), 1000, after_seq=10)
    assert span.records[0].event.seq == 11
    assert span.records[0].raw == data[ends[9] + 16 : ends[10]]
    everything = segments.read_span(path, framing.HEADER_SIZE, 1, len(data), 1 << 20)
    assert [r.event.seq for r in everything.records] == list(range(1, 41))
    assert everything.offset == len(data)
