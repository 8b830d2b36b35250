"""A fork server: a small process that forks every sandbox's child, for a constant spawn cost.

Why: a child that must join its cgroups and drop to its uid between fork and
exec needs code run in the child, and CPython then forks instead of vforking
(actors/confine.py). Fork copies the page tables of the forking process: on
this project's VMs that costs 2.6 ms over a raw spawn for a 60 MB daemon on a
quiet machine and 6-22 ms on a loaded one (bench/boundary.py), growing with the
daemon's memory. Forking from this 12 MB server instead costs about 1 ms over
the raw spawn on a quiet machine (3.7-6.9 ms loaded), whatever the daemon's
size (docs/boundary.md). And the server is single-threaded, so its child can
run Python before exec with none of the hazards of ``preexec_fn`` in a
threaded daemon.

The price: a sandbox's main process is the server's child, not the daemon's.
The server reaps it and sends its exit status back (:meth:`ServedProcess.wait`
returns it as subprocess would: the exit code, or -N for signal N). If the
server dies, the daemon still sees its children end (by pidfd) but not how;
``wait`` then answers None, as for a process adopted after a restart, and
:meth:`ForkServer.spawn` fails until a new server is started. If the daemon
dies, the server sees EOF and exits, and the sandboxes go on running,
reparented, to be adopted by the next daemon as today.

Same placement as :func:`sandboxd.actors.confine.open_confined_process`
(cgroups, rlimits, no_new_privs, uid, umask 077, new session, stdin /dev/null,
only descriptors 0-2) from the same :class:`Confinement`.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from sandboxd.actors.confine import Confinement, ConfinementError

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_forkserver_main.py")


class ServedProcess:
    """A sandbox's main process, forked by the fork server."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid = pid
        #: how it ended, once known: the exit code, -N for signal N; None while it
        #: runs, and for good if the fork server died before it could tell
        self.returncode: int | None = None
        self._server = server
        self._done = trio.Event()

    def __repr__(self) -> str:
        return f"<ServedProcess {self.pid} returncode={self.returncode}>"

    def _exited(self, returncode: int | None) -> None:
        self.returncode = returncode
        self._done.set()

    async def wait(self) -> int | None:
        """Wait until it has ended; its returncode (None if the server could not tell)."""
        await self._done.wait()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal it if it still runs (a pidfd: never a later process with the same pid)."""
        if self._done.is_set():
            return
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
        finally:
            os.close(fd)


class ForkServer:
    """The daemon's side of the fork server. Run :meth:`run` in a nursery, then spawn."""

    def __init__(self) -> None:
        self._sock: trio.socket.SocketType | None = None
        self._process: trio.Process | None = None
        self._ids = itertools.count(1)
        # request id -> (set once answered, [the ServedProcess, or the failure])
        self._pending: dict[int, tuple[trio.Event, list[ServedProcess | dict[str, Any]]]] = {}
        self._running: dict[int, ServedProcess] = {}
        self._send_lock = trio.Lock()
        self._dead: str | None = "the fork server has not started"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the server and relay its messages until cancelled (then it exits)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-S", SERVER, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # no terminal signal reaches it
            )
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        self._dead = None
        task_status.started()
        try:
            await self._relay()
        finally:
            self._sock.close()  # EOF: the server exits, its children keep running
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._process.wait()
            self._fail_all("the fork server stopped")

    async def _relay(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = await self._sock.recv(1 << 16)
            except OSError:  # ECONNRESET: it died with messages unread
                return
            if not data:
                return
            message = json.loads(data)
            if "exit" in message:
                process = self._running.pop(message["exit"], None)
                if process is not None:
                    process._exited(message["returncode"])
                continue
            waiter = self._pending.pop(message["id"], None)
            if waiter is None:
                continue
            done, box = waiter
            if "pid" in message:
                # Registered here, before the next message is read: its exit notice
                # may be the very next one.
                process = ServedProcess(message["pid"], self)
                self._running[process.pid] = process
                box.append(process)
            else:
                box.append(message)
            done.set()

    def _fail_all(self, why: str) -> None:
        self._dead = why
        for event, box in self._pending.values():
            box.append({"error": why, "errno": 0})
            event.set()
        self._pending.clear()
        orphans, self._running = self._running, {}
        for process in orphans.values():
            # Reparented now: its end is still seen (pidfd), but not its status.
            trio.lowlevel.spawn_system_task(_wait_unknown, process)

    async def spawn(
        self,
        command: Sequence[str],
        *,
        confinement: Confinement,
        env: Mapping[str, str],
        cwd: str,
        stdout: int,
        stderr: int,
    ) -> ServedProcess:
        """Start ``command`` confined, as open_confined_process does; return once it exec'd.

        Raises ConfinementError if it could not be placed or the server is down,
        OSError (FileNotFoundError, PermissionError...) if the command cannot be
        executed. It never runs in either case.
        """
        if self._dead is not None or self._sock is None:
            raise ConfinementError(f"cannot start the child: {self._dead}")
        identity = confinement.identity
        request_id = next(self._ids)
        request: dict[str, Any] = {
            "id": request_id,
            "argv": list(command),
            "env": dict(env),
            "cwd": cwd,
            "uid": identity.uid if identity else -1,
            "gid": identity.gid if identity else -1,
            "groups": list(identity.groups) if identity else [],
            "rlimits": [list(pair) for pair in confinement.rlimits],
            "umask": confinement.umask,
        }
        fds = [stdout, stderr]
        try:
            for path in confinement.cgroup_procs:
                try:
                    fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
                except OSError as exc:
                    raise ConfinementError(f"cannot open {path}: {exc.strerror}") from exc
            done = trio.Event()
            box: list[ServedProcess | dict[str, Any]] = []
            self._pending[request_id] = (done, box)
            try:
                async with self._send_lock:
                    await self._sock.sendmsg(
                        [json.dumps(request).encode()],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    )
            except OSError as exc:
                self._pending.pop(request_id, None)
                raise ConfinementError(f"the fork server is gone: {exc.strerror}") from exc
        finally:
            for fd in fds[2:]:
                os.close(fd)
        await done.wait()
        reply = box[0]
        if isinstance(reply, ServedProcess):
            return reply
        code, message, step = reply.get("errno", 0), reply["error"], reply.get("step")
        if step in ("exec", "cwd") and code:
            # As subprocess does: FileNotFoundError, PermissionError... for the command.
            target = command[0] if step == "exec" else cwd
            raise OSError(code, message, target)
        raise ConfinementError(
            f"the child could not take its place ({step}: {message}); it did not run"
        )


async def _wait_unknown(process: ServedProcess) -> None:
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        process._exited(None)
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    process._exited(None)
