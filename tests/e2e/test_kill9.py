"""kill -9 at random moments of a mixed load, then recovery, round after round.

Several clients start, pause, resume and delete sandboxes while one follows
the whole log; at a random moment the daemon gets SIGKILL (some rounds while
it is still starting up, that is recovering). Between the kill and the
restart the log must pass `sandboxd log verify`; after the restart:

- every op a client got a success reply for is in the state and in the log,
  and an op whose reply the crash swallowed left one of its two outcomes;
- the state the daemon serves equals a fold of the whole log from seq 1,
  without snapshots, and daemon.started counts the sandboxes it rebuilt;
- every event the subscriber received is in the log, identical (no phantom
  event), and the subscriber's stream has no gap across the crashes;
- every process carrying a sandbox marker belongs to a live sandbox whose
  recorded process (pid and start time) it runs under, paused ones are
  stopped, running ones are not, MISSING ones have none, and no working
  directory or output file outlives its sandbox.

`make test` runs 30 rounds; `pytest tests/e2e --rounds N` runs N. The random
seed is printed on failure; E2E_SEED=... replays the same choices (the timing
of a crash is the machine's, so a replay is close, not exact).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import attrs
import trio

from sandboxd.actors import proctree
from sandboxd.actors.info import SandboxInfo
from sandboxd.events import types as ev
from sandboxd.events.projection import State, Status
from sandboxd.gateway.client import (
    ClientError,
    ConnectError,
    ConnectionLostError,
    open_client,
)
from tests.daemon_process import DaemonProcess
from tests.e2e.support import (
    ROOT,
    differences,
    end_daemon,
    make_config,
    paused,
    read_log,
    replay,
    sandbox_processes,
    verify_log,
)
from tests.support import TOKENS, eventually

WORKERS = ("alice", "bob", "alice", "bob")
LOAD_SECONDS = (0.05, 0.6)  # how long the load runs before the kill
KILL_IN_STARTUP = 0.2  # share of rounds whose kill lands while the daemon starts (recovers)
ABSENT = None  # the status of a sandbox the state does not hold


@attrs.define
class Op:
    name: str  # start | pause | resume | delete
    outcome: str = "unknown"  # ok | failed | unknown (the crash took the reply)
    info: SandboxInfo | None = None
    result: object = None


@attrs.define
class Sandbox:
    owner: str
    status: Status | None  # as of the last check, then as the acknowledged ops say
    ops: list[Op] = attrs.Factory(list)  # this round's


class Ledger:
    """What the clients asked and were told, per sandbox."""

    def __init__(self) -> None:
        self.sandboxes: dict[str, Sandbox] = {}
        self.acknowledged = 0
        self.unknown = 0

    def mine(self, owner: str) -> list[str]:
        return [
            sid
            for sid, s in self.sandboxes.items()
            if s.owner == owner and s.status is not None and not _unsettled(s)
        ]


def _unsettled(sandbox: Sandbox) -> bool:
    return any(op.outcome == "unknown" for op in sandbox.ops)


TARGET = {"start": Status.RUNNING, "pause": Status.PAUSED, "resume": Status.RUNNING, "delete": None}


async def worker(url: str, user: str, index: int, ledger: Ledger, rng: random.Random) -> None:
    """Ops on this worker's sandboxes, one at a time, until the connection drops."""
    counter = 0
    try:
        async with open_client(url, TOKENS[user]) as client:
            while True:
                mine = [s for s in ledger.mine(user) if s.startswith(f"{user}{index}-")]
                if len(mine) < 2 or (len(mine) < 4 and rng.random() < 0.3):
                    counter += 1
                    sandbox_id = f"{user}{index}-{rng.getrandbits(40):x}-{counter}"
                    ledger.sandboxes[sandbox_id] = Sandbox(user, ABSENT)
                    name = "start"
                else:
                    sandbox_id = rng.choice(mine)
                    status = ledger.sandboxes[sandbox_id].status
                    if status is Status.RUNNING:
                        name = rng.choice(("pause", "pause", "delete"))
                    elif status is Status.PAUSED:
                        name = rng.choice(("resume", "resume", "delete"))
                    else:
                        name = "delete"  # MISSING or ERROR: all a client can do
                sandbox = ledger.sandboxes[sandbox_id]
                op = Op(name)
                sandbox.ops.append(op)
                try:
                    if name == "start":
                        result: object = await client.start(spec_id="sleep", sandbox_id=sandbox_id)
                    else:
                        result = await getattr(client, name)(sandbox_id)
                except (ConnectionLostError, ConnectError):
                    ledger.unknown += 1
                    return  # the daemon is gone: this op's outcome is for recovery to show
                except ClientError as exc:
                    op.outcome, op.result = "failed", exc.error.get("code")
                    continue
                op.outcome, op.result = "ok", result
                op.info = result if isinstance(result, SandboxInfo) else None
                sandbox.status = TARGET[name]
                ledger.acknowledged += 1
    except (ConnectionLostError, ConnectError):
        return  # the daemon was killed before (or while) this client connected


