"""The registry and its actors with real processes, a real log and a real fsync.

As root, every sandbox runs under a uid of its own (the default), so what a
child writes goes into its own working dir (relative paths), which the test,
as root, reads. The tests of a sandbox's process tree run on both boundaries:
its cgroup (the default here) and the markers fallback (``cgroup = "off"``).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from sandboxd.actors import output, proctree
from sandboxd.actors.boundary.in_force import open_boundary
from sandboxd.actors.errors import BadRequest, Conflict, LimitExceeded, NotFound, StartFailed
from sandboxd.actors.info import SandboxInfo
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.registry import Registry, new_sandbox_id
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.projection import Status
from sandboxd.events.store import Store, open_store
from tests.actors.children.support import child, free_port, is_gone, read_pids
from tests.actors.test_ports import time_wait_on
from tests.daemon_process import SANDBOX_PYTHON, agent_command, daemon_config
from tests.support import eventually, ids_of, is_paused, proc_state, sandbox_pids

AGENT = SpecConfig(
    id="agent",
    command=agent_command(),
    health_check_path="/alive",
    ready_timeout=20.0,
    health_interval=0,
)


def plain(spec_id: str, *command: str, **changes: Any) -> SpecConfig:
    """A spec with no HTTP check: RUNNING as soon as its process runs."""
    spec = SpecConfig(id=spec_id, command=(SANDBOX_PYTHON, *command), health_check_path="")
    return attrs.evolve(spec, **changes)


@attrs.frozen
class Caller:
    id: str | None
    admin: bool = False


@attrs.frozen
class Harness:
    registry: Registry
    store: Store

    async def events_of(self, sandbox_id: str) -> list[ev.Event]:
        events = await self.store.log.read(0, 100_000)
        return [e for e in events if e.sandbox_id == sandbox_id]

    def processes(self, sandbox_id: str) -> list[int]:
        """The sandbox's live processes, from the outside: its cgroup's members and the
        processes carrying its markers (SANDBOX_ID alone too: ids are unique per test)."""
        found = set(sandbox_pids(self.registry.config.state_dir).get(sandbox_id, []))
        marked = proctree.find_marked(sandbox_id=sandbox_id).get(sandbox_id, [])
        return sorted(found | {p.pid for p in marked})

    @property
    def cgroups(self) -> bool:
        return self.registry.boundary.cgroups is not None

    @property
    def isolated(self) -> bool:
        return self.registry.boundary.own_uids


ADMIN = Caller(None, admin=True)
ALICE = Caller("alice")
BOB = Caller("bob")


@asynccontextmanager
async def running(tmp_path: Path, *specs: SpecConfig, **config: object) -> AsyncIterator[Harness]:
    """A registry on a real store and the host's boundary (its cgroups removed after)."""
    settings: dict[str, object] = {"port_range": (22000, 22999), "stop_timeout": 2.0}
    settings.update(config)
    cfg = daemon_config(tmp_path / "state", specs or (AGENT,), **settings)
    boundary = open_boundary(
        cfg.boundary_settings, state_dir=cfg.state_dir, max_sandboxes=cfg.max_sandboxes
    )
    try:
        async with open_store(cfg.state_dir) as store, trio.open_nursery() as nursery:
            await nursery.start(boundary.run)
            keys = SessionKeys.of_state_dir(cfg.state_dir)
            registry = Registry(cfg, store, keys, nursery, boundary)
            # As the daemon's start-up does: uids something still holds (an earlier test's
            # processes not yet reaped, files in /tmp) are not handed out again.
            await registry.hold_unknown_uids()
            try:
                yield Harness(registry, store)
            finally:
                with trio.move_on_after(20) as cleanup:
                    cleanup.shield = True
                    await registry.delete_all()
                    await boundary.remove_strays(())
                nursery.cancel_scope.cancel()
    finally:
        boundary.close(remove_parents=True)


