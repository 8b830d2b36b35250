"""Where the memory of bench/sandboxes.py's scale role goes: its imports, and each sandbox.

    python bench/memory.py [--quick] [--n N] [--tracemalloc] [--dir DIR]

Runs what bench/sandboxes.py's scale role runs (the store and the registry
alone, with N light sandboxes, ``sleep 3600``, issue 10's policies on:
``restart = "on-failure"``, an ``idle_timeout``, ``max_running`` with
``on_full = "pause_oldest"``), in this process, and reports:

- the RSS after the imports, with the store and the registry running and no
  sandbox, and at N sandboxes, each split by /proc/self/smaps_rollup into
  anonymous memory (the heap: Python's objects) and file-backed pages (the
  interpreter's and the extensions' code);
- what each sandbox adds: KB of RSS, Python objects by type
  (gc.get_objects at 0 and at N), descriptors, and the trio tasks alive;
- the imports' share: a fresh interpreter importing, one after another, what
  the scale role imports, and the RSS each step adds (``IMPORT_STEPS``);
- with ``--tracemalloc`` (slower, and the RSS then includes its own
  bookkeeping): the heap's growth from 0 to N sandboxes, grouped by the
  innermost line of sandboxd on the allocation's stack ("?" where none is:
  the interpreter's or trio's own tables).

rss_mb_1000 itself is bench/sandboxes.py's; this says where it goes
(docs/performance.md). ``--quick``: 300 sandboxes. The last line is JSON.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
import trio
from _common import bench_base, emit_json, end_sandboxes, rss_mb, step
from sandboxes import ADMIN, IDLE_CHECK_INTERVAL, LIGHT, registry_config, running_registry

from sandboxd.daemon import raise_open_files_limit

#: Python objects per sandbox shown: those at least this many per sandbox.
OBJECTS_SHOWN = 0.5
#: What the scale role's process imports, in steps: each step's modules and what they
#: pull in that no step before did. The last is what remains of bench/sandboxes.py's own.
IMPORT_STEPS = (
    ("ssl", "ssl"),
    ("trio (without ssl)", "trio"),
    ("psutil, msgspec, attrs, cattrs", "psutil, msgspec, attrs, cattrs"),
    ("sandboxd.events (the store)", "sandboxd.events.store"),
    ("sandboxd.actors (the registry)", "sandboxd.actors.registry, sandboxd.actors.recovery"),
    ("sandboxd.daemon (gateway, metrics)", "sandboxd.daemon"),
    ("the bench's own (asyncio for the seed)", "sandboxes"),
)
_IMPORTS_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
steps = json.loads(sys.argv[2])
out = [["the interpreter", rss(), len(sys.modules)]]
for name, modules in steps:
    before, count = rss(), len(sys.modules)
    for module in modules.split(", "):
        __import__(module)
    out.append([name, rss() - before, len(sys.modules) - count])
print(json.dumps(out))
"""


def import_steps() -> list[tuple[str, float, int]]:
    """(step, MB of RSS it added, modules it loaded), in a fresh interpreter."""
    argv = [sys.executable, "-c", _IMPORTS_PROBE, str(Path(__file__).parent)]
    text = subprocess.run(
        [*argv, json.dumps(IMPORT_STEPS)], check=True, capture_output=True, text=True
    ).stdout
    return [(name, mb, modules) for name, mb, modules in json.loads(text)]


def smaps_mb() -> dict[str, float]:
    """The process's memory by kind (/proc/self/smaps_rollup), MB."""
    out = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            value = rest.split()
            if value and value[0].isdigit():
                out[key] = int(value[0]) / 1024
    return {"rss": out["Rss"], "anonymous": out["Anonymous"], "file": out["Rss"] - out["Anonymous"]}


def objects_by_type() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def task_names() -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        names[task.name] += 1
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return names


def by_sandboxd_line(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot
) -> collections.Counter[str]:
    """The heap's growth, by the innermost sandboxd line on each allocation's stack."""
    growth: collections.Counter[str] = collections.Counter()
    for stat in after.compare_to(before, "traceback"):
        where = "?"
        for frame in reversed(stat.traceback):  # oldest first: the innermost is last
            if "/sandboxd/" in frame.filename:
                where = f"{frame.filename.split('/sandboxd/')[-1]}:{frame.lineno}"
                break
        growth[where] += stat.size_diff
    return growth


