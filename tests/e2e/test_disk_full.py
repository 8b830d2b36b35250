"""A full disk during load: ops fail with `unavailable`, nothing acknowledged is lost,
and the daemon works again as soon as there is room.

The state dir is a small tmpfs (we are root in the test environment); a filler
file takes every free block of it while a client keeps asking. The test is
skipped, saying why, where mounting is not permitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sandboxd.events.projection import Status
from sandboxd.gateway.client import Client, UnavailableError, open_client
from tests.e2e.support import (
    daemon_process,
    fill,
    read_log,
    replay,
    tmpfs,
    verify_log,
)
from tests.support import TOKENS, eventually

TARGET = {"start": Status.RUNNING, "pause": Status.PAUSED, "resume": Status.RUNNING, "delete": None}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "4m") as mount:
        yield mount


class Ledger:
    """What alice was told: each sandbox's status after its acknowledged ops."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.expected: dict[str, Status | None] = {}
        self.failed: dict[str, str] = {}  # sandbox -> the op that got `unavailable`
        self.unavailable = 0
        self.ok = 0

    async def op(self, name: str, sandbox_id: str) -> bool:
        """Ask; True if it was acknowledged, False if `unavailable` (anything else fails)."""
        try:
            if name == "start":
                await self.client.start(spec_id="sleep", sandbox_id=sandbox_id)
            else:
                await getattr(self.client, name)(sandbox_id)
        except UnavailableError as exc:
            assert "log" in str(exc), exc
            self.failed[sandbox_id] = name
            self.unavailable += 1
            return False
        self.expected[sandbox_id] = TARGET[name]
        self.failed.pop(sandbox_id, None)
        self.ok += 1
        return True


async def test_a_full_disk_fails_ops_with_unavailable_and_loses_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    state_dir = small_disk / "state"
    async with daemon_process(tmp_path, state_dir=state_dir, snapshot_every=20) as daemon:
        async with open_client(daemon.url, TOKENS["alice"]) as client:
            ledger = Ledger(client)
            for i in range(4):
                assert await ledger.op("start", f"before-{i}")
            assert await ledger.op("pause", "before-0")
            assert await ledger.op("pause", "before-1")

            filler = fill(small_disk)
            # A log page may still hold a small record or two: start until refused.
            for i in range(100):
                if not await ledger.op("start", f"full-{i}"):
                    break
            else:
                raise AssertionError("100 starts succeeded on a full disk")
            # Every op either is acknowledged or fails with `unavailable`; reads work.
            for name, sandbox_id in (
                ("resume", "before-0"),
                ("pause", "before-2"),
                ("delete", "before-3"),
                ("start", "full-x"),
            ):
                await ledger.op(name, sandbox_id)
            assert ledger.unavailable >= 2, ledger.failed
            assert (await client.get("before-1")) is not None
            assert (await client.server_info()).head_seq > 0

            filler.unlink()
            # Room again: the next op works, and so does every op that failed.
            assert await ledger.op("start", "after-0")
            for sandbox_id, name in list(ledger.failed.items()):
                if name == "start" and (await client.get(sandbox_id)) is not None:
                    # Refused after its created event was durable: the start finishes
                    # now that its next event fits (docs/operations.md).
                    with trio.fail_after(10):
                        # Polling the gateway: this client has no event for it to wait on.
                        while (info := await client.get(sandbox_id)) is None or (  # noqa: ASYNC110
                            info.status is not Status.RUNNING
                        ):
                            await trio.sleep(0.02)
                    ledger.expected[sandbox_id] = Status.RUNNING
                    continue
                assert await ledger.op(name, sandbox_id), (name, sandbox_id)
            served = {info.id: info.status async for info in client.search_all()}

        for sandbox_id, status in ledger.expected.items():
            assert served.get(sandbox_id) is status, (sandbox_id, served.get(sandbox_id), status)
        # And nothing acknowledged is lost by a crash either.
        daemon.kill()
        code, text = verify_log(state_dir)
        assert code == 0, text
        await daemon.start()
        async with open_client(daemon.url, TOKENS["alice"]) as client:
            after = {info.id: info.status async for info in client.search_all()}
        for sandbox_id, status in ledger.expected.items():
            assert after.get(sandbox_id) is status, (sandbox_id, after.get(sandbox_id), status)
        replayed = replay(read_log(state_dir))
        assert {sid: r.status for sid, r in replayed.sandboxes.items()} == after

        # A daemon that starts on a full disk either fits its recovery's few events in
        # the log's last page, or cannot record them: then it says so and exits. With
        # room again it starts, and still nothing is lost.
        daemon.kill()
        filler = fill(small_disk)
        daemon.spawn()
        process = daemon.process
        assert process is not None

        def settled() -> bool:
            return process.poll() is not None or "listening on" in daemon.current_output()

        await eventually(settled, what="the daemon to start or give up")
        if process.poll() is not None:
            assert process.returncode == 1
            assert "No space left on device" in daemon.current_output(), daemon.current_output()
        else:
            daemon.kill()
        filler.unlink()
        await daemon.start()
        async with open_client(daemon.url, TOKENS["alice"]) as client:
            again = {info.id: info.status async for info in client.search_all()}
        assert again == after
