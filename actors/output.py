"""A sandbox's output on disk: the file its processes write, capped with one rotation, and its tail.

Each sandbox's stdout and stderr go to ``STATE_DIR/output/ID.log``; once it is
over ``output_cap_bytes``, its newest bytes move to ``ID.log.1`` (the one
rotation) and it starts again from empty.

A sandbox under a uid of its own cannot reach them at all (``output/`` is the
daemon's, 0700, and the sandbox is not told where the state dir is). One that
runs as the daemon's user (``run_as = "daemon"``, or a daemon that is not
root) could name and replace them. So the daemon never trusts a name to lead
where it did:

- it opens ``ID.log`` itself and keeps that descriptor: the child gets a copy
  as its stdout and stderr, and capping and reading go through the daemon's
  copy, never through the name again while the daemon runs. A sandbox that
  replaces the name (with a symlink to another file, a hard link, a FIFO)
  changes nothing the daemon reads, truncates or lets grow past the cap;
- a name is opened only relative to the output directory's own descriptor,
  held from start-up, and never followed if it is a symbolic link (O_NOFOLLOW);
  what it opens is taken only if it is a regular file with one link, owned by
  the daemon's user (fstat), else refused: unread, untruncated, and replaced at
  the sandbox's next spawn. A restarted daemon reopens output files this way.

Followers (``sandbox.logs`` with ``follow``, actors/output_follow.py) read the
output as one stream of *positions*: a position counts the bytes of the output
since the daemon opened it, so it means the same byte before and after a
rotation. Where the filesystem can (ext4, XFS: ``FALLOC_FL_COLLAPSE_RANGE``), a
rotation removes the file's head in place, atomically with respect to the
child's O_APPEND writes: no byte the child writes is lost, and a follower goes
on seamlessly (from ``ID.log.1`` if it was behind). Elsewhere (tmpfs, btrfs) the
rotation falls back to copy-then-truncate, which loses what the child writes in
the few microseconds between the last copy and the truncation.

Everything here blocks (a stat, a copy of at most the cap): callers run it in a
worker thread. Each file has a lock, so the sweep, a reader and a delete never
act on one descriptor at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import attrs

log = logging.getLogger(__name__)

_OPEN = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

#: fallocate(2)'s mode that removes a block-aligned range and shifts the rest down.
_FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@attrs.frozen
class Chunk:
    """What ``OutputFile.read_from`` found at a position of the output."""

    #: The bytes from the position asked for (empty: nothing new).
    data: bytes
    #: Where the next read starts.
    position: int
    #: Bytes between the position asked for and the oldest one still kept: a rotation
    #: dropped them before they were read. ``position`` is then the oldest kept.
    lost: int = 0
    #: The sandbox's output was removed (deleted): ``data`` is the last of it, if any.
    removed: bool = False


class OutputDir:
    """``STATE_DIR/output``, held open from start-up: every output file is reached through it.

    If the directory is later renamed or replaced by a link, the daemon still
    acts in the directory it made, never in one a link leads to.
    """

    def __init__(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OSError(
                    exc.errno,
                    f"{path} is not a directory but a link to one: the daemon makes it itself; "
                    "remove the link and start again",
                ) from None
            raise
        # Closed with the object: one directory for the daemon's life, a few in tests.
        weakref.finalize(self, os.close, self.fd)
        #: Whether its filesystem collapses ranges, for lossless rotations (None: not
        #: tried yet): one filesystem, so one answer for every output file in it.
        self.collapses: bool | None = None

    def file(self, sandbox_id: str) -> OutputFile:
        return OutputFile(self, f"{sandbox_id}.log")

    def remove_unowned(self, live: set[str]) -> int:
        """Remove the output files (and links, FIFOs...) of sandboxes not in ``live``.

        ``ID.log``, its rotation ``ID.log.1`` and a rotation's ``.tmp``: ids
        have no dot. Names are unlinked, never followed.
        """
        removed = 0
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if entry.name.split(".", 1)[0] in live or entry.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self.fd)
                removed += 1
        return removed


class OutputFile:
    """One sandbox's ``ID.log`` and ``ID.log.1``, through the daemon's own descriptor.

    One per sandbox, so slotted, and its other names made when used (a rotation, a
    removal, a person): kept, they and a ``__dict__`` cost 0.15 KB a sandbox at rest.
    """

    __slots__ = (
        "_base",
        "_dir",
        "_end_seen",
        "_fd",
        "_followers",
        "_lock",
        "_refused",
        "_removed",
        "_rotated",
        "name",
    )

    def __init__(self, directory: OutputDir, name: str) -> None:
        self._dir = directory
        self.name = name
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._removed = False
        self._refused = False  # a warning once, not once a sweep
        #: The position (bytes of output since the daemon opened it) of the file's first byte.
        self._base = 0
        #: The positions ``ID.log.1`` holds, start and end, if this daemon rotated it.
        self._rotated: tuple[int, int] | None = None
        #: The furthest end a reader saw: a file shorter than that was cut by someone else.
        self._end_seen = 0
        #: Followers reading through the descriptor: a removal keeps it open for them.
        self._followers = 0

    @property
    def rotated_name(self) -> str:
        return rotated_path(self.name)

    @property
    def _tmp_name(self) -> str:
        return self.rotated_name + ".tmp"

    @property
    def path(self) -> Path:
        """Where the file is, for people and tests; the daemon itself never opens it by this."""
        return self._dir.path / self.name

    @property
    def rotates_losslessly(self) -> bool:
        """Whether rotations collapse the file in place (none loses a byte) where it is."""
        return self._dir.collapses is True

    def open_for_child(self, cap_bytes: int) -> int:
        """A descriptor of the output file for a new process of the sandbox (the caller
        closes it once the child has its copy).

        Opened with O_APPEND, which is what makes capping safe while the child
        keeps writing. Output left by an earlier process of this sandbox counts
        against the cap too. A name the daemon cannot trust is replaced.
        """
        with self._lock:
            if self._removed:
                raise FileNotFoundError(errno.ENOENT, "the sandbox's output is removed", self.name)
            fd = self._open(create=True)
            assert fd is not None
            self._cap(fd, cap_bytes)
            return os.dup(fd)

    def cap(self, cap_bytes: int) -> bool:
        """Rotate the output once it is over ``cap_bytes``; return True if it did.

        The newest ``cap_bytes`` bytes are copied to ``ID.log.1`` (the older
        rotation is replaced) and the file is truncated to zero. The child
        keeps its descriptor: because it was opened with O_APPEND, its next
        write lands at the new end, offset 0, instead of leaving a sparse hole
        the size of the old file. Bytes written between the last copy and the
        truncation (a few microseconds) are lost: the price of never making the
        child wait. On disk a sandbox's output then stays under about twice the
        cap, plus what the child writes between two calls.
        """
        with self._lock:
            fd = self._open(create=False)
            return fd is not None and self._cap(fd, cap_bytes)

    def tail(self, tail_bytes: int) -> tuple[str, bool]:
        """The last ``tail_bytes`` bytes of the output, and whether there was more.

        Reads the rotated part first, then the current file. ``truncated`` is
        True when older output exists that is not returned (more on disk, or a
        rotation already dropped some). Invalid UTF-8 is replaced, and a
        character cut in half by the tail's start is dropped rather than shown
        as garbage.
        """
        with self._lock:
            data, truncated, _ = self._tail(tail_bytes)
        return data.decode("utf-8", errors="replace"), truncated

    def tail_to_follow(self, tail_bytes: int) -> tuple[bytes, bool, int]:
        """The tail (as ``tail``, undecoded), and the position a follower goes on from.

        One step under the lock, so nothing falls between the tail and the follow.
        The tail stops before a character the child has only begun to write: its
        follower reads it whole.
        """
        with self._lock:
            data, truncated, position = self._tail(tail_bytes)
            cut = _partial_utf8_end(data)
            self._followers += 1
            return data[: len(data) - cut], truncated, position - cut

    def read_from(self, position: int, limit: int) -> Chunk:
        """At most ``limit`` bytes of the output from ``position`` on, wherever they are now.

        From ``ID.log.1`` if a rotation moved them there since, from the file
        otherwise. Bytes no longer kept anywhere are counted as ``lost``.
        """
        with self._lock:
            fd = self._fd if self._removed else self._open(create=False)
            if fd is None:
                return Chunk(b"", position, removed=self._removed)
            size = os.fstat(fd).st_size
            if self._base + size < self._end_seen:
                # Cut by someone else (a sandbox may truncate its own stdout): what it
                # writes next comes after everything read so far.
                self._base = self._end_seen
            end = self._base + size
            self._end_seen = end
            if position >= self._base:
                data = _pread_all(fd, min(limit, end - position), position - self._base)
                return Chunk(data, position + len(data), removed=self._removed)
            if self._rotated is not None and self._rotated[0] <= position < self._rotated[1]:
                rotated = self._open_rotated()
                if rotated is not None:
                    try:
                        start, stop = self._rotated
                        data = _pread_all(rotated, min(limit, stop - position), position - start)
                    finally:
                        os.close(rotated)
                    if data:
                        return Chunk(data, position + len(data))
            oldest = self._base
            if self._rotated is not None and position < self._rotated[0] <= self._base:
                oldest = self._rotated[0]  # .1 still holds what comes after the gap
            return Chunk(b"", oldest, lost=oldest - position)

    def unfollow(self) -> None:
        """A follower is done; the last one after a removal closes the descriptor."""
        with self._lock:
            self._followers -= 1
            if self._removed and self._followers == 0 and self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def watch(self, add_watch: Callable[[str], int]) -> int | None:
        """``add_watch`` called on the file the daemon's descriptor holds, under the lock."""
        with self._lock:
            fd = self._fd if self._removed else self._open(create=False)
            return None if fd is None else add_watch(f"/proc/self/fd/{fd}")

    def remove(self) -> None:
        """Close the daemon's descriptor and remove both names (never following them).

        The descriptor stays open while followers read it (``unfollow``).
        """
        with self._lock:
            self._removed = True
            # Followers read to the end of it first (the sandbox is gone: its size is
            # final); the last of them closes it.
            if self._fd is not None and self._followers == 0:
                os.close(self._fd)
                self._fd = None
            for name in (self.name, self.rotated_name, self._tmp_name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self._dir.fd)

    # -- under the lock -------------------------------------------------------------

    def _open(self, *, create: bool) -> int | None:
        """The daemon's descriptor of the output file, opening it by name if it has none."""
        if self._removed:
            return None
        if self._fd is not None:
            return self._fd
        fd = _open_trusted(self.name, self._dir.fd, _OPEN)
        if fd is None and create:
            # Absent, or a name the daemon cannot trust: a fresh file in its place.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self._dir.fd)
            fd = os.open(self.name, _OPEN | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self._dir.fd)
        if fd is None:
            if not self._refused and _exists(self.name, self._dir.fd):
                self._refused = True
                log.warning(
                    "%s is not a regular file of the daemon's (a link, or another kind of "
                    "file): its output is not read, and the sandbox's next start replaces it",
                    self.path,
                )
            return None
        os.set_blocking(fd, True)  # O_NONBLOCK only kept the open itself from waiting
        self._fd = fd
        self._refused = False
        return fd

    def _open_rotated(self) -> int | None:
        return _open_trusted(self.rotated_name, self._dir.fd, _READ)

    def _tail(self, tail_bytes: int) -> tuple[bytes, bool, int]:
        """The last ``tail_bytes`` bytes, whether there was more, and the position of the end."""
        fd = self._open(create=False)
        rotated = self._open_rotated()
        try:
            if tail_bytes <= 0:
                size = 0 if fd is None else os.fstat(fd).st_size
                return b"", size > 0 or rotated is not None, self._base + size
            current, current_more, current_end = (
                (b"", False, 0) if fd is None else _read_tail(fd, tail_bytes)
            )
            end = self._base + current_end
            self._end_seen = max(self._end_seen, end)
            older = b""
            if rotated is not None and len(current) < tail_bytes:
                older, _, _ = _read_tail(rotated, tail_bytes - len(current))
        finally:
            if rotated is not None:
                os.close(rotated)
        data = older + current
        # A rotation always drops the start of the output (it only keeps the newest
        # cap bytes), so if .1 exists something older is gone.
        truncated = current_more or rotated is not None
        if truncated:
            data = _drop_partial_utf8_start(data)
        return data, truncated, end

    def _cap(self, fd: int, cap_bytes: int) -> bool:
        size = os.fstat(fd).st_size
        if size <= cap_bytes:
            return False
        if self._dir.collapses is not False:
            # The head of the file up to the last whole block before its end (a collapse
            # must end before the end of the file, on a block boundary).
            block = os.fstatvfs(fd).f_bsize
            keep_from = (size - 1) // block * block
            if keep_from > 0 and self._rotate_by_collapse(fd, keep_from, cap_bytes):
                return True
        return self._rotate_by_truncate(fd, cap_bytes)

    def _rotate_by_collapse(self, fd: int, keep_from: int, cap_bytes: int) -> bool:
        """Move the newest ``cap_bytes`` before ``keep_from`` to ``ID.log.1`` and remove the
        file's first ``keep_from`` bytes in place: lossless, whatever the child writes
        meanwhile (its O_APPEND writes and the collapse take the same inode lock).
        Measured: 3 ms for an 8 MiB head on ext4. False if the filesystem cannot."""
        dir_fd = self._dir.fd
        start = max(0, keep_from - cap_bytes)
        dst = self._new_tmp()
        try:
            _copy_range(fd, dst, start, keep_from)
        finally:
            os.close(dst)
        if _libc.fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, keep_from) != 0:
            err = ctypes.get_errno()
            os.unlink(self._tmp_name, dir_fd=dir_fd)
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                if self._dir.collapses is None:
                    log.info(
                        "%s: its filesystem cannot collapse a range (%s): sandboxes' output "
                        "rotates by copy and truncate, which loses what is written meanwhile",
                        self._dir.path,
                        os.strerror(err),
                    )
                self._dir.collapses = False
                return False
            raise OSError(err, os.strerror(err), self.name)
        self._dir.collapses = True
        os.replace(self._tmp_name, self.rotated_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self._rotated = (self._base + start, self._base + keep_from)
        self._base += keep_from
        self._end_seen = max(self._end_seen, self._base)
        return True

    def _new_tmp(self) -> int:
        dir_fd = self._dir.fd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp_name, dir_fd=dir_fd)  # a rotation cut short, or planted
        return os.open(
            self._tmp_name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )

    def _rotate_by_truncate(self, fd: int, cap_bytes: int) -> bool:
        dir_fd = self._dir.fd
        dst = self._new_tmp()
        try:
            end = os.fstat(fd).st_size
            pos = first = max(0, end - cap_bytes)
            # Catch up a few times with what the child appended while we copied,
            # so that the loss window shrinks to the gap before ftruncate.
            for _ in range(3):
                pos = _copy_range(fd, dst, pos, end)
                end = os.fstat(fd).st_size
                if end <= pos:
                    break
            os.ftruncate(fd, 0)
        finally:
            os.close(dst)
        # rename replaces whatever the name is (a link included) and never follows it.
        os.replace(self._tmp_name, self.rotated_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        # What was written after ``pos`` and before the truncation is in neither file:
        # positions go on as if it had never been written.
        self._rotated = (self._base + first, self._base + pos)
        self._base += pos
        self._end_seen = max(self._end_seen, self._base)
        return True


def rotated_path(output_path: str) -> str:
    """Where the one rotation of the output at ``output_path`` is kept."""
    return output_path + ".1"


def cap_outputs(files: Iterable[OutputFile], cap_bytes: int) -> int:
    """Rotate every one of ``files`` that has grown past ``cap_bytes``; return how many.

    Blocking (an fstat per file, a copy per rotation): the registry calls it
    from a worker thread once per sweep, for every sandbox at once.
    """
    return sum(output.cap(cap_bytes) for output in files)


def _open_trusted(name: str, dir_fd: int, flags: int) -> int | None:
    """``name`` in the directory, if it is a regular file of ours with one link; else None."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        # ELOOP: a symbolic link; ENXIO, EACCES...: something that is no file of ours.
        log.debug("not opening output %s: %s", name, exc)
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
        return fd
    os.close(fd)
    return None


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _copy_range(src: int, dst: int, pos: int, end: int) -> int:
    while pos < end:
        chunk = os.pread(src, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
        pos += len(chunk)
    return pos


def _read_tail(fd: int, n: int) -> tuple[bytes, bool, int]:
    """The last ``n`` bytes of the file, whether there was more, and the offset they end at."""
    size = os.fstat(fd).st_size
    start = max(0, size - n)
    parts = []
    pos = start
    while pos < size:
        chunk = os.pread(fd, size - pos, pos)
        if not chunk:  # truncated under us by a rotation
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts), start > 0, pos


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _partial_utf8_end(data: bytes) -> int:
    """How many bytes at the end of ``data`` are a character not yet whole (0 to 3)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: its lead is further back
        # The lead byte says how long its character is: 11110xxx 4, 1110xxxx 3, 110xxxxx 2.
        length = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1
        return back if back < length else 0
    return 0


def _drop_partial_utf8_start(data: bytes) -> bytes:
    # A UTF-8 character is at most 4 bytes: at most 3 continuation bytes
    # (0b10xxxxxx) can precede the first whole character.
    i = 0
    while i < 3 and i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return data[i:]
