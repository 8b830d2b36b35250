"""The suite's JetStream cluster: three real nats-servers on loopback, started once per session.

Tests that share it keep apart by using a stream (or bucket) of their own
(``stream_name``); a test that kills servers starts them again before it ends
(``with restarted(cluster):``), so the next test finds three healthy servers.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.events.nats.local_cluster import LocalCluster, local_cluster

_names = itertools.count(1)


def stream_name(prefix: str = "T") -> str:
    """A stream name no other test of this session uses."""
    return f"{prefix}{next(_names)}"


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base: Path = tmp_path_factory.mktemp("nats")
    with local_cluster(base) as cluster:
        yield cluster


@contextlib.contextmanager
def restarted(cluster: LocalCluster) -> Iterator[None]:
    """Whatever the block kills, every server runs again, healthy, afterwards."""
    try:
        yield
    finally:
        dead = [i for i, server in enumerate(cluster.servers) if not server.running]
        if dead:
            cluster.restart(*dead)
