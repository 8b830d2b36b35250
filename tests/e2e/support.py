"""End-to-end support: a real `sandboxd serve` subprocess, and ways to look behind its back.

The daemon runs as `python -m sandboxd.cli serve --config F`, the way an
operator runs it, so SIGKILL and SIGTERM are real. Its sandboxes' children are
`sleep` (no HTTP check: RUNNING as soon as they run), so a test starts one in
milliseconds. Everything the tests check after a restart is read from the
outside: the state through the gateway, the log offline from its files (the
same reader as `sandboxd log dump`), the processes from /proc.

Every wait is for a condition, with a deadline. Everything a test starts is
ended by its own pid: the daemon by the pid of its Popen, the sandboxes by
their markers (SANDBOXD_STATE_DIR names the test's own state dir).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from sandboxd.actors import proctree
from sandboxd.actors.info import SandboxInfo, sandbox_info
from sandboxd.actors.specs import SpecConfig
from sandboxd.cli import main as sandboxd_cli
from sandboxd.config import Config
from sandboxd.daemon import run_daemon
from sandboxd.events import audit, codec
from sandboxd.events import types as ev
from sandboxd.events.projection import SandboxRecord, State, apply
from sandboxd.events.store import StoreConfig, open_store
from sandboxd.gateway.server import Gateway
from tests.support import TOKENS, configured_users, eventually, proc_state, users_toml

SLEEP = shutil.which("sleep") or "/bin/sleep"

ROOT = TOKENS["root"]

#: How long a daemon may take to listen (start-up is recovery; the machine has 2 cores
#: shared with the rest of the suite).
START_TIMEOUT = 30.0


SLEEP_SPEC = SpecConfig(
    id="sleep", command=(SLEEP, "3600"), health_check_path="", inherit_env=("PATH",)
)
#: The project's reference agent server, with a fast liveness check (5 probes a second).
AGENT_SPEC = SpecConfig(
    id="agent",
    command=(sys.executable, "-m", "sandboxd.actors.agent_server", "--port", "{port}"),
    health_check_path="/alive",
    health_interval=0.2,
    ready_timeout=20.0,
    inherit_env=("PATH",),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def daemon_toml(state_dir: Path, port: int, **settings: Any) -> str:
    """A config for `sandboxd serve`: the users above and two specs, "sleep" and "agent".

    ``settings`` go into [sandboxes] or [log] by name (on_shutdown, snapshot_every, ...).
    """
    log_keys = {"segment_bytes", "snapshot_every", "retention"}
    sandboxes = {"on_shutdown": "keep", "stop_timeout": 2.0, "shutdown_grace": 5.0}
    log: dict[str, Any] = {}
    for key, value in settings.items():
        (log if key in log_keys else sandboxes)[key] = value

    def table(name: str, values: Mapping[str, Any]) -> str:
        # A JSON scalar is a TOML scalar.
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())

    return (
        table("server", {"host": "127.0.0.1", "port": port, "state_dir": str(state_dir)})
        + table("sandboxes", sandboxes)
        + (table("log", log) if log else "")
        + "[[specs]]\n"
        'id = "sleep"\n'
        f"command = {json.dumps(list(SLEEP_SPEC.command))}\n"
        'health_check_path = ""\n'
        'inherit_env = ["PATH"]\n'
        "[[specs]]\n"
        'id = "agent"\n'
        f"command = {json.dumps(list(AGENT_SPEC.command))}\n"
        'health_check_path = "/alive"\n'
        f"health_interval = {AGENT_SPEC.health_interval}\n"
        f"ready_timeout = {AGENT_SPEC.ready_timeout}\n"
        'inherit_env = ["PATH"]\n' + users_toml()
    )


def make_config(state_dir: Path, **changes: Any) -> Config:
    """The daemon of ``daemon_toml`` as a Config, for one run in this process (port 0)."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "state_dir": state_dir,
        "specs": (SLEEP_SPEC, AGENT_SPEC),
        "users": configured_users(),
        "stop_timeout": 2.0,
        "shutdown_grace": 5.0,
        "on_shutdown": "keep",
    }
    values.update(changes)
    return Config(**values)


