"""Snapshots: taken every N events, loaded at start-up, never trusted when wrong."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.events import segments, snapshots
from sandboxd.events import types as ev
from sandboxd.events.errors import CorruptLog, Gone
from sandboxd.events.log import open_event_log
from sandboxd.events.projection import (
    Incarnation,
    ProjectionError,
    incarnation_at,
    state_to_dict,
)
from sandboxd.events.store import Store, StoreConfig, open_store
from tests.events.strategies import histories, sample_pending
from tests.support import eventually


async def _fill(store: Store, count: int, start: int = 0) -> None:
    for i in range(start, start + count, 10):
        await store.append_many([sample_pending(j) for j in range(i, min(i + 10, start + count))])


def _snapshot_seqs(state_dir: Path) -> list[int]:
    return sorted(seq for seq, _ in snapshots.list_snapshots(state_dir / "snapshots"))


async def test_startup_loads_the_newest_snapshot_and_replays_the_tail(tmp_path: Path) -> None:
    config = StoreConfig(snapshot_every=100, snapshots_kept=3)
    async with open_store(tmp_path, config) as store:
        await _fill(store, 350)
        # The snapshot task runs beside the writer: one is due once 100 events passed.
        await eventually(lambda: store.snapshot_seq >= 250, within=30, what="the third snapshot")
        live = state_to_dict(store.state)
        assert _snapshot_seqs(tmp_path)[-1] >= 250
        assert store.snapshots_written >= 3
    # A clean exit snapshots the last events too.
    assert _snapshot_seqs(tmp_path)[-1] == 350
    (tmp_path / "snapshots" / snapshots.snapshot_name(350)).unlink()
    async with open_store(tmp_path, config) as store:
        assert store.startup.snapshot_seq >= 250
        assert store.startup.replayed == 350 - store.startup.snapshot_seq
        assert state_to_dict(store.state) == live


async def test_a_snapshot_failing_its_checksum_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = StoreConfig(snapshot_every=0)
    async with open_store(tmp_path, config) as store:
        await _fill(store, 40)
        await store.snapshot()
        await _fill(store, 40, 40)
        live = state_to_dict(store.state)
    newest = tmp_path / "snapshots" / snapshots.snapshot_name(80)
    blob = bytearray(newest.read_bytes())
    blob[-5] ^= 0x01
    newest.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="sandboxd.events"):
        async with open_store(tmp_path, config) as store:
            assert store.startup.snapshot_seq == 40  # the older one
            assert store.startup.replayed == 40
            assert state_to_dict(store.state) == live
    assert "checksum mismatch" in caplog.text
    assert (newest.parent / (newest.name + ".rejected")).exists()


async def test_an_undecodable_snapshot_means_a_full_replay(tmp_path: Path) -> None:
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        await _fill(store, 30)
        live = state_to_dict(store.state)
    path = tmp_path / "snapshots" / snapshots.snapshot_name(30)
    body = b'{"seq": 30, "anchor_ts": null, "state": {"nonsense": 1}}'
    header = snapshots.HEADER.pack(snapshots.MAGIC, 1, zlib.crc32(body), len(body))
    path.write_bytes(header + body)
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        assert (store.startup.snapshot_seq, store.startup.replayed) == (0, 30)
        assert state_to_dict(store.state) == live


async def test_a_snapshot_newer_than_the_log_is_not_trusted(tmp_path: Path) -> None:
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        await _fill(store, 20)
        await store.snapshot()
        before = state_to_dict(store.state)
        await _fill(store, 10, 20)
    # The log lost its last 10 events (say, a restored backup); the snapshot at 30 saw them.
    path = tmp_path / "events" / segments.segment_name(1)
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        cut = (await store.log.read_records(20, limit=1))[0]
    content = path.read_bytes()
    path.write_bytes(content[: content.index(cut.raw) - 16])
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        assert store.log.head_seq == 20
        assert store.startup.snapshot_seq == 20
        assert store.startup.rejected == 0  # the one at 30 was set aside before loading
        assert state_to_dict(store.state) == before
    assert not (tmp_path / "snapshots" / snapshots.snapshot_name(30)).exists()


async def test_a_snapshot_of_another_history_is_not_trusted(tmp_path: Path) -> None:
    other = tmp_path / "other"
    async with open_store(other, StoreConfig(snapshot_every=0)) as store:
        await _fill(store, 25, 800)  # other sandboxes, other ts
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        await _fill(store, 25)
        live = state_to_dict(store.state)
    foreign = other / "snapshots" / snapshots.snapshot_name(25)
    mine = tmp_path / "snapshots" / snapshots.snapshot_name(25)
    mine.write_bytes(foreign.read_bytes())
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        assert store.startup.rejected == 1
        assert store.startup.snapshot_seq == 0
        assert state_to_dict(store.state) == live


async def test_retention_removes_whole_segments_below_the_oldest_kept_snapshot(
    tmp_path: Path,
) -> None:
    config = StoreConfig(
        segment_bytes=4096, snapshot_every=0, snapshots_kept=2, retention="snapshots"
    )
    async with open_store(tmp_path, config) as store:
        await _fill(store, 200)
        await store.snapshot()
        first = store.log.oldest_seq
        assert 1 < first <= 201  # whole segments at or below the only snapshot, 200
        await _fill(store, 200, 200)
        # Whether the segment holding 200 holds 201 too depends on the records' sizes.
        starts = [seq for seq, _ in segments.list_segments(tmp_path / "events")]
        holding_201 = max(seq for seq in starts if seq <= 201)
        await store.snapshot()
        assert _snapshot_seqs(tmp_path) == [200, 400]
        # The snapshot at 200 is still kept: its tail stays, from the segment that holds
        # 201 on; a segment wholly at or below 200 goes, as the first rule says.
        oldest = store.log.oldest_seq
        assert first <= oldest == holding_201
        assert (await store.log.read(200, limit=1))[0].seq == 201
        await _fill(store, 200, 400)
        await store.snapshot()
        assert _snapshot_seqs(tmp_path) == [400, 600]
        assert first < store.log.oldest_seq <= 401
        with pytest.raises(Gone):
            await store.log.read(0)
        live = state_to_dict(store.state)
    async with open_store(tmp_path, config) as store:
        assert state_to_dict(store.state) == live


async def test_by_default_nothing_is_removed(tmp_path: Path) -> None:
    config = StoreConfig(segment_bytes=4096, snapshot_every=0)
    async with open_store(tmp_path, config) as store:
        await _fill(store, 200)
        await store.snapshot()
        await _fill(store, 100, 200)
        await store.snapshot()
        assert store.log.oldest_seq == 1
        assert len(await store.log.read(0, limit=1000)) == 300


async def test_store_append_refuses_what_the_projection_refuses(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        with pytest.raises(ProjectionError):
            await store.append(ev.PendingEvent("ghost", None, ev.SandboxPaused()))
        with pytest.raises(ProjectionError):
            await store.append_many([sample_pending(0), sample_pending(0)])  # created twice
        assert store.log.head_seq == 0
        await store.append_many([sample_pending(i) for i in range(8)])  # a whole lifecycle
        assert store.state.sandboxes == {}


async def test_a_leftover_temporary_file_is_ignored_and_cleaned(tmp_path: Path) -> None:
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        await _fill(store, 10)
    stale = tmp_path / "snapshots" / f".{snapshots.snapshot_name(99)}.tmp"
    stale.write_bytes(b"half a snapshot")
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        assert store.startup.snapshot_seq == 10
        await _fill(store, 10, 10)
    assert not stale.exists()


@settings(max_examples=20, deadline=None)
@given(history=histories(max_size=80), every=st.integers(1, 12), chunk=st.integers(1, 7))
def test_the_state_after_reopening_is_the_live_state(
    tmp_path_factory: pytest.TempPathFactory,
    history: list[ev.PendingEvent],
    every: int,
    chunk: int,
) -> None:
    state_dir = tmp_path_factory.mktemp("state")
    config = StoreConfig(snapshot_every=every, segment_bytes=2048)

    async def run() -> None:
        async with open_store(state_dir, config) as store:
            for i in range(0, len(history), chunk):
                await store.append_many(history[i : i + chunk])
            live = state_to_dict(store.state)
        async with open_store(state_dir, config) as store:
            assert state_to_dict(store.state) == live
            assert store.startup.replayed == 0  # the shutdown snapshot covers everything

    trio.run(run)


async def test_the_snapshot_knows_where_its_event_is(tmp_path: Path) -> None:
    config = StoreConfig(segment_bytes=4096, snapshot_every=0)
    async with open_store(tmp_path, config) as store:
        await _fill(store, 100)
        await store.snapshot()
        await _fill(store, 100, 100)
        live = state_to_dict(store.state)
    path = tmp_path / "snapshots" / snapshots.snapshot_name(100)
    snapshot = snapshots.decode_snapshot(path.read_bytes(), path)
    assert snapshot.position is not None
    async with open_store(tmp_path, config) as store:
        event = await store.log.check_position(100, *snapshot.position)
        assert event is not None and event.seq == 100 and event.ts == snapshot.anchor_ts
        first_seq, offset = snapshot.position
        assert await store.log.check_position(100, first_seq, offset + 1) is None
        assert await store.log.check_position(99, first_seq, offset) is None
        assert await store.log.check_position(100, first_seq + 1, offset) is None
    # A wrong position is only a missed shortcut: the event is found the slow way.
    path.write_bytes(snapshots.encode_snapshot(snapshot.state, snapshot.anchor_ts, (1, 16)))
    (tmp_path / "snapshots" / snapshots.snapshot_name(200)).unlink()
    async with open_store(tmp_path, config) as store:
        assert store.startup.snapshot_seq == 100
        assert state_to_dict(store.state) == live


async def test_an_event_the_fold_refuses_stops_start_up_naming_it(tmp_path: Path) -> None:
    async with open_event_log(tmp_path / "events") as log:  # no store: nothing checks it
        await log.append_many([sample_pending(0), sample_pending(0)])  # created twice
    with pytest.raises(CorruptLog) as caught:
        async with open_store(tmp_path):
            pass
    assert caught.value.seq == 2
    assert caught.value.path == tmp_path / "events" / segments.segment_name(1)
    assert "already exists" in str(caught.value)


def _as_format_1(path: Path) -> None:
    """Rewrite a snapshot as the format before per-life owners wrote it: {id: last owner}."""
    blob = path.read_bytes()
    body = orjson.loads(blob[snapshots.HEADER.size :])
    owners = body["state"]["owners"]
    body["state"]["owners"] = {sandbox_id: lives[-1][1] for sandbox_id, lives in owners.items()}
    old = orjson.dumps(body)
    path.write_bytes(snapshots.HEADER.pack(snapshots.MAGIC, 1, zlib.crc32(old), len(old)) + old)


def _reused_ids(count: int) -> list[ev.PendingEvent]:
    """Each id created by alice and deleted, then created again by bob."""
    history = []
    for i in range(count):
        for owner in ("alice", "bob"):
            created = ev.SandboxCreated("default", owner, f"/w/{i}", 30000 + i)
            history.append(ev.PendingEvent(f"id-{i}", owner, created))
            if owner == "alice":
                history.append(ev.PendingEvent(f"id-{i}", owner, ev.SandboxDeleted(False)))
    return history


async def test_a_format_1_snapshot_is_replaced_by_replay_when_the_log_reaches_back(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        await store.append_many(_reused_ids(20))
        live = state_to_dict(store.state)
    _as_format_1(tmp_path / "snapshots" / snapshots.snapshot_name(60))
    async with open_store(tmp_path, StoreConfig(snapshot_every=0)) as store:
        assert (store.startup.snapshot_seq, store.startup.rejected) == (0, 1)
        assert state_to_dict(store.state) == live  # alice's lives included


async def test_a_format_1_snapshot_is_upcast_to_the_safe_side_when_it_must_be_used(
    tmp_path: Path,
) -> None:
    config = StoreConfig(segment_bytes=4096, snapshot_every=0, retention="snapshots")
    async with open_store(tmp_path, config) as store:
        history = _reused_ids(20)
        for i in range(0, len(history), 6):
            await store.append_many(history[i : i + 6])
        await store.snapshot()
        assert store.log.oldest_seq > 1  # retention removed the start: no replay possible
    _as_format_1(tmp_path / "snapshots" / snapshots.snapshot_name(store.log.head_seq))
    async with open_store(tmp_path, config) as store:
        assert store.startup.snapshot_seq == store.state.head_seq
        # A live sandbox's current life is known exactly; what is not known is nobody's.
        lives = set(store.state.owners.values())
        assert lives == {
            (Incarnation(record.created_seq, "bob"),) for record in store.state.sandboxes.values()
        }
        assert incarnation_at(store.state, "id-0", 1) is None
