"""A sandbox's output on disk: capping it with one rotation, and reading its tail.

The child writes its stdout and stderr straight into ``STATE_DIR/output/ID.log``
(opened with O_APPEND, see :func:`open_for_child`); nothing here runs on its own: the
registry's sweep calls :func:`cap_outputs` once a second for every sandbox.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def open_for_child(output_path: str, cap_bytes: int) -> int:
    """The descriptor a new process of the sandbox writes its output to (the caller closes it).

    Opened with O_APPEND, which is what makes :func:`cap_output` safe while the
    child keeps writing. Output left by an earlier process of this sandbox
    counts against the cap too.
    """
    cap_output(output_path, cap_bytes)
    return os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def rotated_path(output_path: str) -> str:
    """Where :func:`cap_output` keeps the previous part of the output."""
    return output_path + ".1"


def cap_output(output_path: str, cap_bytes: int) -> bool:
    """Rotate ``output_path`` once it is over ``cap_bytes``; return True if it did.

    The newest ``cap_bytes`` bytes are copied to ``output_path + ".1"`` (the
    older rotation is replaced) and the file is truncated to zero. The child
    keeps its descriptor: because it was opened with O_APPEND, its next write
    lands at the new end, offset 0, instead of leaving a sparse hole the size of
    the old file. Bytes written between the last copy and the truncation (a few
    microseconds) are lost: the price of never making the child wait.

    On disk a sandbox's output then stays under about twice the cap, plus what
    the child writes between two calls. Nothing calls this on its own: the
    registry's sweep calls it (through :func:`cap_outputs`) once a second.
    Synchronous file I/O of at most ``cap_bytes``; run it in a thread for large
    caps.
    """
    try:
        if os.stat(output_path).st_size <= cap_bytes:
            return False
        src = os.open(output_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    tmp = output_path + ".1.tmp"
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            end = os.fstat(src).st_size
            pos = max(0, end - cap_bytes)
            # Catch up a few times with what the child appended while we copied,
            # so that the loss window shrinks to the gap before ftruncate.
            for _ in range(3):
                pos = _copy_range(src, dst, pos, end)
                end = os.fstat(src).st_size
                if end <= pos:
                    break
            os.ftruncate(src, 0)
        finally:
            os.close(dst)
        os.replace(tmp, rotated_path(output_path))
    finally:
        os.close(src)
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


def cap_outputs(output_paths: Iterable[str], cap_bytes: int) -> int:
    """Rotate every one of ``output_paths`` that has grown past ``cap_bytes``.

    Blocking (a stat per file, a copy per rotation): the registry calls it
    from a worker thread once per sweep, for every sandbox at once. Returns
    how many files were rotated.
    """
    rotated = 0
    for path in output_paths:
        try:
            if os.stat(path).st_size > cap_bytes:
                rotated += cap_output(path, cap_bytes)
        except FileNotFoundError:
            continue
    return rotated


def read_output_tail(output_path: str, tail_bytes: int) -> tuple[str, bool]:
    """The last ``tail_bytes`` bytes of a sandbox's output, and whether there was more.

    Reads the rotated part first, then the current file. ``truncated`` is True
    when older output exists that is not returned (more on disk, or a rotation
    already dropped some). Invalid UTF-8 is replaced, and a character cut in half
    by the tail's start is dropped rather than shown as garbage.
    """
    if tail_bytes <= 0:
        return "", _output_size(output_path) > 0 or os.path.exists(rotated_path(output_path))
    current, current_more = _read_tail(output_path, tail_bytes)
    rotated_exists = os.path.exists(rotated_path(output_path))
    older = b""
    if rotated_exists and len(current) < tail_bytes:
        older, _ = _read_tail(rotated_path(output_path), tail_bytes - len(current))
    data = older + current
    # A rotation always drops the start of the output (it only keeps the newest
    # cap bytes), so if .1 exists something older is gone.
    truncated = current_more or rotated_exists
    if truncated:
        data = _drop_partial_utf8_start(data)
    return data.decode("utf-8", errors="replace"), truncated


def _output_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_tail(path: str, n: int) -> tuple[bytes, bool]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b"", False
    try:
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
        return b"".join(parts), start > 0
    finally:
        os.close(fd)


def _drop_partial_utf8_start(data: bytes) -> bytes:
    # A UTF-8 character is at most 4 bytes: at most 3 continuation bytes
    # (0b10xxxxxx) can precede the first whole character.
    i = 0
    while i < 3 and i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return data[i:]