@contextlib.asynccontextmanager
async def daemon_in_process(config: Config) -> AsyncIterator[Gateway]:
    """The real wiring (run_daemon) in this process, left by cancelling it: as a crash
    leaves it, with no daemon.stopping, no shutdown snapshot, and sandboxes running on."""
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(run_daemon, config)
        yield gateway
        nursery.cancel_scope.cancel()


class DaemonProcess:
    """`sandboxd serve` on ``root/state``, started and stopped (or killed) at will.

    It keeps its port across restarts, so clients reconnect to the same URL.
    """

    def __init__(self, root: Path, *, state_dir: Path | None = None, **settings: Any) -> None:
        self.root = root
        self.state_dir = state_dir or root / "state"
        self.port = free_port()
        self.settings = settings
        self.config_path = root / "sandboxd.toml"
        self.config_path.write_text(daemon_toml(self.state_dir, self.port, **settings))
        self.log_path = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def marker(self) -> str:
        return str(self.state_dir.resolve())

    def spawn(self) -> None:
        """Start the process; do not wait for it to listen."""
        assert not self.alive(), "the daemon is running already"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts}\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandboxd.cli", "serve", "--config", str(self.config_path)],
                # Not the project's root, whose ./sandboxd folder would shadow the package.
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def current_output(self) -> str:
        """What the daemon printed since its last start."""
        return self.output().rsplit(f"=== start {self.starts}\n", 1)[-1]

    async def start(self, within: float = START_TIMEOUT) -> float:
        """Start and wait until it listens; return the seconds that took."""
        began = time.monotonic()
        self.spawn()
        listening = re.compile(rf"listening on ws://127\.0\.0\.1:{self.port}/v1")
        process = self.process
        assert process is not None

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the daemon exited at start:\n{self.current_output()}")
            return listening.search(self.current_output()) is not None

        await eventually(up, within=within, what=f"the daemon to listen:\n{self.output()}")
        return time.monotonic() - began

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    async def terminate(self, within: float = 20.0) -> int:
        """SIGTERM, and wait until it exits; return its exit code."""
        process = self.process
        assert process is not None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        await eventually(lambda: process.poll() is not None, within=within, what="daemon exit")
        return process.returncode

    def marked(self) -> dict[str, list[proctree.ProcessId]]:
        return marked_processes(self.state_dir)

    def cleanup(self) -> None:
        """Kill the daemon, then every process its sandboxes left (by marker and pid)."""
        self.kill()
        end_marked(self.state_dir)


@contextlib.asynccontextmanager
async def daemon_process(
    root: Path, *, state_dir: Path | None = None, **settings: Any
) -> AsyncIterator[DaemonProcess]:
    """A started daemon; afterwards it and every sandbox process it made are ended."""
    daemon = DaemonProcess(root, state_dir=state_dir, **settings)
    try:
        await daemon.start()
        yield daemon
    finally:
        daemon.cleanup()
    assert "Traceback" not in daemon.output(), daemon.output()


# --- Processes ----------------------------------------------------------------------------


def marked_processes(state_dir: Path) -> dict[str, list[proctree.ProcessId]]:
    """Live processes marked as sandboxes of the daemon on ``state_dir``, by sandbox id."""
    return proctree.find_marked(str(state_dir.resolve()))


def end_marked(state_dir: Path) -> None:
    """SIGKILL every process marked for ``state_dir`` (each only if its pid is still it)."""
    for procs in marked_processes(state_dir).values():
        for proc in procs:
            if proctree.is_alive(proc):  # the pid still holds the process found
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while marked_processes(state_dir) and time.monotonic() < deadline:
        time.sleep(0.01)


