"""run_as and uid_range read strictly, the uid pool's rules, and what still holds a uid."""

from __future__ import annotations

import os
import pwd
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sandboxd.actors.boundary.identities import (
    DEFAULT_UID_RANGE,
    Accounts,
    Identity,
    UidPool,
    UidPoolExhausted,
    holders,
    parse_run_as,
)
from sandboxd.actors.boundary.settings import SANDBOXES_KEYS, parse_boundary_settings
from tests.actors.boundary.conftest import PYTHON, Harness

NOBODY = Accounts(users=[("root", 0), ("nobody", 65534)], groups=[("root", 0)])


def run_as(table: dict[str, Any], *, euid: int = 0, max_sandboxes: int = 1000) -> Any:
    return parse_run_as("sandboxes", table, max_sandboxes=max_sandboxes, euid=euid, accounts=NOBODY)


def test_root_defaults_to_a_uid_per_sandbox() -> None:
    setting = run_as({})
    assert setting.kind == "dynamic" and setting.uid_range == DEFAULT_UID_RANGE
    assert setting.isolated_from_daemon
    assert "uid of its own from 600000-665535" in setting.note


def test_not_root_runs_as_itself_and_says_so() -> None:
    setting = run_as({}, euid=1000)
    assert setting.kind == "daemon" and not setting.isolated_from_daemon
    assert setting.note == (
        "the daemon is not root (uid 1000), so it cannot switch users: sandboxes run as its "
        "own user, not isolated from it or from each other"
    )


def test_daemon_as_root_is_said_plainly() -> None:
    setting = run_as({"run_as": "daemon"})
    assert setting.kind == "daemon"
    assert "not isolated from the daemon or from each other" in setting.note


def test_a_named_user() -> None:
    entry = pwd.getpwnam("nobody")
    setting = run_as({"run_as": "nobody"})
    assert setting.kind == "user" and setting.user == "nobody"
    assert setting.identity is not None
    assert (setting.identity.uid, setting.identity.gid) == (entry.pw_uid, entry.pw_gid)
    assert entry.pw_gid not in setting.identity.groups
    assert "isolated from the daemon, not from each other" in setting.note


