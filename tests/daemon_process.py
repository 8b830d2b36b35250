"""A real daemon for the suites: its config, its config file, its process.

``daemon_config`` makes the Config a suite's daemon runs (the suite brings its
specs); ``config_toml`` writes any Config as the file `sandboxd serve --config`
reads, so a daemon run in this process and one run as a subprocess are the
same daemon (tests/test_daemon_process.py checks the round trip);
``DaemonProcess`` runs `python -m sandboxd.cli serve --config F`, the way an
operator does, so that SIGTERM and SIGKILL are real.

Isolation is on wherever the tests run as root (the default there): every
sandbox runs under a uid of its own. So its working dir must be reachable by
that uid, which pytest's tmp dirs (0700) are not: ``daemon_config`` puts the
working dirs under a dir of their own, mode 0711, in /tmp (``reachable_dir``;
removed at the end of the session), and sandboxes run Python with
``SANDBOX_PYTHON``, an interpreter every uid can run (the venv's lives under
/root, mode 0700).

Every wait is for a condition, with a deadline. The daemon is ended by the pid
of its own Popen; what its sandboxes leave behind (processes, cgroups) is the
suite's to end: ``tests.support.end_sandboxes``, which the suite's autouse
fixture calls after every test for each state dir ``daemon_config`` made.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from sandboxd.actors import agent_server
from sandboxd.actors.boundary.in_force import Boundary, open_boundary
from sandboxd.actors.boundary.limits import Limits
from sandboxd.actors.boundary.workdirs import make_base_dir, remove_tree
from sandboxd.actors.specs import SpecConfig, python_for_sandboxes
from sandboxd.config import SECTION_KEYS, Config
from tests.support import configured_users, eventually

#: How long a daemon may take to listen (start-up is recovery; the machine has 2 cores
#: shared with the rest of the suite).
START_TIMEOUT = 30.0

#: The Python sandboxes run: one every uid can execute (/usr/bin/python3 here).
SANDBOX_PYTHON = python_for_sandboxes()
#: The reference agent server, run by its path (standard library only), as the default spec.
AGENT_SERVER = os.path.realpath(agent_server.__file__)


def agent_command(*args: str) -> tuple[str, ...]:
    """The reference agent server's command, as the default spec runs it."""
    return (SANDBOX_PYTHON, "-I", AGENT_SERVER, "--port", "{port}", *args)


_reachable_root: Path | None = None
#: Every state dir daemon_config made a config for: the suite ends their sandboxes.
STATE_DIRS: list[Path] = []


def reachable_dir(prefix: str = "wd-") -> Path:
    """A fresh dir, mode 0711, under one of this session's in /tmp (mode 0711): every uid
    can pass through it to what it owns inside. Removed with the session's."""
    global _reachable_root
    if _reachable_root is None:
        _reachable_root = Path(tempfile.mkdtemp(prefix=f"sandboxd-tests-{os.getpid()}-"))
        make_base_dir(_reachable_root)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_reachable_root))
    make_base_dir(path)
    return path


def remove_reachable_dirs() -> None:
    """Remove what reachable_dir made (the session's end), whatever sandboxes left there."""
    global _reachable_root
    if _reachable_root is not None:
        remove_tree(_reachable_root)
        _reachable_root = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def daemon_config(state_dir: Path, specs: Sequence[SpecConfig], **changes: Any) -> Config:
    """A daemon on 127.0.0.1 (port 0: any), with the users of tests/support.py and quick stops,
    its working dirs where its sandboxes' uids reach them (``base_working_dir = None``:
    the default, under the state dir).

    ``changes`` are Config fields (on_shutdown, snapshot_every, port, cgroup, ...).
    """
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "state_dir": state_dir,
        "specs": tuple(specs),
        "users": configured_users(),
        "stop_timeout": 2.0,
        "shutdown_grace": 5.0,
    }
    if "base_working_dir" not in changes:
        values["base_working_dir"] = reachable_dir()
    values.update(changes)
    STATE_DIRS.append(state_dir)
    return Config(**values)


def boundary_for(config: Config) -> Boundary:
    """The boundary a daemon of ``config`` runs with, for tests that run its registry alone
    (the caller closes it; tests.support.end_sandboxes removes its cgroups)."""
    return open_boundary(
        config.boundary_settings, state_dir=config.state_dir, max_sandboxes=config.max_sandboxes
    )


