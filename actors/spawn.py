"""Starting a sandbox's main process from a :class:`Launch`: how to launch it, decided beforehand.

Everything the child is given between fork and exec is a field of ``Launch``,
mapped onto ``subprocess.Popen``'s options in one place (``_popen_options``):
today a session of its own, /dev/null as stdin, the output file as stdout and
stderr, the working dir, the whole environment, and no other descriptor. What
a stricter boundary adds there (joining the sandbox's cgroup, switching to its
own uid and gid, ``PR_SET_NO_NEW_PRIVS``, a umask of 077) becomes more fields
of ``Launch`` and more lines of that function: Popen does ``user``, ``group``,
``extra_groups`` and ``umask`` in the child itself, and what it lacks runs as
its ``preexec_fn``, in the child, before exec.

This module knows nothing of the log, of output files' names or caps, or of
sandboxes: it starts one process and names it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from sandboxd.actors.proctree import MARKER_VAR, ExitStatus, ProcessId, process_id


@attrs.frozen
class Launch:
    """How to start a sandbox's main process.

    ``env`` is the whole environment (nothing is inherited) and must carry
    ``SANDBOX_ID``: without the marker the tree could not be found again.
    """

    command: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str

    def __attrs_post_init__(self) -> None:
        if not self.command:
            raise ValueError("command must not be empty")
        if not self.env.get(MARKER_VAR):
            raise ValueError(f"env must carry {MARKER_VAR}: it is how the process tree is found")


@attrs.frozen(eq=False)
class Child:
    """A sandbox's main process, started by this daemon (so it is our child)."""

    process: trio.Process
    id: ProcessId

    async def wait(self) -> ExitStatus:
        """Wait for the process to exit and reap it. Cancelling leaves it running."""
        return _exit_status(await self.process.wait())


def _exit_status(returncode: int) -> ExitStatus:
    # subprocess encodes "killed by signal N" as -N.
    if returncode < 0:
        return ExitStatus(exit_code=None, signal=-returncode)
    return ExitStatus(exit_code=returncode, signal=None)


def _popen_options(launch: Launch, output: int) -> dict[str, Any]:
    """What the child is given between fork and exec, as Popen's options."""
    return {
        # Its own session and process group: signalled as one, no terminal
        # hangup reaches it, and it never depends on the daemon being alive.
        "start_new_session": True,
        "stdin": subprocess.DEVNULL,
        # Straight into the output file: no pipe that the daemon would have to
        # drain, so a dead or slow daemon never blocks it.
        "stdout": output,
        "stderr": output,
        "cwd": launch.cwd,
        "env": dict(launch.env),
        # close_fds (Popen's default, stated): the daemon's log, sockets and
        # secrets stay out of the sandbox.
        "close_fds": True,
    }


async def spawn(launch: Launch, *, output: int) -> Child:
    """Start ``launch``'s command with ``output`` (an open file descriptor) as stdout and stderr.

    The caller keeps ``output`` and closes it when it likes: the child has its
    own copy. Raises OSError if the command cannot be executed.
    """
    process = await trio.lowlevel.open_process(
        list(launch.command), **_popen_options(launch, output)
    )
    # The child cannot be gone yet: until it is reaped it is at least a zombie,
    # whose start time /proc still shows.
    child = process_id(process.pid)
    if child is None:
        # Unreachable in practice; but nothing may run that the caller cannot name.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise OSError(f"the new process {process.pid} vanished before it could be named")
    return Child(process, child)
