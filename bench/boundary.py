"""Benchmark of the boundary's own costs, on real cgroups: spawn, cgroups, freeze, usage.

    python bench/boundary.py [--quick] [--rss-mb N]

What bench/sandboxes.py measures through the registry (start, pause,
delete_all of 1,000) is not repeated here; this is what those numbers are
made of, each against its raw reference:

- spawn_raw_ms_p50: trio.lowlevel.open_process of /usr/bin/true (new session,
  stdin /dev/null, output to a file, a given env and cwd) until it has exited:
  vfork, exec, exit.
- spawn_confined_warm_ms_p50: the same command through open_confined_process
  (its cgroups, a uid of its own, no_new_privs, rlimits, umask), back to back
  into one cgroup; confined_overhead_ms_p50 is its difference from raw, at the
  bench's RSS and grown (``--rss-mb``, default 60, the daemon's RSS target),
  since fork, unlike vfork, costs in proportion to the parent's memory.
- spawn_confined_cold_ms_p50: the same into a fresh cgroup each time, the
  starts spaced 150 ms apart, as sandboxes start: a process moved into a
  cgroup waits for an RCU grace period (the kernel's cgroup_threadgroup_rwsem
  taken for writing), unless another move happened within the last grace
  period; cold_cost_ms_p50 is what that adds.
- cgroup_create_ms_p50 / cgroup_remove_ms_p50: a sandbox's cgroups made (with
  limits) and removed.
- pause_ms_p99_tree50: freeze of a 50-process tree until the kernel confirms
  it frozen, thaw likewise; the raw reference is SIGSTOP to the process group
  until /proc shows all 50 stopped.
- usage_ms_per_1000: reading usage (cpu, memory, pids) of sandboxes with a
  process each, per 1,000: what serving it in sandbox.search of 1,000 would add.

Needs root and a cgroup boundary (prints a skip otherwise). Prints a readable
summary, then one JSON object as its last line. ``--quick``: fewer rounds.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from _common import emit_json, machine, median, percentile, print_targets, step

from sandboxd.actors.boundary.cgroups import CgroupBoundary, SandboxCgroup
from sandboxd.actors.boundary.confine import Confinement, open_confined_process
from sandboxd.actors.boundary.discovery import discover
from sandboxd.actors.boundary.identities import Identity, UidPool
from sandboxd.actors.boundary.limits import Limits
from sandboxd.actors.boundary.workdirs import make_base_dir, remove_tree

TRUE = "/usr/bin/true"
SLEEP = "/usr/bin/sleep"
ENV = {"PATH": "/usr/bin:/bin", "SANDBOX_ID": "bench"}
UIDS = (656000, 665535)


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def raw_spawn(cwd: str, out: int) -> float:
    started = time.perf_counter()
    process = await trio.lowlevel.open_process(
        [TRUE],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        env=ENV,
        cwd=cwd,
        start_new_session=True,
    )
    await process.wait()
    return (time.perf_counter() - started) * 1e3


async def confined_spawn(confinement: Confinement, cwd: str, out: int) -> float:
    started = time.perf_counter()
    process = await open_confined_process(
        [TRUE], confinement=confinement, env=ENV, cwd=cwd, stdout=out, stderr=out
    )
    await process.wait()
    return (time.perf_counter() - started) * 1e3


async def spawn_round(
    cgroup: SandboxCgroup, identity: Identity, cwd: str, out: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Raw and confined spawns, alternating, back to back into one cgroup (warm)."""
    confinement = Confinement(
        cgroup_procs=cgroup.procs_files(), identity=identity, rlimits=((6, 4096),)
    )
    raw: list[float] = []
    confined: list[float] = []
    for _ in range(rounds):
        raw.append(await raw_spawn(cwd, out))
        confined.append(await confined_spawn(confinement, cwd, out))
    return raw, confined


async def cold_round(
    boundary: CgroupBoundary, identity: Identity, cwd: str, out: int, rounds: int
) -> list[float]:
    """Confined spawns into a fresh cgroup each, 150 ms apart (cold, as sandboxes start)."""
    cold: list[float] = []
    for i in range(rounds):
        await trio.sleep(0.15)  # longer than a grace period: nothing moved meanwhile
        cgroup = boundary.create(f"bench-cold-{i}", Limits(pids_max=64))
        try:
            confinement = Confinement(cgroup_procs=cgroup.procs_files(), identity=identity)
            cold.append(await confined_spawn(confinement, cwd, out))
        finally:
            await boundary.remove(cgroup)
    return cold


