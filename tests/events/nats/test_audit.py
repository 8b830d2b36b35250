"""`sandboxd log dump|verify --config FILE` on the JetStream log: the same output as on files."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import orjson
import trio

from sandboxd.events.nats import audit
from sandboxd.events.nats.bridge import connect
from sandboxd.events.nats.local_cluster import LocalCluster
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.store import StoreConfig, open_store
from tests.daemon_process import config_toml, daemon_config
from tests.events.strategies import sample_pending
from tests.nats_cluster import stream_name


def _fill(settings: NatsSettings, state_dir: Path, count: int) -> list[bytes]:
    async def main() -> list[bytes]:
        async with open_store(state_dir, StoreConfig(nats=settings, snapshot_every=0)) as store:
            for i in range(count):
                await store.append(sample_pending(i))
            records = []
            position = 0
            while position < store.state.head_seq:
                history = await store.log.read_history(position, store.state.head_seq)
                records += [r.raw for r in history]
                position = history[-1].event.seq
            return records

    return trio.run(main)


def test_dump_prints_the_stored_records_and_filters(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    settings = NatsSettings(tuple(nats_cluster.urls), stream_name())
    records = _fill(settings, tmp_path, 24)
    out = io.StringIO()
    assert audit.dump(settings, out) == 0
    assert out.getvalue().splitlines() == [r.decode() for r in records]
    out = io.StringIO()
    assert audit.dump(settings, out, after_seq=5, sandbox_id="sbx-000001") == 0
    seqs = [orjson.loads(line)["seq"] for line in out.getvalue().splitlines()]
    assert seqs == list(range(9, 17))


def test_verify_checks_the_stream_and_the_snapshots_and_names_a_bad_message(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    settings = NatsSettings(tuple(nats_cluster.urls), stream_name())
    _fill(settings, tmp_path, 20)  # its shutdown snapshot is at seq 20
    out = io.StringIO()
    assert audit.verify(settings, tmp_path, out) == 0, out.getvalue()
    assert out.getvalue().startswith(f"ok: 20 records (seqs 1..20) in stream {settings.stream}")

    async def publish_garbage() -> None:
        async with connect(settings.servers) as nats:
            subject = settings.subject_of("sbx-000009")
            assert await nats.publish_many([(subject, b"{not json", {})], answer_within=5) == [21]

    trio.run(publish_garbage)
    out = io.StringIO()
    assert audit.verify(settings, tmp_path, out) == 1
    assert out.getvalue().startswith(f"bad record: stream {settings.stream} seq 21")


def test_the_cli_reads_the_stream_its_config_names(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    settings = NatsSettings(tuple(nats_cluster.urls), stream_name())
    records = _fill(settings, tmp_path / "state", 8)
    config_path = tmp_path / "sandboxd.toml"
    config_path.write_text(config_toml(daemon_config(tmp_path / "state", (), nats=settings)))
    dumped = subprocess.run(
        [sys.executable, "-m", "sandboxd.cli", "log", "dump", "--config", str(config_path)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert dumped.stdout.splitlines() == records
    verified = subprocess.run(
        [sys.executable, "-m", "sandboxd.cli", "log", "verify", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("ok: 8 records (seqs 1..8)")
