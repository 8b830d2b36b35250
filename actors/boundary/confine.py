"""Start a sandbox's child already inside its boundary: its cgroups, its uid, no privileges.

Between fork and exec the child, still root, writes itself into each of its
cgroups (so nothing it ever runs starts outside them), sets its rlimits, sets
PR_SET_NO_NEW_PRIVS (no setuid binary, file capability or LSM transition can
give it more than it has), and drops to its uid and gid with no supplementary
groups. subprocess does the rest in C: a new session (its own process group,
no controlling terminal), umask 077, stdin from /dev/null, and every
descriptor but 0, 1 and 2 closed (``close_fds``, which runs after this code:
the cgroup.procs descriptors the child wrote to are closed before exec too).

Why it is built this way (measured on Linux 6.18, this project's CI machine):

- The cgroup.procs files are opened by the daemon, before the fork, and the
  child writes ``0`` ("myself") to those descriptors. So the child needs no
  path lookups, and the write is allowed whatever the child's uid becomes:
  since Linux 5.16 the kernel checks the *opener's* credentials for a
  migration (v2 and v1 alike; verified here: a child that dropped to an
  unprivileged uid can still write 0 to a cgroup.procs its root parent
  opened, and cannot open one itself). The child writes before it drops its
  uid anyway, so older kernels work too.
- The uid switch is done here, not with Popen's ``user=``/``group=``: those run
  before ``preexec_fn`` in CPython 3.11, and the order here (cgroups, rlimits
  as root, then no_new_privs, then the ids) is the one that works on every
  kernel.
- ``preexec_fn`` makes CPython fork instead of vfork: that is the whole cost,
  and it grows with the daemon's memory (bench/boundary.py, on this 2-core VM
  under load: 2.6 ms over a raw spawn for a 29 MB parent, 3.2 ms at 60 MB, the
  daemon's RSS target; the cgroup writes and id changes take microseconds).
  That is within the 5 ms a start may cost over a raw one. A fork server (a
  small single-threaded process forking on the daemon's behalf, measured at
  1.4-1.6 ms) was built and left: it saved about 1.5 ms at the price of a
  second mechanism (exit statuses relayed over a socket, a fallback while it
  restarts). A helper exec (a shell, then setpriv) costs two more execs and
  cannot set every rlimit; clone3(CLONE_INTO_CGROUP) cannot run Python in the
  child.

Why ``preexec_fn`` is acceptable here. It runs in a child forked from a
multi-threaded process (the daemon's trio worker threads), which Python
documents as unsafe: a lock another thread held at the fork stays locked for
ever in the child (the import lock, a logging handler's, malloc's arena). So
the child-side code (:class:`_ChildSetup`) is pre-resolved syscalls only:
functions bound at import (``os.write``, ``resource.setrlimit``, a ctypes
``prctl`` with its argtypes set, ``os.setgroups``/``setresgid``/``setresuid``),
arguments prepared in the parent; no import, no lock, no attribute lookup on a
module another thread may be changing, and nothing allocated that another
thread could hold a lock on (the few small objects come from CPython's own
allocator, which the GIL guards, and the forking thread holds the GIL). Any
failure raises, and subprocess then kills the child before exec and raises in
the parent: nothing runs outside its cgroup or under the wrong uid.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
from collections.abc import Mapping, Sequence

import attrs
import trio

from sandboxd.actors.boundary.identities import Identity

PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
# What the child calls, resolved once here (see _ChildSetup).
_write = os.write
_setrlimit = resource.setrlimit
_setgroups = os.setgroups
_setresgid = os.setresgid
_setresuid = os.setresuid
_get_errno = ctypes.get_errno


def _exists(path: str) -> bool:
    return os.path.exists(path)  # kernfs: answered from memory, no need for a thread


class ConfinementError(Exception):
    """The child could not be placed in its cgroups or take its identity; it never ran."""


@attrs.frozen
class Confinement:
    """Where and as whom a sandbox's child starts.

    ``cgroup_procs``: the cgroup.procs files it joins (SandboxCgroup.procs_files());
    empty under the markers boundary. ``identity``: the uid, gid and groups it
    runs as; None keeps the daemon's own. ``rlimits``: (resource.RLIMIT_*, value)
    pairs, soft and hard alike (boundary/limits.py decides them).
    """

    cgroup_procs: tuple[str, ...] = ()
    identity: Identity | None = None
    rlimits: tuple[tuple[int, int], ...] = ()
    umask: int = 0o077


class _ChildSetup:
    """subprocess's ``preexec_fn``: runs in the child, between fork and exec.

    Everything it touches is prepared in the parent (see the module's docstring
    for why): descriptors, the (soft, hard) tuples, the group list.
    """

    __slots__ = ("_fds", "_gid", "_groups", "_rlimits", "_uid")

    def __init__(
        self, fds: Sequence[int], identity: Identity | None, rlimits: Sequence[tuple[int, int]]
    ) -> None:
        self._fds = tuple(fds)
        self._rlimits = tuple((which, (value, value)) for which, value in rlimits)
        self._uid = identity.uid if identity else -1
        self._gid = identity.gid if identity else -1
        self._groups = list(identity.groups) if identity else []

    def __call__(self) -> None:
        # Only module-level names bound at import: no import, no attribute lookups
        # on modules whose state another thread could have been changing.
        for fd in self._fds:
            _write(fd, b"0")
        for which, limits in self._rlimits:
            _setrlimit(which, limits)
        if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(_get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if self._uid >= 0:
            _setgroups(self._groups)
            _setresgid(self._gid, self._gid, self._gid)
            _setresuid(self._uid, self._uid, self._uid)


async def open_confined_process(
    command: Sequence[str],
    *,
    confinement: Confinement,
    env: Mapping[str, str],
    cwd: str,
    stdout: int,
    stderr: int,
) -> trio.Process:
    """Start ``command`` confined: in its cgroups, as its identity, in a new session.

    ``env`` is the whole environment (nothing is inherited); ``stdout`` and
    ``stderr`` are descriptors the caller opened (and closes after). stdin is
    /dev/null. Raises ConfinementError if the child could not be placed (it
    never ran), OSError if the command cannot be executed.
    """
    identity = confinement.identity
    euid = os.geteuid()
    if identity is not None and euid != 0 and identity.uid != euid:
        raise ConfinementError(
            f"cannot run a sandbox as uid {identity.uid}: the daemon runs as uid {euid}, not root"
        )
    fds: list[int] = []
    try:
        for path in confinement.cgroup_procs:
            try:
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise ConfinementError(f"cannot open {path}: {exc.strerror}") from exc
        setup = _ChildSetup(fds, identity, confinement.rlimits)
        try:
            return await trio.lowlevel.open_process(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
                umask=confinement.umask,
                preexec_fn=setup,
            )
        except subprocess.SubprocessError as exc:
            # CPython passes only "Exception occurred in preexec_fn" back: say what was tried.
            who = f"uid {identity.uid} gid {identity.gid}" if identity else f"uid {euid}"
            gone = [p for p in confinement.cgroup_procs if not _exists(p)]
            detail = f" ({', '.join(gone)} no longer exist)" if gone else ""
            raise ConfinementError(
                f"the child could not join {len(fds)} cgroup(s){detail}, set its rlimits "
                f"or become {who}; it did not run"
            ) from exc
    finally:
        for fd in fds:
            os.close(fd)
