"""The state dir: made private whatever was there before, symlinks never followed, one daemon.

The whole daemon on a state dir made beforehand is in tests/e2e/test_state_dir.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandboxd.state_dir import StateDirError, make_private, open_state_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_every_dir_and_file_loses_group_and_other_permissions(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "events").mkdir(parents=True)
    (state / "events" / "00000000000000000001.log").write_bytes(b"SBXLOG")
    (state / "snapshots").mkdir()
    (state / "daemon.lock").write_text("1\n")
    odd = state / "owner-only-read"
    odd.write_text("x")
    for path, loose in (
        (state, 0o2755),  # setgid, as under a shared parent
        (state / "events", 0o777),
        (state / "events" / "00000000000000000001.log", 0o644),
        (state / "snapshots", 0o750),
        (state / "daemon.lock", 0o666),
        (odd, 0o444),
    ):
        os.chmod(path, loose)

    changed = make_private(state)

    assert {mode(p) for p in (state, state / "events", state / "snapshots")} == {0o700}
    assert mode(state / "events" / "00000000000000000001.log") == 0o600
    assert mode(state / "daemon.lock") == 0o600
    assert mode(odd) == 0o400  # the owner's permissions are kept, not widened
    assert f"{state} (mode 2755)" in changed
    assert f"{state / 'events' / '00000000000000000001.log'} (mode 644)" in changed
    assert len(changed) == 6
    assert make_private(state) == []  # nothing left to do


def test_symlinks_are_not_followed_and_special_files_are_skipped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "output").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the daemon's")
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    (outside_dir / "inner").write_text("x")
    for path in (outside, outside_dir / "inner"):
        os.chmod(path, 0o644)
    os.chmod(outside_dir, 0o755)
    # What a sandbox running as the daemon's user could leave where its output file was.
    (state / "output" / "a.log").symlink_to(outside)
    (state / "output" / "b").symlink_to(outside_dir)
    fifo = state / "output" / "fifo"
    os.mkfifo(fifo)  # opening it to read would block
    os.chmod(fifo, 0o666)

    make_private(state)

    assert mode(outside) == 0o644
    assert mode(outside_dir) == 0o755
    assert mode(outside_dir / "inner") == 0o644
    assert mode(fifo) == 0o666


def test_what_sandboxes_keep_and_the_secret_are_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    working_dir = state / "sandboxes" / "s1"
    working_dir.mkdir(parents=True)
    (working_dir / "notes.txt").write_text("the sandbox's own")
    secret = state / "secret"
    secret.write_bytes(bytes(32))
    for path, loose in (
        (state / "sandboxes", 0o755),
        (working_dir, 0o755),
        (working_dir / "notes.txt", 0o644),
        (secret, 0o644),
    ):
        os.chmod(path, loose)

    make_private(state, keep_out=[state / "sandboxes"], leave=[secret])

    assert mode(state / "sandboxes") == 0o700  # tightened, not entered
    assert mode(working_dir) == 0o755
    assert mode(working_dir / "notes.txt") == 0o644
    assert mode(secret) == 0o644  # the keys refuse it, naming it (tests/actors/test_keys.py)


def test_open_state_dir_makes_it_private_and_holds_it_for_one_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    with open_state_dir(state, state / "sandboxes"):
        assert mode(state) == 0o700
        assert mode(state / "sandboxes") == 0o700
        assert mode(state / "daemon.lock") == 0o600
        assert (state / "daemon.lock").read_text() == f"{os.getpid()}\n"
        with (
            pytest.raises(StateDirError, match="another sandboxd is running on"),
            open_state_dir(state, state / "sandboxes"),
        ):
            pass
    with open_state_dir(state, state / "sandboxes"):  # free again
        pass
