"""Helpers shared by the benchmarks: statistics, process accounting, clean-up (of
processes and cgroups), and the summary table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from sandboxd.actors.boundary.cgroupfs import daemon_dir_name
from sandboxd.actors.boundary.cgroups import remove_daemon_cgroups
from sandboxd.actors.boundary.discovery import discover
from sandboxd.actors.proctree import DAEMON_MARKER


def seed_dir() -> Path:
    """The seed's service (the benchmarks' peer): ``shared/peers/seed_service`` beside the
    checkout, or beside a folder of worktrees that holds it (the nearest that has it)."""
    here = Path(__file__).resolve().parent
    for folder in here.parents:
        candidate = folder / "shared" / "peers" / "seed_service"
        if candidate.is_dir():
            return candidate
    return here.parents[1] / "shared" / "peers" / "seed_service"  # named in the error then


def step(text: str) -> None:
    """Progress, on stderr: stdout is the summary and its last line the JSON."""
    print(text, file=sys.stderr, flush=True)


# -- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0..100) of ``values``; NaN if there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


class Histogram:
    """Latencies in ms, kept as counts of rounded values: about 1 % precision, any count.

    Under 10 ms to 0.01 ms, under 100 ms to 0.1 ms, above that to 1 ms. Mergeable
    and JSON-serialisable, so subprocesses can send theirs back on stdout.
    """

    def __init__(self, counts: dict[float, int] | None = None) -> None:
        self.counts: dict[float, int] = counts or {}

    def add(self, ms: float) -> None:
        key = round(ms, 2) if ms < 10 else round(ms, 1) if ms < 100 else float(round(ms))
        self.counts[key] = self.counts.get(key, 0) + 1

    def merge(self, other: Histogram) -> None:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> float:
        total = self.total
        if not total:
            return float("nan")
        wanted = max(1, math.ceil(q / 100 * total))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= wanted:
                return key
        return max(self.counts)

    def to_json(self) -> list[list[float]]:
        return [[k, n] for k, n in self.counts.items()]

    @classmethod
    def from_json(cls, pairs: Iterable[Sequence[float]]) -> Histogram:
        return cls({float(k): int(n) for k, n in pairs})


def ts_seconds(ts: str) -> float:
    """Seconds since the epoch of an event's ``ts`` ("2026-11-26T11:32:19.123456Z")."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# -- processes ---------------------------------------------------------------------------


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU of a process, all its threads (not its children)."""
    times = proc.cpu_times()
    return float(times.user + times.system)


def rss_mb(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss) / 2**20


def bench_base(prefix: str, parent: Path | None = None) -> Path:
    """A fresh dir for a run's state, mode 0711: a daemon run as root gives each sandbox a
    uid of its own, which must pass through it to its working dir (the daemon keeps
    everything else inside private)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    base.chmod(0o711)
    return base


def end_sandboxes(state_dir: Path) -> int:
    """SIGKILL every process of the daemon on ``state_dir``'s sandboxes, should it have left
    any (they run in sessions of their own), and remove its cgroups; return how many.

    Its sandboxes are the members of its cgroups (named for a hash of the state dir),
    or, under the markers boundary, the processes carrying that name as SANDBOXD_DAEMON.
    """
    name = daemon_dir_name(os.path.realpath(state_dir))
    killed = 0
    layout = discover().layout
    if layout is not None:
        parent = Path(layout.tree, name)
        groups = list(parent.glob("sb-*/cgroup.procs"))
        for procs in groups:
            with contextlib.suppress(OSError):
                killed += len(procs.read_text().split())
        # Its deadline is for all of them: on a loaded machine a thousand cgroups' kills
        # took more than the default 10 s.
        remove_daemon_cgroups(layout, state_dir=state_dir, timeout=10 + 0.05 * len(groups))
    wanted = f"{DAEMON_MARKER}={name}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        if wanted in entries:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def end_group(proc: subprocess.Popen[Any], *, grace: float = 5.0) -> None:
    """End a subprocess started with ``start_new_session=True`` and everything in its group:
    SIGTERM to the group, SIGKILL after ``grace`` seconds."""
    pgid = proc.pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


def run_json_subprocess(argv: list[str], *, timeout: float) -> dict[str, Any]:
    """Run a bench subprocess in a session of its own; return the JSON of its last stdout line.

    Its stderr passes through (progress); its process group is ended in any case.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        end_group(proc)
    lines = [line for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{argv[1:3]} failed with exit code {proc.returncode}: {out[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def machine() -> str:
    mem = psutil.virtual_memory()
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, {mem.total / 2**30:.1f} GiB RAM"
        f" ({mem.available / 2**30:.1f} available), load {load[0]:.2f} {load[1]:.2f},"
        f" Python {sys.version.split()[0]}"
    )


# -- the summary -------------------------------------------------------------------------


Target = tuple[str, float, str, bool]  # metric, measured, target text, met


def print_targets(rows: Sequence[Target]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"  {'metric':<{width}}  {'measured':>12}  {'target':<28} met?")
    for metric, value, target, ok in rows:
        print(f"  {metric:<{width}}  {fmt(value):>12}  {target:<28} {'yes' if ok else 'NO'}")


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def rounded(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, float):
            out[key] = None if value != value else round(value, 4)
        else:
            out[key] = value
    return out


def emit_json(results: dict[str, Any]) -> None:
    """The one JSON object, on the last line of stdout."""
    print(json.dumps(rounded(results)), flush=True)