class Follower:
    """One subscription to the whole log, across every crash (the client reconnects)."""

    def __init__(self) -> None:
        self.seen: list[ev.Event] = []
        self.resubscribed = 0

    async def run(self, url: str) -> None:
        while True:
            try:
                async with (
                    open_client(url, ROOT) as client,
                    client.subscribe(after_seq=self.last_seq) as events,
                ):
                    async for event in events:
                        self.seen.append(event)
            except (ConnectionLostError, ConnectError):
                # The client library gives up after 10 failed reconnects in a row, which
                # a daemon killed every second can cause: resubscribe from the last seq,
                # as a client that wants everything does.
                self.resubscribed += 1
                await trio.sleep(0.05)

    @property
    def last_seq(self) -> int:
        return self.seen[-1].seq if self.seen else 0


def check_offline(daemon: DaemonProcess, context: str) -> None:
    code, text = verify_log(daemon.state_dir)
    assert code == 0, f"{context}: sandboxd log verify failed after the kill:\n{text}"


async def served_state(daemon: DaemonProcess) -> tuple[int, dict[str, SandboxInfo]]:
    """The head seq and every sandbox, as the gateway serves them, read while nothing moves."""
    async with open_client(daemon.url, ROOT) as client:
        while True:
            head = (await client.server_info()).head_seq
            infos = {info.id: info async for info in client.search_all()}
            if (await client.server_info()).head_seq == head:
                return head, infos


def expected_statuses(sandbox: Sandbox) -> set[Status | None]:
    """The statuses recovery may leave a sandbox in, given what its client was told."""
    if not sandbox.ops:
        return {sandbox.status}
    last = sandbox.ops[-1]
    if last.outcome != "unknown":
        return {sandbox.status}
    allowed: set[Status | None] = {sandbox.status, TARGET[last.name]}
    if last.name in ("start", "delete"):
        # Cut before its event: nothing (start), or a process gone half-way (either).
        allowed |= {ABSENT, Status.MISSING}
    return allowed


def check_acknowledged(ledger: Ledger, log: dict[int, ev.Event], deleted: set[str]) -> None:
    ok_types = {
        Status.RUNNING: {"sandbox.running", "sandbox.resumed", "sandbox.healthy"},
        Status.PAUSED: {"sandbox.paused"},
    }
    for sandbox_id, sandbox in ledger.sandboxes.items():
        for op in sandbox.ops:
            if op.outcome != "ok":
                continue
            if op.name == "delete":
                assert sandbox_id in deleted, f"{sandbox_id}: acknowledged delete not in the log"
                continue
            info = op.info
            assert info is not None
            event = log.get(info.version)
            assert event is not None and event.sandbox_id == sandbox_id, (
                f"{sandbox_id}: acknowledged {op.name} (version {info.version}) not in the log"
            )
            assert event.type in ok_types[info.status], (sandbox_id, op.name, event)


def check_processes(daemon: DaemonProcess, state: State) -> None:
    marked = sandbox_processes(daemon.state_dir)
    for sandbox_id, procs in marked.items():
        record = state.sandboxes.get(sandbox_id)
        assert record is not None and record.pid is not None, (
            f"processes {[p.pid for p in procs]} carry the marker of {sandbox_id}, "
            f"which is {record.status if record else 'not in the log'}"
        )
    for record in state.sandboxes.values():
        procs = marked.get(record.id, [])
        if record.pid is None:
            assert not procs, record
            continue
        assert record.create_time is not None
        main = proctree.ProcessId.from_create_time(record.pid, record.create_time)
        assert proctree.is_alive(main), f"{record.id} was adopted but its process is gone"
        states = {p.pid: paused(p.pid) for p in procs}
        if record.status is Status.PAUSED:
            assert all(states.values()), f"{record.id} is PAUSED, its processes: {states}"
        else:
            assert not any(states.values()), f"{record.id} is {record.status}: {states}"
    live = set(state.sandboxes)
    sandboxes_dir = daemon.config.sandboxes_dir
    if sandboxes_dir.is_dir():
        orphans = {p.name for p in sandboxes_dir.iterdir()} - live
        assert not orphans, f"working dirs without a sandbox: {orphans}"
    outputs = {p.name.split(".", 1)[0] for p in (daemon.state_dir / "output").iterdir()}
    assert outputs <= live, f"output files without a sandbox: {outputs - live}"


