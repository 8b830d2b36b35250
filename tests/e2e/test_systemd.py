"""Under systemd (Type=notify): READY=1 once recovery is done and the gateway answers,
STOPPING=1 when the daemon starts to stop: datagrams on $NOTIFY_SOCKET, as systemd reads them.
And what the daemon says at start-up of its boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.e2e.support import daemon_process


async def test_ready_after_recovery_and_stopping_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = tmp_path / "notify"
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as systemd:
        await systemd.bind(str(notify))
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify))  # the daemon inherits it
        async with daemon_process(tmp_path) as daemon:
            with trio.fail_after(10):
                assert await systemd.recv(4096) == b"READY=1"
            # Only once it listens (and recovery, which comes before, is done).
            assert daemon.listening()
            said = daemon.current_output()
            assert "sandboxes recovered" in said
            # What it runs sandboxes with, said once at start-up as server.info says it.
            assert "boundary: " in said and "isolation: " in said and "limits: memory_max" in said
            assert await daemon.terminate() == 0
            with trio.fail_after(10):
                assert await systemd.recv(4096) == b"STOPPING=1"
