"""Benchmark of sandboxd on a NATS JetStream cluster: the log's appends beside nats-py's own.

    python bench/cluster.py [--quick] [--dir DIR]

Starts a 3-server JetStream cluster on loopback (events/nats/local_cluster.py:
``sync_interval: always``, so every acknowledged message is fsynced on a
quorum) and measures, in one run:

- cluster_appends_per_s_c256: acknowledged, folded appends per second through
  the store on the JetStream log (``[log] backend = "nats"``, R3), 256
  concurrent appenders, each one sandbox's lifecycle at a time: every append
  conditional on its sandbox subject's last seq, answered once a quorum stored
  it and this node folded it;
- nats_raw_publish_per_s_c256: its reference, nats-py alone (asyncio, no
  bridge, no fold) publishing the same records, with the same conditions and
  message ids, to the same stream, 256 publishers each awaiting its ack;
  ratio_vs_raw is the first over the second (target >= 0.8);
- cluster_cpu_us_per_append and nats_raw_cpu_us_per_publish: this process's
  CPU time (every thread) per append and per publish in those runs: where the
  difference goes when the machine's cores are the limit;
- cluster_append_ms_p50_c1: one appender's latency, and bridge_roundtrip_us,
  the asyncio bridge's own cost per crossing.

Each rate is the better of two rounds, taken alternately (raw, ours, raw,
ours) so that neither gets the warmer cluster. Prints a readable summary,
then one JSON object as its last line. Other parts (remote starts, failover:
the node layer's) add themselves to ``PARTS``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import trio

from sandboxd.events import types as ev
from sandboxd.events.codec import encode, now_ts
from sandboxd.events.nats.bridge import WRONG_LAST_SEQUENCE, Bridge
from sandboxd.events.nats.local_cluster import LocalCluster, local_cluster
from sandboxd.events.nats.log import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.store import StoreConfig, open_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, step
from _nodes import measure_nodes

CONCURRENCY = 256


def lifecycle(sandbox_id: str, k: int) -> ev.PendingEvent:
    """Event ``k`` (0..7) of a sandbox's life: created ... deleted, as the projection takes it."""
    data: ev.Payload
    if k == 0:
        data = ev.SandboxCreated("default", "alice", f"/var/lib/sandboxd/{sandbox_id}", 30000)
    elif k == 1:
        data = ev.ProcessStarted(10000, 10000, 1732619539.25, ["python3", "-m", "server"])
    elif k in (2, 5):
        data = ev.SandboxRunning([ev.ExposedUrl("AGENT_SERVER", "http://127.0.0.1:30000")])
    elif k == 3:
        data = ev.SandboxPaused()
    elif k == 4:
        data = ev.SandboxResumed()
    elif k == 6:
        data = ev.SandboxUnhealthy("health check timed out")
    else:
        data = ev.SandboxDeleted(False)
    return ev.PendingEvent(sandbox_id, "alice", data)


def settings_for(cluster: LocalCluster, stream: str) -> NatsSettings:
    return NatsSettings(tuple(cluster.urls), stream, 3, None, 10.0)


# -- ours: the store on the JetStream log -------------------------------------------------


def cpu_seconds() -> float:
    """This process's CPU time so far, every thread's (user and system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def bench_cluster_appends(
    cluster: LocalCluster, state_dir: Path, stream: str, concurrency: int, seconds: float
) -> tuple[float, list[float], float]:
    """Appends per second through the store, each append's latency (seconds), and the
    process's CPU seconds per append."""
    config = StoreConfig(nats=settings_for(cluster, stream), snapshot_every=0)
    run = secrets.token_hex(3)
    latencies: list[float] = []
    count = 0
    async with open_store(state_dir, config) as store:
        deadline = trio.current_time() + seconds

        async def appender(w: int) -> None:
            nonlocal count
            for n in itertools.count():
                sandbox_id = f"o{run}-{w}-{n}"
                for k in range(8):
                    began = trio.current_time()
                    await store.append(lifecycle(sandbox_id, k))
                    latencies.append(trio.current_time() - began)
                    count += 1
                    if trio.current_time() >= deadline:
                        return

        started, cpu = trio.current_time(), cpu_seconds()
        async with trio.open_nursery() as nursery:
            for w in range(concurrency):
                nursery.start_soon(appender, w)
        elapsed, cpu = trio.current_time() - started, cpu_seconds() - cpu
    return count / elapsed, latencies, cpu / count


