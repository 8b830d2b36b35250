"""Test support: a real daemon, in this process (trio tests) or as a subprocess.

Both run the real wiring (sandboxd.daemon.run_daemon) on a fresh state dir,
with three users and specs whose children are cheap (`sleep`), so that a test
starts sandboxes in milliseconds. Waits are for conditions, with deadlines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from sandboxd.actors.specs import SpecConfig
from sandboxd.config import Config
from sandboxd.daemon import run_daemon
from sandboxd.gateway.server import Gateway
from tests.support import configured_users, users_toml

SLEEP = shutil.which("sleep") or "/bin/sleep"
FALSE = shutil.which("false") or "/bin/false"


#: Specs of cheap children. "sleep" runs at once (no HTTP check); "stuck" never
#: becomes healthy (nothing listens), so its start waits out ready_timeout;
#: "fails" exits at once, so its start fails.
SPECS = (
    SpecConfig(id="sleep", command=(SLEEP, "600"), health_check_path="", inherit_env=("PATH",)),
    SpecConfig(
        id="stuck",
        command=(SLEEP, "600"),
        health_check_path="/",
        ready_timeout=3.0,
        inherit_env=("PATH",),
    ),
    SpecConfig(
        id="fails",
        command=(FALSE,),
        health_check_path="/",
        ready_timeout=5.0,
        initial_env={"SECRET_SETTING": "hunter2-value"},
        inherit_env=("PATH",),
    ),
)


def make_config(state_dir: Path, *, port: int = 0, **changes: Any) -> Config:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "state_dir": state_dir,
        "specs": SPECS,
        "users": configured_users(),
        "stop_timeout": 2.0,
        "shutdown_grace": 5.0,
        "on_shutdown": "stop",
    }
    values.update(changes)
    return Config(**values)


def config_toml(state_dir: Path, port: int) -> str:
    """The same daemon as make_config, as a file for `sandboxd serve --config`."""

    def spec(s: SpecConfig) -> str:
        # A JSON string is a TOML basic string.
        env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in s.initial_env.items())
        return (
            "[[specs]]\n"
            f"id = {json.dumps(s.id)}\n"
            f"command = {json.dumps(list(s.command))}\n"
            f"health_check_path = {json.dumps(s.health_check_path)}\n"
            f"ready_timeout = {s.ready_timeout}\n"
            f"inherit_env = {json.dumps(list(s.inherit_env))}\n"
            f"initial_env = {{ {env} }}\n"
        )

    return (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = {json.dumps(str(state_dir))}\n'
        '[sandboxes]\non_shutdown = "stop"\nstop_timeout = 2.0\nshutdown_grace = 5.0\n'
        + "".join(spec(s) for s in SPECS)
        + users_toml()
    )


def url_of(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1"


# --- In this process ------------------------------------------------------------------


@attrs.define
class Daemon:
    gateway: Gateway
    config: Config

    @property
    def url(self) -> str:
        return url_of(self.gateway.port)

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir


async def start_daemon(nursery: trio.Nursery, config: Config) -> Daemon:
    gateway: Gateway = await nursery.start(run_daemon, config)
    return Daemon(gateway, config)


async def stop_daemon(daemon: Daemon) -> None:
    """Delete what the test left running; the caller's nursery then cancels the daemon."""
    with trio.move_on_after(10):
        await daemon.gateway.registry.delete_all()


# --- As a subprocess: `sandboxd serve --config F` -------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonProcess:
    """`python -m sandboxd.cli serve` on a fresh state dir; its stderr goes to a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.port = free_port()
        self.config_path = root / "sandboxd.toml"
        self.config_path.write_text(config_toml(self.state_dir, self.port))
        self.log_path = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return url_of(self.port)

    def start(self, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandboxd.cli", "serve", "--config", str(self.config_path)],
                # Not the project's root, whose ./sandboxd folder would shadow the package.
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(rf"listening on ws://127\.0\.0\.1:{self.port}/v1", self.output()):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited at start:\n{self.output()}")
            time.sleep(0.02)
        raise AssertionError(f"the daemon did not listen within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def state_files(state_dir: Path) -> Iterator[Path]:
    """Every file the daemon keeps: log segments, snapshots, its own files."""
    for path in sorted(state_dir.rglob("*")):
        if path.is_file():
            yield path


def env_for_cli(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    env.update(extra)
    return env


# --- A websocket client that is not ours: the `websockets` package ----------------------


class Peer:
    """A `websockets` sync connection that speaks protocol.md by hand.

    ``call`` sends one request and returns its reply; frames that arrive
    meanwhile (subscription frames, other replies) are kept in ``frames``.
    """

    def __init__(self, url: str, token: str | None, *, query: bool = False) -> None:
        from websockets.sync.client import connect

        headers = {} if token is None or query else {"Authorization": f"Bearer {token}"}
        if query and token is not None:
            url = f"{url}?token={token}"
        self.ws = connect(url, additional_headers=headers, max_size=None, close_timeout=5)
        self.ws.__enter__()  # what `with connect(...)` does; the Peer is the context manager
        self.frames: list[dict[str, Any]] = []
        self._ids = iter(range(1, 1 << 62))

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.ws.close()

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(self.ws.recv(timeout=timeout))
        return frame

    def reply_to(self, request_id: object, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            if "ok" in frame and frame.get("id") == request_id:
                return frame
            self.frames.append(frame)

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        """The whole reply frame."""
        request_id = next(self._ids)
        self.send({"id": request_id, "op": op, **params})
        return self.reply_to(request_id)

    def call(self, op: str, **params: Any) -> Any:
        """The result; fails the test on an error reply."""
        reply = self.request(op, **params)
        assert reply["ok"] is True, reply
        return reply["result"]

    def error(self, op: str, **params: Any) -> dict[str, Any]:
        """The error object; fails the test on an ok reply."""
        reply = self.request(op, **params)
        assert reply["ok"] is False, reply
        error: dict[str, Any] = reply["error"]
        return error

    def sub_frames(
        self, subscription: str, until: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """Frames of ``subscription`` (kept ones first) up to the first that ``until`` accepts."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            kept = [f for f in self.frames if f.get("subscription") == subscription]
            self.frames = [f for f in self.frames if f.get("subscription") != subscription]
            for frame in kept:
                got.append(frame)
                if until(frame):
                    return got
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            self.frames.append(frame)


# --- The same by hand over trio-websocket, for the in-process tests (harness.py) ----------


class TrioPeer:
    """protocol.md by hand over one trio-websocket connection (no sandboxd client code)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._ids = iter(range(1, 1 << 62))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.ws.get_message())
        return frame

    async def reply_to(self, request_id: object) -> dict[str, Any]:
        while True:
            frame = await self.recv()
            if "ok" in frame and frame.get("id") == request_id:
                return frame
            self.frames.append(frame)

    async def request(self, op: str, **params: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        await self.send({"id": request_id, "op": op, **params})
        return await self.reply_to(request_id)

    async def call(self, op: str, **params: Any) -> Any:
        reply = await self.request(op, **params)
        assert reply["ok"] is True, reply
        return reply["result"]

    async def sub_frames(
        self, subscription: str, until: Callable[[dict[str, Any]], bool]
    ) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while True:
            kept = [f for f in self.frames if f.get("subscription") == subscription]
            self.frames = [f for f in self.frames if f.get("subscription") != subscription]
            for frame in kept:
                got.append(frame)
                if until(frame):
                    return got
            self.frames.append(await self.recv())


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame as a client sends it (masked), built by hand."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    elif size < 1 << 16:
        header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
