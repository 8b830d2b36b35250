"""Everything the daemon keeps is private, on a state dir made beforehand and open to all.

The daemon runs with umask 0, so every mode checked is the daemon's own choice,
not the umask's. What is checked is every path under the state dir, read from
the outside after a real `sandboxd serve` made them: the log (whose
start_failed reasons quote sandboxes' output), snapshots, the secret, the
lock, the sandboxes' output, their working dirs. Where sandboxes run under
uids of their own (as root, the default), the state dir and ``sandboxes/``
let them pass to their working dirs (0711: traverse, never list); nothing
else is open to them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandboxd.gateway.client import open_client
from tests.daemon_process import DaemonProcess, reachable_dir
from tests.e2e.support import ROOT, end_daemon, make_config
from tests.support import eventually

#: Sandboxes run under uids of their own: the way to their working dirs is open to pass.
ISOLATED = os.geteuid() == 0


def not_private(state_dir: Path, *, sandboxes_own: tuple[str, ...] = ()) -> dict[str, str]:
    """Every path under ``state_dir`` (and it) that is not a 0700 dir or a 0600 file,
    by its name relative to ``state_dir``, but for the sandboxes' own files (and the way
    to them: the state dir and sandboxes/ are 0711 where sandboxes have uids of their own)."""
    passed = {".", "sandboxes"} if ISOLATED else set()
    wrong = {}
    for path in [state_dir, *state_dir.rglob("*")]:
        name = str(path.relative_to(state_dir))
        if name in sandboxes_own:
            continue
        mode = path.lstat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            wrong[name] = stat.filemode(mode)
            continue
        want = 0o711 if name in passed else 0o700 if stat.S_ISDIR(mode) else 0o600
        if stat.S_IMODE(mode) != want:
            wrong[name] = f"{stat.S_IMODE(mode):o}, not {want:o}"
    return wrong


async def test_a_state_dir_made_beforehand_open_to_all_is_made_private(tmp_path: Path) -> None:
    # Where sandbox uids can reach their working dirs in it (pytest's tmp dirs are 0700).
    state_dir = reachable_dir("state-") / "state"
    state_dir.mkdir()
    os.chmod(state_dir, 0o755)  # what `mkdir` (or an installer) leaves
    config = make_config(state_dir, snapshot_every=4, base_working_dir=None)
    daemon = DaemonProcess(tmp_path, config, umask=0)
    try:
        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            sandbox = await client.start(spec_id="sleep", sandbox_id="s1")
            await client.pause(sandbox.id)
            await client.resume(sandbox.id)
            await client.start(spec_id="sleep", sandbox_id="s2")
        assert await daemon.terminate() == 0  # and a shutdown snapshot
        names = {str(path.relative_to(state_dir)) for path in state_dir.rglob("*")}
        for made in (
            "daemon.lock",
            "secret",
            "events/00000000000000000001.log",
            "output/s1.log",
            "sandboxes/s1",
        ):
            assert made in names, names
        assert any(name.startswith("snapshots/") for name in names), names
        assert not_private(state_dir) == {}

        # What an older version left: the log and snapshots open to all. A sandbox's own
        # file in its working dir stays as the sandbox made it.
        for name in ("events", "snapshots", "output", "sandboxes"):
            os.chmod(state_dir / name, 0o755)
        for path in [*state_dir.glob("events/*"), *state_dir.glob("snapshots/*")]:
            os.chmod(path, 0o644)
        own = state_dir / "sandboxes" / "s1" / "notes.txt"
        own.write_text("the sandbox's")
        os.chmod(own, 0o644)
        await daemon.start()
        assert not_private(state_dir, sandboxes_own=("sandboxes/s1/notes.txt",)) == {}
        assert stat.S_IMODE(own.stat().st_mode) == 0o644
        if ISOLATED:  # the working dir is its sandbox's, and only its
            s1 = (state_dir / "sandboxes" / "s1").stat()
            assert s1.st_uid not in (0, os.geteuid()) and s1.st_gid == s1.st_uid
        assert f"in the state dir {state_dir}" in daemon.current_output()
        assert "they are private now" in daemon.current_output()
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()


async def test_a_secret_others_could_read_stops_the_start_in_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    secret = state_dir / "secret"
    secret.write_bytes(os.urandom(32))
    os.chmod(secret, 0o644)  # its keys may be known: a person decides, not the daemon
    daemon = DaemonProcess(tmp_path, make_config(state_dir))
    try:
        daemon.spawn()
        process = daemon.process
        assert process is not None
        await eventually(lambda: process.poll() is not None, what="the daemon to give up")
        assert process.returncode == 1
        last = daemon.current_output().strip().splitlines()[-1]
        assert (
            last == f"sandboxd: {secret} is accessible to other users (mode 644); make it mode 0600"
        )
        assert "Traceback" not in daemon.output()
        assert stat.S_IMODE(secret.stat().st_mode) == 0o644
    finally:
        end_daemon(daemon)


async def test_working_dirs_sandbox_uids_cannot_reach_stop_the_start_in_one_line(
    tmp_path: Path,
) -> None:
    # The state dir under pytest's tmp dirs (0700), the working dirs in it: no sandbox uid
    # could ever enter its own, so the daemon refuses to start, saying which key and where.
    if not ISOLATED:
        pytest.skip("only a daemon running as root gives sandboxes uids of their own")
    state_dir = tmp_path / "state"
    daemon = DaemonProcess(tmp_path, make_config(state_dir, base_working_dir=None))
    try:
        daemon.spawn()
        process = daemon.process
        assert process is not None
        await eventually(lambda: process.poll() is not None, what="the daemon to give up")
        assert process.returncode == 1
        last = daemon.current_output().strip().splitlines()[-1]
        blocked = next(p for p in reversed(tmp_path.parents) if not p.stat().st_mode & 0o001)
        assert last.startswith(f"sandboxd: sandboxes.base_working_dir {state_dir / 'sandboxes'}")
        assert f"{blocked} is mode 0700" in last
        assert "Traceback" not in daemon.output()
    finally:
        end_daemon(daemon)
