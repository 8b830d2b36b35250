"""Who a sandbox runs as: ``run_as``, the uid pool of ``uid_range``, and what holds a uid.

``[sandboxes] run_as``:

- ``"dynamic"`` (the default when the daemon is root): each sandbox gets a uid
  of its own from ``uid_range`` (default 600000-665535, above every account a
  distribution makes, like systemd's DynamicUser range), with the gid of the
  same number and no supplementary groups. Its processes cannot signal,
  ptrace or read the /proc environment of any other sandbox's or the
  daemon's, and its files are its own.
- a user name: every sandbox runs as that one account (its uid, primary gid
  and groups). Kept from the daemon, not from each other.
- ``"daemon"``: sandboxes run as the daemon's own user, as before this
  existed; only by explicit choice when the daemon is root, and the default
  when it is not (a process that is not root cannot switch users). The
  setting's ``note`` says so plainly, for the start-up log and ``server.info``.

A uid goes back to the pool only once nothing runs or remains under it: the
pool keeps a deleted sandbox's uid "draining" until a scan (:func:`holders`)
finds no process, no file at the top of the shared temporary directories and
no System V IPC object of that uid; and it hands out never-used uids before
reclaimed ones, so reuse comes as late as the range allows.

The pool is pure; the scans are plain blocking functions (run them in a thread).
"""

from __future__ import annotations

import collections
import grp
import os
import pwd
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal

import attrs

DEFAULT_UID_RANGE = (600000, 665535)
#: The largest uid Linux can hand out ((uid_t)-1 is "no change", -2 is often nobody).
MAX_UID = 4294967294
#: Shared, world-writable directories a sandbox can leave files in.
TMP_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")