# -- the reference: nats-py alone ---------------------------------------------------------


def bench_raw_publish(
    cluster: LocalCluster, stream: str, concurrency: int, seconds: float
) -> tuple[float, float]:
    """nats-py publishing the same records (same subjects' shape, bodies, conditions and
    message ids) to the same stream: the most the client library gives. Also the process's
    CPU seconds per publish."""

    async def main() -> tuple[float, float]:
        client = await nats.connect(servers=cluster.urls)
        js = client.jetstream()
        run = secrets.token_hex(3)
        count = 0
        deadline = time.monotonic() + seconds
        ts = now_ts()

        async def publisher(w: int) -> None:
            nonlocal count
            ids = itertools.count()
            for n in itertools.count():
                sandbox_id = f"r{run}-{w}-{n}"
                subject = f"{stream}.sandbox.{sandbox_id}"
                last = 0
                for k in range(8):
                    pending = lifecycle(sandbox_id, k)
                    body = encode(ev.Event(0, ts, pending.sandbox_id, pending.by, pending.data))
                    headers = {
                        EXPECTED_LAST_SUBJECT_SEQ: str(last),
                        MSG_ID: f"{run}-{w}-{next(ids)}",
                    }
                    for attempt in itertools.count():
                        try:
                            ack = await js.publish(subject, body, headers=headers, timeout=10)
                            break
                        except nats.js.errors.BadRequestError as exc:
                            # As the log does: the leader refuses for a moment a message of
                            # a subject whose previous one it has not applied yet.
                            if exc.err_code not in WRONG_LAST_SEQUENCE or attempt > 1000:
                                raise
                            await asyncio.sleep(0.001)
                    last = ack.seq
                    count += 1
                    if time.monotonic() >= deadline:
                        return

        started, cpu = time.monotonic(), cpu_seconds()
        await asyncio.gather(*(publisher(w) for w in range(concurrency)))
        elapsed, cpu = time.monotonic() - started, cpu_seconds() - cpu
        await client.close()
        return count / elapsed, cpu / count

    return asyncio.run(main())


def bench_bridge_roundtrip(calls: int) -> float:
    async def nothing() -> None:
        pass

    async def main() -> float:
        bridge = Bridge()
        try:
            started = trio.current_time()
            for _ in range(calls):
                await bridge.run(nothing)
            return (trio.current_time() - started) / calls
        finally:
            bridge.close()

    return trio.run(main)


# -- the parts, in order -------------------------------------------------------------------

Part = Callable[[LocalCluster, Path, float, dict[str, Any]], None]


def part_appends(
    cluster: LocalCluster, base: Path, seconds: float, results: dict[str, Any]
) -> None:
    stream = "BENCH"

    async def make_stream() -> None:  # as the store makes it: R3, file storage
        async with open_store(base / "maker", StoreConfig(nats=settings_for(cluster, stream))):
            pass

    trio.run(make_stream)
    ours: list[tuple[float, float]] = []
    raw: list[tuple[float, float]] = []
    for round_ in (1, 2):
        step(f"  round {round_}: nats-py alone, {CONCURRENCY} publishers ...")
        raw.append(bench_raw_publish(cluster, stream, CONCURRENCY, seconds))
        step(f"  round {round_}: the store on the JetStream log, {CONCURRENCY} appenders ...")
        rate, _, cpu = trio.run(
            bench_cluster_appends, cluster, base / f"ours-{round_}", stream, CONCURRENCY, seconds
        )
        ours.append((rate, cpu))
    best_ours, best_raw = max(ours), max(raw)
    results["cluster_appends_per_s_c256"] = best_ours[0]
    results["nats_raw_publish_per_s_c256"] = best_raw[0]
    results["ratio_vs_raw"] = best_ours[0] / max(best_raw[0], 1e-9)
    # Where the difference goes: this process's CPU per append (both threads) vs nats-py's.
    results["cluster_cpu_us_per_append"] = best_ours[1] * 1e6
    results["nats_raw_cpu_us_per_publish"] = best_raw[1] * 1e6
    step("  one appender ...")
    _, latencies, _ = trio.run(bench_cluster_appends, cluster, base / "c1", stream, 1, seconds)
    results["cluster_append_ms_p50_c1"] = median(latencies) * 1000


