"""Everything the daemon keeps is private, on a state dir made beforehand and open to all.

The daemon runs with umask 0, so every mode checked is the daemon's own choice,
not the umask's. What is checked is every path under the state dir, read from
the outside after a real `sandboxd serve` made them: the log (whose
start_failed reasons quote sandboxes' output), snapshots, the secret, the
lock, the sandboxes' output, their working dirs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sandboxd.gateway.client import open_client
from tests.daemon_process import DaemonProcess
from tests.e2e.support import ROOT, end_daemon, make_config
from tests.support import eventually


def not_private(state_dir: Path, *, sandboxes_own: tuple[str, ...] = ()) -> dict[str, str]:
    """Every path under ``state_dir`` (and it) that is not a 0700 dir or a 0600 file,
    by its name relative to ``state_dir``, but for the sandboxes' own files."""
    wrong = {}
    for path in [state_dir, *state_dir.rglob("*")]:
        name = str(path.relative_to(state_dir))
        if name in sandboxes_own:
            continue
        mode = path.lstat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            wrong[name] = stat.filemode(mode)
            continue
        want = 0o700 if stat.S_ISDIR(mode) else 0o600
        if stat.S_IMODE(mode) != want:
            wrong[name] = f"{stat.S_IMODE(mode):o}, not {want:o}"
    return wrong


async def test_a_state_dir_made_beforehand_open_to_all_is_made_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.chmod(state_dir, 0o755)  # what `mkdir` (or an installer) leaves
    config = make_config(state_dir, snapshot_every=4)
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
