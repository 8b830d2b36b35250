"""A confined child: in its cgroups, under its own uid, with no privileges and nothing inherited.

And what that uid cannot do to anything else: read the daemon's files, signal
or ptrace another sandbox or the daemon, read another's /proc environment, or
become root through a setuid binary.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from sandboxd.actors.boundary.cgroups import SandboxCgroup
from sandboxd.actors.boundary.confine import Confinement, ConfinementError, open_confined_process
from sandboxd.actors.boundary.identities import Identity
from tests.actors.boundary.conftest import PYTHON, Harness, needs_root, wait_for_file

SLEEP = [PYTHON, "-c", "import time; time.sleep(600)"]

REPORT = """
import json, os, resource
lines = open('/proc/self/status').read().splitlines()
status = dict(line.split(':\\t', 1) for line in lines if ':\\t' in line)
fds = sorted(int(n) for n in os.listdir('/proc/self/fd'))
json.dump({
    'uid': os.getresuid(), 'gid': os.getresgid(), 'groups': os.getgroups(),
    'no_new_privs': status['NoNewPrivs'].strip(), 'umask': status['Umask'].strip(),
    'session_leader': os.getsid(0) == os.getpid() == os.getpgrp(),
    'fds': fds, 'stdin': os.readlink('/proc/self/fd/0'),
    'cgroup': open('/proc/self/cgroup').read(),
    'nproc': resource.getrlimit(resource.RLIMIT_NPROC),
    'data': resource.getrlimit(resource.RLIMIT_DATA),
    'env': dict(os.environ), 'cwd': os.getcwd(),
}, open('report.json', 'w'))
"""


async def run_report(
    harness: Harness,
    cgroup: SandboxCgroup,
    identity: Identity | None,
    *,
    rlimits: tuple[tuple[int, int], ...] = (),
) -> dict[str, Any]:
    workdir = harness.workdir(cgroup, identity)
    process = await harness.spawn(
        cgroup, [PYTHON, "-c", REPORT], identity=identity, cwd=workdir, rlimits=rlimits
    )
    with trio.fail_after(10):
        assert await process.wait() == 0
    report: dict[str, Any] = json.loads((workdir / "report.json").read_text())
    report["file"] = os.stat(workdir / "report.json")
    return report


async def test_the_child_starts_confined(harness: Harness) -> None:
    cgroup = harness.create()
    identity = harness.identity(cgroup)
    report = await run_report(
        harness,
        cgroup,
        identity,
        rlimits=((resource.RLIMIT_NPROC, 77), (resource.RLIMIT_DATA, 1 << 30)),
    )
    uid = identity.uid
    assert report["uid"] == [uid, uid, uid] and report["gid"] == [uid, uid, uid]
    assert report["groups"] == []
    assert report["no_new_privs"] == "1"
    assert report["umask"] == "0077"
    assert report["session_leader"] is True
    assert report["stdin"] == "/dev/null"
    # 0, 1, 2 and the descriptor listdir itself opened: nothing of the daemon's.
    assert report["fds"] == [0, 1, 2, 3]
    # Only what it was given (python itself adds LC_CTYPE when no locale is set, PEP 538).
    report["env"].pop("LC_CTYPE", None)
    assert report["env"] == {"PATH": "/usr/bin:/bin"}
    assert report["nproc"] == [77, 77] and report["data"] == [1 << 30, 1 << 30]
    assert f"0::/{harness.boundary.name}/sb-{cgroup.sandbox_id}" in report["cgroup"].splitlines()
    # What it makes is its own, and private.
    assert (report["file"].st_uid, report["file"].st_gid) == (uid, uid)
    assert report["file"].st_mode & 0o777 == 0o600


async def test_without_an_identity_it_keeps_the_daemons_but_not_its_privileges(
    harness: Harness,
) -> None:
    cgroup = harness.create()
    report = await run_report(harness, cgroup, None)
    assert report["uid"] == [0, 0, 0]
    assert report["no_new_privs"] == "1"
    assert report["fds"] == [0, 1, 2, 3]


async def test_a_child_that_cannot_take_its_place_never_runs(harness: Harness) -> None:
    cgroup = harness.create()
    marker = harness.base / "ran"
    # A step in the child that fails: no process may hold more descriptors than nr_open.
    impossible = ((resource.RLIMIT_NOFILE, 1 << 40),)
    with pytest.raises(ConfinementError, match="it did not run"):
        await open_confined_process(
            ["/usr/bin/touch", str(marker)],
            confinement=Confinement(cgroup_procs=cgroup.procs_files(), rlimits=impossible),
            env={},
            cwd="/",
            stdout=1,
            stderr=2,
        )
    assert not marker.exists()
    assert not cgroup.populated()


async def test_a_removed_cgroup_is_said(harness: Harness) -> None:
    cgroup = harness.create()
    procs = cgroup.procs_files()
    await harness.boundary.remove(cgroup)
    with pytest.raises(ConfinementError, match="No such file or directory"):
        await open_confined_process(
            ["/usr/bin/true"],
            confinement=Confinement(cgroup_procs=procs),
            env={},
            cwd="/",
            stdout=1,
            stderr=2,
        )


async def test_a_missing_cgroup_is_said_before_the_fork() -> None:
    needs_root()
    with pytest.raises(ConfinementError, match=r"cannot open /nonexistent/cgroup\.procs"):
        await open_confined_process(
            ["/usr/bin/true"],
            confinement=Confinement(cgroup_procs=("/nonexistent/cgroup.procs",)),
            env={},
            cwd="/",
            stdout=1,
            stderr=2,
        )


# -- what a sandbox's uid cannot reach ------------------------------------------------------

PROBE = """
import ctypes, json, os, sys
target, daemon, secret, other_dir, other_file = sys.argv[1:6]
libc = ctypes.CDLL(None, use_errno=True)
def attempt(fn):
    try:
        fn()
        return 'allowed'
    except OSError as e:
        return e.__class__.__name__