async def test_start_runs_the_agent_and_records_its_life(tmp_path: Path, cgroup: str) -> None:
    async with running(tmp_path, cgroup=cgroup) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ALICE)
        assert info.status is Status.RUNNING
        assert info.session_api_key and info.exposed_urls
        assert info.exposed_urls[0].url == f"http://127.0.0.1:{info.port}"
        working_dir = Path(info.working_dir).stat()
        assert working_dir.st_mode & 0o777 == 0o700
        assert registry.get_by_session_key(ALICE, info.session_api_key) == info
        events = await harness.events_of(info.id)
        types = [e.type for e in events]
        assert types == ["sandbox.created", "sandbox.process_started", "sandbox.running"]
        created, started = events[0].data, events[1].data
        assert isinstance(created, ev.SandboxCreated) and isinstance(started, ev.ProcessStarted)
        if harness.isolated:  # a uid of its own, recorded, owning its working dir
            uid = created.uid
            assert uid is not None and started.uid == uid and uid != os.geteuid()
            assert (working_dir.st_uid, working_dir.st_gid) == (uid, uid)
            assert info.pid is not None and ids_of(info.pid) == ({uid}, {uid})
        assert harness.processes(info.id) == [info.pid]

        assert await registry.delete(ALICE, info.id) is True
        assert registry.get(ALICE, info.id) is None
        assert not Path(info.working_dir).exists()
        assert harness.processes(info.id) == []
        assert registry.get_by_session_key(ALICE, info.session_api_key) is None


async def test_the_sandbox_gets_only_the_environment_config_allows(
    tmp_path: Path, cgroup: str
) -> None:
    envdump = plain(
        "env",
        "-c",
        "import json, os, time; json.dump(dict(os.environ), open('env.json', 'w')); "
        "os.rename('env.json', 'env.ready'); time.sleep(60)",
        initial_env={"GREETING": "hi {sandbox_id}"},
        inherit_env=("PATH", "HOME"),
    )
    async with running(tmp_path, envdump, cgroup=cgroup) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN, env={"EXTRA": "1", "SANDBOX_ID": "spoofed"})
        ready = Path(info.working_dir) / "env.ready"
        await eventually(ready.exists)
        env = json.loads(ready.read_text())
        assert env["SANDBOX_ID"] == info.id  # the marker cannot be overridden
        assert env["GREETING"] == f"hi {info.id}"
        assert env["EXTRA"] == "1"
        assert env["SESSION_API_KEY"] == env["OH_SESSION_API_KEYS_0"]
        assert env["PORT"] == env["SANDBOX_PORT_AGENT_SERVER"] == str(info.port)
        # A uid of its own has no home but its working dir: the daemon's (/root) is not its.
        assert env["HOME"] == (info.working_dir if harness.isolated else os.environ["HOME"])
        # Only under markers does a process carry which daemon it is: a hash, never a path.
        markers = set() if harness.cgroups else {proctree.DAEMON_MARKER}
        # LC_CTYPE is Python's own doing in the child (PEP 538), not the daemon's.
        assert set(env) - {"LC_CTYPE"} == {
            "PATH",
            "HOME",
            "GREETING",
            "EXTRA",
            "SANDBOX_ID",
            "PORT",
            "SANDBOX_PORT_AGENT_SERVER",
            "SESSION_API_KEY",
            "OH_SESSION_API_KEYS_0",
            *markers,
        }
        state_dir = str(registry.config.state_dir)
        assert not [name for name, value in env.items() if state_dir in value]


async def test_pause_and_resume_act_on_the_whole_tree(tmp_path: Path, cgroup: str) -> None:
    tree = plain("tree", child("tree.py"), "tree.pids", "2", "2")
    async with running(tmp_path, tree, cgroup=cgroup) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        pidfile = Path(info.working_dir) / "tree.pids"
        await eventually(lambda: len(read_pids(pidfile)) == 7)
        pids = read_pids(pidfile)

        paused = await registry.pause(ADMIN, info.id)
        assert paused.status is Status.PAUSED and paused.session_api_key is None
        assert all(is_paused(pid) for pid in pids)
        assert (await registry.pause(ADMIN, info.id)).version == paused.version  # a no-op

        resumed = await registry.resume(ADMIN, info.id)
        assert resumed.status is Status.RUNNING
        assert all(proc_state(pid) not in ("T", None) and not is_paused(pid) for pid in pids)

        await registry.delete(ADMIN, info.id)
        assert all(is_gone(pid) for pid in pids)


