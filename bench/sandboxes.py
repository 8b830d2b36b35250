"""Benchmark of sandboxes: start latency, concurrent starts, pause, and 1,000 live sandboxes.

    python bench/sandboxes.py [--quick] [--dir DIR] [--cgroup auto|off] [--run-as dynamic|daemon]

Runs on the boundary the daemon would use here: by default (as root) a cgroup
per sandbox and a uid per sandbox, like a daemon's defaults; ``--cgroup off``
and ``--run-as daemon`` measure the fallback and the unisolated daemon.
Measured in one run, against the physical reference and the seed:

- start_ms_p50/p99: in-process ``Registry.start_sandbox(wait=True)`` of the
  peers' tiny_agent, from the call to its return (RUNNING: its /alive
  answered 200). The registry runs on a real store (fsynced log) in DIR; its
  child joins its cgroups and takes its uid before it runs.
- raw_ready_ms_p50: the same child spawned by hand (trio.lowlevel.open_process,
  same interpreter, command and environment, no boundary) and polled every 1 ms
  until its first 200.
- raw_confined_ready_ms_p50: the raw child started the same way as a
  sandbox's: a fresh cgroup of its own made, then the child started through
  the same primitive into it, under a uid of its own, with nothing of the
  daemon's bookkeeping (events, working dir, output file, health checks).
  start_overhead_ms_p50 is the registry's start over it (what the daemon
  adds); boundary_cost_ms_p50 is it over the bare raw child (what the kernel
  charges for the boundary: placing a process in a cgroup waits for an RCU
  grace period, docs/boundary.md). Raw, confined raw and registry starts
  alternate, so machine noise hits all alike.
- pause_ms_p50/p99_tree50: ``Registry.pause`` of a sandbox whose tree is 50
  processes, until sandbox.paused is durable (the tree frozen and the kernel's
  word for it, then one fdatasync), and resume_ms_p99_tree50 likewise.
- make_room_start_ms_p50: with ``max_running = 1`` and ``on_full =
  "pause_oldest"`` (issue 10), a start that must first pause the running
  sandbox (its tree frozen, sandbox.paused durable), beside a plain start on
  the same registry (make_room_plain_start_ms_p50), alternating; the target is
  their difference, make_room_extra_ms_p50.
- seed_start_ms_p50: the seed's ProcessSandboxService (asyncio, in a
  subprocess) starting the same child; speedup_vs_seed is its p50 over ours.
- concurrent100_s / raw_concurrent100_s: 100 starts at once until all are
  RUNNING, and 100 raw spawns each polled every 10 ms until all answer 200.
- At 1,000 live sandboxes of a light child (``sleep 3600``, no health check,
  liveness off; restart = "on-failure", max_running and on_full = "pause_oldest"
  set: issue 10's policies on), in a subprocess that runs only the store and the registry
  (the daemon without its gateway): rss_mb_1000 (that process's whole RSS),
  idle_cpu_pct_1000 (its CPU, all threads, over seconds of idleness, with the idle
  sweep watching every sandbox at its default interval, 10 s, over as many seconds:
  idle_sweep_ms_1000 is one whole sweep's CPU time, idle_recorded_1000 how many
  sandboxes it had recorded idle),
  get_ms_p99_1000 and search_ms_p99_1000 (limit 100, first and later pages),
  and delete_all_s_1000 (the teardown through Registry.delete_all: SIGTERM to
  every member of each cgroup, its emptying noticed through inotify, the
  cgroups and working dirs removed).
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
import itertools
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio
from _common import (
    Target,
    bench_base,
    cpu_seconds,
    emit_json,
    end_sandboxes,
    machine,
    median,
    percentile,
    print_targets,
    rss_mb,
    run_json_subprocess,
    seed_dir,
    step,
)

from sandboxd.actors import idle, proctree
from sandboxd.actors.boundary.confine import Confinement, open_confined_process
from sandboxd.actors.boundary.in_force import Boundary, open_boundary
from sandboxd.actors.boundary.limits import Limits
from sandboxd.actors.boundary.workdirs import make_base_dir
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.ports import PortAllocator
from sandboxd.actors.registry import Registry
from sandboxd.actors.specs import SpecConfig, python_for_sandboxes
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
#: An interpreter every uid can run (the venv's lives under /root, 0700): the raw
#: reference runs the same one.
PYTHON = python_for_sandboxes()

TINY = SpecConfig(
    id="tiny",
    command=(PYTHON, str(TINY_AGENT), "--port", "{port}"),
    health_check_path="/alive",
    health_interval=0,
    ready_timeout=60.0,
)
#: With the policies of issue 10 on: an idle timeout (never reached here), so that the idle
#: sweep watches every one of the 1,000 (idle_cpu_pct_1000 includes its cost, at
#: IDLE_CHECK_INTERVAL), and restart on failure, which costs nothing until a process fails.
LIGHT = SpecConfig(
    id="light",
    command=LIGHT_COMMAND,
    health_check_path="",
    health_interval=0,
    restart="on-failure",
    idle_timeout=3600.0,
)
#: Seconds between idle sweeps in the 1,000-sandbox run: the default, as the daemon ships;
#: the idle seconds measured are as many, so that they hold a sweep whatever its phase.
IDLE_CHECK_INTERVAL = Config().idle_check_interval
#: A tree of 50 processes (the root and 49 children), sleeping.
TREE50 = SpecConfig(
    id="tree50",
    command=(
        PYTHON,
        "-c",
        "import os, time\nfor _ in range(49):\n    if os.fork() == 0:\n        break\n"
        "time.sleep(3600)\n",
    ),
    health_check_path="",
    health_interval=0,
    limits=Limits(pids_max=128),
)


@attrs.frozen
class Admin:
    id: str | None = None
    admin: bool = True


ADMIN = Admin()


def registry_config(
    state_dir: Path,
    specs: tuple[SpecConfig, ...],
    limit: int,
    args: argparse.Namespace,
    **policies: Any,
) -> Config:
    work = state_dir.parent / f"{state_dir.name}-work"  # the base (0711) is reachable
    make_base_dir(work)
    return Config(
        state_dir=state_dir,
        base_working_dir=work,
        port_range=PROJECT_PORTS,
        stop_timeout=2.0,
        max_sandboxes=limit,
        max_sandboxes_per_user=limit,
        specs=specs,
        cgroup=args.cgroup,
        run_as=args.run_as or None,
        idle_check_interval=IDLE_CHECK_INTERVAL,
        **policies,  # max_running, on_full (issue 10)
    )


@contextlib.asynccontextmanager
async def running_registry(config: Config) -> AsyncIterator[tuple[Registry, Boundary]]:
    """A registry on a real store and the host's boundary, as the daemon wires them."""
    boundary = open_boundary(
        config.boundary_settings, state_dir=config.state_dir, max_sandboxes=config.max_sandboxes
    )
    try:
        async with open_store(config.state_dir) as store, trio.open_nursery() as nursery:
            await nursery.start(boundary.run)
            keys = SessionKeys.of_state_dir(config.state_dir)
            registry = Registry(config, store, keys, nursery, boundary)
            await registry.hold_unknown_uids()
            yield registry, boundary
            nursery.cancel_scope.cancel()
    finally:
        boundary.close()


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