def ptrace():
    if libc.ptrace(16, int(target), None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), 'ptrace')
json.dump({
    'read_secret': attempt(lambda: open(secret).read()),
    'signal_other': attempt(lambda: os.kill(int(target), 0)),
    'signal_daemon': attempt(lambda: os.kill(int(daemon), 0)),
    'environ_other': attempt(lambda: open(f'/proc/{target}/environ', 'rb').read()),
    'ptrace_other': attempt(ptrace),
    'list_other_dir': attempt(lambda: os.listdir(other_dir)),
    'read_other_file': attempt(lambda: open(other_file).read()),
    'write_other_dir': attempt(lambda: open(os.path.join(other_dir, 'x'), 'w').close()),
}, open('probe.json', 'w'))
"""


async def test_a_sandbox_cannot_reach_the_daemon_or_another_sandbox(
    harness: Harness, tmp_path: Path
) -> None:
    secret = harness.base / "secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)

    victim = harness.create()
    victim_id = harness.identity(victim)
    victim_dir = harness.workdir(victim, victim_id)
    (victim_dir / "notes").write_text("private")
    os.chown(victim_dir / "notes", victim_id.uid, victim_id.gid)
    (victim_dir / "notes").chmod(0o644)  # even a readable file: its directory is 0700
    target = await harness.spawn(
        victim, [PYTHON, "-c", "import time; time.sleep(600)"], identity=victim_id, cwd=victim_dir
    )

    prober = harness.create()
    prober_id = harness.identity(prober)
    assert prober_id.uid != victim_id.uid
    workdir = harness.workdir(prober, prober_id)
    args = [
        str(target.pid),
        str(os.getpid()),
        str(secret),
        str(victim_dir),
        str(victim_dir / "notes"),
    ]
    probe = await harness.spawn(
        prober, [PYTHON, "-c", PROBE, *args], identity=prober_id, cwd=workdir
    )
    with trio.fail_after(10):
        assert await probe.wait() == 0
    results = json.loads((workdir / "probe.json").read_text())
    assert results == {
        "read_secret": "PermissionError",
        "signal_other": "PermissionError",
        "signal_daemon": "PermissionError",
        "environ_other": "PermissionError",
        "ptrace_other": "PermissionError",
        "list_other_dir": "PermissionError",
        "read_other_file": "PermissionError",
        "write_other_dir": "PermissionError",
    }
    assert target.poll() is None  # untouched


def setuid_copy(path: Path, binary: str) -> None:
    shutil.copy(binary, path)
    os.chown(path, 0, 0)
    path.chmod(0o4755)


async def test_a_setuid_binary_gives_no_root(harness: Harness) -> None:
    dash = shutil.which("dash") or "/bin/dash"
    if not os.path.exists(dash):
        pytest.skip("no dash to make a setuid shell of")
    cgroup = harness.create()
    identity = harness.identity(cgroup)
    workdir = harness.workdir(cgroup, identity)
    shell = harness.base / "rootshell"
    setuid_copy(shell, dash)
    command = [str(shell), "-p", "-c", "id -u > euid"]

    # The control: the same uid *without* no_new_privs does become root through it,
    # so the file system honours setuid here and the test below can fail.
    with trio.fail_after(10):
        await trio.run_process(
            command, cwd=workdir, user=identity.uid, group=identity.gid, extra_groups=[]
        )
    assert (workdir / "euid").read_text().strip() == "0"
    (workdir / "euid").unlink()

    process = await harness.spawn(cgroup, command, identity=identity, cwd=workdir)
    with trio.fail_after(10):
        assert await process.wait() == 0
    assert (workdir / "euid").read_text().strip() == str(identity.uid)


async def test_the_daemon_can_still_signal_its_sandboxes(harness: Harness, tmp_path: Path) -> None:
    cgroup = harness.create()
    identity = harness.identity(cgroup)
    out = tmp_path / "out"
    ready = "import signal, time\nprint('up', flush=True)\ntime.sleep(600)\n"
    process = await harness.spawn(cgroup, [PYTHON, "-c", ready], identity=identity, output=out)
    await wait_for_file(out, "up")
    assert cgroup.signal(signal.SIGTERM) == 1
    with trio.fail_after(10):
        assert await process.wait() == -signal.SIGTERM
