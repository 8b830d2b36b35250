"""Reading a sandbox's output by position: across rotations, to the end after a delete, and
through inotify, with a real child writing as fast as it can across the cap."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.actors import output
from sandboxd.actors.output_follow import CHUNK_BYTES, OutputEnded, OutputFollow, OutputWatcher
from tests.actors.children.support import Sandboxes
from tests.support import eventually


def _read_all(out: output.OutputFile, position: int) -> tuple[bytes, int]:
    """Everything readable from ``position`` on; fails on a loss."""
    parts: list[bytes] = []
    while True:
        chunk = out.read_from(position, 1000)
        assert chunk.lost == 0, chunk
        if not chunk.data:
            return b"".join(parts), chunk.position
        parts.append(chunk.data)
        position = chunk.position


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=9000).map(lambda b: ("write", b)),
            st.just(("cap", b"")),
            st.just(("read", b"")),
        ),
        max_size=30,
    )
)
def test_a_follower_reads_every_byte_once_across_any_rotations(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, bytes]]
) -> None:
    # On the suite's filesystem (ext4 here: rotations collapse the file in place) and on
    # tmpfs (/dev/shm: it cannot, so they copy and truncate), positions stay straight
    # for a follower that keeps up.
    tmpfs = Path(tempfile.mkdtemp(prefix="sandboxd-test-", dir="/dev/shm"))
    try:
        for base, cap in [
            (tmp_path_factory.mktemp("out"), 4096),
            (tmp_path_factory.mktemp("out"), 5000),
            (tmpfs, 5000),
        ]:
            out = output.OutputDir(base).file("sb")
            os.close(out.open_for_child(cap))
            tail, truncated, position = out.tail_to_follow(0)
            assert (tail, truncated, position) == (b"", False, 0)
            written, seen, rotations = b"", b"", 0
            for action, data in steps:
                if action == "write":
                    with open(out.path, "ab") as f:
                        f.write(data)
                    written += data
                elif action == "cap":
                    # The follower reads before each rotation: at most cap + 9000 behind.
                    got, position = _read_all(out, position)
                    seen += got
                    rotations += out.cap(cap)
                else:
                    got, position = _read_all(out, position)
                    seen += got
            got, position = _read_all(out, position)
            assert seen + got == written
            assert position == len(written)
            if base == tmpfs and rotations:
                assert not out.rotates_losslessly
            out.unfollow()
            out.remove()
    finally:
        shutil.rmtree(tmpfs)


def test_a_follower_behind_reads_on_from_the_rotation_then_loses_only_what_is_gone(
    tmp_path: Path,
) -> None:
    out = output.OutputDir(tmp_path).file("sb")
    os.close(out.open_for_child(8192))
    _, _, position = out.tail_to_follow(0)
    block = os.statvfs(tmp_path).f_bsize
    data = bytes(range(256)) * (3 * block // 256) + b"tail"
    out.path.write_bytes(data)
    assert out.cap(block) is True  # 3 blocks + 4 bytes: the first 3 blocks go
    if out.rotates_losslessly:
        assert out.path.read_bytes() == b"tail"
        # Behind by more than the rotation keeps: what is gone is counted, then it goes on.
        chunk = out.read_from(position, 100)
        assert chunk.lost == 2 * block and chunk.data == b""
        got, end = _read_all(out, chunk.position)
        assert got == data[2 * block :] and end == len(data)
    out.unfollow()


def test_removal_waits_for_followers_to_read_to_the_end(tmp_path: Path) -> None:
    out = output.OutputDir(tmp_path).file("sb")
    os.close(out.open_for_child(1 << 20))
    out.path.write_bytes(b"before ")
    _, _, position = out.tail_to_follow(100)
    assert position == 7
    with open(out.path, "ab") as f:
        f.write(b"last words")
    out.remove()
    assert list(tmp_path.iterdir()) == []
    chunk = out.read_from(position, 100)
    assert chunk.data == b"last words" and chunk.removed
    end = out.read_from(chunk.position, 100)
    assert end.data == b"" and end.removed
    out.unfollow()  # the last follower closes the descriptor
    assert out.read_from(chunk.position, 100).removed


def test_the_tail_stops_before_a_character_half_written(tmp_path: Path) -> None:
    out = output.OutputDir(tmp_path).file("sb")
    os.close(out.open_for_child(1 << 20))
    out.path.write_bytes("ab€".encode()[:-1])  # € is 3 bytes: 2 of them so far
    tail, truncated, position = out.tail_to_follow(100)
    assert (tail, truncated, position) == (b"ab", False, 2)
    out.unfollow()


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40), cut=st.integers(0, 200), tail=st.integers(1, 200))
def test_a_tail_and_its_follow_split_text_only_between_characters(
    tmp_path_factory: pytest.TempPathFactory, text: str, cut: int, tail: int
) -> None:
    data = text.encode("utf-8", "surrogatepass")
    cut = min(cut, len(data))
    out = output.OutputDir(tmp_path_factory.mktemp("out")).file("sb")
    os.close(out.open_for_child(1 << 20))
    out.path.write_bytes(data[:cut])  # the child has written this much so far
    head, truncated, position = out.tail_to_follow(tail)
    with open(out.path, "ab") as f:
        f.write(data[cut:])
    rest, _ = _read_all(out, position)
    # What the tail shows and what the follow reads next are whole characters, and
    # together the end of the text, each byte once.
    assert head + rest == data[len(data) - len(head) - len(rest) :]
    assert position + len(rest) == len(data)
    if not truncated:
        assert head + rest == data
    head.decode("utf-8", "surrogatepass")
    rest.decode("utf-8", "surrogatepass")
    out.unfollow()


_WRITER = r"""
import os, sys, time
total, line = int(sys.argv[1]), 0
while total > 0:
    if line % 100 == 0:
        time.sleep(0.002)  # about 2 MB/s: a follower half a second late is still in time
    text = (f"{line:08d} " + "é€" * (line % 7) + "x" * (line % 97) + "\n").encode()
    # Each line in two writes, cut inside a character where it has one.
    cut = len(text) // 2
    os.write(1, text[:cut])
    os.write(1, text[cut:])
    total -= len(text)
    line += 1
