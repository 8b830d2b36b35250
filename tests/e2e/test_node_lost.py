"""A node's sandboxes recorded lost by another node, on one daemon's own log (the file
backend): what recovery does with them when the node starts again, and that it leaves
other nodes' sandboxes alone. (The cluster itself, on NATS, is tests/cluster/.)

Both are recovery's rules (actors/recovery.py): a sandbox recorded ``sandbox.missing``
with ``node_lost`` kept its process in the record, and is adopted again if that process
still runs, in the status it had (a paused one stays paused); a sandbox of another
node is neither adopted nor marked, whatever this host runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sandboxd.events import types as ev
from sandboxd.events.projection import Status
from sandboxd.gateway.client import open_client
from tests.e2e.support import ROOT, append_offline, daemon_process, read_log
from tests.support import proc_state


async def test_a_returning_node_adopts_its_lost_sandboxes_that_still_run(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, node_id="node-a") as daemon:
        async with open_client(daemon.url, ROOT) as client:
            running = await client.start(spec_id="sleep")
            frozen = await client.start(spec_id="sleep")
            await client.pause(frozen.id)
            gone = await client.start(spec_id="sleep")
        assert running.node == frozen.node == gone.node == "node-a"
        daemon.kill()  # kill -9: the processes run on
        assert gone.pid is not None
        os.kill(gone.pid, signal.SIGKILL)
        # What a survivor appends when node-a's lease expires (daemon/cluster/lease.py),
        # and a sandbox another node created in the shared log, whose pid runs here by
        # chance (this test's own process): none of node-a's business.
        theirs = ev.SandboxCreated("sleep", None, "/elsewhere", 1, node="node-b")
        await append_offline(
            daemon.state_dir,
            [
                *(
                    ev.PendingEvent(info.id, None, ev.SandboxMissing("node node-a lost", "node-a"))
                    for info in (running, frozen, gone)
                ),
                ev.PendingEvent("theirs", None, theirs),
                ev.PendingEvent("theirs", None, ev.ProcessStarted(1, 1, 0.0, ["init"])),
                ev.PendingEvent("theirs", None, ev.SandboxRunning([])),
            ],
        )
        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            after = {info.id: info async for info in client.search_all()}
        assert running.pid is not None and proc_state(running.pid) not in (None, "Z")
    assert (after[running.id].status, after[running.id].pid) == (Status.RUNNING, running.pid)
    assert (after[frozen.id].status, after[frozen.id].pid) == (Status.PAUSED, frozen.pid)
    assert after[running.id].error is None
    assert after[gone.id].status is Status.MISSING and after[gone.id].pid is None
    assert "was gone when the daemon started again" in (after[gone.id].error or "")
    assert (after["theirs"].status, after["theirs"].node) == (Status.RUNNING, "node-b")
    adopted = [e.sandbox_id for e in read_log(daemon.state_dir) if e.type == "sandbox.adopted"]
    assert sorted(adopted[-2:]) == sorted([running.id, frozen.id])
    assert "theirs" not in adopted
