"""`sandboxd serve` with log.backend = "nats": config checks, NATS unreachable at start,
NATS lost while running (ops answer unavailable, nothing acknowledged lost, recovery)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from sandboxd.config import ConfigError, parse_config
from sandboxd.events.nats.local_cluster import LocalCluster, free_ports
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.gateway.client import open_client
from sandboxd.gateway.protocol import UnavailableError
from tests.daemon_process import DaemonProcess
from tests.e2e.support import ROOT, end_daemon, make_config
from tests.nats_cluster import restarted, stream_name


@pytest.mark.parametrize(
    ("log", "key"),
    [
        ({"backend": "etcd"}, "log.backend"),
        ({"backend": "nats", "nats": {"servers": []}}, "log.nats.servers"),
        ({"backend": "nats", "nats": {"servers": ["127.0.0.1:4222"]}}, "log.nats.servers[0]"),
        ({"backend": "nats", "nats": {"stream": "a.b"}}, "log.nats.stream"),
        ({"backend": "nats", "nats": {"replicas": 7}}, "log.nats.replicas"),
        (
            {"backend": "nats", "nats": {"credentials": "/nonexistent.creds"}},
            "log.nats.credentials",
        ),
        ({"backend": "nats", "nats": {"servers": ["nats://a:1"], "x": 1}}, "log.nats.x"),
        ({"backend": "nats", "retention": "snapshots"}, "log.retention"),
        ({"nats": {"stream": "S"}}, "log.nats"),
    ],
)
def test_bad_log_keys_are_named(log: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"log": log})


def test_the_nats_keys_and_their_defaults() -> None:
    config = parse_config({"log": {"backend": "nats", "nats": {"servers": ["nats://h:4222"]}}})
    assert config.nats == NatsSettings(("nats://h:4222",), "SANDBOXD", 3, None)
    assert parse_config({}).nats is None  # the file log stays the default


def test_unreachable_nats_at_start_is_one_sentence_naming_the_servers(tmp_path: Path) -> None:
    urls = tuple(f"nats://127.0.0.1:{port}" for port in free_ports(2))
    config = make_config(tmp_path / "state", nats=NatsSettings(urls, "S", 3))
    daemon = DaemonProcess(tmp_path, config)
    result = subprocess.run(
        [sys.executable, "-m", "sandboxd.cli", "serve", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sandboxd: cannot connect to NATS at")
    assert all(url in last for url in urls) and "log.nats.servers" in last
    assert "Traceback" not in result.stderr


async def test_nats_lost_while_running_answers_unavailable_then_recovers(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    settings = NatsSettings(tuple(nats_cluster.urls), stream_name(), 3, None, 2.0)
    daemon = DaemonProcess(tmp_path, make_config(tmp_path / "state", nats=settings))
    try:
        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            kept = await client.start(spec_id="sleep")
            with restarted(nats_cluster):  # then every server back, its store as it was
                for i in range(3):
                    nats_cluster.kill(i)
                with pytest.raises(UnavailableError, match="NATS did not answer"):
                    await client.start(spec_id="sleep")
                # Reads are the node's own projection: they still answer.
                assert (await client.get(kept.id)).id == kept.id
            # Appends work again once the stream has its leader back.
            with trio.fail_after(30):
                while True:
                    try:
                        again = await client.start(spec_id="sleep")
                        break
                    except UnavailableError:
                        pass  # not yet: the stream's leader is being elected
            assert (await client.get(again.id)).status in ("STARTING", "RUNNING")
            assert await client.delete(kept.id) is True
            assert await client.delete(again.id) is True
        # Nothing acknowledged is lost: the stream holds the first start's creation.
        assert "Traceback" not in daemon.output(), daemon.output()
    finally:
        end_daemon(daemon)
