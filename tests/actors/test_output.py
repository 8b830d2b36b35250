"""A sandbox's output: capped with one rotation while a real child writes, and its tail."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from sandboxd.actors import health, output
from tests.actors.children.support import Sandboxes, child, free_port
from tests.support import eventually


async def test_output_stays_capped_while_a_child_writes_100_mib(
    sandboxes: Sandboxes,
) -> None:
    cap = 1 << 20
    port = free_port()
    sandbox_id = sandboxes.new_id()
    path = str(sandboxes.output_path(sandbox_id))
    rotated = output.rotated_path(path)
    spawned = await sandboxes.spawn(
        child("writer.py"), str(port), "100", sandbox_id=sandbox_id, output_cap_bytes=cap
    )
    # writer.py writes 50 MiB, waits until it sees its file truncated, writes 50 more.
    # Sweep until the first rotation, then stop: the second half stays in the file.
    await eventually(
        lambda: output.cap_outputs([path], cap) > 0 or os.path.exists(rotated), within=30
    )
    # Answering HTTP means it wrote all 100 MiB: nothing ever blocked it.
    assert await health.wait_until_ready(port, "/", timeout=20)

    # The writes after the truncation went to the file's new end (O_APPEND): no
    # hole where the truncated bytes were, the file holds only what came after.
    st = os.stat(path)
    assert st.st_size <= st.st_blocks * 512 + (64 << 10)
    assert st.st_size < 100 << 20

    assert output.cap_output(path, cap) is True
    assert os.stat(path).st_size == 0
    assert os.stat(rotated).st_size <= cap
    data, truncated = output.read_output_tail(path, 4096)
    assert truncated
    assert data.endswith("written\n")
    assert spawned.process.returncode is None


def test_cap_output_rotates_and_read_output_tail_reads_across(tmp_path: Path) -> None:
    path = str(tmp_path / "out.log")
    assert output.read_output_tail(path, 100) == ("", False)
    assert output.cap_output(path, 10) is False  # no file yet

    Path(path).write_bytes(b"0123456789abcdefghij")
    assert output.read_output_tail(path, 100) == ("0123456789abcdefghij", False)
    assert output.read_output_tail(path, 5) == ("fghij", True)
    assert output.cap_output(path, 30) is False  # under the cap: untouched

    assert output.cap_output(path, 8) is True
    assert Path(output.rotated_path(path)).read_bytes() == b"cdefghij"
    assert Path(path).read_bytes() == b""
    with open(path, "ab") as f:
        f.write(b"XYZ")
    assert output.read_output_tail(path, 5) == ("ijXYZ", True)
    # The rotation dropped the start: truncated even when all that is left is shown.
    assert output.read_output_tail(path, 100) == ("cdefghijXYZ", True)


def test_read_output_tail_drops_a_character_cut_in_half(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    path.write_bytes("é".encode() * 10)  # 2 bytes each
    assert output.read_output_tail(str(path), 5) == ("éé", True)
    path.write_bytes(b"ok \xff\xfe bad")
    assert output.read_output_tail(str(path), 100) == ("ok \ufffd\ufffd bad", False)


async def test_spawn_counts_earlier_output_against_the_cap(sandboxes: Sandboxes) -> None:
    sandbox_id = sandboxes.new_id()
    path = sandboxes.output_path(sandbox_id)
    path.write_bytes(b"old\n" * 1000)
    spawned = await sandboxes.spawn(
        "-c", "print('new')", sandbox_id=sandbox_id, output_cap_bytes=100
    )
    with trio.fail_after(5):
        await spawned.wait()
    assert path.read_text() == "new\n"
    assert os.stat(output.rotated_path(str(path))).st_size == 100