def stopped(pid: int) -> bool:
    return proc_state(pid) in ("T", "t")


def spawn_marked(state_dir: Path, sandbox_id: str, *argv: str) -> subprocess.Popen[bytes]:
    """A process marked as ``sandbox_id``'s of this daemon, as the actor spawns them."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        proctree.MARKER_VAR: sandbox_id,
        proctree.DAEMON_MARKER: str(state_dir.resolve()),
    }
    return subprocess.Popen(
        list(argv) or [SLEEP, "3600"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


#: A process that writes the number of every signal it receives to the file named
#: by argv[1], and says "ready" there once its handlers are installed.
SIGNAL_RECORDER = """
import os, signal, sys, time
path = sys.argv[1]
def note(signum, frame):
    with open(path, "a") as f:
        f.write(f"{signum}\\n")
for s in signal.valid_signals():
    if s not in (signal.SIGKILL, signal.SIGSTOP):
        try:
            signal.signal(s, note)
        except (OSError, ValueError):
            pass
with open(path, "a") as f:
    f.write("ready\\n")
while True:
    time.sleep(3600)
"""


# --- The log, read offline -----------------------------------------------------------------


def read_log(state_dir: Path) -> list[ev.Event]:
    """Every event of the log, from seq 1, read from its files (`sandboxd log dump`)."""
    out, err = io.StringIO(), io.StringIO()
    code = audit.dump(state_dir, out, err=err)
    assert code == 0, err.getvalue()
    return [codec.decode(line.encode()) for line in out.getvalue().splitlines()]


def replay(events: Iterable[ev.Event]) -> State:
    """The fold of ``events`` from an empty state: no snapshot involved."""
    state = State()
    for event in events:
        apply(state, event)
    return state


def verify_log(state_dir: Path) -> tuple[int, str]:
    """`sandboxd log verify --state-dir DIR`, in this process: its exit code and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sandboxd_cli(["log", "verify", "--state-dir", str(state_dir)])
    return code, out.getvalue()


async def append_offline(state_dir: Path, pendings: list[ev.PendingEvent]) -> list[ev.Event]:
    """Append events with no daemon running, through the real store (codec, log, checks)."""
    async with open_store(state_dir, StoreConfig()) as store:
        return await store.append_many(pendings)


def differences(info: SandboxInfo, record: SandboxRecord) -> list[str]:
    """Where a SandboxInfo from the gateway and a record of a replay differ (not the key)."""
    mine = attrs.asdict(sandbox_info(record, ""), recurse=False)
    theirs = attrs.asdict(info, recurse=False)
    return [
        f"{key}: gateway {theirs[key]!r}, replay {value!r}"
        for key, value in mine.items()
        if key != "session_api_key" and theirs[key] != value
    ]


# --- A subscription by hand (protocol.md, no client library) ------------------------------


async def raw_subscription(
    url: str,
    token: str,
    after_seq: int,
    until: Callable[[list[dict[str, Any]]], bool],
    frames: list[dict[str, Any]],
) -> None:
    """Subscribe after ``after_seq`` and append every frame of the subscription to ``frames``
    until ``until(frames)`` holds or the server closes the connection.

    By hand, so that what is checked is the server's stream, not a client's dedup.
    """
    from trio_websocket import ConnectionClosed, open_websocket_url

    headers = [(b"Authorization", f"Bearer {token}".encode())]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        await ws.send_message(
            json.dumps({"id": 1, "op": "events.subscribe", "after_seq": after_seq})
        )
        try:
            while not until(frames):
                frame = json.loads(await ws.get_message())
                if "subscription" in frame:
                    frames.append(frame)
                else:
                    assert frame.get("ok") is True, frame
        except ConnectionClosed:
            return


def seqs_of(frames: Iterable[Mapping[str, Any]]) -> list[int]:
    return [f["event"]["seq"] for f in frames if "event" in f]
