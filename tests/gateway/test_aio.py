"""sandboxd.aio as an asyncio program uses it: in a process of its own, with no trio in it.

The behaviour both clients share is tested once, for both, in test_client.py;
here is what only a real asyncio process can show: that it imports no trio,
that it starts, follows and deletes a sandbox, that its subscription survives
real cuts mid-burst with no gap and no duplicate, and that closing leaves no
task behind. And that the two clients are one API.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

import sandboxd.aio
from sandboxd.gateway import client as trio_client
from sandboxd.gateway import protocol as p
from tests.gateway.support import Daemon
from tests.gateway.test_client import produce
from tests.support import TOKENS

PROGRAM = Path(__file__).with_name("aio_program.py")


def test_sandboxd_aio_imports_no_trio() -> None:
    code = "import sys, sandboxd.aio; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _public(cls: type) -> dict[str, inspect.Signature | str]:
    members: dict[str, inspect.Signature | str] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__aenter__", "__aexit__", "__anext__"):
            continue
        members[name] = inspect.signature(member) if callable(member) else "attribute"
    return members


def test_both_clients_are_one_api() -> None:
    # The same methods with the same parameters (protocol.ClientOps, but for what each
    # transport must do itself), and the same subscription.
    assert _public(sandboxd.aio.Client) == _public(trio_client.Client)
    aio_sub = _public(sandboxd.aio.Subscription)
    assert aio_sub == _public(trio_client.Subscription)
    assert {"open", "aclose", "last_seq", "head_seq", "reconnects", "caught_up"} <= {
        *aio_sub,
        "caught_up",  # an instance attribute of both
    }
    # And the same output follow.
    assert _public(sandboxd.aio.LogFollow) == _public(trio_client.LogFollow)
    assert {"open", "aclose", "truncated", "ended"} <= set(_public(trio_client.LogFollow))
    # The same names, and the very same result types and exception classes.
    assert set(sandboxd.aio.__all__) == set(trio_client.__all__) | {"connect"}
    for name in trio_client.__all__:
        if name not in ("Client", "Subscription", "LogFollow", "open_client"):
            assert getattr(sandboxd.aio, name) is getattr(trio_client, name), name
    assert sandboxd.aio.NotFoundError is p.NotFoundError


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    """JSON messages of the program, one per line."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            data = await stream.receive_some()
            if not data:
                return
            buffer += data
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)


async def test_an_asyncio_program_follows_a_sandbox_across_cuts_mid_burst(
    daemon: Daemon, tmp_path: Path
) -> None:
    burst, in_flight = 2000, 50
    cuts = [150, 700, 1300, 1900]
    errors = tmp_path / "program.stderr"
    command = [sys.executable, str(PROGRAM), str(daemon.gateway.port), TOKENS["root"]]
    command += [str(burst), *map(str, cuts)]
    with errors.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL
        )
    try:
        assert process.stdout is not None
        messages = _lines(process.stdout).__aiter__()
        with trio.fail_after(60):
            ready = await anext(messages)
            assert "ready" in ready, ready
            # Each cut comes with events in flight, and the burst goes on only once the
            # program has cut: the rest can reach it only through a new connection.
            produced = 0
            for n in cuts:
                await produce(daemon, n + in_flight - produced)
                produced = n + in_flight
                assert await anext(messages) == {"cut": n}
            await produce(daemon, burst - produced)
            result = (await anext(messages))["result"]
            await process.wait()
    finally:
        with trio.move_on_after(5):
            process.kill()
            await process.wait()
    assert process.returncode == 0, errors.read_text()

    seqs = result["seqs"]
    assert seqs == list(range(result["head"] + 1, seqs[-1] + 1))  # no gap, no duplicate
    assert result["burst_seen"] == burst
    assert result["mine"] == [
        "sandbox.created",
        "sandbox.process_started",
        "sandbox.running",
        "sandbox.deleted",
    ]
    assert result["deleted"] is True
    assert result["reconnects"] >= len(cuts)
    assert result["relayed_connections"] >= 3 + len(cuts)  # two clients, a subscription, ...
    assert result["tasks_left"] == []
    assert result["trio_imported"] is False
    async with trio_client.open_client(daemon.url, TOKENS["root"]) as client:
        assert await client.get(ready["ready"]) is None
