"""`sandboxd log dump` and `sandboxd log verify`, offline, on a state dir."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import trio

from sandboxd.events import audit, segments, snapshots
from sandboxd.events.codec import encode
from sandboxd.events.store import StoreConfig, open_store
from sandboxd.events.types import Event
from tests.events.strategies import sample_pending


def _make_state_dir(state_dir: Path, count: int = 120) -> list[Event]:
    async def build() -> list[Event]:
        config = StoreConfig(segment_bytes=4096, snapshot_every=0)
        async with open_store(state_dir, config) as store:
            events = []
            for i in range(0, count, 10):
                events += await store.append_many([sample_pending(j) for j in range(i, i + 10)])
                if i == 50:
                    await store.snapshot()
            return events

    return trio.run(build)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Event]]:
    state_dir = tmp_path_factory.mktemp("pristine")
    return state_dir, _make_state_dir(state_dir)


@pytest.fixture
def state_dir(tmp_path: Path, pristine: tuple[Path, list[Event]]) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(pristine[0], copy)
    return copy


def _dump(state_dir: Path, **filters: object) -> tuple[int, list[dict[str, object]], str]:
    out, err = io.StringIO(), io.StringIO()
    code = audit.dump(state_dir, out, err=err, **filters)  # type: ignore[arg-type]
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def _verify(state_dir: Path) -> tuple[int, str]:
    out = io.StringIO()
    return audit.verify(state_dir, out), out.getvalue()


def test_dump_prints_every_record_as_stored(
    state_dir: Path, pristine: tuple[Path, list[Event]]
) -> None:
    events = pristine[1]
    out, err = io.StringIO(), io.StringIO()
    assert audit.dump(state_dir, out, err=err) == 0
    assert out.getvalue().splitlines() == [encode(e).decode() for e in events]
    assert err.getvalue() == ""


def test_dump_filters(state_dir: Path, pristine: tuple[Path, list[Event]]) -> None:
    events = pristine[1]
    code, lines, _ = _dump(state_dir, after_seq=100)
    assert code == 0 and [r["seq"] for r in lines] == list(range(101, 121))
    code, lines, _ = _dump(state_dir, sandbox_id="sbx-000003")
    assert [r["seq"] for r in lines] == [e.seq for e in events if e.sandbox_id == "sbx-000003"]
    code, lines, _ = _dump(state_dir, types={"sandbox.paused", "sandbox.resumed"}, after_seq=20)
    assert [r["seq"] for r in lines] == [
        e.seq for e in events if e.seq > 20 and e.type in {"sandbox.paused", "sandbox.resumed"}
    ]


def test_verify_passes_a_good_state_dir(state_dir: Path) -> None:
    code, output = _verify(state_dir)
    assert code == 0, output
    assert output.startswith("ok: 120 records (seqs 1..120)")


def _segment_holding(state_dir: Path, seq: int) -> tuple[Path, int]:
    """The segment file holding ``seq`` and the record's offset in it."""
    found = segments.list_segments(state_dir / "events")
    first, path = [(f, p) for f, p in found if f <= seq][-1]
    segment = segments.Segment(first, path, path.stat().st_size, None)
    for offset, record in segments.iter_segment(segment):
        if record.event.seq == seq:
            return path, offset
    raise AssertionError(f"no seq {seq}")


def test_verify_names_the_first_bad_record(state_dir: Path) -> None:
    path, offset = _segment_holding(state_dir, 47)
    content = bytearray(path.read_bytes())
    content[offset + 40] ^= 0x08
    path.write_bytes(bytes(content))
    later, later_offset = _segment_holding(state_dir, 90)
    content = bytearray(later.read_bytes())
    content[later_offset + 40] ^= 0x08
    later.write_bytes(bytes(content))
    code, output = _verify(state_dir)
    assert code == 1
    assert output.startswith(f"bad record: {path} offset {offset} seq 47: checksum mismatch")
    code, lines, err = _dump(state_dir)
    assert code == 1 and lines[-1]["seq"] == 46
    assert f"offset {offset}" in err


def test_verify_finds_a_missing_segment(state_dir: Path) -> None:
    found = segments.list_segments(state_dir / "events")
    first, path = found[1]
    path.unlink()
    code, output = _verify(state_dir)
    assert code == 1
    before = found[0][1]
    assert output.startswith(f"bad record: {before} offset {before.stat().st_size} seq {first}:")
    assert f"ends before seq {first}, the next one starts at {found[2][0]}" in output


def test_verify_finds_a_lost_tail_through_the_snapshots(state_dir: Path) -> None:
    # The last segment gone: the snapshot taken at shutdown covers events no longer there.
    found = segments.list_segments(state_dir / "events")
    found[-1][1].unlink()
    code, output = _verify(state_dir)
    assert code == 1
    assert f"but the log ends at seq {found[-1][0] - 1}" in output


def test_verify_notes_a_torn_tail_without_failing(state_dir: Path) -> None:
    last = segments.list_segments(state_dir / "events")[-1][1]
    size = last.stat().st_size
    with last.open("ab") as file:
        file.write(b"\x07" * 33)
    code, output = _verify(state_dir)
    assert code == 0, output
    assert f"33 bytes of a torn write after offset {size}" in output
    assert last.stat().st_size == size + 33  # verify changes nothing


def test_verify_fails_a_snapshot_the_daemon_would_trust_wrongly(state_dir: Path) -> None:
    path = state_dir / "snapshots" / snapshots.snapshot_name(60)
    snapshot = snapshots.decode_snapshot(path.read_bytes(), path)
    del snapshot.state.sandboxes[next(iter(snapshot.state.sandboxes))]
    path.write_bytes(snapshots.encode_snapshot(snapshot.state, snapshot.anchor_ts))
    code, output = _verify(state_dir)
    assert code == 1
    assert f"bad snapshot: {path}: its state differs" in output


def test_verify_notes_a_format_1_snapshot_without_failing_it(state_dir: Path) -> None:
    # Written before owners were kept per life of an id: {id: last owner}.
    path = state_dir / "snapshots" / snapshots.snapshot_name(60)
    body = json.loads(path.read_bytes()[snapshots.HEADER.size :])
    body["state"]["owners"] = {i: lives[-1][1] for i, lives in body["state"]["owners"].items()}
    old = json.dumps(body).encode()
    path.write_bytes(snapshots.HEADER.pack(snapshots.MAGIC, 1, zlib.crc32(old), len(old)) + old)
    code, output = _verify(state_dir)
    assert code == 0, output
    assert f"{path}: in snapshot format 1" in output


def test_verify_notes_a_damaged_snapshot(state_dir: Path) -> None:
    path = state_dir / "snapshots" / snapshots.snapshot_name(60)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    code, output = _verify(state_dir)
    assert code == 0
    assert "checksum mismatch (the daemon does not use it)" in output


def test_no_log_is_an_error(tmp_path: Path) -> None:
    assert _verify(tmp_path)[0] == 1
    assert _dump(tmp_path)[0] == 1


def test_the_command_line(state_dir: Path, tmp_path: Path) -> None:
    sandboxd = Path(sys.executable).with_name("sandboxd")
    if not sandboxd.exists():
        pytest.skip("the sandboxd command is not installed")
    done = subprocess.run(
        [str(sandboxd), "log", "verify", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "ok: 120 records" in done.stdout
    done = subprocess.run(
        [str(sandboxd), "log", "dump", "--state-dir", str(state_dir), "--after-seq", "118"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["seq"] for line in done.stdout.splitlines()] == [119, 120]
