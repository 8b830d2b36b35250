"""Fixtures for the boundary tests: real cgroups, real uids, real processes, all cleaned up.

Every cgroup a test makes lives under a per-daemon parent named for the test's
own state dir, and teardown kills and removes all of them and the parents
(asserting they are gone). Child programs run with /usr/bin/python3, which
every uid can execute (the venv's python lives under /root, mode 0700).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trio

from sandboxd.actors.boundary.cgroups import CgroupBoundary, SandboxCgroup
from sandboxd.actors.boundary.confine import Confinement, open_confined_process
from sandboxd.actors.boundary.discovery import Layout, discover
from sandboxd.actors.boundary.identities import Identity, UidPool
from sandboxd.actors.boundary.limits import Limits
from sandboxd.actors.boundary.workdirs import make_base_dir, make_working_dir, remove_tree

PYTHON = "/usr/bin/python3"
PROGRAMS = Path(__file__).parent / "programs"
#: uids the tests run children as: inside the default range, far from its start.
TEST_UIDS = (655000, 655999)


def program(name: str) -> str:
    return str(PROGRAMS / name)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: switching uids and writing cgroups")
    if not os.access(PYTHON, os.X_OK):
        pytest.skip(f"needs {PYTHON}, a python every uid can run")


def host_layout() -> Layout:
    """This host's layout, or skip: the tests need a writable cgroup hierarchy."""
    needs_root()
    found = discover()
    if found.layout is None:
        pytest.skip(f"no cgroup boundary here: {found.reason}")
    return found.layout


def needs_controller(boundary: CgroupBoundary, controller: str) -> None:
    if controller not in boundary.controllers:
        pytest.skip(f"this host has no {controller} controller for sandboxes")


@pytest.fixture
def layout() -> Layout:
    return host_layout()


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """Where working dirs go: mode 0711 under /tmp, reachable by every uid (tmp_path is not)."""
    needs_root()
    base = Path(tempfile.mkdtemp(prefix="sandboxd-bnd-", dir="/tmp"))
    make_base_dir(base)
    try:
        yield base
    finally:
        remove_tree(base)


@pytest.fixture
def uids() -> UidPool:
    return UidPool(*TEST_UIDS)


class Harness:
    """Makes sandbox cgroups and starts confined children in them; ends all of it after."""

    def __init__(self, boundary: CgroupBoundary, base: Path, uids: UidPool) -> None:
        self.boundary = boundary
        self.base = base
        self.uids = uids
        self.processes: list[trio.Process] = []
        self._count = 0

    def create(self, limits: Limits | None = None) -> SandboxCgroup:
        self._count += 1
        return self.boundary.create(f"t{os.getpid()}-{self._count}", limits)

    def identity(self, cgroup: SandboxCgroup) -> Identity:
        uid = self.uids.allocate(cgroup.sandbox_id)
        return Identity(uid, uid)

    def workdir(self, cgroup: SandboxCgroup, identity: Identity | None) -> Path:
        path = self.base / cgroup.sandbox_id
        make_working_dir(path, identity)
        return path

    async def spawn(
        self,
        cgroup: SandboxCgroup | None,
        argv: Sequence[str],
        *,
        identity: Identity | None = None,
        cwd: Path | None = None,
        rlimits: tuple[tuple[int, int], ...] = (),
        output: Path | None = None,
    ) -> trio.Process:
        out = os.open(
            output or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        try:
            process = await open_confined_process(
                argv,
                confinement=Confinement(
                    cgroup_procs=cgroup.procs_files() if cgroup else (),
                    identity=identity,
                    rlimits=rlimits,
                ),
                env={"PATH": "/usr/bin:/bin"},
                cwd=str(cwd or self.base),
                stdout=out,
                stderr=out,
            )
        finally:
            os.close(out)
        self.processes.append(process)
        return process

    async def cleanup(self) -> None:
        await self.boundary.remove_strays(())
        with trio.fail_after(10):
            for process in self.processes:
                await process.wait()  # reap: each was killed with its cgroup


@pytest.fixture
async def boundary(
    layout: Layout, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[CgroupBoundary]:
    cgroups = CgroupBoundary.open(layout, state_dir=tmp_path / "state")
    await nursery.start(cgroups.run)
    try:
        yield cgroups
    finally:
        await cgroups.remove_strays(())
        cgroups.close(remove_parents=True)
        left = [p for p in cgroups.parents if os.path.exists(p)]
        assert not left, f"cgroups left behind: {left}"


@pytest.fixture
async def harness(
    boundary: CgroupBoundary, base_dir: Path, uids: UidPool
) -> AsyncIterator[Harness]:
    h = Harness(boundary, base_dir, uids)
    try:
        yield h
    finally:
        await h.cleanup()


async def wait_for_file(path: Path, text: str, *, within: float = 10.0) -> str:
    """The content of ``path`` once it holds ``text``; fails after ``within`` seconds."""
    with trio.move_on_after(within):
        while True:
            try:
                content = path.read_text()
            except FileNotFoundError:
                content = ""
            if text in content:
                return content
            await trio.sleep(0.005)
    raise AssertionError(f"{path} did not get {text!r} within {within} s")