async def measure(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    raise_open_files_limit()  # as the daemon and the scale role do
    me = psutil.Process()
    n: int = args.n
    out: dict[str, Any] = {"n": n, "rss_mb_imports": rss_mb(me)}
    state_dir = base / "memory"
    config = registry_config(
        state_dir, (LIGHT,), n + 10, args, max_running=n + 10, on_full="pause_oldest"
    )
    try:
        async with running_registry(config) as (registry, _):
            objects0 = objects_by_type()
            fds0 = len(os.listdir("/proc/self/fd"))
            empty = smaps_mb()
            snapshot0 = tracemalloc.take_snapshot() if args.tracemalloc else None
            limiter = trio.CapacityLimiter(50)  # as the scale role starts them

            async def start_one() -> None:
                async with limiter:
                    await registry.start_sandbox(ADMIN)

            step(f"  starting {n} sandboxes ...")
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(start_one)
            await trio.sleep(args.settle)
            objects = objects_by_type()
            fds = len(os.listdir("/proc/self/fd"))
            full = smaps_mb()
            snapshot = tracemalloc.take_snapshot() if args.tracemalloc else None
            tasks = task_names()
            await registry.delete_all()
    finally:
        end_sandboxes(state_dir)
    out |= {f"empty_{k}_mb": v for k, v in empty.items()}
    out |= {f"full_{k}_mb": v for k, v in full.items()}
    out["kb_per_sandbox"] = (full["rss"] - empty["rss"]) * 1024 / n
    out["heap_kb_per_sandbox"] = (full["anonymous"] - empty["anonymous"]) * 1024 / n
    out["fds_per_sandbox"] = (fds - fds0) / n
    out["objects_per_sandbox"] = {
        name: round((count - objects0[name]) / n, 2)
        for name, count in objects.most_common()
        if count - objects0[name] >= OBJECTS_SHOWN * n
    }
    out["tasks_per_sandbox"] = {
        name: round(count / n, 2) for name, count in tasks.items() if count >= n // 2
    }
    if snapshot0 is not None and snapshot is not None:
        growth = by_sandboxd_line(snapshot0, snapshot)
        out["tracemalloc_kb_per_sandbox"] = sum(growth.values()) / 1024 / n
        out["tracemalloc_bytes_per_sandbox_by_line"] = {
            where: round(size / n) for where, size in growth.most_common(args.lines)
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 sandboxes instead of 1,000")
    parser.add_argument("--n", type=int, help="how many sandboxes (default 1,000)")
    parser.add_argument("--tracemalloc", action="store_true", help="where the heap grows")
    parser.add_argument("--lines", type=int, default=25, help="lines shown with --tracemalloc")
    parser.add_argument(
        "--settle",
        type=float,
        default=2 * IDLE_CHECK_INTERVAL + 1,
        help="seconds before measuring (default: as the scale role, two idle sweeps and 1 s)",
    )
    parser.add_argument("--dir", type=Path, help="where state goes (default: a temporary dir)")
    parser.add_argument("--cgroup", default="auto", help='sandboxes.cgroup: "auto" or "off"')
    parser.add_argument("--run-as", default=None, help='sandboxes.run_as (default "dynamic")')
    args = parser.parse_args(argv)
    args.n = args.n or (300 if args.quick else 1000)
    if args.tracemalloc:
        tracemalloc.start(40)  # deep enough to reach sandboxd's frames under trio's
    imports = import_steps()
    base = bench_base("sandboxd-bench-mem-", args.dir)
    try:
        started = time.perf_counter()
        r = trio.run(measure, args, base)
        r["seconds"] = time.perf_counter() - started
        r["imports_mb"] = {name: mb for name, mb, _ in imports}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"sandboxd memory of the scale role ({r['n']} light sandboxes)")
    print(f"  after imports                  {r['rss_mb_imports']:6.1f} MB, of which:")
    for name, mb, modules in imports:
        print(f"    {name:40s} {mb:5.1f} MB  ({modules} modules)")
    labels = {"empty": "store + registry, no sandbox", "full": f"at {r['n']} sandboxes"}
    for when, label in labels.items():
        print(
            f"  {label:30s} {r[f'{when}_rss_mb']:6.1f} MB  (anonymous"
            f" {r[f'{when}_anonymous_mb']:.1f}, file-backed {r[f'{when}_file_mb']:.1f})"
        )
    print(
        f"  per sandbox: {r['kb_per_sandbox']:.1f} KB of RSS ({r['heap_kb_per_sandbox']:.1f}"
        f" KB anonymous), {r['fds_per_sandbox']:.2f} descriptors"
    )
    print(
        "  trio tasks per sandbox: "
        + ", ".join(f"{k} {v}" for k, v in r["tasks_per_sandbox"].items())
    )
    print(
        "  Python objects per sandbox: "
        + ", ".join(f"{k} {v:g}" for k, v in r["objects_per_sandbox"].items())
    )
    if "tracemalloc_kb_per_sandbox" in r:
        print(
            f"  heap growth (tracemalloc): {r['tracemalloc_kb_per_sandbox']:.1f} KB a sandbox,"
            " by line:"
        )
        for where, size in r["tracemalloc_bytes_per_sandbox_by_line"].items():
            print(f"    {size:6d} B  {where}")
    emit_json(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
