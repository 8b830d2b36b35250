"""Test support: a real daemon, in this process (trio tests) or as a subprocess.

Both run the real wiring (sandboxd.daemon.run_daemon) on a fresh state dir (the
subprocess is tests/daemon_process.py's DaemonProcess of ``make_config``),
with three users and specs whose children are cheap (`sleep`), so that a test
starts sandboxes in milliseconds. Waits are for conditions, with deadlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from sandboxd.actors.specs import SpecConfig
from sandboxd.config import Config
from sandboxd.daemon import run_daemon
from sandboxd.gateway.server import Gateway
from tests.daemon_process import daemon_config

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


def make_config(state_dir: Path, **changes: Any) -> Config:
    """This suite's daemon: SPECS; its sandboxes are deleted when it stops."""
    return daemon_config(state_dir, SPECS, on_shutdown="stop", **changes)


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


# --- As a subprocess: `sandboxd serve --config F` (tests/daemon_process.py) -----------


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


@contextlib.asynccontextmanager
async def trio_peer(url: str, token: str) -> AsyncIterator[TrioPeer]:
    """A websocket of trio-websocket's, speaking frames as the tests write them."""
    from trio_websocket import open_websocket_url

    async with open_websocket_url(
        url, extra_headers=[(b"Authorization", f"Bearer {token}".encode())]
    ) as ws:
        yield TrioPeer(ws)


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
