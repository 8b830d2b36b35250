"""A sandbox's working dir: made private to its uid, and removed whatever the sandbox did to it.

Made: mode 0700, owned by the sandbox's uid and gid, so no other sandbox can
list, read or write it. The directory it sits in (``base_working_dir``) is the
daemon's, mode 0711: every sandbox can pass through it to its own dir, none
can list it or make anything in it (:func:`make_base_dir`, and
:func:`unreachable` says which ancestor stops sandbox users from getting
there at all, such as /root at 0700).

Removed (:func:`remove_tree`): every entry is reached through the descriptor
of its directory and never through a path, so no symlink the sandbox left is
ever followed out of the tree (a link is unlinked, never opened); a
directory is opened with O_NOFOLLOW and checked to be the one just listed; a
directory made unreadable (chmod 000) is given back its mode first; an
immutable or append-only flag (``chattr +i``/``+a``, which only root can set:
a sandbox running as root with ``run_as = "daemon"``) is cleared when it
blocks a removal. It walks with one directory descriptor open at a time and
no recursion, so a tree nested thousands deep removes like a flat one
(shutil.rmtree keeps a descriptor and a Python frame per level).

Blocking file-system work: run it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

import attrs

from sandboxd.actors.boundary.identities import Identity

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_base_dir(path: Path | str) -> None:
    """Make (or tighten) the directory working dirs sit in: the daemon's, mode 0711."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fchmod(fd, 0o711)
    finally:
        os.close(fd)


def unreachable(path: Path | str) -> str | None:
    """Why users other than the daemon's cannot reach ``path``, or None if they can.

    Each ancestor must let others pass (o+x). The answer is one sentence naming
    the first one that does not.
    """
    current = Path(os.path.abspath(path))
    for ancestor in reversed(current.parents):
        try:
            mode = os.stat(ancestor).st_mode
        except OSError as exc:
            return f"{ancestor} cannot be read: {exc.strerror}"
        if not mode & stat.S_IXOTH:
            return (
                f"{ancestor} is mode {stat.S_IMODE(mode):04o}: sandbox users cannot pass through "
                f"it to reach {path}"
            )
    return None


def make_working_dir(path: Path | str, identity: Identity | None) -> None:
    """Make the sandbox's working dir, mode 0700, owned by ``identity`` (or the daemon).

    An existing one (a sandbox started again) is given the same owner and mode.
    Its parent must exist and be the daemon's: the last component is not followed
    if it is a link.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = os.open(path, _DIR_FLAGS)
    try:
        if identity is not None:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (identity.uid, identity.gid):
                os.fchown(fd, identity.uid, identity.gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


# -- removal -------------------------------------------------------------------------------


class RemoveError(OSError):
    """The tree could not be removed; the message names the entry and why."""


@attrs.define
class _Frame:
    """One directory on the way down: its name in its parent, identity, subdirs left."""

    name: str
    dev: int
    ino: int
    subdirs: list[str]


def remove_tree(path: Path | str) -> None:
    """Remove ``path`` and everything under it, never following a link; absent is fine.

    Raises RemoveError when an entry cannot be removed even after fixing its
    mode and clearing its flags (a mount point, a flag set without the rights
    to clear it).
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    # O_PATH: the base dir (0711) need not be readable, only passable, to work in it.
    try:
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # no parent, no tree

    try:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            _remove_dir(parent_fd, name, st)
        else:
            _unlink(parent_fd, name)
    finally:
        os.close(parent_fd)


def _remove_dir(top_parent_fd: int, top_name: str, top_st: os.stat_result) -> None:
    fd = _open_dir(top_parent_fd, top_name, top_st)
    frames = [_Frame(top_name, top_st.st_dev, top_st.st_ino, _empty_files(fd))]
    try:
        while frames:
            frame = frames[-1]
            if frame.subdirs:
                name = frame.subdirs.pop()
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    _unlink(fd, name)
                    continue
                child = _open_dir(fd, name, st)
                os.close(fd)
                fd = child
                frames.append(_Frame(name, st.st_dev, st.st_ino, _empty_files(fd)))
                continue
            frames.pop()
            if not frames:
                break
            # Up through "..", checked to be the directory we came down from.
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            st = os.fstat(up)
            if (st.st_dev, st.st_ino) != (frames[-1].dev, frames[-1].ino):
                os.close(up)
                raise RemoveError(errno.ESTALE, f"{frame.name}: moved while being removed")
            os.close(fd)
            fd = up
            _rmdir(fd, frame.name)
    finally:
        os.close(fd)
    _rmdir(top_parent_fd, top_name)


def _open_dir(parent_fd: int, name: str, st: os.stat_result) -> int:
    """Open a subdirectory just listed, fixing a mode that locks its owner out."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        # chmod 000 by its owner; root passes anyway, the owner needs its rights back.
        os.chmod(name, 0o700, dir_fd=parent_fd, follow_symlinks=False)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise RemoveError(errno.ESTALE, f"{name}: replaced while being removed")
    _owner_rights(fd)
    return fd


def _owner_rights(fd: int) -> None:
    """Give the directory's owner back read, write and search (u+rwx), nothing else.

    Root needs none of it; an owner that is not root does, to list and unlink.
    Other bits stay, so the base dir's 0711 is never touched.
    """
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & stat.S_IRWXU != stat.S_IRWXU:
        os.fchmod(fd, mode | stat.S_IRWXU)


def _empty_files(fd: int) -> list[str]:
    """Unlink every entry of the directory but subdirectories; return those."""
    subdirs = []
    with os.scandir(fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        if is_dir:
            subdirs.append(name)
        else:
            _unlink(fd, name)
    return subdirs


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except PermissionError:
        pass
    # EPERM: the entry or its directory is immutable or append-only; EACCES: the
    # directory lost its write bit (an owner that is not root).
    _clear_flags(dir_fd)
    _clear_flags_of(dir_fd, name)
    _owner_rights(dir_fd)
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise RemoveError(exc.errno, f"cannot remove {name}: {exc.strerror}") from exc


def _rmdir(parent_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    except PermissionError:
        pass
    _clear_flags(parent_fd)
    _clear_flags_of(parent_fd, name, directory=True)
    _owner_rights(parent_fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise RemoveError(exc.errno, f"cannot remove {name}: {exc.strerror}") from exc


def _clear_flags_of(dir_fd: int, name: str, *, directory: bool = False) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    # Only regular files and directories carry these flags in practice; opening a
    # device, fifo or socket could block or act on something.
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(name, flags | (os.O_DIRECTORY if directory else 0), dir_fd=dir_fd)
    except OSError:
        return
    try:
        _clear_flags(fd)
    finally:
        os.close(fd)


def _clear_flags(fd: int) -> None:
    """Clear the immutable and append-only flags of an open file, if set and allowed."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        flags = int.from_bytes(buf[:4], "little")
        if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
            cleared = flags & ~(FS_IMMUTABLE_FL | FS_APPEND_FL)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, cleared.to_bytes(4, "little") + bytes(4))
    except OSError:
        pass  # no flags on this file system, or not allowed to change them
