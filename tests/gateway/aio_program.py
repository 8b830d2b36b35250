"""An asyncio program on sandboxd.aio, run as a process of its own by test_aio.py.

    python aio_program.py DAEMON_PORT TOKEN BURST CUT [CUT ...]

It starts a sandbox, follows the log through a second client whose connections
pass through a TCP relay of its own, and cuts that relay's connections (a real
cut: the sockets are aborted, mid-frame if it comes to that) when it has seen
the CUT-th event of the burst that the test appends meanwhile. Then it deletes
the sandbox and follows until its ``sandbox.deleted``. It talks to the test in
JSON lines on stdout:

    {"ready": SANDBOX_ID}   the sandbox runs and the follower is subscribed: burst now
    {"cut": N}              the follower's connections were cut after N events of the burst
    {"result": {...}}       what it saw, for the test to judge

Nothing here imports trio; the result says whether anything did.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import sandboxd.aio


def say(**message: Any) -> None:
    print(json.dumps(message), flush=True)


class Relay:
    """A TCP relay to the daemon whose connections can be cut at any moment."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._transports: set[asyncio.BaseTransport] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _relay(self, down_reader: asyncio.StreamReader, down: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._transports |= {down.transport, up.transport}
        for source, sink in ((down_reader, up), (up_reader, down)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()

    def cut(self) -> None:
        """Abort every relayed connection, both sides."""
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self.cut()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def main(daemon_port: int, token: str, burst: int, cuts: set[int]) -> dict[str, Any]:
    relay = Relay(daemon_port)
    relayed = f"ws://127.0.0.1:{await relay.start()}/v1"
    direct = f"ws://127.0.0.1:{daemon_port}/v1"
    seqs: list[int] = []
    mine: list[str] = []
    async with (
        sandboxd.aio.open_client(direct, token) as client,
        sandboxd.aio.open_client(relayed, token) as follower,
    ):
        head = (await client.server_info()).head_seq
        # Never closed here: closing its client must end it.
        forgotten = follower.subscribe()
        await forgotten.open()
        async with follower.subscribe(after_seq=head) as events:
            await events.open()
            sandbox = await client.start(spec_id="sleep")
            say(ready=sandbox.id)
            seen = 0
            deleting: asyncio.Task[bool] | None = None
            async for event in events:
                seqs.append(event.seq)
                if event.sandbox_id == sandbox.id:
                    mine.append(event.type)
                    if event.type == "sandbox.deleted":
                        break
                elif event.type == "daemon.stopping":
                    seen += 1
                    if seen in cuts:
                        relay.cut()
                        say(cut=seen)
                    if seen == burst:
                        deleting = asyncio.create_task(client.delete(sandbox.id))
            assert deleting is not None
            deleted = await deleting
            reconnects = events.reconnects
    await relay.close()
    return {
        "head": head,
        "seqs": seqs,
        "mine": mine,
        "burst_seen": seen,
        "deleted": deleted,
        "reconnects": reconnects,
        "relayed_connections": relay.connections,
        "tasks_left": [repr(t) for t in asyncio.all_tasks() - {asyncio.current_task()}],
        "trio_imported": "trio" in sys.modules,
    }


if __name__ == "__main__":
    port, token, burst, *cuts = sys.argv[1:]
    say(result=asyncio.run(main(int(port), token, int(burst), {int(n) for n in cuts})))