@attrs.frozen
class Identity:
    """The credentials a sandbox's processes run with."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@attrs.frozen
class RunAs:
    """The ``run_as`` setting, resolved."""

    kind: Literal["dynamic", "user", "daemon"]
    #: for "user": that account's identity
    identity: Identity | None = None
    user: str | None = None
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    #: one plain sentence on what isolation this gives, for the log and server.info
    note: str = ""

    @property
    def isolated_from_daemon(self) -> bool:
        return self.kind != "daemon"


@attrs.frozen
class Accounts:
    """The accounts the host knows: (name, uid) of users, (name, gid) of groups."""

    users: list[tuple[str, int]]
    groups: list[tuple[str, int]]

    @classmethod
    def of_host(cls) -> Accounts:
        return cls(
            users=[(p.pw_name, p.pw_uid) for p in pwd.getpwall()],
            groups=[(g.gr_name, g.gr_gid) for g in grp.getgrall()],
        )


def parse_uid_range(key: str, value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise ValueError(f"{key} must be a list of two uids [low, high], not {value!r}")
    low, high = value
    if not 1 <= low <= high <= MAX_UID:
        raise ValueError(f"{key} must be [low, high] with 1 <= low <= high <= {MAX_UID}")
    return low, high


def parse_run_as(
    key: str,
    table: Mapping[str, Any],
    *,
    max_sandboxes: int,
    euid: int | None = None,
    accounts: Accounts | None = None,
    lookup_user: Callable[[str], pwd.struct_passwd] = pwd.getpwnam,
) -> RunAs:
    """``run_as``, ``uid_range`` and ``allow_existing_uids`` of the ``key`` table.

    Other keys of the table are the caller's. Raises ValueError with one sentence
    naming the offending key.
    """
    euid = os.geteuid() if euid is None else euid
    allow_existing = table.get("allow_existing_uids", False)
    if not isinstance(allow_existing, bool):
        raise ValueError(f"{key}.allow_existing_uids must be true or false, not {allow_existing!r}")
    uid_range = DEFAULT_UID_RANGE
    if "uid_range" in table:
        uid_range = parse_uid_range(f"{key}.uid_range", table["uid_range"])
    value = table.get("run_as", "dynamic" if euid == 0 else "daemon")
    if not isinstance(value, str) or not value:
        raise ValueError(f'{key}.run_as must be "dynamic", "daemon" or a user name, not {value!r}')

    if value == "daemon":
        if euid == 0:
            note = (
                "sandboxes run as root, the daemon's own user: they are not isolated from "
                'the daemon or from each other (run_as = "daemon")'
            )
        elif "run_as" in table:
            note = f"sandboxes run as the daemon's own user (uid {euid}): not isolated from it"
        else:
            note = (
                f"the daemon is not root (uid {euid}), so it cannot switch users: sandboxes run "
                "as its own user, not isolated from it or from each other"
            )
        return RunAs("daemon", uid_range=uid_range, note=note)

    if value == "dynamic":
        if euid != 0:
            raise ValueError(
                f'{key}.run_as = "dynamic" needs the daemon to run as root; it runs as uid '
                f'{euid} (leave run_as out, or set it to "daemon")'
            )
        low, high = uid_range
        if high - low + 1 < max_sandboxes:
            raise ValueError(
                f"{key}.uid_range [{low}, {high}] holds {high - low + 1} uids, fewer than "
                f"max_sandboxes ({max_sandboxes})"
            )
        if not allow_existing:
            _check_free(key, uid_range, accounts or Accounts.of_host())
        return RunAs(
            "dynamic",
            uid_range=uid_range,
            note=f"each sandbox runs under a uid of its own from {low}-{high}",
        )

    try:
        entry = lookup_user(value)
    except KeyError:
        raise ValueError(f"{key}.run_as names the user {value!r}, which does not exist") from None
    if entry.pw_uid == 0:
        raise ValueError(
            f'{key}.run_as names root; set run_as = "daemon" to run sandboxes as root on purpose'
        )
    if euid != 0 and entry.pw_uid != euid:
        raise ValueError(
            f"{key}.run_as = {value!r} needs the daemon to run as root (or as {value}); "
            f"it runs as uid {euid}"
        )
    groups = tuple(g for g in os.getgrouplist(value, entry.pw_gid) if g != entry.pw_gid)
    identity = Identity(entry.pw_uid, entry.pw_gid, groups)
    return RunAs(
        "user",
        identity=identity,
        user=value,
        uid_range=uid_range,
        note=(
            f"sandboxes run as user {value} (uid {entry.pw_uid}): isolated from the daemon, "
            "not from each other"
        ),
    )


def _check_free(key: str, uid_range: tuple[int, int], accounts: Accounts) -> None:
    low, high = uid_range
    for name, uid in accounts.users:
        if low <= uid <= high:
            raise ValueError(
                f"{key}.uid_range [{low}, {high}] overlaps the existing user {name!r} (uid {uid});"
                f" pick a range no account uses, or set {key}.allow_existing_uids = true"
            )
    for name, gid in accounts.groups:
        if low <= gid <= high:
            raise ValueError(
                f"{key}.uid_range [{low}, {high}] overlaps the existing group {name!r} "
                f"(gid {gid}); pick a range no account uses, or set "
                f"{key}.allow_existing_uids = true"
            )


# -- the pool ------------------------------------------------------------------------------


class UidPoolExhausted(Exception):
    """No uid of the range is free; the message says how many are held and why."""


class UidPool:
    """The uids of ``uid_range``: which sandbox holds which, and which are draining.

    A sandbox keeps its uid for its whole life, restarts and daemon restarts
    included (``assign`` it again from the log on recovery). ``release`` on delete
    moves the uid to draining; ``reclaim`` returns it once the caller has checked
    that nothing runs or remains under it (:func:`holders`). Allocation hands out
    uids never handed out since this pool was made before reclaimed ones.
    """

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self._by_sandbox: dict[str, int] = {}
        self._owner: dict[int, str] = {}
        self._draining: set[int] = set()
        self._next_fresh = low
        self._reclaimed: collections.deque[int] = collections.deque()

    def __repr__(self) -> str:
        return (
            f"<UidPool {self.low}-{self.high}: {len(self._owner)} held, "
            f"{len(self._draining)} draining>"
        )

    def uid_of(self, sandbox_id: str) -> int | None:
        return self._by_sandbox.get(sandbox_id)

    def owner_of(self, uid: int) -> str | None:
        return self._owner.get(uid)

    @property
    def draining(self) -> frozenset[int]:
        return frozenset(self._draining)

    def held(self) -> dict[str, int]:
        return dict(self._by_sandbox)

    def assign(self, sandbox_id: str, uid: int) -> None:
        """Record that ``sandbox_id`` has ``uid`` (from its events, on recovery).

        A uid outside the range (the range was changed since) is kept all the same:
        the sandbox keeps its identity. Raises ValueError if another sandbox holds it.
        """
        owner = self._owner.get(uid)
        if owner is not None and owner != sandbox_id:
            raise ValueError(f"uid {uid} is held by sandbox {owner!r}, not {sandbox_id!r}")
        previous = self._by_sandbox.get(sandbox_id)
        if previous is not None and previous != uid:
            raise ValueError(f"sandbox {sandbox_id!r} holds uid {previous}, not {uid}")
        self._draining.discard(uid)
        self._by_sandbox[sandbox_id] = uid
        self._owner[uid] = sandbox_id

    def allocate(self, sandbox_id: str) -> int:
        """The sandbox's uid: the one it holds, else a free one. Raises UidPoolExhausted."""
        if (uid := self._by_sandbox.get(sandbox_id)) is not None:
            return uid
        uid = self._take_free()
        self._by_sandbox[sandbox_id] = uid
        self._owner[uid] = sandbox_id
        return uid

    def _take_free(self) -> int:
        while self._next_fresh <= self.high:
            uid = self._next_fresh
            self._next_fresh += 1
            if uid not in self._owner and uid not in self._draining:
                return uid
        while self._reclaimed:
            uid = self._reclaimed.popleft()
            if uid not in self._owner and uid not in self._draining:
                return uid
        raise UidPoolExhausted(
            f"no free uid in uid_range [{self.low}, {self.high}]: {len(self._owner)} held by "
            f"sandboxes, {len(self._draining)} waiting until nothing runs or remains under them"
        )

    def release(self, sandbox_id: str) -> int | None:
        """The sandbox is deleted: its uid drains until :meth:`reclaim`. Returns it."""
        uid = self._by_sandbox.pop(sandbox_id, None)
        if uid is not None:
            del self._owner[uid]
            self._draining.add(uid)
        return uid

    def hold(self, uids: Iterable[int]) -> None:
        """Mark uids found in use by no known sandbox (a scan at start-up) as draining."""
        for uid in uids:
            if self.low <= uid <= self.high and uid not in self._owner:
                self._draining.add(uid)

    def reclaim(self, vacant: Iterable[int]) -> list[int]:
        """Return these draining uids to the pool (the caller found them vacant)."""
        back = []
        for uid in vacant:
            if uid in self._draining:
                self._draining.remove(uid)
                if uid >= self._next_fresh:
                    continue  # not handed out yet in this run: the cursor will reach it
                self._reclaimed.append(uid)
                back.append(uid)
        return back


