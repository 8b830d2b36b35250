"""The fork server's own program: ``python -I -S _forkserver_main.py FD``.

Standard library only and run without site (``-S``), so it stays a few
megabytes: forking it costs a fraction of forking the daemon. It is
single-threaded, so the child it forks may run Python before exec without any
of the hazards of ``preexec_fn`` in a threaded process.

Protocol on the SOCK_SEQPACKET socket FD (one message per datagram, JSON):

- request: ``{"id", "argv", "env", "cwd", "uid", "gid", "groups", "rlimits",
  "umask"}`` with SCM_RIGHTS descriptors ``[stdout, stderr, cgroup.procs...]``;
- reply: ``{"id", "pid"}`` once the child has exec'd, or ``{"id", "error",
  "errno"}`` if it could not (it never ran);
- ``{"exit", "returncode"}`` when a child ends (subprocess's convention: -N for
  a signal), always after the reply that named its pid.

EOF on the socket (the daemon is gone) ends the server; its children go on
running, reparented, as a sandbox outlives a crashed daemon anyway.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
from typing import Any, NoReturn

PR_SET_NO_NEW_PRIVS = 38
MAX_FDS = 3 + 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


def child(request: dict[str, Any], fds: list[int], error_w: int) -> NoReturn:
    """In the forked child: take its place, then exec. Never returns.

    On failure it writes ``{"errno", "error", "step"}`` to ``error_w``; the step
    tells the daemon whether the command (exec, cwd) or the placement failed.
    """
    step = "session"
    try:
        os.setsid()
        os.umask(request["umask"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        step = "cgroup"
        for fd in fds[2:]:
            os.write(fd, b"0")  # into each cgroup, while still root
        step = "rlimit"
        for which, value in request["rlimits"]:
            resource.setrlimit(which, (value, value))
        step = "no_new_privs"
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        step = "identity"
        if request["uid"] >= 0:
            os.setgroups(request["groups"])
            os.setresgid(request["gid"], request["gid"], request["gid"])
            os.setresuid(request["uid"], request["uid"], request["uid"])
        step = "cwd"  # as the sandbox's uid: a dir it cannot enter is its problem to see
        os.chdir(request["cwd"])
        step = "signals"
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # Python and this server changed these
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.closerange(3, error_w)
        os.closerange(error_w + 1, 1 << 20)
        step = "exec"
        os.execvpe(request["argv"][0], request["argv"], request["env"])
    except BaseException as exc:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        report = {"errno": code, "error": message, "step": step}
        os.write(error_w, json.dumps(report).encode())
    finally:
        os._exit(127)


def handle(sock: socket.socket, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(error_r)
        os.close(error_w)
        return {"id": request["id"], "errno": exc.errno, "error": f"fork: {exc.strerror}"}
    if pid == 0:
        sock.close()
        os.close(error_r)
        child(request, fds, error_w)
    os.close(error_w)
    chunks = []
    while chunk := os.read(error_r, 4096):  # EOF at exec (close-on-exec), or the error
        chunks.append(chunk)
    os.close(error_r)
    if chunks:
        os.waitpid(pid, 0)  # it failed before exec: reap it here, no exit notice
        failure = json.loads(b"".join(chunks))
        return {"id": request["id"], **failure}
    return {"id": request["id"], "pid": pid}


def reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        sock.send(json.dumps({"exit": pid, "returncode": code}).encode())


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the daemon's to act on
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    break
            reap(sock)
        if sock.fileno() in ready:
            try:
                message, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
            except InterruptedError:
                continue
            if not message:
                return  # the daemon is gone
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            try:
                reply = handle(sock, json.loads(message), list(fds))
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(json.dumps(reply).encode())
            reap(sock)


if __name__ == "__main__":
    main()
