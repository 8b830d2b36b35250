"""Least privilege, end to end: a real `sandboxd serve` run as root, sandboxes under uids of
their own, each probed from the inside; and a kill -9 that finds them again by cgroup.

From inside a sandbox each of these fails: reading the secret, the admin token, a log
segment, a snapshot, another sandbox's working dir or output; signalling the daemon or
another sandbox; reading another sandbox's /proc/PID/environ; ptracing it; gaining
root through a setuid copy of a shell or of su that the test makes (a control shows the
file system honours setuid for the same uid without no_new_privs). What it makes is
its own uid's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import attrs
import pytest
import trio

from sandboxd.actors.boundary.cgroupfs import sandbox_dir_name
from sandboxd.actors.boundary.discovery import discover
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.gateway.client import open_client
from tests.daemon_process import (
    SANDBOX_PYTHON,
    DaemonProcess,
    config_toml,
    daemon_config,
    reachable_dir,
)
from tests.e2e.support import (
    SLEEP_SPEC,
    daemon_process,
    end_daemon,
    paused,
    read_log,
    spawn_stray,
)
from tests.support import daemon_marker, eventually, ids_of, proc_state

#: Tries each thing it is told of, and writes what happened to probe.json in its own dir.
#: (No braces in it: in a spec's command they would be taken for placeholders.)
PROBE = """
import ctypes, json, os, signal, subprocess, sys
with open(sys.argv[1]) as f:
    paths = json.load(f)
libc = ctypes.CDLL(None, use_errno=True)
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as e:
        return e.__class__.__name__
def read(path):
    with open(path, "rb") as f:
        f.read(1)