async def bench_spawn(
    boundary: CgroupBoundary, cwd: str, rounds: int, rss_target_mb: int
) -> dict[str, Any]:
    cgroup = boundary.create("bench-spawn", Limits(pids_max=64))
    identity = Identity(UIDS[0], UIDS[0])
    out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    results: dict[str, Any] = {}
    try:
        await spawn_round(cgroup, identity, cwd, out, 5)  # warm-up: threads, page cache
        raw, confined = await spawn_round(cgroup, identity, cwd, out, rounds)
        results["bench_rss_mb"] = rss_mb()
        results["spawn_raw_ms_p50"] = median(raw)
        results["spawn_confined_warm_ms_p50"] = median(confined)
        results["confined_overhead_ms_p50"] = median(confined) - median(raw)
        step(f"  cold: a fresh cgroup each, {rounds // 4} spawns 150 ms apart ...")
        cold = await cold_round(boundary, identity, cwd, out, rounds // 4)
        results["spawn_confined_cold_ms_p50"] = median(cold)
        results["spawn_confined_cold_ms_p99"] = percentile(cold, 99)
        results["cold_cost_ms_p50"] = median(cold) - median(confined)
        step(f"  grown to {rss_target_mb} MB of RSS (the daemon's target) ...")
        ballast = bytearray(max(0, int((rss_target_mb - rss_mb()) * 2**20)))
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
        raw, confined = await spawn_round(cgroup, identity, cwd, out, rounds)
        results["grown_rss_mb"] = rss_mb()
        results["spawn_raw_ms_p50_grown"] = median(raw)
        results["spawn_confined_warm_ms_p50_grown"] = median(confined)
        results["confined_overhead_ms_p50_grown"] = median(confined) - median(raw)
        del ballast
    finally:
        os.close(out)
        await boundary.remove(cgroup)
    return results


async def bench_create_remove(boundary: CgroupBoundary, rounds: int) -> dict[str, Any]:
    create: list[float] = []
    remove: list[float] = []
    limits = Limits(memory_max=256 << 20, pids_max=128, cpu_max=1.0)
    for i in range(rounds):
        started = time.perf_counter()
        cgroup = boundary.create(f"bench-create-{i}", limits)
        create.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        await boundary.remove(cgroup)
        remove.append((time.perf_counter() - started) * 1e3)
    return {"cgroup_create_ms_p50": median(create), "cgroup_remove_ms_p50": median(remove)}


TREE = (
    "import os, time\n"
    "for _ in range(49):\n"
    "    if os.fork() == 0:\n"
    "        break\n"
    "time.sleep(3600)\n"
)


async def poll_until(predicate: Callable[[], bool], interval: float) -> None:
    # /proc has no event to wait on: polling it is what the SIGSTOP reference costs.
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(interval)


def all_stopped(pids: list[int], stopped: bool) -> bool:
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (state in "tT") != stopped:
            return False
    return True


async def bench_pause(boundary: CgroupBoundary, cwd: str, rounds: int) -> dict[str, Any]:
    cgroup = boundary.create("bench-pause", Limits(pids_max=128))
    out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        root = await open_confined_process(
            ["/usr/bin/python3", "-c", TREE],
            confinement=Confinement(cgroup_procs=cgroup.procs_files()),
            env=ENV,
            cwd=cwd,
            stdout=out,
            stderr=out,
        )
        with trio.fail_after(30):
            await poll_until(lambda: len(cgroup.pids()) >= 50, 0.01)
        pids = cgroup.pids()
        freeze: list[float] = []
        thaw: list[float] = []
        sigstop: list[float] = []
        for _ in range(rounds):
            started = time.perf_counter()
            await cgroup.freeze()
            freeze.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            await cgroup.thaw()
            thaw.append((time.perf_counter() - started) * 1e3)
            # The reference: one SIGSTOP to the group, then /proc until all 50 show it.
            started = time.perf_counter()
            os.killpg(root.pid, signal.SIGSTOP)
            await poll_until(lambda: all_stopped(pids, True), 0.0005)
            sigstop.append((time.perf_counter() - started) * 1e3)
            os.killpg(root.pid, signal.SIGCONT)
            await poll_until(lambda: all_stopped(pids, False), 0.0005)
        await cgroup.kill()
        await root.wait()
    finally:
        os.close(out)
        await boundary.remove(cgroup)
    return {
        "pause_ms_p50_tree50": median(freeze),
        "pause_ms_p99_tree50": percentile(freeze, 99),
        "resume_ms_p99_tree50": percentile(thaw, 99),
        "sigstop_ms_p99_tree50": percentile(sigstop, 99),
    }


async def bench_usage(boundary: CgroupBoundary, base: Path, count: int) -> dict[str, Any]:
    """Usage of ``count`` sandboxes with a sleeping process each, per 1,000."""
    pool = UidPool(*UIDS)
    cgroups: list[SandboxCgroup] = []
    processes: list[trio.Process] = []
    out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        step(f"  starting {count} sandboxes, each a sleep under its own uid ...")
        for i in range(count):
            cgroup = boundary.create(f"bench-usage-{i}", Limits(pids_max=16))
            cgroups.append(cgroup)
            uid = pool.allocate(cgroup.sandbox_id)
            confinement = Confinement(
                cgroup_procs=cgroup.procs_files(), identity=Identity(uid, uid)
            )
            processes.append(
                await open_confined_process(
                    [SLEEP, "3600"],
                    confinement=confinement,
                    env=ENV,
                    cwd=str(base),
                    stdout=out,
                    stderr=out,
                )
            )
        started = time.perf_counter()
        for _ in range(3):
            for cgroup in cgroups:
                cgroup.usage()
        usage_ms = (time.perf_counter() - started) * 1e3 / 3 * 1000 / count
    finally:
        os.close(out)
        for cgroup in cgroups:
            await boundary.remove(cgroup)
        for process in processes:
            await process.wait()
    return {"usage_ms_per_1000": usage_ms, "usage_sandboxes": count}


async def run(quick: bool, rss_target_mb: int) -> dict[str, Any]:
    found = discover()
    if found.layout is None:
        raise SystemExit(f"no cgroup boundary here: {found.reason}")
    state = Path(tempfile.mkdtemp(prefix="bench-boundary-"))
    base = Path(tempfile.mkdtemp(prefix="bench-boundary-base-", dir="/tmp"))
    make_base_dir(base)
    boundary = CgroupBoundary.open(found.layout, state_dir=state)
    results: dict[str, Any] = {"boundary": boundary.mode, "machine": machine()}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(boundary.run)
            step("spawn: raw vs confined ...")
            rounds = 30 if quick else 200
            results |= await bench_spawn(boundary, str(base), rounds, rss_target_mb)
            step("cgroup create and remove ...")
            results |= await bench_create_remove(boundary, 50 if quick else 300)
            step("pause of a 50-process tree ...")
            results |= await bench_pause(boundary, str(base), 20 if quick else 100)
            step("usage ...")
            results |= await bench_usage(boundary, base, 50 if quick else 200)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                await nursery.start(boundary.run)
                await boundary.remove_strays(())
                nursery.cancel_scope.cancel()
        boundary.close(remove_parents=True)
        remove_tree(base)
        remove_tree(state)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rss-mb", type=int, default=60, help="RSS for the second spawn round")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        step("skipped: needs root (cgroups and uids)")
        emit_json({"skipped": "needs root"})
        return 0
    r = trio.run(run, args.quick, args.rss_mb)
    print(f"boundary {r['boundary']} on {r['machine']}")
    print(
        f"  spawn /usr/bin/true to exit: raw {r['spawn_raw_ms_p50']:.2f} ms, confined warm"
        f" {r['spawn_confined_warm_ms_p50']:.2f} ms, cold {r['spawn_confined_cold_ms_p50']:.2f}"
        f" ms (bench RSS {r['bench_rss_mb']:.0f} MB); at RSS {r['grown_rss_mb']:.0f} MB: raw"
        f" {r['spawn_raw_ms_p50_grown']:.2f} ms, confined warm"
        f" {r['spawn_confined_warm_ms_p50_grown']:.2f} ms"
    )
    print(
        f"  cgroups per sandbox: create {r['cgroup_create_ms_p50']:.2f} ms, remove"
        f" {r['cgroup_remove_ms_p50']:.2f} ms"
    )
    print(
        f"  50-process tree: freeze p50 {r['pause_ms_p50_tree50']:.2f} ms, p99"
        f" {r['pause_ms_p99_tree50']:.2f} ms; SIGSTOP reference p99"
        f" {r['sigstop_ms_p99_tree50']:.2f} ms"
    )
    print(f"  usage of 1000 sandboxes: {r['usage_ms_per_1000']:.1f} ms")
    overhead, grown = r["confined_overhead_ms_p50"], r["confined_overhead_ms_p50_grown"]
    pause = r["pause_ms_p99_tree50"]
    print_targets(
        [
            ("confined_overhead_ms_p50", overhead, "<= 5 ms", overhead <= 5),
            ("confined_overhead_ms_p50_grown", grown, "<= 5 ms", grown <= 5),
            ("pause_ms_p99_tree50", pause, "<= 20 ms", pause <= 20),
        ]
    )
    emit_json(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
