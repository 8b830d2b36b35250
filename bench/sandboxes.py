"""Benchmark of sandboxes: start latency, concurrent starts, and 1,000 live sandboxes.

    python bench/sandboxes.py [--quick] [--dir DIR]

Measured in one run, against the physical reference and the seed:

- start_ms_p50/p99: in-process ``Registry.start_sandbox(wait=True)`` of the
  peers' tiny_agent, from the call to its return (RUNNING: its /alive
  answered 200). The registry runs on a real store (fsynced log) in DIR.
- raw_ready_ms_p50: the same child spawned by hand (trio.lowlevel.open_process,
  same command and environment) and polled every 1 ms until its first 200.
  Raw and registry starts alternate, so machine noise hits both alike.
- seed_start_ms_p50: the seed's ProcessSandboxService (asyncio, in a
  subprocess) starting the same child; speedup_vs_seed is its p50 over ours.
- concurrent100_s / raw_concurrent100_s: 100 starts at once until all are
  RUNNING, and 100 raw spawns each polled every 10 ms until all answer 200.
- At 1,000 live sandboxes of a light child (``sleep 3600``, no health check,
  liveness off), in a subprocess that runs only the store and the registry
  (the daemon without its gateway): rss_mb_1000 (that process's whole RSS),
  idle_cpu_pct_1000 (its CPU, all threads, over seconds of idleness),
  get_ms_p99_1000 and search_ms_p99_1000 (limit 100, first and later pages),
  and delete_all_s_1000 (the teardown through Registry.delete_all).
- seed_search_ms_p99: the seed's search_sandboxes (limit 100) with as many of
  its sandboxes live as memory allows, up to 1,000 (each is a Python process
  of ~11 MB; the count used is reported as seed_scale_n).

Prints a readable summary, then one JSON object as its last line. ``--quick``
runs fewer starts and 300 live sandboxes instead of 1,000 (seed: 100).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio
from _common import (
    Target,
    cpu_seconds,
    emit_json,
    kill_marked,
    machine,
    median,
    percentile,
    print_targets,
    rss_mb,
    run_json_subprocess,
    seed_dir,
    step,
)

from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.ports import PortAllocator
from sandboxd.actors.registry import Registry
from sandboxd.actors.specs import SpecConfig
from sandboxd.config import Config
from sandboxd.daemon import raise_open_files_limit
from sandboxd.events.store import open_store

SEED_DIR = seed_dir()
TINY_AGENT = SEED_DIR / "tiny_agent.py"

# Ports below Linux's ephemeral range (32768+), so no outgoing connection holds one.
PROJECT_PORTS = (24000, 25999)
RAW_PORTS = (26000, 26999)
SEED_START_PORT = 27000
SEED_SCALE_PORT = 28000  # up to 28999
LIGHT_COMMAND = ("sleep", "3600")
INHERIT = ("PATH", "HOME", "LANG")

TINY = SpecConfig(
    id="tiny",
    command=(sys.executable, str(TINY_AGENT), "--port", "{port}"),
    health_check_path="/alive",
    health_interval=0,
    ready_timeout=60.0,
)
LIGHT = SpecConfig(id="light", command=LIGHT_COMMAND, health_check_path="", health_interval=0)


@attrs.frozen
class Admin:
    id: str | None = None
    admin: bool = True


ADMIN = Admin()


def registry_config(state_dir: Path, spec: SpecConfig, limit: int) -> Config:
    return Config(
        state_dir=state_dir,
        port_range=PROJECT_PORTS,
        stop_timeout=2.0,
        max_sandboxes=limit,
        max_sandboxes_per_user=limit,
        specs=(spec,),
    )


# -- the raw reference -------------------------------------------------------------------

_ALIVE = b"GET /alive HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def http_ok(port: int) -> bool:
    """One bare GET /alive: True on a 200."""
    try:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        with sock:
            await sock.connect(("127.0.0.1", port))
            await sock.send(_ALIVE)
            head = await sock.recv(64)
            return head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    except OSError:
        return False


def raw_env() -> dict[str, str]:
    return {name: os.environ[name] for name in INHERIT if name in os.environ}


async def raw_start(port: int, cwd: Path, poll: float) -> float:
    """Spawn tiny_agent by hand and poll it every ``poll`` s until its first 200: ms."""
    started = time.perf_counter()
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(TINY_AGENT), "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=raw_env(),
        cwd=str(cwd),
        start_new_session=True,
    )
    try:
        with trio.fail_after(60):
            while not await http_ok(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"tiny_agent on port {port} exited: {proc.returncode}")
                await trio.sleep(poll)
        return (time.perf_counter() - started) * 1000
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with trio.CancelScope(shield=True):
            await proc.wait()


# -- starts: single and concurrent, in this process ---------------------------------------


async def bench_starts(base: Path, singles: int, rounds: int, concurrent: int) -> dict[str, Any]:
    state_dir = base / "starts"
    cwd = base / "raw"
    cwd.mkdir()
    config = registry_config(state_dir, TINY, concurrent + 10)
    raw_ports = PortAllocator(*RAW_PORTS)
    out: dict[str, Any] = {"start_ms": [], "raw_ms": [], "conc_s": [], "raw_conc_s": []}
    try:
        async with open_store(state_dir) as store, trio.open_nursery() as nursery:
            registry = Registry(config, store, SessionKeys.of_state_dir(state_dir), nursery)

            async def raw_once(poll: float) -> float:
                port = raw_ports.reserve()
                try:
                    return await raw_start(port, cwd, poll)
                finally:
                    raw_ports.release(port)

            async def project_once() -> float:
                started = time.perf_counter()
                info = await registry.start_sandbox(ADMIN, spec_id="tiny")
                elapsed = (time.perf_counter() - started) * 1000
                await registry.delete(ADMIN, info.id)
                return elapsed

            step(f"  single starts: {singles} registry + {singles} raw, alternating ...")
            await raw_once(0.001)  # warm-up: the interpreter's files into the page cache
            await project_once()
            for _ in range(singles):
                out["raw_ms"].append(await raw_once(0.001))
                out["start_ms"].append(await project_once())

            for r in range(rounds):
                step(f"  {concurrent} starts at once, round {r + 1}/{rounds}: raw, then registry")
                started = time.perf_counter()
                async with trio.open_nursery() as batch:
                    for _ in range(concurrent):
                        batch.start_soon(raw_once, 0.010)
                out["raw_conc_s"].append(time.perf_counter() - started)
                await trio.sleep(0.5)

                started = time.perf_counter()
                async with trio.open_nursery() as batch:
                    for _ in range(concurrent):
                        batch.start_soon(registry.start_sandbox, ADMIN)
                out["conc_s"].append(time.perf_counter() - started)
                await registry.delete_all()
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    finally:
        kill_marked(state_dir)
    return out


# -- 1,000 live sandboxes: a subprocess running the store and the registry only ------------


async def scale_role(args: argparse.Namespace) -> dict[str, Any]:
    # As the daemon does: each sandbox holds a pidfd and its output file's descriptor.
    raise_open_files_limit()
    me = psutil.Process()
    n: int = args.n
    state_dir = Path(args.state_dir)
    out: dict[str, Any] = {"n": n, "rss_mb_imports": rss_mb(me)}
    config = registry_config(state_dir, LIGHT, n + 10)
    try:
        async with open_store(state_dir) as store, trio.open_nursery() as nursery:
            registry = Registry(config, store, SessionKeys.of_state_dir(state_dir), nursery)
            out["rss_mb_empty"] = rss_mb(me)
            ids: list[str] = []
            limiter = trio.CapacityLimiter(50)

            async def start_one() -> None:
                async with limiter:
                    ids.append((await registry.start_sandbox(ADMIN)).id)

            step(f"    starting {n} sandboxes of `{' '.join(LIGHT_COMMAND)}` ...")
            started = time.perf_counter()
            async with trio.open_nursery() as batch:
                for _ in range(n):
                    batch.start_soon(start_one)
            out["start_all_s"] = time.perf_counter() - started
            # Each actor's output watcher backs off from 50 ms to its 2 s interval: let
            # it reach its steady state before idleness is measured.
            await trio.sleep(args.settle)
            out["rss_mb"] = rss_mb(me)
            step(f"    idle for {args.idle:g} s ...")
            cpu0, wall0 = cpu_seconds(me), time.perf_counter()
            switches0 = sum(me.num_ctx_switches())
            await trio.sleep(args.idle)
            wall = time.perf_counter() - wall0
            out["idle_cpu_pct"] = (cpu_seconds(me) - cpu0) / wall * 100
            out["idle_wakeups_per_s"] = (sum(me.num_ctx_switches()) - switches0) / wall
            out["rss_mb_after_idle"] = rss_mb(me)

            rng = random.Random(1)
            gets = []
            for _ in range(args.gets):
                sandbox_id = rng.choice(ids)
                t = time.perf_counter_ns()
                info = registry.get(ADMIN, sandbox_id)
                gets.append((time.perf_counter_ns() - t) / 1e6)
                assert info is not None
            out["get_ms_p50"] = percentile(gets, 50)
            out["get_ms_p99"] = percentile(gets, 99)

            # First pages and pages from a cursor anywhere in the list.
            cursors = [str(record.created_seq) for record in store.state.sandboxes.values()]
            searches = []
            for i in range(args.searches):
                cursor = None if i % 2 == 0 else rng.choice(cursors)
                t = time.perf_counter_ns()
                page, _ = registry.search(ADMIN, page_id=cursor, limit=100)
                searches.append((time.perf_counter_ns() - t) / 1e6)
                assert page or cursor is not None
            out["search_ms_p50"] = percentile(searches, 50)
            out["search_ms_p99"] = percentile(searches, 99)

            step(f"    Registry.delete_all() of {n} ...")
            started = time.perf_counter()
            await registry.delete_all()
            out["delete_all_s"] = time.perf_counter() - started
            nursery.cancel_scope.cancel()
    finally:
        out["left_behind"] = kill_marked(state_dir)
    return out


# -- the seed (asyncio), in subprocesses -----------------------------------------------------


def _seed_imports() -> Any:
    sys.path.insert(0, str(SEED_DIR))
    import seed_peer

    return seed_peer


async def seed_start_role(args: argparse.Namespace) -> dict[str, Any]:
    seed_peer = _seed_imports()
    times: list[float] = []
    async with seed_peer.open_seed_service(args.state_dir, base_port=SEED_START_PORT) as service:
        for i in range(args.n + 1):  # the first one warms up, as for ours
            step(f"    seed start {i + 1}/{args.n + 1} ...")
            started = time.perf_counter()
            info = await service.start_sandbox()
            elapsed = (time.perf_counter() - started) * 1000
            await service.delete_sandbox(info.id)
            if i:
                times.append(elapsed)
    return {"start_ms": times}


async def seed_scale_role(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    seed_peer = _seed_imports()
    me = psutil.Process()
    n: int = args.n
    out: dict[str, Any] = {"n": n}
    async with seed_peer.open_seed_service(args.state_dir, base_port=SEED_SCALE_PORT) as first:
        # The seed picks "the first free port from base_port" and holds none: starts
        # at once would all pick the same one. One service per start, each with its
        # own base port (all share the module's sandbox table), avoids that race.
        services = [dataclasses.replace(first, base_port=SEED_SCALE_PORT + i) for i in range(n)]
        ids: list[str] = []
        failures = 0
        started = time.perf_counter()
        wave = 100
        for i in range(0, n, wave):
            step(f"    seed: starting sandboxes {i + 1}-{min(n, i + wave)} of {n} ...")
            results = await asyncio.gather(
                *(s.start_sandbox() for s in services[i : i + wave]), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    failures += 1
                else:
                    ids.append(result.id)
        out["start_all_s"] = time.perf_counter() - started
        out["failures"] = failures
        out["live"] = len(ids)
        out["rss_mb"] = rss_mb(me)
        rng = random.Random(1)
        searches = []
        for i in range(args.searches):
            page_id = None if i % 2 == 0 else str(rng.randrange(0, max(1, len(ids) - 100)))
            t = time.perf_counter_ns()
            page = await first.search_sandboxes(page_id=page_id, limit=100)
            searches.append((time.perf_counter_ns() - t) / 1e6)
            assert page.items
        out["search_ms_p50"] = percentile(searches, 50)
        out["search_ms_p99"] = percentile(searches, 99)
        gets = []
        for _ in range(args.gets):
            sandbox_id = rng.choice(ids)
            t = time.perf_counter_ns()
            await first.get_sandbox(sandbox_id)
            gets.append((time.perf_counter_ns() - t) / 1e6)
        out["get_ms_p50"] = percentile(gets, 50)
        out["get_ms_p99"] = percentile(gets, 99)
        step(f"    seed: deleting {len(ids)} ...")
        for sandbox_id in ids:
            await first.delete_sandbox(sandbox_id)
    return out


# -- the run -----------------------------------------------------------------------------


def role_argv(role: str, state_dir: Path, n: int, **extra: object) -> list[str]:
    argv = [sys.executable, __file__, "--role", role, "--state-dir", str(state_dir), "--n", str(n)]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def seed_capacity(wanted: int) -> int:
    """How many seed sandboxes (tiny_agent processes, ~11 MB PSS each) fit comfortably:
    those leaving at least 4 GiB of memory available."""
    available: int = psutil.virtual_memory().available - (4 << 30)
    return max(50, min(wanted, available // (12 << 20)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, well under a minute")
    parser.add_argument("--dir", type=Path, help="where state goes (default: a temporary dir)")
    hidden = argparse.SUPPRESS
    parser.add_argument("--role", choices=["scale", "seed-start", "seed-scale"], help=hidden)
    parser.add_argument("--state-dir", help=hidden)
    parser.add_argument("--n", type=int, help=hidden)
    parser.add_argument("--settle", type=float, default=5.0, help=hidden)
    parser.add_argument("--idle", type=float, default=5.0, help=hidden)
    parser.add_argument("--gets", type=int, default=20_000, help=hidden)
    parser.add_argument("--searches", type=int, default=1_000, help=hidden)
    args = parser.parse_args(argv)

    if args.role == "scale":
        emit_json(trio.run(scale_role, args))
        return 0
    if args.role == "seed-start":
        emit_json(asyncio.run(seed_start_role(args)))
        return 0
    if args.role == "seed-scale":
        emit_json(asyncio.run(seed_scale_role(args)))
        return 0

    quick = args.quick
    singles, rounds, concurrent = (10, 1, 100) if quick else (50, 3, 100)
    scale_n = 300 if quick else 1000
    seed_starts = 3 if quick else 10
    seed_n = seed_capacity(100 if quick else 1000)
    base = Path(tempfile.mkdtemp(prefix="sandboxd-bench-sbx-", dir=args.dir))
    results: dict[str, Any] = {}
    try:
        print(f"sandboxd sandboxes benchmark ({'quick' if quick else 'full'} run)")
        print(f"  {machine()}")
        print(f"  state in {base}; child: {TINY_AGENT.name} (and `sleep 3600` at scale)")
        starts = trio.run(bench_starts, base, singles, rounds, concurrent)

        step(f"  {scale_n} live sandboxes (subprocess: store + registry only) ...")
        scale = run_json_subprocess(
            role_argv(
                "scale",
                base / "scale",
                scale_n,
                settle=5.0,
                idle=3.0 if quick else 5.0,
                gets=5_000 if quick else 20_000,
                searches=300 if quick else 1_000,
            ),
            timeout=600,
        )
        step(f"  the seed: {seed_starts} sequential starts (subprocess, asyncio) ...")
        seed_start = run_json_subprocess(
            role_argv("seed-start", base / "seed-start", seed_starts), timeout=600
        )
        step(f"  the seed: {seed_n} live sandboxes (subprocess, asyncio) ...")
        seed_scale = run_json_subprocess(
            role_argv(
                "seed-scale",
                base / "seed-scale",
                seed_n,
                searches=100 if quick else 300,
                gets=300 if quick else 1000,
            ),
            timeout=900,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    results["start_ms_p50"] = median(starts["start_ms"])
    results["start_ms_p99"] = percentile(starts["start_ms"], 99)
    results["raw_ready_ms_p50"] = median(starts["raw_ms"])
    results["raw_ready_ms_p99"] = percentile(starts["raw_ms"], 99)
    results["start_overhead_ms_p50"] = results["start_ms_p50"] - results["raw_ready_ms_p50"]
    results["seed_start_ms_p50"] = median(seed_start["start_ms"])
    results["speedup_vs_seed"] = results["seed_start_ms_p50"] / results["start_ms_p50"]
    results["concurrent100_s"] = median(starts["conc_s"])
    results["raw_concurrent100_s"] = median(starts["raw_conc_s"])
    results["concurrent100_ratio"] = results["concurrent100_s"] / results["raw_concurrent100_s"]
    results["scale_n"] = scale["n"]
    results["rss_mb_1000"] = scale["rss_mb"]
    results["rss_mb_growth_1000"] = scale["rss_mb"] - scale["rss_mb_empty"]
    results["idle_cpu_pct_1000"] = scale["idle_cpu_pct"]
    results["idle_wakeups_per_s_1000"] = scale["idle_wakeups_per_s"]
    results["get_ms_p99_1000"] = scale["get_ms_p99"]
    results["search_ms_p99_1000"] = scale["search_ms_p99"]
    results["start_all_s_1000"] = scale["start_all_s"]
    results["delete_all_s_1000"] = scale["delete_all_s"]
    results["seed_scale_n"] = seed_scale["live"]
    results["seed_search_ms_p99_1000"] = seed_scale["search_ms_p99"]
    results["seed_get_ms_p99_1000"] = seed_scale["get_ms_p99"]
    results["seed_rss_mb_1000"] = seed_scale["rss_mb"]
    results["samples_single"] = len(starts["start_ms"])
    results["rounds_concurrent"] = len(starts["conc_s"])
    results["quick"] = quick

    r = results
    print()
    print(
        f"  start to RUNNING (registry)  p50 {r['start_ms_p50']:7.1f} ms   p99"
        f" {r['start_ms_p99']:7.1f} ms   ({r['samples_single']} starts)"
    )
    print(
        f"  raw spawn to first 200       p50 {r['raw_ready_ms_p50']:7.1f} ms   p99"
        f" {r['raw_ready_ms_p99']:7.1f} ms"
    )
    print(f"  seed start                   p50 {r['seed_start_ms_p50']:7.1f} ms")
    print(
        f"  {concurrent} at once: registry {r['concurrent100_s']:.2f} s, raw"
        f" {r['raw_concurrent100_s']:.2f} s (median of {r['rounds_concurrent']};"
        f" registry {', '.join(f'{x:.2f}' for x in starts['conc_s'])};"
        f" raw {', '.join(f'{x:.2f}' for x in starts['raw_conc_s'])})"
    )
    print(
        f"  {r['scale_n']} live: started in {r['start_all_s_1000']:.1f} s, RSS"
        f" {scale['rss_mb_empty']:.1f} MB empty -> {r['rss_mb_1000']:.1f} MB,"
        f" idle CPU {r['idle_cpu_pct_1000']:.2f} %"
        f" ({r['idle_wakeups_per_s_1000']:.0f} context switches/s),"
        f" get p50 {scale['get_ms_p50'] * 1000:.1f} us, search p50"
        f" {scale['search_ms_p50']:.2f} ms, delete_all {r['delete_all_s_1000']:.1f} s"
    )
    print(
        f"  seed, {r['seed_scale_n']} live (failures {seed_scale['failures']}): search p50"
        f" {seed_scale['search_ms_p50']:.2f} ms, p99 {seed_scale['search_ms_p99']:.2f} ms;"
        f" get p99 {seed_scale['get_ms_p99']:.3f} ms; RSS {seed_scale['rss_mb']:.0f} MB"
    )
    print()
    rows: list[Target] = [
        ("start_ms_p50 - raw_ready_ms_p50", r["start_overhead_ms_p50"], "<= 5 ms", False),
        ("speedup_vs_seed", r["speedup_vs_seed"], ">= 20", False),
        ("concurrent100_s / raw", r["concurrent100_ratio"], "<= 1.3", False),
        ("rss_mb_1000", r["rss_mb_1000"], "<= 60 MB", False),
        ("idle_cpu_pct_1000", r["idle_cpu_pct_1000"], "<= 1 %", False),
        ("get_ms_p99_1000", r["get_ms_p99_1000"], "<= 1 ms", False),
        ("search_ms_p99_1000", r["search_ms_p99_1000"], "<= 5 ms", False),
    ]
    checks = [
        r["start_overhead_ms_p50"] <= 5,
        r["speedup_vs_seed"] >= 20,
        r["concurrent100_ratio"] <= 1.3,
        r["rss_mb_1000"] <= 60,
        r["idle_cpu_pct_1000"] <= 1,
        r["get_ms_p99_1000"] <= 1,
        r["search_ms_p99_1000"] <= 5,
    ]
    print_targets([(m, v, t, ok) for (m, v, t, _), ok in zip(rows, checks, strict=True)])
    if r["scale_n"] != 1000 or r["seed_scale_n"] != 1000:
        print(f"  (at scale: {r['scale_n']} sandboxes, seed {r['seed_scale_n']}: not 1,000)")
    emit_json(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