async def test_delete_kills_what_ignores_sigterm(tmp_path: Path, cgroup: str) -> None:
    stubborn = plain("stubborn", child("ignore_term.py"), "ready")
    async with running(tmp_path, stubborn, stop_timeout=0.3, cgroup=cgroup) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        await eventually((Path(info.working_dir) / "ready").exists)
        await registry.delete(ADMIN, info.id)
        deleted = (await harness.events_of(info.id))[-1]
        assert deleted.data == ev.SandboxDeleted(forced=True)
        assert harness.processes(info.id) == []


async def test_delete_ends_a_child_that_left_the_group(tmp_path: Path, cgroup: str) -> None:
    escaper = plain("escaper", child("double_fork.py"), "escaped")
    async with running(tmp_path, escaper, cgroup=cgroup) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        pidfile = Path(info.working_dir) / "escaped"
        await eventually(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"))
        escaped = int(pidfile.read_text().split()[-1])
        assert escaped in harness.processes(info.id)
        await registry.delete(ADMIN, info.id)
        assert is_gone(escaped)
        assert harness.processes(info.id) == []


async def test_a_child_that_exits_at_once_fails_the_start_with_its_code(
    tmp_path: Path, cgroup: str
) -> None:
    dies = plain(
        "dies", "-c", "import sys; print('no config'); sys.exit(3)", health_check_path="/alive"
    )
    async with running(tmp_path, dies, cgroup=cgroup) as harness:
        registry = harness.registry
        with pytest.raises(StartFailed) as failed:
            await registry.start_sandbox(ADMIN)
        assert failed.value.sandbox.status is Status.ERROR
        assert "code 3" in str(failed.value) and "no config" in str(failed.value)
        last = (await harness.events_of(failed.value.sandbox.id))[-1]
        assert isinstance(last.data, ev.StartFailed) and last.data.exit_code == 3


async def test_a_child_that_never_gets_healthy_fails_at_the_timeout(
    tmp_path: Path, cgroup: str
) -> None:
    silent = plain(
        "silent", "-c", "import time; time.sleep(60)", health_check_path="/", ready_timeout=0.5
    )
    async with running(tmp_path, silent, cgroup=cgroup) as harness:
        registry = harness.registry
        with pytest.raises(StartFailed, match=r"within 0\.5 s"):
            await registry.start_sandbox(ADMIN)
        (sandbox,) = registry.search(ADMIN)[0]
        assert sandbox.status is Status.ERROR and sandbox.pid is None
        assert harness.processes(sandbox.id) == []


async def test_a_chatty_child_reaches_running_with_its_output_capped(tmp_path: Path) -> None:
    cap = 1 << 20
    writer = SpecConfig(
        id="writer",
        command=(SANDBOX_PYTHON, child("writer.py"), "{port}", "100"),
        health_check_path="/",
        ready_timeout=60,
        health_interval=0,
    )
    async with running(tmp_path, writer, output_cap_bytes=cap) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        assert info.status is Status.RUNNING
        out = registry.config.state_dir / "output" / f"{info.id}.log"
        rotated = Path(output.rotated_path(str(out)))

        def on_disk() -> int:
            return out.stat().st_size + rotated.stat().st_size

        # The cap is enforced by a check that backs off while output is quiet: what
        # the disk holds comes down to the file plus its one rotation, not 100 MB.
        await eventually(lambda: on_disk() <= 2 * cap, within=15)
        data, truncated = registry.logs(ADMIN, info.id, 1000)
        # The newest output, and only the child's: rotation while the child writes at full
        # speed may drop the bytes of the instant before a truncation, never mix them up.
        assert truncated and data.replace("written", "").strip("x\n") == ""


async def test_fifty_sandboxes_started_at_once_get_distinct_ports(tmp_path: Path) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper) as harness:
        registry = harness.registry
        infos = []

        async def start() -> None:
            infos.append(await registry.start_sandbox(ADMIN))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(start)
        assert len({i.port for i in infos}) == 50
        assert all(i.status is Status.RUNNING for i in infos)


