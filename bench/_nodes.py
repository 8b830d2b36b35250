"""The cluster bench's node measures: a start through a node that is not the owner, and a
node killed with -9 (bench/cluster.py runs them beside the log's).

Three `sandboxd serve` nodes on the bench's 3-server NATS cluster, configured as
`make cluster` configures them (daemon/cluster/local.py: lease_ttl 3 s), each
sandbox the project's reference agent server (the default spec: RUNNING once its
/alive answers).

- local_start_ms_p50: ``start(node=A, wait=False)`` through A (answered once
  ``sandbox.created`` is stored on a quorum and folded); remote_start_ms_p50: the
  same through B (placed on A, forwarded over NATS request/reply, answered by A):
  one NATS round trip and two bridge crossings more. ``*_running_ms_p50``: the same
  with ``wait=True``, to RUNNING (the agent server's /alive answering): the same
  difference under the readiness wait, whose own jitter (tens of ms on 2 shared
  cores) hides a difference of a millisecond, which is why the first pair is the
  measure of routing. Alternated, so machine noise hits both alike.
- failover_s: node C killed with -9 while it runs sandboxes, until every one of them
  is MISSING ("node node-c lost") as A sees it: the lease's TTL and one look of the
  watch, at most; and client_failover_s: until a client connected to C with every
  URL has its next op answered (by another node).
- lost: starts acknowledged through A and B while C is killed, missing afterwards from
  the log as any node reads it (the stream's seqs are every node's): 0.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path
from statistics import median
from typing import Any

import trio
from _common import end_sandboxes

from sandboxd.cluster.local import running_nodes, write_nodes
from sandboxd.events.nats.local_cluster import LocalCluster
from sandboxd.events.projection import Status
from sandboxd.gateway.client import Client, ClientError, open_client


async def _starts(client: Client, node: str, count: int, *, wait: bool) -> list[float]:
    """``count`` starts on ``node`` through ``client``, each deleted after: their ms."""
    times = []
    for _ in range(count):
        began = time.perf_counter()
        info = await client.start(node=node, wait=wait)
        times.append((time.perf_counter() - began) * 1000)
        assert info.node == node and (info.status is Status.RUNNING or not wait)
        await client.delete(info.id)
    return times


async def _measure(cluster: LocalCluster, base: Path, quick: bool) -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    nodes = write_nodes(base, cluster, token)
    with running_nodes(base, nodes) as running:
        (a, _), (b, _), (c, c_process) = running
        for url, _ in running:  # every node sees the others' leases
            async with open_client(url, token) as client:
                while len((await client.server_info()).nodes or ()) < len(running):  # noqa: ASYNC110
                    await trio.sleep(0.05)
        local: list[float] = []
        remote: list[float] = []
        local_running: list[float] = []
        remote_running: list[float] = []
        rounds = 10 if quick else 40
        async with open_client(a, token) as on_a, open_client(b, token) as on_b:
            for wait in (False, True):  # warm up: the spec's interpreter, the caches
                await _starts(on_a, "node-a", 2, wait=wait)
                await _starts(on_b, "node-a", 2, wait=wait)
            for _ in range(rounds):
                local += await _starts(on_a, "node-a", 1, wait=False)
                remote += await _starts(on_b, "node-a", 1, wait=False)
                local_running += await _starts(on_a, "node-a", 1, wait=True)
                remote_running += await _starts(on_b, "node-a", 1, wait=True)

        # Node C runs sandboxes, and is killed with -9 during a burst of starts.
        acknowledged: list[str] = []
        async with (
            open_client(a, token) as on_a,
            open_client([c, a, b], token) as on_c,
        ):
            victims = [await on_a.start(node="node-c") for _ in range(3)]
            stop_burst = trio.Event()

            async def burst(url: str) -> None:
                async with open_client(url, token) as client:
                    while not stop_burst.is_set():
                        try:
                            info = await client.start(node="node-a", wait=False)
                        except ClientError:
                            continue  # unacknowledged: not counted
                        acknowledged.append(info.id)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(burst, a)
                nursery.start_soon(burst, b)
                await trio.sleep(0.5)
                c_process.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                client_failover = None
                while client_failover is None:
                    try:
                        await on_c.server_info()
                        client_failover = time.monotonic() - killed
                    except ClientError:
                        pass
                while True:
                    infos = [await on_a.get(v.id) for v in victims]
                    if all(i is not None and i.status is Status.MISSING for i in infos):
                        failover = time.monotonic() - killed
                        break
                    await trio.sleep(0.01)
                stop_burst.set()
            c_process.wait()
            logged: set[str | None] = set()
            after, head = 0, (await on_a.server_info()).head_seq
            while after < head:
                page = await on_a.read_events(after, types=["sandbox.created"], limit=1000)
                logged |= {e.sandbox_id for e in page.events}
                after = page.next_after_seq
            lost = sum(1 for sandbox_id in acknowledged if sandbox_id not in logged)
            for sandbox_id in acknowledged:
                await on_a.delete(sandbox_id)
    return {
        "local_start_ms_p50": round(median(local), 2),
        "remote_start_ms_p50": round(median(remote), 2),
        "remote_start_overhead_ms": round(median(remote) - median(local), 2),
        "local_start_running_ms_p50": round(median(local_running), 2),
        "remote_start_running_ms_p50": round(median(remote_running), 2),
        "failover_s": round(failover, 2),
        "client_failover_s": round(client_failover, 3),
        "lost": lost,
        "acknowledged_during_failover": len(acknowledged),
    }


def measure_nodes(cluster: LocalCluster, base: Path, *, quick: bool) -> dict[str, Any]:
    """The node measures, on ``cluster``, with the nodes' files under ``base``."""
    # The sandboxes' own uids pass through it to their working dirs (mkdtemp made it 0700).
    os.chmod(base, 0o711)
    try:
        return trio.run(_measure, cluster, base / "nodes", quick)
    finally:
        # Node C's sandboxes outlive its kill -9, as any node's do (MISSING, still
        # running): ended here with every node's, so nothing the bench started runs on.
        for state_dir in (base / "nodes").glob("node-*"):
            if state_dir.is_dir():
                end_sandboxes(state_dir)