async def raw_start(
    port: int, cwd: Path, poll: float, confinement: Confinement | None = None
) -> float:
    """Spawn tiny_agent by hand and poll it every ``poll`` s until its first 200: ms.

    With ``confinement``, started as a sandbox's child is (its own cgroup, its uid,
    no_new_privs, umask 077), through the same primitive, with nothing of the daemon's
    bookkeeping around it: the raw child started the same way.
    """
    command = [PYTHON, str(TINY_AGENT), "--port", str(port)]
    started = time.perf_counter()
    if confinement is None:
        proc = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=raw_env(),
            cwd=str(cwd),
            start_new_session=True,
        )
    else:
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            proc = await open_confined_process(
                command,
                confinement=confinement,
                env=raw_env(),
                cwd=str(cwd),
                stdout=null,
                stderr=null,
            )
        finally:
            os.close(null)
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


async def bench_starts(
    base: Path, singles: int, rounds: int, concurrent: int, pauses: int, args: argparse.Namespace
) -> dict[str, Any]:
    state_dir = base / "starts"
    cwd = base / "raw"
    make_base_dir(cwd)
    config = registry_config(state_dir, (TINY, TREE50), concurrent + 10, args)
    raw_ports = PortAllocator(*RAW_PORTS)
    out: dict[str, Any] = {"start_ms": [], "raw_ms": [], "conc_s": [], "raw_conc_s": []}
    try:
        async with running_registry(config) as (registry, boundary):
            out["boundary"] = boundary.mode
            out["isolation"] = boundary.isolation

            async def raw_once(poll: float) -> float:
                port = raw_ports.reserve()
                try:
                    return await raw_start(port, cwd, poll)
                finally:
                    raw_ports.release(port)

            confined_runs = itertools.count()

            async def raw_confined_once() -> float:
                # A fresh cgroup and uid each time, as each sandbox has: what the kernel
                # charges for placing a process there is part of starting it this way.
                # Timed from its cgroup's making: part of starting a child this way.
                name = f"raw-{next(confined_runs)}"
                started = time.perf_counter()
                cgroups = boundary.cgroups
                cgroup = cgroups.create(name) if cgroups is not None else None
                uid = boundary.allocate_uid(name)
                confinement = Confinement(
                    cgroup.procs_files() if cgroup is not None else (), boundary.identity(uid)
                )
                made_ms = (time.perf_counter() - started) * 1000
                port = raw_ports.reserve()
                try:
                    return made_ms + await raw_start(port, cwd, 0.001, confinement)
                finally:
                    raw_ports.release(port)
                    boundary.release_uid(name)
                    if cgroups is not None and cgroup is not None:
                        await cgroups.remove(cgroup)

            async def project_once() -> float:
                started = time.perf_counter()
                info = await registry.start_sandbox(ADMIN, spec_id="tiny")
                elapsed = (time.perf_counter() - started) * 1000
                await registry.delete(ADMIN, info.id)
                return elapsed

            step(f"  single starts: {singles} registry + {singles} x 2 raw, alternating ...")
            out["raw_confined_ms"] = []
            await raw_once(0.001)  # warm-up: the interpreter's files into the page cache
            await raw_confined_once()
            await project_once()
            for _ in range(singles):
                out["raw_ms"].append(await raw_once(0.001))
                out["raw_confined_ms"].append(await raw_confined_once())
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
                        batch.start_soon(partial(registry.start_sandbox, ADMIN, spec_id="tiny"))
                out["conc_s"].append(time.perf_counter() - started)
                await registry.delete_all()
                await trio.sleep(0.5)

            step(f"  pause and resume of a 50-process tree, {pauses} times ...")
            out |= await bench_pause(registry, pauses)
            await registry.delete_all()
    finally:
        end_sandboxes(state_dir)
    return out