def _toml(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # a JSON scalar (string, number, boolean) is a TOML scalar


def _table(header: str, values: Mapping[str, Any]) -> str:
    return header + "\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in values.items())


def _spec_table(spec: SpecConfig) -> dict[str, Any]:
    """A spec's keys: its fields, its limits as the spec keys they come from."""
    table = {
        f.name: getattr(spec, f.name)
        for f in attrs.fields(SpecConfig)
        if f.name not in ("created_at", "limits")
    }
    limits = {f.name: getattr(spec.limits, f.name) for f in attrs.fields(Limits)}
    table |= {name: value for name, value in limits.items() if value is not None}
    table["limits_required"] = table.pop("required")
    return table


def config_toml(config: Config) -> str:
    """``config`` as a config file (spec/config.md): every key written, none left to defaults."""
    scalars = {
        field.name: getattr(config, field.name)
        for field in attrs.fields(Config)
        if field.name not in ("specs", "users") and getattr(config, field.name) is not None
    }
    server = {key: scalars.pop(key) for key in SECTION_KEYS["server"] if key in scalars}
    log = {key: scalars.pop(key) for key in SECTION_KEYS["log"] if key in scalars}
    cluster = {key: scalars.pop(key) for key in SECTION_KEYS["cluster"] if key in scalars}
    nats = log.pop("nats", None)
    if nats is not None:
        log["backend"] = "nats"
        nats = {k: v for k, v in attrs.asdict(nats, recurse=False).items() if v is not None}
    specs = [_spec_table(spec) for spec in config.specs]
    users = [attrs.asdict(user) for user in config.users]
    return (
        _table("[server]", server)
        + _table("[sandboxes]", scalars)
        + _table("[log]", log)
        + (_table("[log.nats]", nats) if nats is not None else "")
        + _table("[cluster]", cluster)
        + "".join(_table("[[specs]]", spec) for spec in specs)
        + "".join(_table("[[users]]", user) for user in users)
    )


class DaemonProcess:
    """`sandboxd serve` of ``config`` in ``root``, started and stopped (or killed) at will.

    Port 0 in ``config`` is replaced by a free port, which the daemon keeps across
    restarts so that clients reconnect to the same URL. What it prints goes to
    ``root/daemon.log``, each start marked so that ``current_output`` is the last one's.
    With ``umask`` it runs with that umask instead of this process's.
    """

    def __init__(self, root: Path, config: Config, *, umask: int | None = None) -> None:
        self.root = root
        self.config = config if config.port else attrs.evolve(config, port=free_port())
        self.umask = umask  # the daemon's, if not this process's
        self.config_path = root / "sandboxd.toml"
        self.config_path.write_text(config_toml(self.config))
        self.log_path = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    # -- starting ------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process; do not wait for it to listen."""
        assert not self.alive(), "the daemon is running already"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts}\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandboxd.cli", "serve", "--config", str(self.config_path)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                umask=-1 if self.umask is None else self.umask,
            )

    def listening(self) -> bool:
        """Whether the process of the last start listens; it must not have exited."""
        process = self.process
        assert process is not None, "the daemon was never started"
        if process.poll() is not None:
            raise AssertionError(f"the daemon exited at start:\n{self.current_output()}")
        pattern = rf"listening on ws://127\.0\.0\.1:{self.port}/v1"
        return re.search(pattern, self.current_output()) is not None

    async def start(self, within: float = START_TIMEOUT) -> float:
        """Start, and wait until it listens; return the seconds that took."""
        began = time.monotonic()
        self.spawn()
        await eventually(self.listening, within=within, what=f"the daemon to listen on {self.url}")
        return time.monotonic() - began

    def start_blocking(self, within: float = START_TIMEOUT) -> None:
        """``start`` for code that runs outside trio (module-scoped fixtures, sync tests)."""
        self.spawn()
        deadline = time.monotonic() + within
        while not self.listening():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the daemon did not listen within {within} s:\n{self.current_output()}"
                )
            time.sleep(0.01)

    # -- what it says ----------------------------------------------------------------------

    def output(self) -> str:
        """Everything the daemon printed, every start."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def current_output(self) -> str:
        """What the daemon printed since its last start."""
        return self.output().rsplit(f"=== start {self.starts}\n", 1)[-1]

    # -- stopping ----------------------------------------------------------------------------

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

    def stop(self, within: float = 20.0) -> int:
        """``terminate`` outside trio; SIGKILL if it overruns. Returns the exit code."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(within)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode
