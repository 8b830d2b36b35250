"""GET /metrics against a real daemon: what clients did, read back at scrape time.

Parsed with prometheus_client's own parser, so what is checked is what Prometheus reads.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sandboxd import __version__
from sandboxd.events import types as ev
from sandboxd.events.log import open_event_log
from sandboxd.events.projection import Status
from tests.gateway.support import Daemon, make_config, start_daemon, stop_daemon, trio_peer
from tests.http.support import bearer, http_get
from tests.support import TOKENS, eventually

ALICE, ROOT = TOKENS["alice"], TOKENS["root"]


async def scrape(daemon: Daemon, token: str | None = ROOT) -> list[Sample]:
    reply = await http_get(daemon.gateway.port, "/metrics", [bearer(token)] if token else [])
    assert reply.status == 200, reply
    return [s for family in text_string_to_metric_families(reply.text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, [s for s in samples if s.name == name])
    return found[0]


def status_of(daemon: Daemon, sandbox_id: str) -> Status | None:
    record = daemon.gateway.registry.state.sandboxes.get(sandbox_id)
    return None if record is None else record.status


async def test_what_clients_did_is_what_metrics_say(daemon: Daemon) -> None:
    async with trio_peer(daemon.url, ALICE) as alice:
        ids = [(await alice.call("sandbox.start", spec_id="sleep"))["id"] for _ in range(4)]
        failed = await alice.request("sandbox.start", spec_id="fails")
        assert failed["error"]["code"] == "start_failed"
        await alice.call("sandbox.pause", sandbox_id=ids[0])
        assert await alice.call("sandbox.delete", sandbox_id=ids[1]) is True
        assert (await alice.request("sandbox.get", sandbox_id="no such one"))["ok"] is False
        # One exits by a signal: its own process, ended by its pid.
        killed = await alice.call("sandbox.get", sandbox_id=ids[2])
        os.kill(killed["pid"], signal.SIGKILL)
        await eventually(lambda: status_of(daemon, ids[2]) is Status.ERROR, what="the exit")
        await alice.call("events.subscribe")
        info = await alice.call("server.info")

        m = await scrape(daemon)

    sandboxes = {s.labels["status"]: s.value for s in m if s.name == "sandboxd_sandboxes"}
    assert sandboxes == {"STARTING": 0, "RUNNING": 1, "PAUSED": 1, "ERROR": 2, "MISSING": 0}
    assert value(m, "sandboxd_sandbox_starts_total", spec="sleep", outcome="running") == 4
    assert value(m, "sandboxd_sandbox_starts_total", spec="fails", outcome="failed") == 1
    assert value(m, "sandboxd_sandbox_starts_total", spec="fails", outcome="running") == 0
    assert value(m, "sandboxd_sandbox_start_duration_seconds_count") == 4
    assert 0 < value(m, "sandboxd_sandbox_start_duration_seconds_sum") < 4 * 10
    assert value(m, "sandboxd_sandbox_exits_total", spec="sleep", reason="killed") == 1
    assert value(m, "sandboxd_sandbox_exits_total", spec="sleep", reason="failed") == 0
    assert value(m, "sandboxd_event_log_head_seq") == info["head_seq"]
    segments = (daemon.state_dir / "events").glob("*.log")
    assert value(m, "sandboxd_event_log_bytes") == sum(p.stat().st_size for p in segments)
    assert value(m, "sandboxd_connections") == 1  # alice's; HTTP connections are not counted
    assert value(m, "sandboxd_subscriptions") == 1
    assert value(m, "sandboxd_subscriber_lag_events") == 0
    assert value(m, "sandboxd_event_log_fsync_duration_seconds_count") >= 1
    assert value(m, "sandboxd_requests_total", op="sandbox.start", code="ok") == 4
    assert value(m, "sandboxd_requests_total", op="sandbox.start", code="start_failed") == 1
    assert value(m, "sandboxd_requests_total", op="sandbox.pause", code="ok") == 1
    assert value(m, "sandboxd_requests_total", op="sandbox.delete", code="ok") == 1
    # A frame that is no valid request (here: a bad sandbox_id) counts under op "invalid".
    assert value(m, "sandboxd_requests_total", op="invalid", code="bad_request") == 1
    [build] = [s for s in m if s.name == "sandboxd_build_info"]
    assert build.labels["version"] == __version__ and build.value == 1
    # No label with unbounded values unless asked for.
    assert not [s for s in m if "sandbox_id" in s.labels]

    # True at scrape time: the connection closed, the sandboxes went on changing.
    async with trio_peer(daemon.url, ROOT) as root:
        await root.call("sandbox.resume", sandbox_id=ids[0])
        await root.call("sandbox.delete", sandbox_id=ids[2])
        m = await scrape(daemon)
    sandboxes = {s.labels["status"]: s.value for s in m if s.name == "sandboxd_sandboxes"}
    assert sandboxes == {"STARTING": 0, "RUNNING": 2, "PAUSED": 0, "ERROR": 1, "MISSING": 0}
    assert value(m, "sandboxd_connections") == 1
    assert value(m, "sandboxd_subscriptions") == 0


async def test_invalid_frames_are_counted_without_their_op(daemon: Daemon) -> None:
    async with trio_peer(daemon.url, ALICE) as alice:
        for op in ("made.up.1", "made.up.2"):
            assert (await alice.request(op))["error"]["code"] == "unknown_op"
    m = await scrape(daemon)
    assert value(m, "sandboxd_requests_total", op="invalid", code="unknown_op") == 2
    assert not [s for s in m if s.labels.get("op", "").startswith("made.up")]


@pytest.fixture
async def per_sandbox(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    config = make_config(tmp_path / "state", metrics_per_sandbox=True, metrics_public=True)
    running = await start_daemon(nursery, config)
    yield running
    await stop_daemon(running)
    nursery.cancel_scope.cancel()


async def test_per_sandbox_series_and_public_metrics_when_configured(per_sandbox: Daemon) -> None:
    async with trio_peer(per_sandbox.url, ALICE) as alice:
        started = await alice.call("sandbox.start", spec_id="sleep")
        await alice.call("sandbox.pause", sandbox_id=started["id"])
    m = await scrape(per_sandbox, token=None)  # metrics_public: no token needed
    [info] = [s for s in m if s.name == "sandboxd_sandbox_info"]
    expected: dict[str, Any] = {
        "sandbox_id": started["id"],
        "spec": "sleep",
        "user": "alice",
        "status": "PAUSED",
    }
    assert info.labels == expected and info.value == 1


async def test_the_log_s_size_and_its_slowest_subscriber(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        slow, idle = log.subscribe(0), log.subscribe(None)
        for i in range(5):
            await log.append(ev.PendingEvent(None, None, ev.DaemonStopping(f"test {i}")))
        assert log.subscriber_lag == 5  # `slow` has passed nothing yet
        await slow.__anext__()
        await slow.__anext__()
        assert log.subscriber_lag == 5  # `idle` subscribed at 0 and passed nothing either
        await idle.aclose()
        assert log.subscriber_lag == 3
        assert log.size_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.log"))
        await slow.aclose()
        assert log.subscriber_lag == 0