async def test_named_ports_of_starts_fired_at_once_are_all_distinct(tmp_path: Path) -> None:
    sleeper = plain(
        "sleeper", "-c", "import time; time.sleep(60)", ports=("AGENT_SERVER", "VSCODE", "W")
    )
    async with running(tmp_path, sleeper, url_host="sandboxes.test") as harness:
        registry = harness.registry
        infos: list[SandboxInfo] = []

        async def start() -> None:
            infos.append(await registry.start_sandbox(ADMIN))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(start)
        urls = [url for info in infos for url in info.exposed_urls or ()]
        assert len(urls) == 60 and len({url.port for url in urls}) == 60
        assert all(url.url == f"http://sandboxes.test:{url.port}" for url in urls)
        assert registry.ports.reserved == {url.port for url in urls}
        for info in infos:
            await registry.delete(ADMIN, info.id)
        assert registry.ports.reserved == frozenset()


async def test_pause_resume_and_delete_fired_together_end_in_one_state(
    tmp_path: Path, cgroup: str
) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper, cgroup=cgroup) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        outcomes: list[object] = []

        async def attempt(op: str) -> None:
            try:
                outcomes.append(await getattr(registry, op)(ADMIN, info.id))
            except (Conflict, NotFound) as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for op in ("pause", "resume", "delete", "pause", "resume"):
                nursery.start_soon(attempt, op)
        assert True in outcomes  # the delete won, whatever its place
        assert registry.get(ADMIN, info.id) is None
        assert harness.processes(info.id) == []


async def test_limits(tmp_path: Path) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper, max_sandboxes=3, max_sandboxes_per_user=2) as harness:
        registry = harness.registry
        await registry.start_sandbox(ALICE)
        await registry.start_sandbox(ALICE)
        with pytest.raises(LimitExceeded, match="max_sandboxes_per_user"):
            await registry.start_sandbox(ALICE)
        await registry.start_sandbox(BOB)
        told_admin = "3 sandboxes are live, the limit max_sandboxes is 3"
        with pytest.raises(LimitExceeded, match=told_admin):
            await registry.start_sandbox(ADMIN)
        # A user learns about its own sandboxes only: neither how many others run nor the
        # limit they reach (defect 6c of issue 8).
        with pytest.raises(LimitExceeded) as refused:
            await registry.start_sandbox(BOB)
        assert str(refused.value) == (
            "no room for another sandbox: the daemon's max_sandboxes is reached (you have 1)"
        )


async def test_limits_hold_for_starts_fired_at_once(tmp_path: Path) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper, max_sandboxes=5, max_sandboxes_per_user=2) as harness:
        outcomes: list[object] = []

        async def start(caller: Caller) -> None:
            try:
                outcomes.append(await harness.registry.start_sandbox(caller, wait=False))
            except LimitExceeded as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for caller in [ALICE] * 4 + [BOB] * 4:
                nursery.start_soon(start, caller)
        started = [o for o in outcomes if not isinstance(o, LimitExceeded)]
        assert len(started) == 4  # two each: per user, then in total, never one more


async def test_ids_conflict_and_users_see_only_their_own(tmp_path: Path) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper) as harness:
        registry = harness.registry
        mine = await registry.start_sandbox(ALICE, sandbox_id="mine")
        with pytest.raises(Conflict):
            await registry.start_sandbox(BOB, sandbox_id="mine")
        assert registry.get(BOB, "mine") is None
        assert registry.get(ADMIN, "mine") == mine
        with pytest.raises(NotFound):
            await registry.pause(BOB, "mine")
        with pytest.raises(NotFound):
            await registry.delete(BOB, "mine")
        assert registry.search(BOB) == ([], None)


