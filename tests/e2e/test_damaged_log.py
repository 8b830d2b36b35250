"""A record damaged in the middle of the log, against a real `sandboxd serve`.

- Where start-up must read it (the last segment, or a closed one no snapshot
  covers), the daemon does not start, and says so in one sentence: the file,
  the offset, the seq, and the command that shows more. No traceback.
- Where a snapshot covers it, the daemon starts; a reader that reaches it
  (`events.read`, a subscription from seq 0) gets what comes before it, then
  `unavailable` naming the damage, however often it asks; the daemon logs the
  damage once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sandboxd.events import framing, segments
from sandboxd.gateway.client import UnavailableError, open_client
from tests.daemon_process import DaemonProcess
from tests.e2e.support import (
    ROOT,
    end_daemon,
    make_config,
    raw_subscription,
    read_log,
    verify_log,
)
from tests.support import TOKENS, eventually


async def make_history(daemon: DaemonProcess, sandboxes: int) -> None:
    """Sandboxes started, paused and resumed, by alice and bob."""
    users = ("alice", "bob")
    for n in range(sandboxes):
        async with open_client(daemon.url, TOKENS[users[n % 2]]) as client:
            sandbox = await client.start(spec_id="sleep", sandbox_id=f"s{n}")
            await client.pause(sandbox.id)
            await client.resume(sandbox.id)


def damage(state_dir: Path, seq: int) -> tuple[Path, int]:
    """Flip one bit in the payload of the record ``seq``; return its segment and offset."""
    found = segments.list_segments(state_dir / "events")
    first_seq, path = next((first, path) for first, path in reversed(found) if first <= seq)
    content = bytearray(path.read_bytes())
    scan = framing.scan(content, framing.HEADER_SIZE, first_seq, collect=True)
    offset = next(at for at, frame_seq, _payload in scan.frames if frame_seq == seq)
    content[offset + framing.FRAME_OVERHEAD + 4] ^= 0x10
    path.write_bytes(bytes(content))
    return path, offset


async def exit_code(daemon: DaemonProcess) -> int:
    process = daemon.process
    assert process is not None
    await eventually(lambda: process.poll() is not None, what="the daemon to give up")
    return process.returncode


@pytest.mark.parametrize("where", ["last segment", "closed segment, no snapshot"])
async def test_a_damaged_record_start_up_must_read_stops_it_in_one_sentence(
    tmp_path: Path, where: str
) -> None:
    state_dir = tmp_path / "state"
    daemon = DaemonProcess(tmp_path, make_config(state_dir, segment_bytes=4096))
    try:
        await daemon.start()
        await make_history(daemon, 10)
        assert await daemon.terminate() == 0
        head = read_log(state_dir)[-1].seq
        assert len(segments.list_segments(state_dir / "events")) > 2
        if where == "last segment":
            seq = segments.list_segments(state_dir / "events")[-1][0] + 1
            assert seq < head  # valid records follow it: damage, not a torn tail
        else:
            seq = 5
            shutil.rmtree(state_dir / "snapshots")  # start-up replays from seq 1
        path, offset = damage(state_dir, seq)

        daemon.spawn()
        assert await exit_code(daemon) == 1
        said = daemon.current_output().strip()
        assert "\n" not in said, said
        assert said.startswith(
            f"sandboxd: the event log is damaged at offset {offset} of {path} (seq {seq}: "
            "checksum mismatch"
        ), said
        assert said.endswith(
            f"and the daemon does not start on a damaged log: `sandboxd log verify --state-dir"
            f" {state_dir}` shows more, and docs/operations.md says what to do"
        ), said
        # The command it names finds the same record.
        code, verified = verify_log(state_dir)
        assert code == 1
        assert verified.startswith(f"bad record: {path} offset {offset} seq {seq}:"), verified
    finally:
        end_daemon(daemon)


async def test_reading_a_damaged_range_a_snapshot_covers_says_where_and_logs_it_once(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    daemon = DaemonProcess(tmp_path, make_config(state_dir, segment_bytes=4096))
    try:
        await daemon.start()
        await make_history(daemon, 10)
        assert await daemon.terminate() == 0  # a snapshot at the head: nothing to replay
        head = read_log(state_dir)[-1].seq
        assert len(segments.list_segments(state_dir / "events")) > 2
        path, offset = damage(state_dir, 5)  # in the first segment, closed
        await daemon.start()  # start-up reads none of the first segment

        said = (
            f"The event log is damaged at seq 5, offset {offset} of segment {path.name} and"
            " cannot be read there; an operator can see more with `sandboxd log verify`."
        )
        for token in (ROOT, TOKENS["alice"], ROOT):
            async with open_client(daemon.url, token) as client:
                # What comes before the damage is served, then the damage is named.
                page = await client.read_events(0)
                assert page.next_after_seq == 4
                with pytest.raises(UnavailableError) as refused:
                    await client.read_events(page.next_after_seq)
                assert refused.value.message == said
        frames: list[dict[str, object]] = []
        await raw_subscription(daemon.url, ROOT, 0, lambda f: any("ended" in x for x in f), frames)
        assert [f["event"]["seq"] for f in frames if "event" in f] == [1, 2, 3, 4]  # type: ignore[index]
        assert frames[-1] == {"subscription": "s1", "ended": True, "reason": said, "last_seq": 4}

        # Past the damage the log reads, and the daemon works on.
        async with open_client(daemon.url, ROOT) as client:
            page = await client.read_events(head - 3)
            seqs = [e.seq for e in page.events]
            assert seqs == list(range(head - 2, head - 2 + len(seqs)))
            assert seqs[-1] > head  # and the new daemon's own events
            await client.start(spec_id="sleep", sandbox_id="after")
        logged = daemon.current_output()
        assert logged.count(f"{path}: bad record at offset {offset} (seq 5)") == 1, logged
        assert "sandboxd log verify" in logged
        assert "Traceback" not in daemon.output()
    finally:
        end_daemon(daemon)
