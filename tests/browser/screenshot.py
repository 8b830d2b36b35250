"""Take docs/dashboard.png: a real daemon, a few minutes of work from three users, Chromium.

    .venv/bin/python -m tests.browser.screenshot docs/dashboard.png [--minutes 3]

Not a test: it runs for minutes so that the charts have a history to show.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
from pathlib import Path

import trio

from tests.browser.support import Browser
from tests.e2e.support import daemon_process
from tests.gateway.support import TrioPeer, trio_peer
from tests.support import TOKENS


async def work(peers: dict[str, TrioPeer], seconds: float) -> None:
    """Starts, pauses, resumes, deletes and one crash, spread over ``seconds``."""
    rng = random.Random(13)
    mine: dict[str, list[str]] = {name: [] for name in peers}
    steps = 60
    for step in range(steps):
        name = rng.choice(["root", "alice", "alice", "bob"])
        peer = peers[name]
        roll = rng.random()
        if step < 8 or roll < 0.45 or not mine[name]:
            spec = "agent" if rng.random() < 0.25 else "sleep"
            info = await peer.call("sandbox.start", spec_id=spec)
            mine[name].append(info["id"])
        elif roll < 0.65:
            reply = await peer.request("sandbox.pause", sandbox_id=rng.choice(mine[name]))
            assert reply["ok"] or reply["error"]["code"] == "conflict", reply
        elif roll < 0.75:
            await peer.request("sandbox.resume", sandbox_id=rng.choice(mine[name]))
        elif roll < 0.9:
            victim = mine[name].pop(rng.randrange(len(mine[name])))
            await peer.call("sandbox.delete", sandbox_id=victim)
        elif roll < 0.95:
            # A sandbox whose process dies: ERROR, with the reason.
            info = await peer.call("sandbox.get", sandbox_id=rng.choice(mine[name]))
            if info["pid"]:
                os.kill(info["pid"], signal.SIGKILL)
        await trio.sleep(seconds / steps)


async def main(out: Path, minutes: float) -> None:
    with tempfile.TemporaryDirectory(prefix="sandboxd-shot-") as root:
        async with daemon_process(Path(root), max_sandboxes_per_user=500) as daemon:
            with Browser.start() as browser:
                browser.open(daemon.port, TOKENS["root"])
                await browser.live()
                async with (
                    trio_peer(daemon.url, TOKENS["root"]) as r,
                    trio_peer(daemon.url, TOKENS["alice"]) as a,
                    trio_peer(daemon.url, TOKENS["bob"]) as b,
                ):
                    await work({"root": r, "alice": a, "bob": b}, minutes * 60)
                await trio.sleep(3)  # the last second's events on the rate chart
                browser.screenshot(out)
                print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    trio.run(main, args.out, args.minutes)
