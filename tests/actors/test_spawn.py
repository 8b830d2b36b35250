"""Spawning a sandbox's main process, and waiting for it: real processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
import trio

from sandboxd.actors.proctree import ExitStatus
from sandboxd.actors.spawn import Launch, spawn
from tests.actors.children.support import Sandboxes


async def test_wait_gives_the_exit_code(sandboxes: Sandboxes) -> None:
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn(
        "-c", "import sys; print('bye'); sys.exit(7)", sandbox_id=sandbox_id
    )
    with trio.fail_after(5):
        assert await spawned.wait() == ExitStatus(exit_code=7, signal=None)
    assert sandboxes.output(sandbox_id).tail(1000) == ("bye\n", False)


async def test_wait_gives_the_signal(sandboxes: Sandboxes) -> None:
    spawned = await sandboxes.spawn("-c", "import time; time.sleep(60)")
    os.killpg(spawned.id.pid, signal.SIGKILL)
    with trio.fail_after(5):
        assert await spawned.wait() == ExitStatus(exit_code=None, signal=signal.SIGKILL)


async def test_spawned_process_owns_its_session_and_nothing_else(
    sandboxes: Sandboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXD_TEST_LEAK", "daemon-only")
    sandbox_id = sandboxes.new_id()
    program = (
        "import os, sys\n"
        "print('session', os.getsid(0) == os.getpid() == os.getpgrp())\n"
        "print('stdin', os.readlink('/proc/self/fd/0'))\n"
        "print('leak', 'SANDBOXD_TEST_LEAK' in os.environ)\n"
        "print('marker', os.environ['SANDBOX_ID'])\n"
        "sys.stderr.write('to stderr\\n')\n"
    )
    spawned = await sandboxes.spawn("-c", program, sandbox_id=sandbox_id)
    main = spawned.id
    assert os.getpgid(main.pid) == main.pid
    assert main.create_time == psutil.Process(main.pid).create_time()
    with trio.fail_after(5):
        assert (await spawned.wait()).exit_code == 0
    output = sandboxes.output_path(sandbox_id).read_text()
    assert "session True" in output
    assert "stdin /dev/null" in output
    assert "leak False" in output
    assert f"marker {sandbox_id}" in output
    assert "to stderr" in output  # stdout and stderr share the file


def test_a_launch_refuses_an_environment_without_the_marker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SANDBOX_ID"):
        Launch((sys.executable, "-c", "pass"), {"PATH": os.environ["PATH"]}, str(tmp_path))
    with pytest.raises(ValueError, match="command"):
        Launch((), {"SANDBOX_ID": "x"}, str(tmp_path))


async def test_spawn_of_a_missing_command_raises_oserror(sandboxes: Sandboxes) -> None:
    sandbox_id = sandboxes.new_id()
    launch = Launch(
        ("/nonexistent/sandboxd-test-command",), sandboxes.env(sandbox_id), str(sandboxes.base)
    )
    with open(sandboxes.output_path(sandbox_id), "ab") as out, pytest.raises(FileNotFoundError):
        await spawn(launch, output=out.fileno())
