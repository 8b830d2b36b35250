"""sd_notify against a real unix datagram socket, by path and in the abstract namespace."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.sdnotify import notify


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_ready_by_path(receiver: socket.socket, tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    receiver.bind(path)
    assert notify(socket_path=path) is True
    assert receiver.recv(4096) == b"READY=1"


def test_ready_by_abstract_name_from_the_environment(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"sandboxd-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
    receiver.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert notify("READY=1\nSTATUS=recovered 3 sandboxes") is True
    assert receiver.recv(4096) == b"READY=1\nSTATUS=recovered 3 sandboxes"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify() is False


def test_an_address_it_cannot_reach_is_said() -> None:
    with pytest.raises(ValueError, match="vsock:2:1234"):
        notify(socket_path="vsock:2:1234")
    with pytest.raises(OSError):
        notify(socket_path="/nonexistent/notify")


UNIT = Path(__file__).parents[1] / "contrib" / "sandboxd.service"


def test_the_shipped_unit_is_notify_and_delegated(tmp_path: Path) -> None:
    lines = {
        key: value
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
        for key, value in [line.split("=", 1)]
    }
    assert lines["Type"] == "notify"
    assert lines["Delegate"] in ("yes", "memory pids cpu")
    assert lines["KillMode"] == "process"  # sandboxes outlive a restart, to be adopted
    # The default state dir of root, passable by sandbox uids (docs/boundary.md).
    assert (lines["StateDirectory"], lines["StateDirectoryMode"]) == ("sandboxd", "0711")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd's own parser, with an ExecStart that exists on this machine.
    unit = tmp_path / "sandboxd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sandboxd", "/bin/true"))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr and "Invalid" not in result.stderr