def part_bridge(cluster: LocalCluster, base: Path, seconds: float, results: dict[str, Any]) -> None:
    step("  the bridge alone ...")
    results["bridge_roundtrip_us"] = bench_bridge_roundtrip(5000) * 1e6


#: What a run measures, in order; each part adds its keys to the results.
def part_nodes(cluster: LocalCluster, base: Path, seconds: float, results: dict[str, Any]) -> None:
    """The node layer's: remote starts beside local ones, a node killed (bench/_nodes.py)."""
    step("nodes: local and remote starts, then kill -9 of a node ...")
    results |= measure_nodes(cluster, base, quick=seconds < 5)


PARTS: list[Part] = [part_bridge, part_appends, part_nodes]


def summary(results: dict[str, Any]) -> list[str]:
    lines = []
    if "cluster_appends_per_s_c256" in results:
        lines += [
            f"  store on JetStream, c256   {results['cluster_appends_per_s_c256']:>10,.0f} /s",
            f"  nats-py alone, c256        {results['nats_raw_publish_per_s_c256']:>10,.0f} /s",
            f"    ours / nats-py           {results['ratio_vs_raw']:>10.2f}  (target >= 0.8)",
            f"  CPU per append, ours       {results['cluster_cpu_us_per_append']:>10.1f} us",
            f"  CPU per publish, nats-py   {results['nats_raw_cpu_us_per_publish']:>10.1f} us",
            f"  one append, c1, p50        {results['cluster_append_ms_p50_c1']:>10.2f} ms",
        ]
    if "remote_start_ms_p50" in results:
        lines += [
            f"  start through the owner    {results['local_start_ms_p50']:>10.2f} ms p50",
            f"  start through another node {results['remote_start_ms_p50']:>10.2f} ms p50"
            "  (target <= the first + 5)",
            f"  the same to RUNNING        {results['local_start_running_ms_p50']:>10.2f} /"
            f" {results['remote_start_running_ms_p50']:.2f} ms p50",
            f"  node killed -9 -> MISSING  {results['failover_s']:>10.2f} s  (target <= 5)",
            f"  client on it, next op      {results['client_failover_s']:>10.3f} s",
            f"  acknowledged, then lost    {results['lost']:>10d}    (of"
            f" {results['acknowledged_during_failover']} during the kill; target 0)",
        ]
    if "bridge_roundtrip_us" in results:
        lines.append(f"  bridge round trip          {results['bridge_roundtrip_us']:>10.1f} us")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run, in seconds")
    parser.add_argument("--dir", type=Path, help="where the servers keep their stores")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else 5.0
    base = Path(tempfile.mkdtemp(prefix="sandboxd-cluster-bench-", dir=args.dir))
    results: dict[str, Any] = {}
    try:
        print(f"sandboxd cluster benchmark ({'quick' if args.quick else 'full'} run)")
        print(
            f"  3 nats-servers on loopback, sync_interval always, in {base}; {os.cpu_count()} CPUs"
        )
        with local_cluster(base / "nats") as cluster:
            for part in PARTS:
                part(cluster, base, seconds, results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    for line in summary(results):
        print(line)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
