"""Benchmark of recovery: SIGKILL a daemon holding 1,000 live sandboxes and a
1,000,000-event log, start it again, and time until it serves them all, adopted.

    python bench/recovery.py [--quick] [--dir DIR] [--no-seed]

Measured in one run:

- recovery_s: from the new daemon's exec to its gateway answering a search
  that lists every sandbox RUNNING under its old pid (the gateway opens only
  after recovery, so its first answer is already the whole state). Includes
  Python's start and imports: import_floor_s is that floor alone
  (``python -c "import sandboxd.daemon"``), the raw baseline of any restart.
- adopted, lost: sandbox.adopted events after the restart; sandboxes not
  RUNNING under their old pid (goal: 1,000 and 0).
- recovery_in_daemon_s: the daemon's own measure of its OS reconciliation
  (survey of /proc, adopted events in batches, actors started), from its log.
- snapshot_seq, tail_events: where the newest snapshot was and how many events
  were replayed after it (the default snapshot_every is 10,000).
- recovery_s_no_snapshot: the same restart with the snapshots moved aside:
  every one of the million events replayed (a worst case: a lost snapshot dir).
- seed_lost: the seed's ProcessSandboxService, same scenario at a smaller
  scale (seed_sandboxes, each a Python process): its sandboxes live in a
  module-level dict, so a restarted service knows none of them; seed_orphans
  is how many of their processes it left running, unknown.

The log is filled offline through the real store (append_many in batches of
5,000 sandbox lifecycles, every sandbox deleted again), then the daemon starts
the live sandboxes through its gateway. Prints a readable summary, then one
JSON object as its last line. ``--quick``: 100 sandboxes, 100,000 events,
10 seed sandboxes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import trio
from _common import bench_base, emit_json, end_sandboxes, machine, print_targets, seed_dir, step

from sandboxd.events import types as ev
from sandboxd.events.store import StoreConfig, open_store
from sandboxd.gateway.client import open_client

SEED_DIR = seed_dir()
TOKEN = "bench-admin-token-0123456789"
SANDBOX_PORTS = (12000, 13999)  # below the ephemeral range: no outgoing connection takes one
SEED_PORTS = (14000, 15999)  # a block of 10 per seed sandbox, from a random start
LIFECYCLE = 10  # events per filler sandbox
SLEEP = shutil.which("sleep") or "/bin/sleep"


# -- the log's history, written offline -----------------------------------------------------


def lifecycle(n: int) -> list[ev.PendingEvent]:
    """One filler sandbox, created to deleted: 10 events."""
    sandbox_id = f"hist-{n:07d}"
    port = 20000 + n % 10000
    running = ev.SandboxRunning([ev.ExposedUrl("AGENT_SERVER", f"http://127.0.0.1:{port}")])
    data: list[ev.Payload] = [
        ev.SandboxCreated("light", "admin", f"/var/lib/sandboxd/sandboxes/{sandbox_id}", port),
        ev.ProcessStarted(4_000_000 + n % 100_000, 4_000_000 + n % 100_000, 1.7e9 + n, [SLEEP]),
        running,
        ev.SandboxPaused(),
        ev.SandboxResumed(),
        ev.SandboxPaused(),
        ev.SandboxResumed(),
        ev.SandboxUnhealthy("3 health checks in a row got no 200"),
        ev.SandboxHealthy(),
        ev.SandboxDeleted(False),
    ]
    return [ev.PendingEvent(sandbox_id, "admin", d) for d in data]


async def write_history(state_dir: Path, events: int) -> None:
    batch = 500  # lifecycles per append_many: 5,000 events, one write and one fdatasync
    async with open_store(state_dir, StoreConfig(snapshot_every=0)) as store:
        for first in range(0, events // LIFECYCLE, batch):
            count = min(batch, events // LIFECYCLE - first)
            pendings = [p for n in range(first, first + count) for p in lifecycle(n)]
            await store.append_many(pendings)
    # Its clean close took a snapshot at the end of the history.


# -- the daemon ---------------------------------------------------------------------------


def config_toml(state_dir: Path, port: int, sandboxes: int) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = {json.dumps(str(state_dir))}
[sandboxes]
port_range = [{SANDBOX_PORTS[0]}, {SANDBOX_PORTS[1]}]
max_sandboxes = {sandboxes + 100}
max_sandboxes_per_user = {sandboxes + 100}
on_shutdown = "keep"
[[specs]]
id = "light"
command = [{json.dumps(SLEEP)}, "3600"]
health_check_path = ""
inherit_env = ["PATH"]
[[users]]
id = "admin"
token = "{TOKEN}"
admin = true
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    def __init__(self, base: Path, sandboxes: int) -> None:
        self.state_dir = base / "state"
        self.port = free_port()
        self.config = base / "sandboxd.toml"
        self.config.write_text(config_toml(self.state_dir, self.port, sandboxes))
        self.log = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.started_wall = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def spawn(self) -> None:
        with self.log.open("ab") as log:
            log.write(b"=== start\n")
            self.started_at = time.perf_counter()
            self.started_wall = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandboxd.cli", "serve", "--config", str(self.config)],
                cwd=self.config.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def last_output(self) -> str:
        return self.log.read_text(errors="replace").rsplit("=== start\n", 1)[-1]


async def wait_for_gateway(daemon: Daemon, within: float) -> None:
    """Poll until the gateway accepts a connection (it opens only after recovery)."""
    with trio.fail_after(within):
        while True:
            assert daemon.proc is not None
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{daemon.last_output()[-3000:]}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
            except OSError:
                await trio.sleep(0.005)
                continue
            await stream.aclose()
            return


async def start_sandboxes(daemon: Daemon, n: int) -> dict[str, int]:
    """Start ``n`` light sandboxes through the gateway, 4 clients with 32 starts in flight each."""
    pids: dict[str, int] = {}
    todo = iter(range(n))

    async def one_client() -> None:
        async with open_client(daemon.url, TOKEN) as client:

            async def starter() -> None:
                for i in todo:
                    info = await client.start(spec_id="light", sandbox_id=f"live-{i:05d}")
                    assert info.pid is not None
                    pids[info.id] = info.pid

            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(starter)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one_client)
    return pids


async def all_adopted(daemon: Daemon, pids: dict[str, int]) -> tuple[int, int]:
    """(sandboxes RUNNING under their old pid, head seq), as the gateway serves them."""
    async with open_client(daemon.url, TOKEN) as client:
        same = 0
        async for info in client.search_all():
            if info.status.value == "RUNNING" and pids.get(info.id) == info.pid:
                same += 1
        head = (await client.server_info()).head_seq
    return same, head


async def count_adopted(daemon: Daemon, after_seq: int) -> int:
    async with open_client(daemon.url, TOKEN) as client:
        adopted = 0
        while True:
            page = await client.read_events(after_seq, types=["sandbox.adopted"])
            adopted += len(page.events)
            if page.next_after_seq == after_seq:
                return adopted
            after_seq = page.next_after_seq


async def restart_and_time(daemon: Daemon, pids: dict[str, int]) -> dict[str, Any]:
    daemon.kill()
    daemon.spawn()
    await wait_for_gateway(daemon, within=300)
    same, head = await all_adopted(daemon, pids)
    elapsed = time.perf_counter() - daemon.started_at
    out = daemon.last_output()
    found = re.search(r"from snapshot (\d+) and (\d+) events after it", out)
    in_daemon = re.search(r"recovery: .* in ([0-9.]+) s", out)
    phases = _phases(out, daemon.started_wall, daemon.started_wall + elapsed)
    return {
        **phases,
        "recovery_s": elapsed,
        "same_pid_running": same,
        "head_seq": head,
        "snapshot_seq": int(found.group(1)) if found else -1,
        "tail_events": int(found.group(2)) if found else -1,
        "recovery_in_daemon_s": float(in_daemon.group(1)) if in_daemon else float("nan"),
    }


def _phases(output: str, spawned: float, answered: float) -> dict[str, float]:
    """Where the restart's time went, from the timestamps of the daemon's log lines."""
    marks = {
        "rebuilt the state": "store_open_s",  # log opened and checked, snapshot, tail
        "recovery: ": "reconcile_s",  # the OS checked, events recorded, actors started
        "listening on": "gateway_open_s",  # daemon.started, the gateway bound
    }
    found: dict[str, float] = {}
    last = spawned
    for line in output.splitlines():
        for text, name in marks.items():
            if text in line and name not in found:
                stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
                stamp += int(line[20:23]) / 1000
                found[name] = max(0.0, stamp - last)
                last = stamp
    found["first_answer_s"] = max(0.0, answered - last)
    return found


def import_floor() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sandboxd.daemon"], check=True, cwd="/")
    return time.perf_counter() - started


async def bench_sandboxd(base: Path, sandboxes: int, events: int, full: bool) -> dict[str, Any]:
    daemon = Daemon(base, sandboxes)
    results: dict[str, Any] = {}
    try:
        step(f"  writing {events:,} events of history through the store ...")
        started = time.perf_counter()
        await write_history(daemon.state_dir, events)
        results["history_write_s"] = time.perf_counter() - started
        step("  starting the daemon ...")
        daemon.spawn()
        await wait_for_gateway(daemon, within=600)
        step(f"  starting {sandboxes:,} sandboxes through the gateway ...")
        started = time.perf_counter()
        pids = await start_sandboxes(daemon, sandboxes)
        results["start_all_s"] = time.perf_counter() - started
        async with open_client(daemon.url, TOKEN) as client:
            head_before = (await client.server_info()).head_seq
        results["events_in_log"] = head_before
        step("  SIGKILL, and start again ...")
        timed = await restart_and_time(daemon, pids)
        results.update(timed)
        results["adopted"] = await count_adopted(daemon, head_before)
        results["lost"] = sandboxes - timed["same_pid_running"]
        alive = sum(1 for pid in pids.values() if psutil.pid_exists(pid))
        results["processes_alive"] = alive
        if full:
            step("  SIGKILL, snapshots moved aside, start again (every event replayed) ...")
            daemon.kill()
            aside = base / "snapshots-aside"
            shutil.move(daemon.state_dir / "snapshots", aside)
            worst = await restart_and_time(daemon, pids)
            results["recovery_s_no_snapshot"] = worst["recovery_s"]
            results["lost_no_snapshot"] = sandboxes - worst["same_pid_running"]
    finally:
        daemon.kill()
        killed = end_sandboxes(daemon.state_dir)
        step(f"  ended the daemon and {killed} sandbox processes")
    return results


# -- the seed, in subprocesses (asyncio) ---------------------------------------------------


def _seed_imports() -> Any:
    sys.path.insert(0, str(SEED_DIR))
    import seed_peer  # type: ignore[import-not-found]  # the peer's folder, put on sys.path

    return seed_peer


async def seed_start_role(state_dir: str, n: int, base_port: int) -> None:
    """Start ``n`` seed sandboxes, print their processes as one JSON line, then wait to die."""
    import dataclasses

    seed_peer = _seed_imports()
    async with seed_peer.open_seed_service(state_dir, base_port=base_port) as first:
        # One service per start, each with its own block of ports (they share the
        # module's table): the seed holds no port between picking it ("the first port
        # from base_port that binds") and its child binding it, and a port a previous
        # run left in TIME_WAIT does not bind, so starts at once need distinct blocks.
        services = [dataclasses.replace(first, base_port=base_port + 10 * i) for i in range(n)]
        failed = 0
        for i in range(0, n, 50):
            wave = services[i : i + 50]
            done = await asyncio.gather(*(s.start_sandbox() for s in wave), return_exceptions=True)
            failed += sum(1 for d in done if isinstance(d, BaseException))
        procs = [[p.pid, psutil.Process(p.pid).create_time()] for p in _seed_table().values()]
        print(json.dumps({"started": len(procs), "failed": failed, "procs": procs}), flush=True)
        await asyncio.sleep(3600)  # SIGKILLed long before


def _seed_table() -> dict[str, Any]:
    from openhands.app_server.sandbox import (  # type: ignore[import-not-found]
        process_sandbox_service,
    )

    table: dict[str, Any] = process_sandbox_service._processes
    return table


async def seed_restart_role(state_dir: str) -> None:
    """A fresh service on the same directory: how many sandboxes does it know?"""
    seed_peer = _seed_imports()
    async with seed_peer.open_seed_service(state_dir, base_port=SEED_PORTS[0]) as service:
        known = 0
        page_id = None
        while True:
            page = await service.search_sandboxes(page_id=page_id, limit=100)
            known += len(page.items)
            page_id = page.next_page_id
            if page_id is None:
                break
    print(json.dumps({"known": known}), flush=True)


def bench_seed(base: Path, n: int) -> dict[str, Any]:
    state_dir = base / "seed"
    argv = [sys.executable, __file__, "--state-dir", str(state_dir)]
    base_port = random.randrange(SEED_PORTS[0], SEED_PORTS[1] - 10 * n)
    driver = subprocess.Popen(
        [*argv, "--role", "seed-start", "--n", str(n), "--base-port", str(base_port)],
        stdout=subprocess.PIPE,
        text=True,
        # The seed's children stay in its process group: the clean-up's handle on all.
        start_new_session=True,
    )
    procs: list[list[float]] = []
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()  # blocks until its sandboxes are up
        if not line:
            raise RuntimeError("the seed driver died before starting its sandboxes")
        started = json.loads(line)
        procs = started["procs"]
        driver.send_signal(signal.SIGKILL)  # the service process only: its children live on
        driver.wait()
        restarted = subprocess.run(
            [*argv, "--role", "seed-restart"], capture_output=True, text=True, check=True
        )
        known = json.loads(restarted.stdout.strip().splitlines()[-1])["known"]
        orphans = sum(1 for pid, created in procs if _same_process(int(pid), created))
        return {
            "seed_start_failures": started["failed"],
            "seed_sandboxes": started["started"],
            "seed_known_after_restart": known,
            "seed_lost": started["started"] - known,
            "seed_orphans": orphans,
        }
    finally:
        driver.kill()
        driver.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # whatever of its group is left
        for pid, created in procs:
            if _same_process(int(pid), created):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(int(pid)).kill()


def _same_process(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        same: bool = abs(proc.create_time() - created) < 0.01
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--dir", type=Path, help="where state goes (default: a temporary dir)")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed's part")
    hidden = argparse.SUPPRESS
    parser.add_argument("--role", choices=["seed-start", "seed-restart"], help=hidden)
    parser.add_argument("--state-dir", help=hidden)
    parser.add_argument("--n", type=int, help=hidden)
    parser.add_argument("--base-port", type=int, help=hidden)
    args = parser.parse_args(argv)
    if args.role == "seed-start":
        asyncio.run(seed_start_role(args.state_dir, args.n, args.base_port))
        return 0
    if args.role == "seed-restart":
        asyncio.run(seed_restart_role(args.state_dir))
        return 0

    sandboxes = 100 if args.quick else 1000
    events = 100_000 if args.quick else 1_000_000
    seed_n = 10 if args.quick else 100
    base = bench_base("sandboxd-bench-recovery-", args.dir)
    results: dict[str, Any] = {"sandboxes": sandboxes}
    try:
        print(f"sandboxd recovery benchmark ({'quick' if args.quick else 'full'} run)")
        print(f"  {machine()}; state in {base}")
        results["import_floor_s"] = import_floor()
        results.update(trio.run(bench_sandboxd, base, sandboxes, events, not args.quick))
        if not args.no_seed:
            step(f"  the seed: {seed_n} sandboxes, SIGKILL, restart ...")
            results.update(bench_seed(base, seed_n))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(
        f"  {sandboxes:,} live sandboxes, {results['events_in_log']:,} events in the log; "
        f"newest snapshot at seq {results['snapshot_seq']:,}, "
        f"{results['tail_events']:,} events replayed after it"
    )
    print(
        f"  history written in {results['history_write_s']:.1f} s; "
        f"{sandboxes:,} sandboxes started in {results['start_all_s']:.1f} s"
    )
    print(
        f"  restart after SIGKILL: {results['recovery_s']:.2f} s to a gateway serving all "
        f"(Python and imports alone: {results['import_floor_s']:.2f} s)"
    )
    print(
        f"    exec to store open {results.get('store_open_s', float('nan')):.2f} s, "
        f"OS reconciliation {results.get('reconcile_s', float('nan')):.2f} s "
        f"(its own measure {results['recovery_in_daemon_s']:.3f} s), "
        f"gateway open {results.get('gateway_open_s', float('nan')):.2f} s, "
        f"first full answer {results.get('first_answer_s', float('nan')):.2f} s"
    )
    if "recovery_s_no_snapshot" in results:
        print(
            f"  without snapshots (all {results['events_in_log']:,} events replayed): "
            f"{results['recovery_s_no_snapshot']:.2f} s, lost {results['lost_no_snapshot']}"
        )
    if "seed_lost" in results:
        print(
            f"  the seed at {results['seed_sandboxes']} sandboxes: after SIGKILL and restart it "
            f"knows {results['seed_known_after_restart']}, lost {results['seed_lost']}; "
            f"{results['seed_orphans']} of their processes still run, unknown to it"
            + (
                f" ({results['seed_start_failures']} of its starts failed)"
                if results["seed_start_failures"]
                else ""
            )
        )
    print()
    print_targets(
        [
            ("recovery_s", results["recovery_s"], "<= 2 s", results["recovery_s"] <= 2),
            ("adopted", results["adopted"], f"{sandboxes}", results["adopted"] == sandboxes),
            ("lost", results["lost"], "0", results["lost"] == 0),
        ]
    )
    emit_json(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