def ptrace():
    if libc.ptrace(16, paths["victim_pid"], None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
def run(argv):
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return [done.returncode, done.stdout.strip()]
results = dict(
    read_secret=attempt(lambda: read(paths["secret"])),
    read_admin_token=attempt(lambda: read(paths["admin_token"])),
    read_segment=attempt(lambda: read(paths["segment"])),
    read_snapshot=attempt(lambda: read(paths["snapshot"])),
    list_state_dir=attempt(lambda: os.listdir(paths["state_dir"])),
    list_other_working_dir=attempt(lambda: os.listdir(paths["victim_dir"])),
    read_other_file=attempt(lambda: read(paths["victim_file"])),
    write_other_working_dir=attempt(lambda: open(paths["victim_dir"] + "/x", "w").close()),
    read_other_output=attempt(lambda: read(paths["victim_output"])),
    signal_daemon=attempt(lambda: os.kill(paths["daemon_pid"], signal.SIGTERM)),
    signal_other=attempt(lambda: os.kill(paths["victim_pid"], signal.SIGTERM)),
    read_other_environ=attempt(lambda: read("/proc/%d/environ" % paths["victim_pid"])),
    ptrace_other=attempt(ptrace),
    setuid_shell=run([paths["setuid_shell"], "-p", "-c", "id -u"]),
    setuid_su=run([paths["setuid_su"], "root", "-c", "id -u"]),
    uid=os.getuid(),
)
with open("probe.json", "w") as f:
    json.dump(results, f)
"""


def setuid_copy(path: Path, binary: str) -> Path:
    shutil.copy(binary, path)
    os.chown(path, 0, 0)
    path.chmod(0o4755)
    return path


async def test_from_inside_a_sandbox_nothing_of_the_daemon_or_of_another_is_within_reach(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a daemon running as root gives sandboxes uids of their own")
    dash, su = shutil.which("dash") or "/bin/dash", shutil.which("su") or "/bin/su"
    if not (os.path.exists(dash) and os.path.exists(su)):
        pytest.skip("needs dash and su to make setuid copies of")
    tools = reachable_dir("setuid-")  # where a sandbox uid can run them from
    shell = setuid_copy(tools / "rootshell", dash)
    rootsu = setuid_copy(tools / "rootsu", su)
    probe = SpecConfig(
        id="probe",
        command=(SANDBOX_PYTHON, "-c", PROBE, "{working_dir}/../paths.json"),
        health_check_path="",
        inherit_env=("PATH",),
    )
    # No [[users]]: the daemon makes STATE_DIR/admin.token; snapshots every few events.
    config = daemon_config(
        tmp_path / "state", (SLEEP_SPEC, probe), users=(), snapshot_every=3, on_shutdown="keep"
    )
    daemon = DaemonProcess(tmp_path, config)
    try:
        await daemon.start()
        state_dir = daemon.state_dir
        token = (state_dir / "admin.token").read_text().strip()
        async with open_client(daemon.url, token) as client:
            victim = await client.start(spec_id="sleep")
            assert victim.pid is not None
            victim_file = Path(victim.working_dir) / "notes"
            victim_file.write_text("the victim's own")
            victim_file.chmod(0o644)  # even readable: its directory is 0700, another uid's
            # The control: that uid without no_new_privs does become root through the shell.
            control = await trio.run_process(
                [str(shell), "-p", "-c", "id -u"],
                capture_stdout=True,
                user=65534,
                group=65534,
                extra_groups=[],
            )
            assert control.stdout.decode().strip() == "0"
            await eventually(lambda: any((state_dir / "snapshots").glob("*.snap")))
            paths = {
                "secret": str(state_dir / "secret"),
                "admin_token": str(state_dir / "admin.token"),
                "segment": str(next((state_dir / "events").glob("*.log"))),
                "snapshot": str(next((state_dir / "snapshots").glob("*.snap"))),
                "state_dir": str(state_dir),
                "victim_dir": victim.working_dir,
                "victim_file": str(victim_file),
                "victim_output": str(state_dir / "output" / f"{victim.id}.log"),
                "daemon_pid": daemon.process.pid if daemon.process else 0,
                "victim_pid": victim.pid,
                "setuid_shell": str(shell),
                "setuid_su": str(rootsu),
            }
            # Where the probe reads them: the working dirs' base, which every uid passes.
            (daemon.config.sandboxes_dir / "paths.json").write_text(json.dumps(paths))
            (daemon.config.sandboxes_dir / "paths.json").chmod(0o644)
            prober = await client.start(spec_id="probe")
            report = Path(prober.working_dir) / "probe.json"
            await eventually(report.exists, what="the probe's report")
            await eventually(lambda: report.read_text().endswith("}"))
            results = json.loads(report.read_text())
            uid = results.pop("uid")
            assert uid not in (0, os.geteuid())
            assert ids_of(victim.pid)[0] != {uid}  # two sandboxes, two uids
            _, shell_out = results.pop("setuid_shell")
            assert shell_out == str(uid), shell_out  # no_new_privs: the setuid bit is ignored
            su_code, su_out = results.pop("setuid_su")
            assert su_code != 0 and su_out != "0", (su_code, su_out)
            assert results == dict.fromkeys(results, "PermissionError"), results
            assert proc_state(victim.pid) not in (None, "Z")  # untouched
            assert daemon.alive()
            # What it made is its own.
            made = report.stat()
            assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (uid, uid, 0o600)
            created = next(
                e.data
                for e in read_log(state_dir)
                if e.sandbox_id == prober.id and isinstance(e.data, ev.SandboxCreated)
            )
            assert created.uid == uid
            info = await client.server_info()
            assert info.isolation == "dynamic" and info.boundary in (
                "cgroup1",
                "cgroup2",
                "markers",
            )
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()


async def test_after_kill_9_sandboxes_are_adopted_by_cgroup_keeping_their_uids(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a daemon running as root gives sandboxes uids of their own")
    layout = discover().layout
    if layout is None:
        pytest.skip("no cgroup boundary here")
    async with daemon_process(tmp_path) as daemon:
        state_dir = daemon.state_dir
        token = "root-token-0123456789xyz"
        async with open_client(daemon.url, token) as client:
            running = await client.start(spec_id="sleep", sandbox_id="running")
            held = await client.start(spec_id="sleep", sandbox_id="held")
            await client.pause(held.id)
        before = {info.id: info for info in (running, held)}
        uids = {sid: ids_of(info.pid or 0)[0] for sid, info in before.items()}
        assert all(len(u) == 1 for u in uids.values()) and uids["running"] != uids["held"]
        daemon.kill()

        # While it is down: a process in a cgroup of this daemon that no sandbox owns.
        stray = spawn_stray(state_dir, "stray")
        stray_dir = Path(layout.tree, daemon_marker(state_dir), sandbox_dir_name("stray"))
        try:
            assert stray_dir.is_dir()
            head = read_log(state_dir)[-1].seq
            await daemon.start()
            with trio.fail_after(10):
                while stray.poll() is None:  # noqa: ASYNC110  killed by recovery, reaped here
                    await trio.sleep(0.01)
            assert stray.returncode == -signal.SIGKILL
            assert not stray_dir.exists()
        finally:
            if stray.poll() is None:
                stray.kill()
                stray.wait()

        adopted = {
            e.sandbox_id: e.data.pid
            for e in read_log(state_dir)
            if e.seq > head and isinstance(e.data, ev.SandboxAdopted)
        }
        assert adopted == {sid: info.pid for sid, info in before.items()}
        for sid, info in before.items():
            assert info.pid is not None and ids_of(info.pid)[0] == uids[sid]
        assert paused(held.pid or 0) and not paused(running.pid or 0)
        async with open_client(daemon.url, token) as client:
            assert (await client.resume(held.id)).pid == held.pid
            assert not paused(held.pid or 0)
            # The pool knows the uids it gave out before the crash: a new sandbox gets another.
            fresh = await client.start(spec_id="sleep")
            assert fresh.pid is not None
            assert ids_of(fresh.pid)[0].isdisjoint(uids["running"] | uids["held"])
            assert await client.delete(running.id) is True
            assert proc_state(running.pid or 0) in (None, "Z")


async def test_a_sandbox_started_without_cgroups_is_adopted_on_markers_and_deleted(
    tmp_path: Path,
) -> None:
    # A daemon on markers (cgroup = "off", or a version before the boundary) leaves a
    # sandbox running; the next one runs with cgroups and finds its process outside any.
    layout = discover().layout
    if layout is None:
        pytest.skip("no cgroup boundary here")
    async with daemon_process(tmp_path, cgroup="off") as daemon:
        async with open_client(daemon.url, "root-token-0123456789xyz") as client:
            before = await client.start(spec_id="sleep", sandbox_id="old")
        assert before.pid is not None
        daemon.kill()
        daemon.config = attrs.evolve(daemon.config, cgroup="auto")
        daemon.config_path.write_text(config_toml(daemon.config))
        await daemon.start()
        assert "runs outside any cgroup" in daemon.current_output()
        async with open_client(daemon.url, "root-token-0123456789xyz") as client:
            assert (await client.server_info()).boundary != "markers"
            now = await client.get("old")
            assert now is not None and now.pid == before.pid and now.status.value == "RUNNING"
            await client.pause("old")  # through its markers: SIGSTOP
            assert paused(before.pid)
            assert await client.delete("old") is True
        await eventually(lambda: proc_state(before.pid or 0) in (None, "Z"), what="it ended")
        # Nothing of it is left in the daemon's cgroups either.
        assert not (
            Path(discover().layout.tree, daemon_marker(daemon.state_dir)) / "sb-old"
        ).exists()  # type: ignore[union-attr]