async def test_an_admin_starts_sandboxes_for_users_that_are_then_theirs(tmp_path: Path) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper, max_sandboxes_per_user=2) as harness:
        registry = harness.registry
        root = Caller("root", admin=True)
        first = await registry.start_sandbox(root, owner="oh-user-1")
        assert first.created_by_user_id == "oh-user-1"
        created = (await harness.events_of(first.id))[0]
        assert isinstance(created.data, ev.SandboxCreated)
        assert created.data.created_by_user_id == "oh-user-1" and created.by == "root"
        # The owner's limit, not the admin's.
        await registry.start_sandbox(root, owner="oh-user-1")
        with pytest.raises(LimitExceeded, match="user oh-user-1 has 2 sandboxes"):
            await registry.start_sandbox(root, owner="oh-user-1")
        for_alice = await registry.start_sandbox(root, owner="alice")
        # Seen by its owner as its own; by no other user.
        assert registry.get(ALICE, for_alice.id) == for_alice
        assert registry.get(ALICE, first.id) is None
        assert await registry.pause(ALICE, for_alice.id)
        mine, _ = registry.search(ALICE)
        assert [s.id for s in mine] == [for_alice.id]
        # An admin may narrow a search to one owner; a user may not name one.
        users, _ = registry.search(root, owner="oh-user-1")
        assert {s.created_by_user_id for s in users} == {"oh-user-1"} and len(users) == 2
        assert registry.search(root, owner="nobody") == ([], None)
        with pytest.raises(BadRequest, match="'owner' may be given by an admin only"):
            registry.search(ALICE, owner="alice")
        with pytest.raises(BadRequest, match="'owner' may be given by an admin only"):
            await registry.start_sandbox(ALICE, owner="bob")


async def test_a_session_key_finds_its_running_sandbox_for_whoever_sees_it(
    tmp_path: Path,
) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ALICE)
        key = info.session_api_key
        assert key is not None
        assert registry.get_by_session_key(ALICE, key) == info
        assert registry.get_by_session_key(ADMIN, key) == info
        assert registry.get_by_session_key(BOB, key) is None  # not his
        assert registry.get_by_session_key(ALICE, key[:-1] + "x") is None
        assert registry.get_by_session_key(ALICE, "") is None
        # Only while RUNNING: the one status in which the key is shown at all.
        await registry.pause(ALICE, info.id)
        assert registry.get_by_session_key(ALICE, key) is None
        resumed = await registry.resume(ALICE, info.id)
        assert registry.get_by_session_key(ALICE, key) == resumed
        await registry.delete(ALICE, info.id)
        assert registry.get_by_session_key(ADMIN, key) is None


async def test_search_pages_newest_first_without_repeats_or_gaps(tmp_path: Path) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper) as harness:
        registry = harness.registry
        ids = [(await registry.start_sandbox(ADMIN, wait=False)).id for _ in range(7)]
        first, cursor = registry.search(ADMIN, limit=3)
        assert [i.id for i in first] == ids[::-1][:3]
        await registry.delete(ADMIN, ids[6])  # on the page already seen
        extra = await registry.start_sandbox(ADMIN, wait=False)  # newer than the cursor
        second, cursor = registry.search(ADMIN, limit=3, page_id=cursor)
        third, cursor = registry.search(ADMIN, limit=3, page_id=cursor)
        assert [i.id for i in second + third] == ids[::-1][3:]
        assert cursor is None
        assert extra.id not in {i.id for i in second + third}


async def test_a_session_key_in_the_command_never_reaches_the_log(tmp_path: Path) -> None:
    # config.md lets a command use {session_api_key}: the process gets the key, the log
    # records the placeholder (defect 2 of issue 8: the live key was in the segments).
    argv = plain(
        "argv",
        "-c",
        "import json, sys, time; json.dump(sys.argv[1:], open('argv.json', 'w')); time.sleep(60)",
        "--key={session_api_key}",
        "--port={port}",
    )
    async with running(tmp_path, argv) as harness:
        info = await harness.registry.start_sandbox(ADMIN)
        key = info.session_api_key
        assert key
        written = Path(info.working_dir) / "argv.json"
        await eventually(lambda: written.exists() and written.read_text().endswith("]"))
        assert json.loads(written.read_text()) == [f"--key={key}", f"--port={info.port}"]

        started = next(
            e.data for e in await harness.events_of(info.id) if e.type == "sandbox.process_started"
        )
        assert isinstance(started, ev.ProcessStarted)
        assert started.command[-2:] == ["--key={session_api_key}", f"--port={info.port}"]
        await harness.store.snapshot()
        state_dir = harness.registry.config.state_dir
        files = [p for d in ("events", "snapshots") for p in (state_dir / d).iterdir()]
        assert any(p.parent.name == "snapshots" for p in files)
        for path in files:
            assert key.encode() not in path.read_bytes(), path


