"""The log's exceptions: a small flat set, each with one meaning.

They live apart from ``log.py`` so that the pure and sync modules (framing,
segments, audit) can raise them without importing trio.
"""

from __future__ import annotations

from pathlib import Path


class LogUnavailable(Exception):
    """The log cannot take this append now (a write or fsync failed, or it is closed).

    Nothing of the failed batch is durable. The daemon answers ``unavailable``;
    the caller may retry later (appends work again once the disk has room).
    """


class Gone(Exception):
    """The events asked for are older than the retained log (protocol code ``gone``)."""

    def __init__(self, oldest_seq: int) -> None:
        super().__init__(f"events before seq {oldest_seq} are no longer retained")
        self.oldest_seq = oldest_seq


class CorruptLog(Exception):
    """A record that cannot be trusted, and that is not a torn tail that recovery may cut.

    ``seq`` is the seq the record claims, or the one expected there when its
    header itself is unreadable.
    """

    def __init__(self, path: Path, offset: int, seq: int | None, reason: str) -> None:
        where = f"seq {seq}" if seq is not None else "no seq"
        super().__init__(f"{path}: bad record at offset {offset} ({where}): {reason}")
        self.path = path
        self.offset = offset
        self.seq = seq
        self.reason = reason

    @property
    def where(self) -> str:
        """The damaged record in words, without the state dir's path (clients get this)."""
        seq = f"seq {self.seq}, " if self.seq is not None else ""
        return f"{seq}offset {self.offset} of segment {self.path.name}"


def only_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside ``group`` (however nested), else the group itself.

    The log and the store run tasks in a nursery around the caller's block;
    an error from that block (or a task) should reach the caller as itself,
    not wrapped in the nursery's exception group.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending and len(leaves) < 2:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 and not pending else group
