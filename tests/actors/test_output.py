"""A sandbox's output: capped with one rotation while a real child writes, and its tail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
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
    out = sandboxes.output(sandbox_id)
    path = str(out.path)
    rotated = output.rotated_path(path)
    spawned = await sandboxes.spawn(
        child("writer.py"), str(port), "100", sandbox_id=sandbox_id, output_cap_bytes=cap
    )
    # writer.py writes 50 MiB, waits until it sees its file truncated, writes 50 more.
    # Sweep until the first rotation, then stop: the second half stays in the file.
    await eventually(
        lambda: output.cap_outputs([out], cap) > 0 or os.path.exists(rotated), within=30
    )
    # Answering HTTP means it wrote all 100 MiB: nothing ever blocked it.
    assert await health.wait_until_ready(port, "/", timeout=20)

    # The writes after the truncation went to the file's new end (O_APPEND): no
    # hole where the truncated bytes were, the file holds only what came after.
    st = os.stat(path)
    assert st.st_size <= st.st_blocks * 512 + (64 << 10)
    assert st.st_size < 100 << 20

    assert out.cap(cap) is True
    if out.rotates_losslessly:
        # Collapsed in place up to its last whole block: what followed it stays, and
        # the rotation ends exactly where the file begins.
        assert Path(path).read_bytes() == b"written\n"
        assert Path(rotated).read_bytes() == (b"x" * 1023 + b"\n") * (cap // 1024)
    else:
        assert os.stat(path).st_size == 0
        assert os.stat(rotated).st_size <= cap
    data, truncated = out.tail(4096)
    assert truncated
    assert data.endswith("written\n")
    assert spawned.process.returncode is None


def test_cap_rotates_and_tail_reads_across(tmp_path: Path) -> None:
    out = output.OutputDir(tmp_path).file("out")
    path = out.path
    assert out.tail(100) == ("", False)
    assert out.cap(10) is False  # no file yet

    path.write_bytes(b"0123456789abcdefghij")
    assert out.tail(100) == ("0123456789abcdefghij", False)
    assert out.tail(5) == ("fghij", True)
    assert out.cap(30) is False  # under the cap: untouched

    assert out.cap(8) is True
    assert Path(output.rotated_path(str(path))).read_bytes() == b"cdefghij"
    assert path.read_bytes() == b""
    with open(path, "ab") as f:
        f.write(b"XYZ")
    assert out.tail(5) == ("ijXYZ", True)
    # The rotation dropped the start: truncated even when all that is left is shown.
    assert out.tail(100) == ("cdefghijXYZ", True)
    assert out.tail(0) == ("", True)

    out.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert out.tail(100) == ("", False)


def test_tail_drops_a_character_cut_in_half(tmp_path: Path) -> None:
    out = output.OutputDir(tmp_path).file("out")
    out.path.write_bytes("é".encode() * 10)  # 2 bytes each
    assert out.tail(5) == ("éé", True)
    out.path.write_bytes(b"ok \xff\xfe bad")
    assert out.tail(100) == ("ok \ufffd\ufffd bad", False)


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


@pytest.mark.parametrize("swap", ["symlink", "hardlink", "fifo", "directory"])
def test_a_name_the_daemon_cannot_trust_is_never_read_or_truncated(
    tmp_path: Path, swap: str
) -> None:
    # What a restarted daemon finds if a sandbox swapped its output's name meanwhile.
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the sandbox's\n" * 100)
    before = victim.read_bytes()
    outputs = output.OutputDir(tmp_path / "output")
    out = outputs.file("sb")
    if swap == "symlink":
        out.path.symlink_to(victim)
    elif swap == "hardlink":
        os.link(victim, out.path)
    elif swap == "fifo":
        os.mkfifo(out.path)  # opening it to read would wait for ever for a writer
    else:
        out.path.mkdir()
    assert out.tail(100) == ("", False)
    assert out.cap(10) is False
    assert victim.read_bytes() == before

    # The next spawn gets a fresh file of its own in place of the name.
    if swap == "directory":
        out.path.rmdir()
    os.close(out.open_for_child(10))
    assert not out.path.is_symlink() and out.path.stat().st_size == 0
    assert victim.read_bytes() == before
    out.remove()
    assert victim.read_bytes() == before


def test_a_rotation_never_follows_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep\n")
    outputs = output.OutputDir(tmp_path / "output")
    out = outputs.file("sb")
    os.close(out.open_for_child(4))
    # Links planted where the rotation writes: its temporary file and the rotation itself.
    (outputs.path / "sb.log.1.tmp").symlink_to(victim)
    (outputs.path / "sb.log.1").symlink_to(victim)
    assert out.tail(100) == ("", False)  # a linked rotation is not read
    with open(out.path, "ab") as f:
        f.write(b"0123456789")
    assert out.cap(4) is True
    assert victim.read_bytes() == b"keep\n"
    assert out.tail(100) == ("6789", True)


def test_the_output_directory_is_refused_if_it_is_a_link(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "output").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="link"):
        output.OutputDir(tmp_path / "output")
