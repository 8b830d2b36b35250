"""Benchmark of live output (sandbox.logs with follow): what noticing new output costs.

    python bench/output_follow.py [--quick]

How a follower notices that its sandbox wrote something, measured against the
alternative in the same run:

- idle_cpu_pct_inotify_1000: the daemon's CPU (% of one core) while 1,000
  followers wait on 1,000 files nobody writes: one inotify descriptor
  (actors/output_follow.py), each follower asleep on its event;
- idle_cpu_pct_poll_100ms_1000 / idle_cpu_pct_poll_1s_1000: the reference, the
  same 1,000 followers each reading its file's size (``read_from``: the file's
  lock and an fstat) every 100 ms or every second, as a polling design would;
- chatty_cpu_pct / chatty_mb_per_s: one follower of a real child that writes
  40-byte lines as fast as it can for 3 s: the follower's CPU (this process's,
  the child's is its own) and how much it carried; chatty_reads is how many
  reads (frames) that took;
- first_byte_ms_p50: from a write to an idle followed file until its follower
  has read it.

Prints a readable summary, then one JSON object as its last line. ``--quick``:
shorter windows.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio.testing
from _common import emit_json, machine, median, print_targets, step

from sandboxd.actors import output
from sandboxd.actors.output_follow import OutputFollow, OutputWatcher

FOLLOWERS = 1000
WRITER = (
    "import os, time\n"
    "end, n = time.monotonic() + 3, 0\n"
    "while time.monotonic() < end:\n"
    "    os.write(1, b'%08d a line of a chatty child...\\n' % n); n += 1\n"
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def files(count: int) -> list[output.OutputFile]:
    directory = output.OutputDir(Path(tempfile.mkdtemp(prefix="bench-follow-")))
    made = [directory.file(f"s{i}") for i in range(count)]
    for out in made:
        os.close(out.open_for_child(1 << 20))
    return made


async def cpu_while(window: float) -> float:
    await trio.testing.wait_all_tasks_blocked()  # every follower is set up and waiting
    start, cpu = time.monotonic(), cpu_seconds()
    await trio.sleep(window)
    return 100 * (cpu_seconds() - cpu) / (time.monotonic() - start)


async def idle_polling(interval: float, window: float) -> float:
    async def poll(out: output.OutputFile) -> None:
        position = 0
        while True:
            await trio.sleep(interval)
            position = out.read_from(position, 65536).position

    async with trio.open_nursery() as nursery:
        for out in files(FOLLOWERS):
            nursery.start_soon(poll, out)
        used = await cpu_while(window)
        nursery.cancel_scope.cancel()
    return used


async def idle_inotify(window: float) -> float:
    watcher = OutputWatcher()
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)

        async def follow(follower: OutputFollow) -> None:
            while True:
                await follower.wait()
                await follower.read()

        for out in files(FOLLOWERS):
            nursery.start_soon(follow, await OutputFollow.open(out, watcher, 0))
        used = await cpu_while(window)
        nursery.cancel_scope.cancel()
    return used


async def chatty() -> tuple[float, float, int]:
    (out,) = files(1)
    watcher = OutputWatcher()
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        follower = await OutputFollow.open(out, watcher, 0)
        fd = out.open_for_child(64 << 20)
        start, cpu = time.monotonic(), cpu_seconds()
        child = subprocess.Popen([sys.executable, "-c", WRITER], stdout=fd)  # noqa: ASYNC220
        os.close(fd)
        carried = reads = 0
        while child.poll() is None or carried < out.path.stat().st_size:
            with trio.move_on_after(0.2):
                await follower.wait()
            carried += len((await follower.read()).encode())
            reads += 1
        elapsed = time.monotonic() - start
        used = 100 * (cpu_seconds() - cpu) / elapsed
        follower.close()
        nursery.cancel_scope.cancel()
    return used, carried / elapsed / 1e6, reads


async def first_byte(rounds: int) -> float:
    (out,) = files(1)
    watcher = OutputWatcher()
    times = []
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        follower = await OutputFollow.open(out, watcher, 0)
        await follower.read()
        with open(out.path, "ab", buffering=0) as f:  # noqa: ASYNC230
            for _ in range(rounds):
                await trio.sleep(0.05)  # idle again: the watcher's batching window is over
                await follower.read()
                start = time.perf_counter()
                f.write(b"x")
                text = ""
                while not text:
                    await follower.wait()
                    text = await follower.read()
                times.append(1000 * (time.perf_counter() - start))
        follower.close()
        nursery.cancel_scope.cancel()
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    window = 2.0 if args.quick else 5.0
    step(f"machine: {machine()}")
    step("1,000 idle followers on inotify")
    inotify = trio.run(idle_inotify, window)
    step("1,000 idle followers polling every 100 ms, then every second")
    poll_100ms = trio.run(idle_polling, 0.1, window)
    poll_1s = trio.run(idle_polling, 1.0, window)
    step("one follower of a chatty child")
    chatty_cpu, chatty_mb_s, chatty_reads = trio.run(chatty)
    step("first byte after a quiet spell")
    latency = trio.run(first_byte, 20 if args.quick else 100)
    results = {
        "idle_cpu_pct_inotify_1000": inotify,
        "idle_cpu_pct_poll_100ms_1000": poll_100ms,
        "idle_cpu_pct_poll_1s_1000": poll_1s,
        "chatty_cpu_pct": chatty_cpu,
        "chatty_mb_per_s": chatty_mb_s,
        "chatty_reads": chatty_reads,
        "first_byte_ms_p50": latency,
    }
    print(f"live output, on {machine()}")
    print_targets(
        [
            ("idle_cpu_pct_inotify_1000", inotify, "<= 1 % (idle target)", inotify <= 1),
            ("idle_cpu_pct_poll_100ms_1000", poll_100ms, "reference", True),
            ("idle_cpu_pct_poll_1s_1000", poll_1s, "reference", True),
            ("chatty_cpu_pct", chatty_cpu, f"at {chatty_mb_s:.1f} MB/s", True),
            ("first_byte_ms_p50", latency, "<= 20 ms", latency <= 20),
        ]
    )
    emit_json(results)


if __name__ == "__main__":
    main()
