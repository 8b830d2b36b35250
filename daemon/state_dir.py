"""The state dir: private to the daemon's user, and held by one daemon at a time.

Everything the daemon keeps is under one directory (docs/operations.md): the
event log (whose ``start_failed`` reasons quote what sandboxes printed),
snapshots, the secret, the admin token, the sandboxes' output. Each file is
made private where it is made (0600 files, 0700 dirs, by explicit modes, not
by the umask); ``open_state_dir`` makes the state dir and takes the lock, then
takes every permission of group and others away from what is there already:
a state dir made beforehand (``mkdir`` gives 0755), files an older version left.

Where sandboxes run under uids of their own (``run_as`` "dynamic" or a user)
and their working dirs are under the state dir (the default,
``STATE_DIR/sandboxes``), those uids must pass through the state dir to reach
them: then the state dir and ``sandboxes/`` are mode 0711 (others may
traverse, never list), and everything else stays 0700/0600, out of a sandbox's
reach. A sandbox is never told the state dir's path, and could not list it.

Tightened rather than refused: the daemon knows exactly which modes it needs,
and a refusal would only add a step every operator does the same way (``chmod
-R go-rwx``); past exposure is the same either way, and the warning says what
was open, for an operator who wants to act on it. Left alone:

- the sandboxes' working dirs and what is in them: the sandboxes' own files
  (each working dir is made 0700);
- the secret: a secret others could read may be known, and so may every
  session key derived from it; the keys refuse it (naming it) rather than
  carry on with it, and that decision is the operator's.

Symlinks are never followed: a sandbox that runs as the daemon's user (run_as
"daemon") could put one where a file of the daemon was.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from sandboxd.actors.keys import SECRET_FILE

logger = logging.getLogger(__name__)

#: The permissions the daemon keeps: the owner's. Group, others, setuid, setgid and
#: sticky all go.
OWNER_ONLY = 0o700
#: The dirs sandbox uids pass through to their working dirs: traverse, never list.
PASS_THROUGH = 0o711
LOCK_FILE = "daemon.lock"


class StateDirError(Exception):
    """The state dir cannot be used; the message says why and what to do."""


@contextmanager
def open_state_dir(state_dir: Path, sandboxes_dir: Path, *, shared: bool = False) -> Iterator[None]:
    """Make the state dir (0700) if need be, lock it, and make what it holds private.

    ``sandboxes_dir`` (the sandboxes' working dirs) is made too if it is missing;
    what is inside it is left alone. With ``shared`` (sandboxes run under uids
    of their own), ``sandboxes_dir`` and the dirs of the state dir on the way to
    it are 0711, so those uids can reach their working dirs; else 0700.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(state_dir):
        passed = [*_on_the_way(state_dir, sandboxes_dir), sandboxes_dir] if shared else []
        tightened = make_private(
            state_dir,
            keep_out=(sandboxes_dir,),
            leave=(state_dir / SECRET_FILE,),
            pass_through=passed,
        )
        if tightened:
            logger.warning(
                "others could read or enter %d %s in the state dir %s (%s); %s private now",
                len(tightened),
                "path" if len(tightened) == 1 else "paths",
                state_dir,
                ", ".join(tightened[:3]) + (", ..." if len(tightened) > 3 else ""),
                "it is" if len(tightened) == 1 else "they are",
            )
        sandboxes_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in passed:
            _open_for_passing(directory)
        yield


def _on_the_way(state_dir: Path, sandboxes_dir: Path) -> list[Path]:
    """The dirs of the state dir that lead to ``sandboxes_dir``, the state dir first."""
    top, target = Path(os.path.realpath(state_dir)), Path(os.path.realpath(sandboxes_dir))
    if top not in target.parents:
        return []
    return [top, *(p for p in reversed(target.parents) if top in p.parents)]


def _open_for_passing(directory: Path) -> None:
    """Mode 0711: others may pass through to what they own inside, never list it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PASS_THROUGH:
            os.fchmod(fd, PASS_THROUGH)
    finally:
        os.close(fd)


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One daemon per state dir: two writers would interleave one log."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirError(
                f"another sandboxd is running on {state_dir}; stop it or pick another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def make_private(
    state_dir: Path,
    *,
    keep_out: Collection[Path] = (),
    leave: Collection[Path] = (),
    pass_through: Collection[Path] = (),
) -> list[str]:
    """Take group's and others' permissions from ``state_dir`` and every dir and file in it.

    Returns what changed, as ``"path (mode 755)"``, the old mode. The dirs in
    ``keep_out`` are tightened but not entered; the files in ``leave`` are not
    touched; the dirs in ``pass_through`` may keep their search bits (at most
    0711). Symlinks are not followed; sockets, fifos and devices are skipped.
    Raises ``StateDirError`` naming a path that cannot be made private.

    One lstat per entry, and an open only for what must change: on a state
    dir of 1,000 sandboxes (2,000 output files, 100 segments) this takes
    about 9 ms at each start, 22 ms the one time it tightens them all.
    """
    top = os.path.realpath(state_dir)
    not_entered = {os.path.realpath(p) for p in keep_out}
    untouched = {os.path.realpath(p) for p in leave}
    passed = {os.path.realpath(p) for p in pass_through}
    changed: list[str] = []
    for dirpath, dirnames, filenames, dirfd in os.fwalk(top, follow_symlinks=False):
        _tighten(dirfd, dirpath, changed, PASS_THROUGH if dirpath in passed else OWNER_ONLY)
        for name in list(dirnames):
            if os.path.join(dirpath, name) in not_entered:
                dirnames.remove(name)
                filenames.append(name)  # tightened itself, below, like a file
        for name in filenames:
            path = os.path.join(dirpath, name)
            if path in untouched:
                continue
            try:
                found = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile
            allowed = PASS_THROUGH if path in passed else OWNER_ONLY
            if not _needs_tightening(found.st_mode, allowed):
                continue  # already private, or not a file or dir (a symlink is not followed)
            try:
                fd = os.open(name, _OPEN_NO_FOLLOW, dir_fd=dirfd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue  # replaced by a symlink meanwhile
                raise StateDirError(f"cannot make {path} private: {exc}") from None
            try:
                _tighten(fd, path, changed, allowed)
            finally:
                os.close(fd)
    return changed


_OPEN_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _needs_tightening(mode: int, allowed: int = OWNER_ONLY) -> bool:
    return (stat.S_ISDIR(mode) or stat.S_ISREG(mode)) and bool(stat.S_IMODE(mode) & ~allowed)


def _tighten(fd: int, path: str, changed: list[str], allowed: int = OWNER_ONLY) -> None:
    """Tighten the file or dir open at ``fd`` (checked again: it may have been replaced)."""
    mode = os.fstat(fd).st_mode
    if _needs_tightening(mode, allowed):
        permissions = stat.S_IMODE(mode)
        try:
            os.fchmod(fd, permissions & allowed)
        except OSError as exc:
            raise StateDirError(
                f"{path} is open to other users (mode {permissions:o}) and cannot be made "
                f"private: {exc}; remove group and other permissions from it (chmod go-rwx)"
            ) from None
        changed.append(f"{path} (mode {permissions:o})")
