"""``sandboxd log dump`` and ``sandboxd log verify`` on the JetStream log.

The same output and exit codes as audit.py's on the files: dump prints each
event as stored (protocol.md's event plus ``v``, with the stream's seq), and
verify reads the whole stream in order and checks that its seqs have no gap,
that every message decodes as an event, that the projection folds them all,
and that each of this node's snapshots (``STATE_DIR/snapshots``) equals the
fold at its seq. Read-only: nothing is published, nothing deleted. It reads
with batched direct gets through the bridge, so it needs no consumer.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TextIO

import trio

from sandboxd.events import snapshots
from sandboxd.events.audit import compare_snapshot
from sandboxd.events.codec import DecodeError
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.log import READ_BYTES
from sandboxd.events.nats.bridge import Nats, StreamMessage, connect
from sandboxd.events.nats.log import PAGE_MESSAGES, decode_message
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.projection import ProjectionError, State, apply


class _Bad(Exception):
    pass


async def _messages(nats: Nats, stream: str, after_seq: int) -> AsyncIterator[StreamMessage]:
    """Every stored message after ``after_seq``, in order, up to the stream's end now."""
    info = await nats.bridge.run(nats.js.stream_info, stream)
    last = int(info.state.last_seq)
    position = after_seq
    while position < last:
        page = await nats.direct_batch(stream, position + 1, PAGE_MESSAGES, READ_BYTES)
        if not page:
            raise LogUnavailable(f"seq {position + 1} of stream {stream} could not be read")
        for message in page:
            if message.seq > last:
                return
            yield message
            position = message.seq


def dump(
    settings: NatsSettings,
    out: TextIO,
    *,
    after_seq: int = 0,
    sandbox_id: str | None = None,
    types: set[str] | None = None,
    err: TextIO | None = None,
) -> int:
    err = err or sys.stderr

    async def main() -> int:
        async with connect(settings.servers, credentials=settings.credentials) as nats:
            async for message in _messages(nats, settings.stream, after_seq):
                try:
                    record = decode_message(message)
                except DecodeError as exc:
                    print(
                        f"sandboxd log dump: bad record: seq {message.seq} of stream"
                        f" {settings.stream}: {exc}",
                        file=err,
                    )
                    return 1
                event = record.event
                if sandbox_id is not None and event.sandbox_id != sandbox_id:
                    continue
                if types is not None and event.type not in types:
                    continue
                out.write(record.raw.decode())
                out.write("\n")
        return 0

    try:
        return trio.run(main)
    except LogUnavailable as exc:
        print(f"sandboxd log dump: {exc}", file=err)
        return 1


def verify(settings: NatsSettings, state_dir: Path | None, out: TextIO) -> int:
    saved = {}
    if state_dir is not None:
        saved = dict(snapshots.list_snapshots(state_dir / "snapshots"))

    async def main() -> tuple[int, int | None, int | None, State, list[str], list[str]]:
        state = State()
        count = 0
        first = last = None
        bad: list[str] = []
        notes: list[str] = []
        if 0 in saved:
            compare_snapshot(saved.pop(0), state, None, bad, notes)
        async with connect(settings.servers, credentials=settings.credentials) as nats:
            async for message in _messages(nats, settings.stream, 0):
                expected = 1 if last is None else last + 1
                if message.seq != expected:
                    raise _Bad(f"seq {expected} is missing (the next message is seq {message.seq})")
                try:
                    event = decode_message(message).event
                    apply(state, event)
                except (DecodeError, ProjectionError) as exc:
                    raise _Bad(f"seq {message.seq} ({message.subject}): {exc}") from None
                count += 1
                first = message.seq if first is None else first
                last = message.seq
                if event.seq in saved:
                    compare_snapshot(saved.pop(event.seq), state, event.ts, bad, notes)
        return count, first, last, state, bad, notes

    try:
        count, first, last, state, bad, notes = trio.run(main)
    except _Bad as exc:
        print(f"bad record: stream {settings.stream} {exc}", file=out)
        return 1
    except LogUnavailable as exc:
        print(f"sandboxd log verify: {exc}", file=out)
        return 1
    for seq, path in saved.items():
        bad.append(
            f"{path}: covers seq {seq}, but the stream ends at seq {last or 0}:"
            " events the stream had acknowledged are missing"
        )
    for note in notes:
        print(f"note: {note}", file=out)
    if bad:
        for problem in bad:
            print(f"bad snapshot: {problem}", file=out)
        return 1
    span = f"seqs {first}..{last}" if count else "no records"
    print(
        f"ok: {count} records ({span}) in stream {settings.stream}; "
        f"{len(state.sandboxes)} sandboxes live at the end",
        file=out,
    )
    return 0