# -- what still holds a uid ----------------------------------------------------------------


def holders(
    uids: Collection[int] | range,
    *,
    tmp_roots: Iterable[str] = TMP_ROOTS,
    proc: str = "/proc",
) -> dict[int, list[str]]:
    """For each uid of ``uids`` still held, what holds it: processes, files, IPC objects.

    One pass over /proc (each process's real, effective, saved and filesystem
    uid), one listing of each of ``tmp_roots`` (their top-level entries), and
    /proc/sysvipc. Blocking: tens of milliseconds with a thousand processes.
    """
    found: dict[int, list[str]] = {}

    def note(uid: int, what: str) -> None:
        if uid in uids:
            found.setdefault(uid, []).append(what)

    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        for uid in {int(v) for v in line.split()[1:]}:
                            note(uid, f"process {name}")
                        break
        except OSError:
            continue
    for root in tmp_roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            try:
                note(entry.stat(follow_symlinks=False).st_uid, entry.path)
            except OSError:
                continue
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"{proc}/sysvipc/{kind}", encoding="ascii", errors="replace") as f:
                header = f.readline().split()
                columns = [header.index(c) for c in ("uid", "cuid") if c in header]
                key_column = header.index("key") if "key" in header else 0
                for line in f:
                    fields = line.split()
                    for column in columns:
                        note(int(fields[column]), f"sysv {kind} {fields[key_column]}")
        except (OSError, ValueError, IndexError):
            continue
    return found
