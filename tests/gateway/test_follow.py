"""sandbox.logs with follow, against a real daemon (`sandboxd serve` as a subprocess) whose
sandboxes are real Python children: every byte once across the daemon's own rotations, the
end on delete, a slow reader cut with its memory bounded, bad input, both clients, the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from sandboxd import aio
from sandboxd.actors.specs import SpecConfig
from sandboxd.gateway.client import open_client
from tests.actors.test_output_follow import expected_writer_output
from tests.daemon_process import SANDBOX_PYTHON, DaemonProcess, daemon_config
from tests.gateway.support import SPECS, trio_peer
from tests.gateway.test_cli_client import sandboxd as cli
from tests.support import TOKENS, end_sandboxes, eventually

ALICE, BOB = TOKENS["alice"], TOKENS["bob"]
#: Big enough that a follower half a second late is still in time, small enough that the
#: writer below crosses it several times: the daemon's sweep rotates once a second.
CAP = 1 << 20

# Each waits for a file "go" in its working dir, so a test follows it from its first byte.
_WAIT_FOR_GO = "import os, sys, time\nwhile not os.path.exists('go'): time.sleep(0.005)\n"
# The writer of tests/actors/test_output_follow.py (lines cut inside characters), at about
# 1 MB/s; half-way it waits (up to a minute) until its file is shorter than what it wrote
# (rotated, then or before), so a rotation falls in the middle of what is followed. Then
# it sleeps.
_WRITER = _WAIT_FOR_GO + (
    "total, line, wrote = int(os.environ['TOTAL']), 0, 0\n"
    "half, deadline = total // 2, time.monotonic() + 60\n"
    "while total > 0:\n"
    "    if line % 50 == 0: time.sleep(0.002)\n"
    "    text = ('%08d ' % line + 'é€' * (line % 7) + 'x' * (line % 97) + '\\n').encode()\n"
    "    cut = len(text) // 2\n"
    "    os.write(1, text[:cut]); os.write(1, text[cut:])\n"
    "    total -= len(text); line += 1; wrote += len(text)\n"
    "    if half and total <= half:\n"
    "        half = 0\n"
    "        while os.fstat(1).st_size >= wrote and time.monotonic() < deadline:\n"
    "            time.sleep(0.01)\n"
    "os.write(1, b'done\\n')\n"
    "time.sleep(600)\n"
)
# Says hello; on SIGTERM says bye and exits: what it says while it is deleted is followed.
_FAREWELL = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (os.write(1, b'bye\\n'), sys.exit(0)))\n"
    "os.write(1, b'hello\\n')\n"
    "while True: time.sleep(1)\n"
)
# As fast as it can: MIB MiB, then "done".
_FLOOD = _WAIT_FOR_GO + (
    "chunk = (b'f' * 1023 + b'\\n') * 64\n"
    "for _ in range(int(os.environ['MIB']) * 16): os.write(1, chunk)\n"
    "os.write(1, b'done\\n')\n"
    "time.sleep(600)\n"
)


def _python(code: str, spec_id: str) -> SpecConfig:
    return SpecConfig(id=spec_id, command=(SANDBOX_PYTHON, "-c", code), health_check_path="")


FOLLOW_SPECS = (
    *SPECS,
    _python(_WRITER, "writer"),
    _python(_FAREWELL, "farewell"),
    _python(_FLOOD, "flood"),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("follow")
    config = daemon_config(root / "state", FOLLOW_SPECS, on_shutdown="stop", output_cap_bytes=CAP)
    running = DaemonProcess(root, config)
    running.start_blocking()
    try:
        yield running
    finally:
        running.stop()
        end_sandboxes(running.state_dir)
    assert "Traceback" not in running.output(), running.output()


def _new_id() -> str:
    return "fl-" + uuid.uuid4().hex[:10]


def _go(info: Any) -> None:
    Path(info.working_dir, "go").write_text("")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_follow_sees_every_byte_once_across_the_daemons_rotations(
    daemon: DaemonProcess,
) -> None:
    total = 3 << 20  # over CAP by half of it at the rotation the writer waits for
    async with open_client(daemon.url, ALICE) as client:
        info = await client.start(spec_id="writer", sandbox_id=_new_id(), env={"TOTAL": str(total)})
        rotated = daemon.state_dir / "output" / f"{info.id}.log.1"
        received: list[str] = []
        with trio.fail_after(120):
            async with client.follow_logs(info.id, tail_bytes=0) as output:
                assert output.truncated is False
                _go(info)
                async for text in output:
                    received.append(text)
                    if "".join(received[-2:]).endswith("done\n"):
                        break
        # The daemon rotated the file while it was followed (the sweep, once a second).
        assert rotated.exists()
        assert "".join(received) == expected_writer_output(total)
        await client.delete(info.id)


async def test_a_follow_gets_the_last_words_then_ends_when_the_sandbox_is_deleted(
    daemon: DaemonProcess,
) -> None:
    async with open_client(daemon.url, ALICE) as client:
        info = await client.start(spec_id="farewell", sandbox_id=_new_id())
        await eventually(
            lambda: (daemon.state_dir / "output" / f"{info.id}.log").stat().st_size > 0
        )
        received: list[str] = []
        with trio.fail_after(30):
            async with client.follow_logs(info.id) as output:
                async for text in output:
                    received.append(text)
                    if text == "hello\n":
                        # The tail; now delete it from another connection.
                        async with open_client(daemon.url, ALICE) as other:
                            assert await other.delete(info.id) is True
        assert "".join(received) == "hello\nbye\n"
        assert output.ended == "the sandbox was deleted"


def test_the_asyncio_client_follows_too(daemon: DaemonProcess) -> None:
    async def main() -> tuple[list[str], str | None, bool | None]:
        async with aio.open_client(daemon.url, ALICE) as client:
            info = await client.start(spec_id="farewell", sandbox_id=_new_id())
            got: list[str] = []
            async with client.follow_logs(info.id) as output:
                deleting: asyncio.Task[bool] | None = None
                async for text in output:
                    got.append(text)
                    if "hello\n" in "".join(got) and deleting is None:
                        deleting = asyncio.create_task(client.delete(info.id))
                assert deleting is not None and await deleting
            return got, output.ended, output.truncated

    # hello is in the tail or comes after it: either way once, then bye.
    got, ended, truncated = asyncio.run(asyncio.wait_for(main(), 30))
    assert "".join(got) == "hello\nbye\n" and ended == "the sandbox was deleted"
    assert truncated is not None


async def test_a_slow_reader_is_cut_with_the_reason_and_the_daemon_holds_little_for_it(
    daemon: DaemonProcess,
) -> None:
    assert daemon.process is not None
    pid = daemon.process.pid
    mib = 48
    async with open_client(daemon.url, ALICE) as client:
        info = await client.start(spec_id="flood", sandbox_id=_new_id(), env={"MIB": str(mib)})
        rss_before = _rss_kib(pid)
        # A reader of trio-websocket's that takes one message off the socket and then no
        # more: the daemon's queue for it fills, then TCP's, then the pump waits.
        async with open_websocket_url(
            daemon.url,
            extra_headers=[(b"Authorization", f"Bearer {ALICE}".encode())],
            message_queue_size=1,
            max_message_size=1 << 26,
        ) as ws:
            await ws.send_message(
                json.dumps({"id": 1, "op": "sandbox.logs", "sandbox_id": info.id, "follow": True})
            )
            reply = json.loads(await ws.get_message())
            assert reply["ok"] is True, reply
            sub = reply["result"]["subscription"]
            _go(info)
            # The child wrote all of it, and the daemon rotated since.
            log = daemon.state_dir / "output" / f"{info.id}.log"
            peak = 0

            def flooded() -> bool:
                nonlocal peak
                peak = max(peak, _rss_kib(pid))
                with log.open("rb") as f:
                    f.seek(max(0, log.stat().st_size - 5))
                    return f.read() == b"done\n"

            await eventually(flooded, within=60)
            rotated = daemon.state_dir / "output" / f"{info.id}.log.1"
            await eventually(rotated.exists, within=5)
            # Now it reads: some output, then the end, with why.
            output_bytes = 0
            with trio.fail_after(30):
                while True:
                    frame = json.loads(await ws.get_message())
                    assert frame["subscription"] == sub
                    if "output" in frame:
                        output_bytes += len(frame["output"])
                        continue
                    break
            assert frame["ended"] is True
            assert "fell" in frame["reason"] and "behind" in frame["reason"], frame
            # What it got is what the queues held, not what was written.
            assert output_bytes < (mib << 20) // 2
    # 48 MiB went by; the daemon grew by far less (its send queue is 1 MiB).
    assert peak - rss_before < 24 << 10, (rss_before, peak)


async def test_bad_input_names_the_field(daemon: DaemonProcess) -> None:
    async with trio_peer(daemon.url, ALICE) as peer:
        missing = await peer.request("sandbox.logs", sandbox_id="no-such-box", follow=True)
        assert missing["error"]["code"] == "not_found"
        assert "'sandbox_id'" in missing["error"]["message"]
        wrong = await peer.request("sandbox.logs", sandbox_id="no-such-box", follow="yes")
        assert wrong["error"]["code"] == "bad_request"
        assert "'follow'" in wrong["error"]["message"]
        too_much = await peer.request("sandbox.logs", sandbox_id="x", follow=True, tail_bytes=-1)
        assert too_much["error"]["code"] == "bad_request"
        assert "'tail_bytes'" in too_much["error"]["message"]
    # Another user's sandbox is one that does not exist.
    async with open_client(daemon.url, BOB) as bob:
        info = await bob.start(spec_id="sleep", sandbox_id=_new_id())
        async with trio_peer(daemon.url, ALICE) as peer:
            hidden = await peer.request("sandbox.logs", sandbox_id=info.id, follow=True)
            assert hidden["error"]["code"] == "not_found"
        await bob.delete(info.id)


async def test_unsubscribe_ends_a_follow_and_follows_count_against_the_limit(
    daemon: DaemonProcess,
) -> None:
    from sandboxd.gateway.ops import MAX_SUBSCRIPTIONS

    async with open_client(daemon.url, ALICE) as client:
        info = await client.start(spec_id="sleep", sandbox_id=_new_id())
        async with trio_peer(daemon.url, ALICE) as peer:
            subs = []
            for i in range(MAX_SUBSCRIPTIONS):
                if i % 2:
                    result = await peer.call("events.subscribe")
                else:
                    result = await peer.call("sandbox.logs", sandbox_id=info.id, follow=True)
                    assert set(result) == {"data", "truncated", "subscription"}
                subs.append(result["subscription"])
            # A sandbox that says nothing: no output frame (the event subscriptions' caught_up).
            assert all("caught_up" in frame for frame in peer.frames), peer.frames
            full = await peer.request("sandbox.logs", sandbox_id=info.id, follow=True)
            assert full["error"]["code"] == "limit_exceeded"
            assert await peer.call("events.unsubscribe", subscription=subs[0]) is True
            again = await peer.call("sandbox.logs", sandbox_id=info.id, follow=True)
            assert again["subscription"] not in subs
            gone = await peer.request("events.unsubscribe", subscription=subs[0])
            assert gone["error"]["code"] == "not_found"
            # Deleted: every follow still open ends, once; the unsubscribed one says nothing.
            follows = {*subs[2::2], again["subscription"]}
            await client.delete(info.id)
            ended: list[str] = []
            with trio.fail_after(20):
                while set(ended) != follows:
                    frame = peer.frames.pop(0) if peer.frames else await peer.recv()
                    assert "output" not in frame
                    if frame.get("ended") is True and "last_seq" not in frame:
                        assert frame["reason"] == "the sandbox was deleted"
                        ended.append(frame["subscription"])
            assert sorted(ended) == sorted(follows)


def test_cli_logs_follow_prints_until_the_sandbox_is_deleted(daemon: DaemonProcess) -> None:
    sandbox_id = _new_id()
    started = cli(daemon, "start", "--spec", "farewell", "--id", sandbox_id, "--json")
    assert started.returncode == 0, started.stderr
    command = [sys.executable, "-m", "sandboxd.cli", "logs", "-f", sandbox_id]
    command += ["--url", daemon.url, "--token", ALICE]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
        env={k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")},
    ) as follower:
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline() == "hello\n"  # the tail, as soon as it came
            assert cli(daemon, "rm", sandbox_id).returncode == 0
            out, err = follower.communicate(timeout=30)
        finally:
            if follower.poll() is None:
                follower.kill()
    assert follower.returncode == 0, err
    assert out == "bye\n"
    assert err.strip() == "sandboxd: the sandbox was deleted"
    missing = cli(daemon, "logs", "-f", sandbox_id)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


async def test_a_follow_ends_with_shutdown_when_the_daemon_stops(
    tmp_path: Path,
) -> None:
    config = daemon_config(tmp_path / "state", FOLLOW_SPECS, on_shutdown="keep")
    running = DaemonProcess(tmp_path, config)
    await running.start()
    try:
        async with open_client(running.url, ALICE) as client:
            info = await client.start(spec_id="farewell", sandbox_id=_new_id())
        async with trio_peer(running.url, ALICE) as peer:
            result = await peer.call("sandbox.logs", sandbox_id=info.id, follow=True)
            assert running.process is not None
            running.process.terminate()
            with trio.fail_after(20):
                frame = await peer.recv()
                while "output" in frame:
                    frame = await peer.recv()
            assert frame == {
                "subscription": result["subscription"],
                "ended": True,
                "reason": "shutdown",
            }
    finally:
        if running.alive():
            running.stop()
        end_sandboxes(running.state_dir)