async def test_a_deleted_sandboxs_port_is_free_while_its_connections_sit_in_time_wait(
    tmp_path: Path,
) -> None:
    # One port: the next sandbox gets it again at once (issue 8, defect 6d).
    port = free_port()
    async with running(tmp_path, port_range=(port, port)) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ALICE)
        assert info.port == port
        # A client reads a whole answer, which the agent server ends by closing: the
        # server's side of the connection waits in TIME_WAIT, 60 s, on the sandbox's port.
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET /alive HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while client.recv(4096):
                pass
        await registry.delete(ALICE, info.id)
        assert time_wait_on(port)
        again = await registry.start_sandbox(ALICE)
        assert again.port == port and again.status is Status.RUNNING


#: A sandbox that swaps the name of its own output file (in the OUTPUTS dir it is given)
#: for a link to the file VICTIM names, or for a FIFO, then writes past the cap.
SWAPPER = """
import os, sys, time
out = os.path.join(os.environ["OUTPUTS"], os.environ["SANDBOX_ID"] + ".log")
print("mine", flush=True)
os.unlink(out)
how = sys.argv[1]
if how == "symlink":
    os.symlink(os.environ["VICTIM"], out)
elif how == "hardlink":
    os.link(os.environ["VICTIM"], out)
else:
    os.mkfifo(out)
sys.stdout.write("x" * 20000)
sys.stdout.flush()
open("swapped", "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["symlink", "hardlink", "fifo"])
async def test_a_sandbox_that_swaps_its_output_file_changes_nothing_the_daemon_reads(
    tmp_path: Path, how: str
) -> None:
    # sandbox.logs and rotation read and truncate the file the daemon made, never what
    # the name leads to now (issue 8, defect 6e). Only a sandbox running as the daemon's
    # own user (run_as = "daemon") can reach that file; it is told where it is.
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim's own data\n" * 1000)  # past the cap too
    before = victim.read_bytes()
    outputs = str(tmp_path / "state" / "output")
    env = {"VICTIM": str(victim), "OUTPUTS": outputs}
    swapper = plain("swapper", "-c", SWAPPER, how, initial_env=env)
    async with running(tmp_path, swapper, output_cap_bytes=4096, run_as="daemon") as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        await eventually((Path(info.working_dir) / "swapped").exists)
        out = registry.config.state_dir / "output" / f"{info.id}.log"
        rotated = Path(output.rotated_path(str(out)))
        await eventually(rotated.exists, what="the sweep to rotate the sandbox's own output")
        with trio.fail_after(5):
            text, truncated = await trio.to_thread.run_sync(
                registry.logs, ADMIN, info.id, 100_000, abandon_on_cancel=True
            )
        assert truncated and text and set(text) <= set("mine\nx"), text[:200]
        assert victim.read_bytes() == before
        await registry.delete(ADMIN, info.id)
        assert victim.read_bytes() == before
        assert not out.exists() and not out.is_symlink()


async def test_a_sandbox_is_this_nodes_and_a_start_for_another_node_is_refused(
    tmp_path: Path,
) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    async with running(tmp_path, sleeper, node_id="node-a") as harness:
        registry = harness.registry
        root = Caller("root", admin=True)
        here = await registry.start_sandbox(root, node="node-a")
        assert here.node == "node-a" and registry.get(root, here.id) == here
        created = (await harness.events_of(here.id))[0]
        assert isinstance(created.data, ev.SandboxCreated) and created.data.node == "node-a"
        # Without a cluster there is no other node to run it on.
        with pytest.raises(NotFound, match="node 'node-b' is not a node of"):
            await registry.start_sandbox(root, node="node-b")
        assert len(registry.state.sandboxes) == 1


def test_no_sandbox_id_reads_as_a_command_line_option() -> None:
    # One base64url id in 64 began with "-", and `sandboxd get ID` took it for an option.
    # 10,000 ids: the old generator made one such id with a probability of 1 - 1e-68.
    ids = {new_sandbox_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids)