async def bench_pause(registry: Registry, rounds: int) -> dict[str, Any]:
    info = await registry.start_sandbox(ADMIN, spec_id="tree50")
    boundary = registry.boundary

    def members() -> int:
        if boundary.cgroups is not None:
            return len(boundary.cgroups.members(info.id))
        return len(proctree.tree_members(None, info.id, daemon_marker=boundary.marker))

    with trio.fail_after(60):
        while members() < 50:  # noqa: ASYNC110  /proc and cgroup.procs have no event to wait on
            await trio.sleep(0.01)
    pause_ms: list[float] = []
    resume_ms: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        await registry.pause(ADMIN, info.id)
        pause_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await registry.resume(ADMIN, info.id)
        resume_ms.append((time.perf_counter() - started) * 1000)
    await registry.delete(ADMIN, info.id)
    return {
        "pause_ms_p50_tree50": median(pause_ms),
        "pause_ms_p99_tree50": percentile(pause_ms, 99),
        "resume_ms_p99_tree50": percentile(resume_ms, 99),
    }


# -- making room: a start that must pause the oldest first, beside a plain one -------------


async def bench_make_room(base: Path, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    """``max_running = 1``, ``on_full = "pause_oldest"``: alternately a plain start (nothing
    runs) and a start that must first pause the one that runs (its tiny_agent frozen,
    sandbox.paused durable), on the same registry; then both are deleted."""
    state_dir = base / "room"
    config = registry_config(state_dir, (TINY,), 10, args, max_running=1, on_full="pause_oldest")
    plain: list[float] = []
    room: list[float] = []
    try:
        async with running_registry(config) as (registry, _):
            for i in range(rounds + 1):  # the first round warms up
                started = time.perf_counter()
                first = await registry.start_sandbox(ADMIN, spec_id="tiny")
                plain_ms = (time.perf_counter() - started) * 1000
                started = time.perf_counter()
                second = await registry.start_sandbox(ADMIN, spec_id="tiny")
                room_ms = (time.perf_counter() - started) * 1000
                paused = registry.get(ADMIN, first.id)
                assert paused is not None and paused.status.value == "PAUSED", paused
                for info in (first, second):
                    await registry.delete(ADMIN, info.id)
                if i:
                    plain.append(plain_ms)
                    room.append(room_ms)
    finally:
        end_sandboxes(state_dir)
    return {"plain_ms": plain, "room_ms": room}


# -- 1,000 live sandboxes: a subprocess running the store and the registry only ------------


async def scale_role(args: argparse.Namespace) -> dict[str, Any]:
    # As the daemon does: each sandbox holds a pidfd and its output file's descriptor.
    raise_open_files_limit()
    me = psutil.Process()
    n: int = args.n
    state_dir = Path(args.state_dir)
    out: dict[str, Any] = {"n": n, "rss_mb_imports": rss_mb(me)}
    # The policies on, as an operator would set them: every start is counted against
    # max_running (one pass over the sandboxes), though none has to make room here.
    config = registry_config(
        state_dir, (LIGHT,), n + 10, args, max_running=n + 10, on_full="pause_oldest"
    )
    try:
        async with running_registry(config) as (registry, _):
            store = registry.state  # the projection: search's cursors come from it
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
            # Let every sandbox reach its steady state before idleness is measured: the
            # idle sweep's first two sweeps record each one idle (one event each).
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
            # What one idle sweep costs (its I/O, in its worker thread), and that it ran.
            # CPU time, not wall time: on a loaded machine the thread waits for a core.
            sweeper, sweeps = idle.IdleSweep(), []
            for _ in range(6):  # the first opens each cpu.stat, the others are a sweep's
                t = time.thread_time()
                watched = registry.idle_watched()
                sweeper.sweep(watched, sweeper.measure(watched, time.time(), config.port_range))
                sweeps.append((time.thread_time() - t) * 1000)
            sweeper.close()
            out["idle_sweep_ms"] = median(sweeps[1:])
            out["idle_recorded"] = sum(1 for r in store.sandboxes.values() if r.idle_since)

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
            cursors = [str(record.created_seq) for record in store.sandboxes.values()]
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
    finally:
        out["left_behind"] = end_sandboxes(state_dir)
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
    if role == "scale":
        argv += ["--cgroup", str(extra.pop("cgroup")), "--run-as", str(extra.pop("run_as"))]
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
    parser.add_argument(
        "--cgroup", default="auto", help='sandboxes.cgroup: "auto" (default) or "off" (markers)'
    )
    parser.add_argument(
        "--run-as",
        default=None,
        help='sandboxes.run_as: default "dynamic" as root; "daemon" to measure without isolation',
    )
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
    pauses = 30 if quick else 200
    scale_n = 300 if quick else 1000
    seed_starts = 3 if quick else 10
    seed_n = seed_capacity(100 if quick else 1000)
    base = bench_base("sandboxd-bench-sbx-", args.dir)
    results: dict[str, Any] = {}
    try:
        print(f"sandboxd sandboxes benchmark ({'quick' if quick else 'full'} run)")
        print(f"  {machine()}")
        print(f"  state in {base}; child: {TINY_AGENT.name} (and `sleep 3600` at scale)")
        starts = trio.run(bench_starts, base, singles, rounds, concurrent, pauses, args)
        step("  make room: plain starts, and starts that pause the oldest, alternating ...")
        room = trio.run(bench_make_room, base, max(singles, 20), args)
        print(f"  boundary {starts['boundary']}, isolation {starts['isolation']}")

        step(f"  {scale_n} live sandboxes (subprocess: store + registry only) ...")
        scale = run_json_subprocess(
            role_argv(
                "scale",
                base / "scale",
                scale_n,
                # Two sweeps and a second: each sandbox's sandbox.idle is recorded (its
                # one-off event) before the idleness is measured.
                settle=2 * IDLE_CHECK_INTERVAL + 1,
                idle=IDLE_CHECK_INTERVAL,
                gets=5_000 if quick else 20_000,
                searches=300 if quick else 1_000,
                cgroup=args.cgroup,
                run_as=args.run_as or "",
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

    results["boundary"] = starts["boundary"]
    results["isolation"] = starts["isolation"]
    results["start_ms_p50"] = median(starts["start_ms"])
    results["start_ms_p99"] = percentile(starts["start_ms"], 99)
    results["raw_ready_ms_p50"] = median(starts["raw_ms"])
    results["raw_confined_ready_ms_p50"] = median(starts["raw_confined_ms"])
    results["boundary_cost_ms_p50"] = (
        results["raw_confined_ready_ms_p50"] - results["raw_ready_ms_p50"]
    )
    results["raw_ready_ms_p99"] = percentile(starts["raw_ms"], 99)
    results["start_overhead_ms_p50"] = (
        results["start_ms_p50"] - results["raw_confined_ready_ms_p50"]
    )
    results["make_room_start_ms_p50"] = median(room["room_ms"])
    results["make_room_plain_start_ms_p50"] = median(room["plain_ms"])
    results["make_room_extra_ms_p50"] = (
        results["make_room_start_ms_p50"] - results["make_room_plain_start_ms_p50"]
    )
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
    results["idle_sweep_ms_1000"] = scale["idle_sweep_ms"]  # one sweep of every sandbox
    results["idle_recorded_1000"] = scale["idle_recorded"]  # sandboxes it found idle
    results["get_ms_p99_1000"] = scale["get_ms_p99"]
    results["search_ms_p99_1000"] = scale["search_ms_p99"]
    results["start_all_s_1000"] = scale["start_all_s"]
    results["delete_all_s_1000"] = scale["delete_all_s"]
    results["pause_ms_p50_tree50"] = starts["pause_ms_p50_tree50"]
    results["pause_ms_p99_tree50"] = starts["pause_ms_p99_tree50"]
    results["resume_ms_p99_tree50"] = starts["resume_ms_p99_tree50"]
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
    print(
        f"  raw, started the same way    p50 {r['raw_confined_ready_ms_p50']:7.1f} ms"
        f"   (the boundary's own cost: {r['boundary_cost_ms_p50']:.1f} ms)"
    )
    print(
        f"  start that makes room        p50 {r['make_room_start_ms_p50']:7.1f} ms   (a plain"
        f" one beside it: {r['make_room_plain_start_ms_p50']:.1f} ms)"
    )
    print(f"  seed start                   p50 {r['seed_start_ms_p50']:7.1f} ms")
    print(
        f"  pause of a 50-process tree   p50 {r['pause_ms_p50_tree50']:7.1f} ms   p99"
        f" {r['pause_ms_p99_tree50']:7.1f} ms   (resume p99 {r['resume_ms_p99_tree50']:.1f} ms)"
    )
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
        ("start_ms_p50 - raw_confined_ready", r["start_overhead_ms_p50"], "<= 5 ms", False),
        ("speedup_vs_seed", r["speedup_vs_seed"], ">= 20", False),
        ("concurrent100_s / raw", r["concurrent100_ratio"], "<= 1.3", False),
        ("rss_mb_1000", r["rss_mb_1000"], "<= 60 MB", False),
        ("idle_cpu_pct_1000", r["idle_cpu_pct_1000"], "<= 1 %", False),
        ("get_ms_p99_1000", r["get_ms_p99_1000"], "<= 1 ms", False),
        ("search_ms_p99_1000", r["search_ms_p99_1000"], "<= 5 ms", False),
        ("delete_all_s_1000", r["delete_all_s_1000"], "<= 3 s", False),
        ("pause_ms_p99_tree50", r["pause_ms_p99_tree50"], "<= 20 ms", False),
        ("make_room_start_ms_p50 - plain", r["make_room_extra_ms_p50"], "<= 10 ms", False),
    ]
    checks = [
        r["start_overhead_ms_p50"] <= 5,
        r["speedup_vs_seed"] >= 20,
        r["concurrent100_ratio"] <= 1.3,
        r["rss_mb_1000"] <= 60,
        r["idle_cpu_pct_1000"] <= 1,
        r["get_ms_p99_1000"] <= 1,
        r["search_ms_p99_1000"] <= 5,
        r["delete_all_s_1000"] <= 3,
        r["pause_ms_p99_tree50"] <= 20,
        r["make_room_extra_ms_p50"] <= 10,
    ]
    print_targets([(m, v, t, ok) for (m, v, t, _), ok in zip(rows, checks, strict=True)])
    if r["scale_n"] != 1000 or r["seed_scale_n"] != 1000:
        print(f"  (at scale: {r['scale_n']} sandboxes, seed {r['seed_scale_n']}: not 1,000)")
    emit_json(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
