"""Snapshots of the projection: written atomically, trusted only when they check out.

A snapshot file ``STATE_DIR/snapshots/<seq, 20 digits>.snap`` holds::

    "SBXSNAP" | format version (u8) | crc32 of the body (u32) | body length (u64) | body

all little-endian; the body is JSON: ``{"seq", "anchor_ts", "position",
"state"}``, where ``state`` is ``projection.state_to_dict`` of the state after
folding every event up to ``seq``, ``anchor_ts`` is the ts of the event at
``seq`` and ``position`` where its record is: [first seq of its segment,
offset], so that start-up finds it without indexing a whole segment.

Writing goes to a temporary file, which is fsynced, renamed over the final
name, and then the directory is fsynced: a crash leaves the old set of
snapshots or the new one, never a half-written file under a final name.

Loading trusts a snapshot only if its checksum and JSON check out, its name,
header and body agree on the seq, and (checked by the store, which has the
log) the log still holds the very event it was taken after: same seq, same
ts. A snapshot that fails is set aside (renamed ``.rejected``), never used.

Format 2 keeps every life of a sandbox id with its owner (``State.owners``);
format 1 kept one owner per id, the last, which cannot tell whose an event of a
reused id was. A format 1 snapshot still loads, its owners upcast to the safe
side (a live sandbox's current life is known; the lives of deleted ids are
dropped, so their events are an admin's alone), and ``Snapshot.format`` says so:
the store uses it only when the log no longer reaches back to seq 1, and
otherwise replays the whole log, which gives every owner exactly.

Everything here blocks: the store calls it in worker threads.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson

from sandboxd.events.projection import State, state_from_dict, state_to_dict
from sandboxd.events.segments import fsync_dir

logger = logging.getLogger(__name__)

MAGIC = b"SBXSNAP"
FORMAT_VERSION = 2
#: Formats this code reads; older ones are upcast (see the module's docstring).
READABLE_FORMATS = (1, 2)
HEADER = struct.Struct("<7sBIQ")
SUFFIX = ".snap"


class SnapshotError(ValueError):
    """A snapshot file that cannot be trusted."""


@attrs.frozen
class Snapshot:
    seq: int  # every event up to here is folded into ``state``
    anchor_ts: str | None  # the ts of the event at ``seq`` (None for seq 0)
    position: tuple[int, int] | None  # (segment's first seq, offset) of that event's record
    state: State
    path: Path
    format: int = FORMAT_VERSION  # of the file; below FORMAT_VERSION, its state was upcast


def snapshot_name(seq: int) -> str:
    return f"{seq:020d}{SUFFIX}"


def encode_snapshot(
    state: State, anchor_ts: str | None, position: tuple[int, int] | None = None
) -> bytes:
    body = orjson.dumps(
        {
            "seq": state.head_seq,
            "anchor_ts": anchor_ts,
            "position": position,
            "state": state_to_dict(state),
        }
    )
    return HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)) + body


def decode_snapshot(blob: bytes, path: Path) -> Snapshot:
    if len(blob) < HEADER.size:
        raise SnapshotError(f"{len(blob)} bytes, shorter than a snapshot header")
    magic, version, crc, length = HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise SnapshotError("not a sandboxd snapshot")
    if version not in READABLE_FORMATS:
        readable = " and ".join(map(str, READABLE_FORMATS))
        raise SnapshotError(f"snapshot format version {version}, this code reads {readable}")
    body = memoryview(blob)[HEADER.size :]
    if len(body) != length:
        raise SnapshotError(f"the body is {len(body)} bytes, the header says {length}")
    if zlib.crc32(body) != crc:
        raise SnapshotError("checksum mismatch")
    try:
        raw: Any = orjson.loads(body)
        seq, anchor_ts, position = raw["seq"], raw["anchor_ts"], raw.get("position")
        state = state_from_dict(raw["state"] if version > 1 else _upcast_v1(raw["state"]))
    except Exception as exc:  # a checksummed body that does not decode: written by a bug
        raise SnapshotError(f"the body does not decode: {exc!r}") from None
    if type(seq) is not int or seq != state.head_seq:
        raise SnapshotError(f"seq {seq!r} does not match the state's head seq {state.head_seq}")
    if not (anchor_ts is None or type(anchor_ts) is str):
        raise SnapshotError("anchor_ts is not a string")
    if position is not None:
        if not (type(position) is list and len(position) == 2):
            raise SnapshotError("position is not a pair")
        first_seq, offset = position
        if type(first_seq) is not int or type(offset) is not int:
            raise SnapshotError("position is not a pair of integers")
        position = (first_seq, offset)
    return Snapshot(seq, anchor_ts, position, state, path, version)


def _upcast_v1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1's ``owners`` ({id: last owner}) as format 2's lives, on the safe side."""
    born = {record["id"]: record["created_seq"] for record in state["sandboxes"]}
    owners = {
        sandbox_id: [[born[sandbox_id], owner]]
        for sandbox_id, owner in state["owners"].items()
        if sandbox_id in born
    }
    return {**state, "owners": owners}


def write_snapshot(directory: Path, seq: int, blob: bytes) -> Path:
    """Write a snapshot atomically and durably; return its path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = directory / snapshot_name(seq)
    temporary = directory / f".{final.name}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(blob)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, final)
    fsync_dir(directory)
    return final


def list_snapshots(directory: Path) -> list[tuple[int, Path]]:
    """The snapshot files as (seq, path), newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        stem = path.name.removesuffix(SUFFIX)
        if path.name.endswith(SUFFIX) and len(stem) == 20 and stem.isdigit():
            found.append((int(stem), path))
    found.sort(reverse=True)
    return found


def candidates(directory: Path, head_seq: int) -> Iterator[Snapshot]:
    """The snapshots that decode and check out, newest first; the others are set aside.

    One newer than ``head_seq`` means the log lost events the snapshot had
    seen (unsynced data, a restored backup): it describes a history the log
    does not hold, and is not used.
    """
    for seq, path in list_snapshots(directory):
        try:
            if seq > head_seq:
                raise SnapshotError(f"it covers seq {seq}, past the log's end at {head_seq}")
            snapshot = decode_snapshot(path.read_bytes(), path)
            if snapshot.seq != seq:
                raise SnapshotError(f"the file name says seq {seq}, the body {snapshot.seq}")
        except (SnapshotError, OSError) as exc:
            reject(path, str(exc))
            continue
        yield snapshot


def reject(path: Path, reason: str) -> None:
    """Set a snapshot aside for good: kept for a person to look at, never loaded."""
    logger.warning("%s: snapshot not used: %s", path, reason)
    try:
        path.rename(path.with_name(path.name + ".rejected"))
    except OSError as exc:
        logger.warning("%s: could not set the snapshot aside: %s", path, exc)


def prune(directory: Path, keep: int) -> list[int]:
    """Keep the newest ``keep`` snapshots, delete the rest; return the kept seqs."""
    found = list_snapshots(directory)
    for _, path in found[keep:]:
        path.unlink(missing_ok=True)
    for stale in directory.glob(f".*{SUFFIX}.tmp"):
        stale.unlink(missing_ok=True)  # a write a crash interrupted
    if found[keep:]:
        fsync_dir(directory)
    return [seq for seq, _ in found[:keep]]