async def check_after_restart(
    daemon: DaemonProcess, ledger: Ledger, follower: Follower, context: str
) -> None:
    # A start cut after its process was recorded is adopted STARTING and finishes now.
    async def settled() -> tuple[int, dict[str, SandboxInfo]]:
        while True:
            head, infos = await served_state(daemon)
            if all(i.status is not Status.STARTING for i in infos.values()):
                return head, infos
            await trio.sleep(0.02)

    with trio.fail_after(20):
        head, infos = await settled()
    events = [e for e in read_log(daemon.state_dir) if e.seq <= head]
    assert [e.seq for e in events] == list(range(1, head + 1)), f"{context}: seqs not 1..{head}"
    log = {e.seq: e for e in events}

    # The state served equals the fold of the whole log, no snapshot involved.
    state = replay(events)
    assert set(infos) == set(state.sandboxes), (
        f"{context}: served {sorted(infos)}, replay {sorted(state.sandboxes)}"
    )
    for sandbox_id, info in infos.items():
        diff = differences(info, state.sandboxes[sandbox_id])
        assert not diff, f"{context}: {sandbox_id}: {diff}"

    # daemon.started counts what the replay up to it held.
    started = [e for e in events if isinstance(e.data, ev.DaemonStarted)]
    assert started, context
    before = replay(e for e in events if e.seq < started[-1].seq)
    assert isinstance(started[-1].data, ev.DaemonStarted)
    assert started[-1].data.recovered == len(before.sandboxes), context

    # What the clients were told.
    deleted = {e.sandbox_id for e in events if e.type == "sandbox.deleted" and e.sandbox_id}
    check_acknowledged(ledger, log, deleted)
    for sandbox_id, sandbox in ledger.sandboxes.items():
        record = state.sandboxes.get(sandbox_id)
        status = None if record is None else record.status
        allowed = expected_statuses(sandbox)
        assert status in allowed, (
            f"{context}: {sandbox_id} is {status}, expected one of {allowed}; ops {sandbox.ops}"
        )
        sandbox.status, sandbox.ops = status, []
    for sandbox_id in state.sandboxes:
        assert sandbox_id in ledger.sandboxes, f"{context}: {sandbox_id} was never asked for"

    # No phantom events, no gap.
    for seen in list(follower.seen):
        if seen.seq <= head:
            assert log.get(seen.seq) == seen, f"{context}: received {seen}, the log has another"
    seqs = [e.seq for e in follower.seen]
    assert seqs == list(range(1, len(seqs) + 1)), f"{context}: the subscriber has a gap"

    check_processes(daemon, state)


async def test_kill_9_at_random_moments_of_a_mixed_load(tmp_path: Path, rounds: int) -> None:
    seed = int(os.environ.get("E2E_SEED", time.time_ns() % 1_000_000_007))
    rng = random.Random(seed)
    # Small segments and frequent snapshots: kills land in rolls and snapshot writes too.
    daemon = DaemonProcess(
        tmp_path, make_config(tmp_path / "state", snapshot_every=25, segment_bytes=16384)
    )
    ledger = Ledger()
    follower = Follower()
    began = time.monotonic()
    try:
        await daemon.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run, daemon.url)
            for round_no in range(1, rounds + 1):
                context = f"round {round_no} of {rounds} (E2E_SEED={seed})"
                async with trio.open_nursery() as load:
                    for index, user in enumerate(WORKERS):
                        load.start_soon(worker, daemon.url, user, index, ledger, rng)
                    await trio.sleep(rng.uniform(*LOAD_SECONDS))  # the random moment
                    daemon.kill()
                check_offline(daemon, context)
                if rng.random() < KILL_IN_STARTUP:
                    # Killed again while it recovers: before, during or after its survey.
                    daemon.spawn()
                    await trio.sleep(rng.uniform(0.1, 0.6))
                    daemon.kill()
                    check_offline(daemon, context + ", killed while starting")
                await daemon.start()
                await check_after_restart(daemon, ledger, follower, context)
            with trio.fail_after(30):
                head, _ = await served_state(daemon)
                await eventually(
                    lambda: follower.last_seq >= head, within=30, what="the subscriber to catch up"
                )
            nursery.cancel_scope.cancel()
        seqs = [e.seq for e in follower.seen]
        assert seqs[:head] == list(range(1, head + 1)), "the subscriber missed events"
        assert ledger.acknowledged > rounds, "the load did too little to mean anything"
        print(
            f"{rounds} rounds in {time.monotonic() - began:.1f} s: {ledger.acknowledged} ops "
            f"acknowledged, {ledger.unknown} cut by a kill, {head} events, "
            f"{follower.resubscribed} resubscriptions (E2E_SEED={seed})"
        )
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()