@pytest.mark.parametrize(
    ("table", "euid", "message"),
    [
        (
            {"run_as": "dynamic"},
            1000,
            'sandboxes.run_as = "dynamic" needs the daemon to run as root',
        ),
        (
            {"run_as": "no-such-user-x"},
            0,
            "sandboxes.run_as names the user 'no-such-user-x', which",
        ),
        ({"run_as": "root"}, 0, 'sandboxes.run_as names root; set run_as = "daemon"'),
        ({"run_as": "nobody"}, 1000, "sandboxes.run_as = 'nobody' needs the daemon to run as root"),
        ({"run_as": ""}, 0, "sandboxes.run_as must be"),
        ({"run_as": 7}, 0, "sandboxes.run_as must be"),
        ({"uid_range": [5, 1]}, 0, "sandboxes.uid_range must be [low, high] with 1 <= low <= high"),
        ({"uid_range": [0, 10]}, 0, "sandboxes.uid_range must be [low, high]"),
        ({"uid_range": [1, 2, 3]}, 0, "sandboxes.uid_range must be a list of two uids"),
        ({"uid_range": "600000-665535"}, 0, "sandboxes.uid_range must be a list of two uids"),
        ({"uid_range": [1, 1 << 32]}, 0, "sandboxes.uid_range must be [low, high]"),
        ({"allow_existing_uids": 1}, 0, "sandboxes.allow_existing_uids must be true or false"),
        (
            {"uid_range": [700000, 700099]},
            0,
            "sandboxes.uid_range [700000, 700099] holds 100 uids, fewer than max_sandboxes (1000)",
        ),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, Any], euid: int, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        run_as(table, euid=euid)
    assert str(caught.value).startswith(message)


def test_a_range_over_existing_accounts_is_refused_unless_allowed() -> None:
    accounts = Accounts(users=[("svc", 600123)], groups=[("grp", 650000)])
    with pytest.raises(ValueError, match=r"overlaps the existing user 'svc' \(uid 600123\)"):
        parse_run_as("sandboxes", {}, max_sandboxes=10, euid=0, accounts=accounts)
    with pytest.raises(ValueError, match=r"overlaps the existing group 'grp' \(gid 650000\)"):
        parse_run_as(
            "sandboxes",
            {"uid_range": [640000, 660000]},
            max_sandboxes=10,
            euid=0,
            accounts=accounts,
        )
    allowed = parse_run_as(
        "sandboxes", {"allow_existing_uids": True}, max_sandboxes=10, euid=0, accounts=accounts
    )
    assert allowed.kind == "dynamic"


def test_the_default_range_is_free_on_this_host() -> None:
    # What a root daemon does with no config at all must load here.
    assert parse_run_as("sandboxes", {}, max_sandboxes=1000, euid=0).kind == "dynamic"


# -- the pool ------------------------------------------------------------------------------


def test_each_sandbox_gets_its_own_uid_and_keeps_it() -> None:
    pool = UidPool(1000, 1009)
    a, b = pool.allocate("a"), pool.allocate("b")
    assert a != b
    assert pool.allocate("a") == a  # a restart of the same sandbox
    assert pool.uid_of("b") == b and pool.owner_of(a) == "a"


def test_a_released_uid_is_not_reused_until_reclaimed() -> None:
    pool = UidPool(1000, 1002)
    a = pool.allocate("a")
    pool.allocate("b")
    assert pool.release("a") == a
    assert pool.draining == {a}
    assert pool.allocate("c") == 1002  # a fresh one first
    with pytest.raises(UidPoolExhausted, match="1 waiting until nothing runs or remains"):
        pool.allocate("d")
    assert pool.reclaim([a]) == [a]
    assert pool.allocate("d") == a


def test_recovery_assigns_recorded_uids_and_holds_leftovers() -> None:
    pool = UidPool(1000, 1009)
    pool.assign("kept", 1003)
    pool.assign("kept", 1003)  # idempotent
    pool.hold([1000, 1003, 5])  # a scan found 1000 in use; 1003 is kept's; 5 is not ours
    assert pool.draining == {1000}
    assert pool.allocate("new") == 1001
    with pytest.raises(ValueError, match="held by sandbox 'kept'"):
        pool.assign("other", 1003)
    with pytest.raises(ValueError, match="holds uid 1003, not 1004"):
        pool.assign("kept", 1004)


class PoolMachine(RuleBasedStateMachine):
    """Whatever the order of starts, deletes and reclaims, no uid is ever held twice."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = UidPool(100, 107)
        self.live: dict[str, int] = {}
        self.draining: set[int] = set()
        self.n = 0

    @rule()
    def allocate(self) -> None:
        self.n += 1
        name = f"s{self.n}"
        try:
            uid = self.pool.allocate(name)
        except UidPoolExhausted:
            assert len(self.live) + len(self.draining) == 8
            return
        assert uid not in self.live.values() and uid not in self.draining
        self.live[name] = uid

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.live)))
        uid = self.live.pop(name)
        assert self.pool.release(name) == uid
        self.draining.add(uid)

    @precondition(lambda self: self.draining)
    @rule(data=st.data())
    def reclaim(self, data: st.DataObject) -> None:
        uids = data.draw(st.sets(st.sampled_from(sorted(self.draining))))
        self.pool.reclaim(uids)
        self.draining -= uids

    @invariant()
    def consistent(self) -> None:
        assert self.pool.held() == self.live
        assert self.pool.draining == self.draining


TestPoolMachine = PoolMachine.TestCase


# -- what holds a uid ----------------------------------------------------------------------


async def test_holders_finds_processes_and_files_of_a_uid(harness: Harness) -> None:
    cgroup = harness.create()
    identity = harness.identity(cgroup)
    idle = Identity(identity.uid + 500, identity.uid + 500)
    leftover = Path(f"/dev/shm/sandboxd-test-{os.getpid()}")
    leftover.write_text("x")
    os.chown(leftover, identity.uid, identity.gid)
    try:
        process = await harness.spawn(
            cgroup, [PYTHON, "-c", "import time; time.sleep(600)"], identity=identity
        )
        found = await trio.to_thread.run_sync(holders, {identity.uid, idle.uid})
        assert idle.uid not in found
        assert f"process {process.pid}" in found[identity.uid]
        assert str(leftover) in found[identity.uid]
        await cgroup.kill()
        await process.wait()
        leftover.unlink()
        assert identity.uid not in await trio.to_thread.run_sync(holders, {identity.uid})
    finally:
        leftover.unlink(missing_ok=True)


# -- the [sandboxes] keys together, as config.py will call them ----------------------------


def test_boundary_settings_from_a_config_file() -> None:
    raw = tomllib.loads(
        '[sandboxes]\ncgroup = "off"\nrun_as = "dynamic"\nuid_range = [700000, 700999]\n'
        "max_sandboxes = 10\n"
    )["sandboxes"]
    settings = parse_boundary_settings("sandboxes", raw, max_sandboxes=10, euid=0, accounts=NOBODY)
    assert settings.cgroup == "off"
    assert (settings.run_as, settings.uid_range) == ("dynamic", (700000, 700999))
    run_as = settings.resolve_run_as("sandboxes", max_sandboxes=10, euid=0, accounts=NOBODY)
    assert run_as.kind == "dynamic" and run_as.uid_range == (700000, 700999)
    default = parse_boundary_settings("sandboxes", {}, max_sandboxes=10, euid=1000)
    assert default.cgroup == "auto" and default.run_as is None
    assert default.resolve_run_as("sandboxes", max_sandboxes=10, euid=1000).kind == "daemon"
    assert default.resolve_run_as("sandboxes", max_sandboxes=10, euid=0).kind == "dynamic"


BAD = {
    "cgroup": 1,
    "run_as": "",
    "uid_range": [3, 1],
    "allow_existing_uids": "no",
}


@pytest.mark.parametrize("name", SANDBOXES_KEYS)
def test_each_boundary_key_is_read_and_named(name: str) -> None:
    assert set(BAD) == set(SANDBOXES_KEYS)
    with pytest.raises(ValueError, match=rf"^sandboxes\.{name} "):
        parse_boundary_settings(
            "sandboxes", {name: BAD[name]}, max_sandboxes=10, euid=0, accounts=NOBODY
        )