os.write(1, b"done\n")
"""


def expected_writer_output(total: int) -> str:
    lines, line = [], 0
    while total > 0:
        text = f"{line:08d} " + "é€" * (line % 7) + "x" * (line % 97) + "\n"
        lines.append(text)
        total -= len(text.encode())
        line += 1
    return "".join(lines) + "done\n"


async def test_a_follow_sees_every_byte_once_while_a_child_writes_across_many_rotations(
    sandboxes: Sandboxes, nursery: trio.Nursery
) -> None:
    cap = 1 << 20
    total = 6 << 20
    sandbox_id = sandboxes.new_id()
    out = sandboxes.output(sandbox_id)
    watcher = OutputWatcher()
    await nursery.start(watcher.run)
    # The file exists (empty) before the child: the follow starts at its beginning.
    os.close(out.open_for_child(cap))
    follow = await OutputFollow.open(out, watcher, 0)
    assert follow.tail == "" and follow.position == 0
    spawned = await sandboxes.spawn(
        "-c", _WRITER, str(total), sandbox_id=sandbox_id, output_cap_bytes=cap
    )
    rotations = 0
    received: list[str] = []

    async def rotate_all_along() -> None:
        nonlocal rotations
        while True:
            rotations += await trio.to_thread.run_sync(out.cap, cap)
            await trio.sleep(0.01)

    async with trio.open_nursery() as rotating:
        rotating.start_soon(rotate_all_along)
        with trio.fail_after(60):
            while not "".join(received[-2:]).endswith("done\n"):
                await follow.wait()
                received.append(await follow.read())
        rotating.cancel_scope.cancel()
    text = "".join(received)
    assert rotations >= 4
    assert out.rotates_losslessly
    assert text == expected_writer_output(total)
    # A chunk, plus at most the 3 bytes of a character the one before it cut.
    assert max(len(part.encode()) for part in received) <= CHUNK_BYTES + 3
    with trio.fail_after(10):
        await spawned.wait()

    # Deleted: the follower reads to the end, then ends with the reason.
    out.remove()
    with pytest.raises(OutputEnded, match="deleted"):
        with trio.fail_after(5):
            while True:
                await follow.wait()
                assert await follow.read() == ""
    follow.close()
    assert len(watcher) == 0


async def test_a_follow_wakes_on_a_write_and_costs_no_wakeup_while_idle(
    sandboxes: Sandboxes, nursery: trio.Nursery
) -> None:
    sandbox_id = sandboxes.new_id()
    out = sandboxes.output(sandbox_id)
    watcher = OutputWatcher()
    await nursery.start(watcher.run)
    os.close(out.open_for_child(1 << 20))
    follow = await OutputFollow.open(out, watcher, 0)
    assert await follow.read() == ""
    woken = trio.Event()

    async def waiter() -> None:
        await follow.wait()
        woken.set()

    nursery.start_soon(waiter)
    await trio.testing.wait_all_tasks_blocked()
    assert not woken.is_set()  # nothing written: it sleeps
    with open(out.path, "ab") as f:
        f.write(b"hi")
    await eventually(woken.is_set, within=5)
    assert await follow.read() == "hi"
    follow.close()


async def test_a_follow_goes_on_across_a_restart_of_the_sandbox(
    sandboxes: Sandboxes, nursery: trio.Nursery
) -> None:
    # A restart spawns the next process through the actor's same OutputFile: the same
    # descriptor, so its followers simply read on. Its earlier output over the cap is
    # rotated at that spawn (open_for_child): positions stay straight across it too.
    sandbox_id = sandboxes.new_id()
    out = sandboxes.output(sandbox_id)
    watcher = OutputWatcher()
    await nursery.start(watcher.run)
    os.close(out.open_for_child(8192))
    follow = await OutputFollow.open(out, watcher, 0)
    code = "import os, sys; os.write(1, sys.argv[1].encode() * int(sys.argv[2]))"
    received = ""
    for round_, (text, count) in enumerate([("a", 10000), ("b", 3), ("c", 20000)]):
        spawned = await sandboxes.spawn(
            "-c", code, text, str(count), sandbox_id=sandbox_id, output_cap_bytes=8192
        )
        with trio.fail_after(10):
            await spawned.wait()
            while received.count(text) < count:
                await follow.wait()
                received += await follow.read()
        assert round_ == 0 or Path(output.rotated_path(str(out.path))).exists()
    assert received == "a" * 10000 + "bbb" + "c" * 20000
    follow.close()


async def test_a_delete_noticed_before_the_last_read_still_ends_the_follow(
    sandboxes: Sandboxes, nursery: trio.Nursery
) -> None:
    # The last words and the delete's unlink come in one batch of the watcher: the read
    # that gets the words begins after both were noticed, so no event is left to wait
    # for. It must end all the same (it hung, once under load).
    out = sandboxes.output(sandboxes.new_id())
    watcher = OutputWatcher()
    await nursery.start(watcher.run)
    os.close(out.open_for_child(1 << 20))
    follow = await OutputFollow.open(out, watcher, 0)
    assert await follow.read() == ""
    with open(out.path, "ab") as f:
        f.write(b"bye\n")
    out.remove()  # no checkpoint between: the watcher sees both at once
    with trio.fail_after(5):
        await follow.wait()
        assert await follow.read() == "bye\n"
        await follow.wait()
        with pytest.raises(OutputEnded, match="deleted"):
            await follow.read()
    follow.close()


class _GatedWatch(output.OutputFile):
    """An output file whose next watch, once added, waits for the test to let it go on."""

    def __init__(self, directory: output.OutputDir, name: str) -> None:
        super().__init__(directory, name)
        self.gate = False
        self.added = threading.Event()
        self.go = threading.Event()

    def watch(self, add_watch: Callable[[str], int]) -> int | None:
        wd = super().watch(add_watch)
        if self.gate:
            self.added.set()
            self.go.wait(10)
        return wd


async def test_a_follower_leaving_while_another_joins_leaves_the_joiner_its_events(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # inotify gives the second follower the first one's watch again; if the first,
    # leaving, removed it from the kernel meanwhile, the second never heard a write.
    out = _GatedWatch(output.OutputDir(tmp_path), "sb.log")
    watcher = OutputWatcher()
    await nursery.start(watcher.run)
    os.close(out.open_for_child(1 << 20))
    first = await OutputFollow.open(out, watcher, 0)
    out.gate = True
    joined: list[OutputFollow] = []

    async def join() -> None:
        joined.append(await OutputFollow.open(out, watcher, 0))

    nursery.start_soon(join)
    await trio.to_thread.run_sync(out.added.wait, 10)  # its watch is added, not yet known
    first.close()
    out.go.set()
    await eventually(lambda: bool(joined))
    second = joined[0]
    assert await second.read() == ""
    with open(out.path, "ab") as f:
        f.write(b"heard")
    with trio.fail_after(5):
        await second.wait()
    assert await second.read() == "heard"
    second.close()
