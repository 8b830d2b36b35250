"""The idle sweep's parts: CPU over a process tree, and the judgement of each window (plain
code over samples). Its connections are test_connections.py's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import trio

from sandboxd.actors.boundary.discovery import discover
from sandboxd.actors.idle import (
    CpuCounters,
    IdleSweep,
    IdleVerdict,
    Sample,
    Watched,
    cpu_of_process_trees,
    format_ts,
    judge,
    parse_ts,
)
from sandboxd.actors.mailbox import IdleCheck
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.projection import SandboxRecord, Status
from sandboxd.events.types import NamedPort
from tests.actors.test_registry import ALICE, plain, running


def test_cpu_of_a_process_tree_counts_its_descendants() -> None:
    # A child that starts a grandchild; the grandchild burns CPU, the child sleeps.
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {burn!r} + 'time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20  # a wait for the OS, with a deadline
        while (totals := cpu_of_process_trees({"tree": child.pid, "none": 2**22 + 1}))[
            "tree"
        ] < 0.3:
            assert time.monotonic() < deadline, f"the grandchild's CPU never counted: {totals}"
            time.sleep(0.01)
        assert totals["none"] == 0.0
    finally:
        for process in [*psutil.Process(child.pid).children(recursive=True)]:
            process.kill()
        child.kill()
        child.wait()


# --- The judgement ---------------------------------------------------------------------------

T0 = 1_800_000_000.0
SPEC = SpecConfig(id="s", command=("x",), idle_timeout=10.0, idle_cpu_seconds=0.5)
RECORD = SandboxRecord(
    id="a",
    spec_id="s",
    created_by_user_id=None,
    status=Status.RUNNING,
    created_at=format_ts(T0 - 100),
    updated_at=format_ts(T0 - 100),
    created_seq=1,
    version=3,
    port=30001,
    working_dir="/w",
    ports=(NamedPort("AGENT_SERVER", 30001), NamedPort("VSCODE", 30002)),
)


def watched(**changes: Any) -> Watched:
    return Watched(msgspec.structs.replace(RECORD, **changes), SPEC, None)


def test_ts_round_trip() -> None:
    assert parse_ts(format_ts(T0 + 0.25)) == T0 + 0.25


def test_a_quiet_window_begins_an_idle_period_at_its_start() -> None:
    verdict = judge(watched(), Sample(T0, 1.0, ()), Sample(T0 + 2, 1.1, ()))
    assert verdict == IdleVerdict(
        3,
        True,
        "no connection to port 30001, 30002, CPU 0.10 s < 0.5 s in 2.0 s",
        since=format_ts(T0),
    )


def test_an_idle_period_begins_no_earlier_than_the_last_change() -> None:
    resumed = watched(updated_at=format_ts(T0 + 1))
    verdict = judge(resumed, Sample(T0, 1.0, ()), Sample(T0 + 2, 1.0, ()))
    assert verdict is not None and verdict.since == format_ts(T0 + 1)


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        (Sample(T0 + 2, 1.0, (30002,)), "a connection to port 30002"),
        (Sample(T0 + 2, 1.5, ()), "CPU 0.50 s >= 0.5 s in 2.0 s"),
    ],
)
def test_a_connection_or_cpu_is_activity(sample: Sample, reason: str) -> None:
    before = Sample(T0, 1.0, ())
    # Active while active: nothing new to record.
    assert judge(watched(), before, sample) is None
    # Active while idle: the period ends, with what was seen.
    idle = watched(idle_since=format_ts(T0 - 5))
    assert judge(idle, before, sample) == IdleVerdict(3, False, reason)


def test_an_idle_period_expires_after_idle_timeout() -> None:
    quiet = (Sample(T0, 1.0, ()), Sample(T0 + 2, 1.0, ()))
    assert judge(watched(idle_since=format_ts(T0 - 7)), *quiet) is None  # 9 s: still idle
    verdict = judge(watched(idle_since=format_ts(T0 - 8)), *quiet)
    assert verdict is not None and verdict.idle
    assert verdict.expired == (
        f"idle since {format_ts(T0 - 8)} for 10 s:"
        " no connection to port 30001, 30002, CPU 0.00 s < 0.5 s in 2.0 s"
    )


def test_without_a_cpu_reading_nothing_is_judged() -> None:
    assert judge(watched(), Sample(T0, None, ()), Sample(T0 + 2, 1.0, ())) is None
    assert judge(watched(), Sample(T0, 1.0, ()), Sample(T0 + 2, None, (30001,))) is None


def test_the_sweep_needs_two_samples_and_forgets_what_it_no_longer_watches() -> None:
    sweep = IdleSweep()
    one = [watched()]
    assert sweep.sweep(one, {"a": Sample(T0, 1.0, ())}) == []  # a baseline only
    (found,) = sweep.sweep(one, {"a": Sample(T0 + 2, 1.0, ())})
    assert found[0] == "a" and found[1].idle
    assert sweep.sweep([], {}) == []  # paused, say: not watched
    assert sweep.sweep(one, {"a": Sample(T0 + 60, 1.0, ())}) == []  # a fresh baseline


def test_a_sample_is_wall_clock_time() -> None:
    # Samples and idle_since must mean the same to the next daemon: both are wall time.
    assert abs(parse_ts(format_ts(time.time())) - time.time()) < 5


# --- CPU counters of cgroups, kept open ------------------------------------------------------


def test_cpu_counters_read_a_real_cgroup_and_let_go_of_it() -> None:
    layout = discover().layout
    if layout is None or os.geteuid() != 0:
        pytest.skip("needs a writable cgroup v2 hierarchy")
    directory = os.path.join(layout.tree, f"sandboxd-idle-test-{os.getpid()}")
    os.mkdir(directory)
    counters = CpuCounters()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        path = os.path.join(directory, "cpu.stat")
        assert counters.read("a", path) == 0.0  # nothing ran in it yet
        with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
            procs.write(str(child.pid))
        deadline = time.monotonic() + 20  # the OS's doing: waited for, with a deadline
        while (used := counters.read("a", path)) is None or used < 0.2:
            assert time.monotonic() < deadline, f"no CPU counted: {used}"
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(directory)  # with the counter's descriptor still open
                break
            except OSError:  # busy until the killed child has left it
                assert time.monotonic() < deadline
                time.sleep(0.01)
    # Removed: no evidence, and its descriptor let go.
    assert list(counters._open) == ["a"]
    assert counters.read("a", path) is None and counters._open == {}
    # A sandbox no longer watched lets go of its descriptor; another path, another file.
    assert counters.read("b", "/proc/self/stat") is None  # no usage_usec in it
    assert list(counters._open) == ["b"]
    counters.keep_only(["c"])
    assert counters._open == {}
    counters.close()


# --- The actor's side: a verdict acts only on the record it was made on ---------------------


async def test_a_stale_verdict_is_dropped_and_a_current_one_acted_on(tmp_path: Path) -> None:
    spec = plain("quiet", "-c", "import time; time.sleep(600)", idle_timeout=3600.0)
    async with running(tmp_path, spec) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ALICE, spec_id="quiet")
        actor = registry._actors[info.id]
        since = format_ts(time.time() - 10)

        async def tell(verdict: IdleVerdict) -> list[str]:
            check = IdleCheck(verdict)
            assert actor.tell(check)
            with trio.fail_after(10):
                await check.handled.wait()
            return [e.type for e in await harness.events_of(info.id)]

        before = [e.type for e in await harness.events_of(info.id)]
        # Made on an older record (version - 1): the sandbox changed since; nothing is done.
        stale = IdleVerdict(info.version - 1, True, "quiet", since, expired="idle for ever")
        assert await tell(stale) == before
        # Made on the record as it is: recorded idle, then paused with the words given.
        current = IdleVerdict(info.version, True, "quiet", since, expired="idle for ever")
        assert await tell(current) == [*before, "sandbox.idle", "sandbox.paused"]
        paused = (await harness.events_of(info.id))[-1].data
        assert isinstance(paused, ev.SandboxPaused) and paused.reason == "idle for ever"
        got = registry.get(ALICE, info.id)
        assert got is not None and got.status is Status.PAUSED and got.idle_since is None
