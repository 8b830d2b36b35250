"""Test support: start sandbox-like processes as the actor does, and always clean up.

Every process gets its own session, /dev/null as stdin, an output file and the
markers in its environment, exactly as the actor gives them through
:func:`sandboxd.actors.spawn.spawn`; each test uses fresh sandbox ids, so
teardown can end everything a test started (by its group while unreaped, by its
marker otherwise) and never anything else.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import uuid
from pathlib import Path

import trio

from sandboxd.actors import health, output, proctree
from sandboxd.actors.ports import PortAllocator
from sandboxd.actors.spawn import Child, Launch, spawn
from tests.support import proc_state

#: Ports for servers the tests start: below Linux's ephemeral range (32768+),
#: so no outgoing connection of another program takes one meanwhile.
PORTS = PortAllocator(20000, 20999)


def free_port() -> int:
    """A free port, from a random start: test runs in parallel rarely pick the same."""
    return PORTS.reserve(preferred=random.randint(PORTS.low, PORTS.high))


CHILDREN = Path(__file__).parent


def child(name: str) -> str:
    """The path of a helper program in this folder."""
    return str(CHILDREN / name)


class Sandboxes:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemon_marker = str(base)
        self.spawned: list[Child] = []
        self.ids: list[str] = []
        self.outputs = output.OutputDir(base)
        self._output_files: dict[str, output.OutputFile] = {}

    def new_id(self) -> str:
        sandbox_id = f"test-{uuid.uuid4().hex[:12]}"
        self.ids.append(sandbox_id)
        return sandbox_id

    def env(self, sandbox_id: str, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONDONTWRITEBYTECODE": "1",
            proctree.MARKER_VAR: sandbox_id,
            proctree.DAEMON_MARKER: self.daemon_marker,
            **extra,
        }

    async def spawn(
        self,
        *args: str,
        sandbox_id: str | None = None,
        env: dict[str, str] | None = None,
        output_cap_bytes: int = 1 << 20,
    ) -> Child:
        """Run ``python ARGS`` as a sandbox's main process."""
        sandbox_id = sandbox_id or self.new_id()
        launch = Launch((sys.executable, *args), env or self.env(sandbox_id), str(self.base))
        fd = self.output(sandbox_id).open_for_child(output_cap_bytes)
        try:
            spawned = await spawn(launch, output=fd)
        finally:
            os.close(fd)
        self.spawned.append(spawned)
        return spawned

    async def agent_server(
        self, *args: str, port: int | None = None, key: str | None = "test-key", **env: str
    ) -> tuple[Child, int]:
        """Start the reference agent server; return once it answers on ``port``.

        ``port`` (a free one if None) is given as PORT unless ``env`` says otherwise.
        """
        port = free_port() if port is None else port
        sandbox_id = self.new_id()
        environ = self.env(sandbox_id, **{"PORT": str(port), **env})
        if key is not None:
            environ["SESSION_API_KEY"] = key
        spawned = await self.spawn(
            "-m", "sandboxd.actors.agent_server", *args, sandbox_id=sandbox_id, env=environ
        )
        assert await health.wait_until_ready(port, "/alive", timeout=10)
        return spawned, port

    def output(self, sandbox_id: str) -> output.OutputFile:
        """The sandbox's output file, as its actor holds it: one per sandbox."""
        if sandbox_id not in self._output_files:
            self._output_files[sandbox_id] = self.outputs.file(sandbox_id)
        return self._output_files[sandbox_id]

    def output_path(self, sandbox_id: str) -> Path:
        return self.base / f"{sandbox_id}.log"

    async def cleanup(self) -> None:
        for spawned in self.spawned:
            # returncode None: alive and not reaped, so its pgid is still its own.
            if spawned.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(spawned.id.pid, signal.SIGKILL)
        for sandbox_id in self.ids:
            for procs in proctree.find_marked(sandbox_id=sandbox_id).values():
                # kill_processes checks each pid still holds the process found.
                await proctree.kill_processes(procs)
        with trio.fail_after(5):
            for spawned in self.spawned:
                await spawned.wait()


def read_pids(path: Path) -> list[int]:
    """The pids a helper wrote to ``path``, one per line (last word of the line)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(line.split()[-1]) for line in text.splitlines() if line.strip()]


def is_gone(pid: int) -> bool:
    return proc_state(pid) in (None, "Z", "X")
