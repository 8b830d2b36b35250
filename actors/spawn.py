"""Starting a sandbox's main process from a :class:`Launch`: how to launch it, decided beforehand.

Everything the child is given between fork and exec is a field of ``Launch``:
a session of its own, /dev/null as stdin, the output file as stdout and
stderr, the working dir, the whole environment, no other descriptor, a umask
of 077, and its boundary (``Confinement``): the cgroups it joins before it
runs anything, the uid it runs under, its rlimits, and ``PR_SET_NO_NEW_PRIVS``.
The confined primitive (actors/boundary/confine.py) does all of it in one
fork.

This module knows nothing of the log, of output files' names or caps, or of
sandboxes: it starts one process and names it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping

import attrs
import trio

from sandboxd.actors.boundary.confine import Confinement, open_confined_process
from sandboxd.actors.proctree import MARKER_VAR, ExitStatus, ProcessId, process_id


@attrs.frozen
class Launch:
    """How to start a sandbox's main process.

    ``env`` is the whole environment (nothing is inherited). A process that
    joins no cgroup must carry ``SANDBOX_ID``: under the markers boundary that
    is how its tree is found again.
    """

    command: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    confinement: Confinement = attrs.Factory(Confinement)

    def __attrs_post_init__(self) -> None:
        if not self.command:
            raise ValueError("command must not be empty")
        if not self.confinement.cgroup_procs and not self.env.get(MARKER_VAR):
            raise ValueError(
                f"env must carry {MARKER_VAR} when no cgroup holds the process: it is how "
                "the process tree is found"
            )


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


async def spawn(launch: Launch, *, output: int) -> Child:
    """Start ``launch``'s command with ``output`` (an open file descriptor) as stdout and stderr.

    Straight into the output file: no pipe that the daemon would have to drain,
    so a dead or slow daemon never blocks the child. The caller keeps
    ``output`` and closes it when it likes: the child has its own copy.
    Raises OSError if the command cannot be executed, ConfinementError if the
    child could not take its place (it never ran).
    """
    process = await open_confined_process(
        launch.command,
        confinement=launch.confinement,
        env=launch.env,
        cwd=launch.cwd,
        stdout=output,
        stderr=output,
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
