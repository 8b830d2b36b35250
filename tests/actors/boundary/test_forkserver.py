"""The fork server: the confinement of in-process spawning, exit statuses relayed, its death."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandboxd.actors.confine import Confinement, ConfinementError
from sandboxd.actors.forkserver import ForkServer, ServedProcess
from tests.actors.boundary.conftest import PYTHON, Harness, needs_root, wait_for_file
from tests.actors.boundary.test_confine import REPORT
from tests.support import eventually


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[ForkServer]:
    needs_root()
    forks = ForkServer()
    await nursery.start(forks.run)
    yield forks


async def served(
    server: ForkServer,
    harness: Harness,
    argv: list[str],
    *,
    confinement: Confinement,
    cwd: Path,
    output: Path | None = None,
) -> ServedProcess:
    out = os.open(
        output or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
    )
    try:
        return await server.spawn(
            argv,
            confinement=confinement,
            env={"PATH": "/usr/bin:/bin"},
            cwd=str(cwd),
            stdout=out,
            stderr=out,
        )
    finally:
        os.close(out)


async def test_a_served_child_starts_confined(server: ForkServer, harness: Harness) -> None:
    cgroup = harness.create()
    identity = harness.identity(cgroup)
    workdir = harness.workdir(cgroup, identity)
    confinement = Confinement(cgroup_procs=cgroup.procs_files(), identity=identity)
    process = await served(
        server, harness, [PYTHON, "-c", REPORT], confinement=confinement, cwd=workdir
    )
    with trio.fail_after(10):
        assert await process.wait() == 0
    report = json.loads((workdir / "report.json").read_text())
    uid = identity.uid
    assert report["uid"] == [uid, uid, uid] and report["gid"] == [uid, uid, uid]
    assert report["groups"] == []
    assert report["no_new_privs"] == "1" and report["umask"] == "0077"
    assert report["session_leader"] is True and report["stdin"] == "/dev/null"
    assert report["fds"] == [0, 1, 2, 3]
    assert f"0::/{harness.boundary.name}/sb-{cgroup.sandbox_id}" in report["cgroup"].splitlines()
    # Its parent is the fork server, not the daemon.
    assert os.getppid() != server.pid


async def test_exit_codes_and_signals_come_back(
    server: ForkServer, harness: Harness, tmp_path: Path
) -> None:
    cgroup = harness.create()
    confinement = Confinement(cgroup_procs=cgroup.procs_files())
    seven = await served(
        server,
        harness,
        [PYTHON, "-c", "raise SystemExit(7)"],
        confinement=confinement,
        cwd=tmp_path,
    )
    out = tmp_path / "out"
    sleeper = await served(
        server,
        harness,
        [PYTHON, "-c", "print('up', flush=True); import time; time.sleep(600)"],
        confinement=confinement,
        cwd=tmp_path,
        output=out,
    )
    await wait_for_file(out, "up")
    assert sleeper.pid in cgroup.pids()
    sleeper.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        assert await seven.wait() == 7
        assert await sleeper.wait() == -signal.SIGTERM
    sleeper.send_signal(signal.SIGTERM)  # gone: nothing happens


async def test_failures_say_what_failed_and_nothing_runs(
    server: ForkServer, harness: Harness, tmp_path: Path
) -> None:
    cgroup = harness.create()
    with pytest.raises(FileNotFoundError):
        await served(
            server, harness, ["no-such-command-x"], confinement=Confinement(), cwd=tmp_path
        )
    with pytest.raises(ConfinementError, match=r"\(rlimit: .*\); it did not run"):
        impossible = Confinement(cgroup_procs=cgroup.procs_files(), rlimits=((7, 1 << 40),))
        await served(server, harness, ["/usr/bin/true"], confinement=impossible, cwd=tmp_path)
    assert not cgroup.populated()
    # The server goes on serving after failures.
    process = await served(
        server, harness, ["/usr/bin/true"], confinement=Confinement(), cwd=tmp_path
    )
    with trio.fail_after(10):
        assert await process.wait() == 0


async def test_many_at_once(server: ForkServer, harness: Harness, tmp_path: Path) -> None:
    cgroups = [harness.create() for _ in range(10)]
    results: list[int | None] = []

    async def one(i: int) -> None:
        confinement = Confinement(cgroup_procs=cgroups[i].procs_files())
        process = await served(
            server,
            harness,
            [PYTHON, "-c", f"raise SystemExit({i})"],
            confinement=confinement,
            cwd=tmp_path,
        )
        results.append(await process.wait())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
    assert sorted(r for r in results if r is not None) == list(range(10))


async def test_when_the_server_dies_its_children_live_on(
    harness: Harness, tmp_path: Path, nursery: trio.Nursery
) -> None:
    needs_root()
    server = ForkServer()
    await nursery.start(server.run)
    cgroup = harness.create()
    out = tmp_path / "out"
    child = await served(
        server,
        harness,
        [PYTHON, "-c", "print('up', flush=True); import time; time.sleep(600)"],
        confinement=Confinement(cgroup_procs=cgroup.procs_files()),
        cwd=tmp_path,
        output=out,
    )
    await wait_for_file(out, "up")
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)  # the server's own pid: nothing else
    with pytest.raises(ConfinementError, match="fork server"):
        with trio.fail_after(10):
            while True:  # until the relay has seen the EOF
                await served(
                    server, harness, ["/usr/bin/true"], confinement=Confinement(), cwd=tmp_path
                )
                await trio.sleep(0.01)
    assert cgroup.pids() == [child.pid]  # still running, reparented
    await cgroup.kill()
    with trio.fail_after(10):
        assert await child.wait() is None  # it ended; how, only its dead parent knew
    await eventually(lambda: not cgroup.populated(), what="the cgroup to empty")
