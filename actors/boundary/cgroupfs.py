"""The cgroup filesystem's texts, read and written without touching it (sans-IO).

What /proc/self/cgroup and /proc/self/mountinfo say about where this process's
cgroups are, the flat "key value" files the kernel keeps in every cgroup
(cgroup.events, cpu.stat, memory.events, memory.oom_control), the names this
daemon gives its cgroups, and the values it writes into limit files of either
version. Everything here is a pure function of its arguments: the I/O lives in
:mod:`sandboxd.actors.boundary.discovery` and :mod:`sandboxd.actors.boundary.cgroups`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import attrs

#: The controllers this daemon sets limits with (and reads usage from).
LIMIT_CONTROLLERS = ("memory", "pids", "cpu")

#: Every controller a cgroup v1 mount may carry, to tell them from mount options.
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)

#: Every sandbox cgroup's name starts so; the rest is the escaped sandbox id.
SANDBOX_PREFIX = "sb-"
#: The per-daemon parent's name starts so; a hash of the daemon's state dir follows.
DAEMON_PREFIX = "sandboxd-"

#: The CFS period this daemon writes with every CPU quota (the kernel's default).
CPU_PERIOD_USEC = 100_000
#: The kernel refuses a quota under 1 ms per period.
CPU_MIN_QUOTA_USEC = 1_000

# Kept as is in a cgroup name: the protocol's sandbox id alphabet. Nothing in it
# is special to cgroupfs (only "/" and "\n" are, and names that clash with a
# control file, all of which hold a ".").
_SAFE = re.compile(r"[A-Za-z0-9_-]")
_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_NAME_MAX = 255


# -- names --------------------------------------------------------------------------------


def daemon_dir_name(resolved_state_dir: str) -> str:
    """The per-daemon parent cgroup's name: which daemon, from its resolved state dir.

    Two daemons on one machine keep apart (sandbox ids are chosen by clients, so
    both may have a "build-1"), and one daemon finds its own again after a restart.
    48 bits of SHA-256 are plenty for the handful of daemons one host runs.
    """
    digest = hashlib.sha256(resolved_state_dir.encode("utf-8", "surrogateescape")).hexdigest()
    return DAEMON_PREFIX + digest[:12]


def sandbox_dir_name(sandbox_id: str) -> str:
    """The cgroup name of a sandbox: ``sb-`` and its id, any unsafe byte as %XX.

    The protocol allows ids of ``[A-Za-z0-9_-]{1,64}``, which map to themselves;
    anything else (a future, wider alphabet) is percent-escaped byte by byte of its
    UTF-8, which keeps the mapping reversible (``%`` itself is escaped) and the
    name free of "/", "\\n" and ".". Raises ValueError for an empty id or one
    whose name would be longer than a directory name may be.
    """
    if not sandbox_id:
        raise ValueError("a sandbox id must not be empty")
    parts = []
    for char in sandbox_id:
        if _SAFE.fullmatch(char):
            parts.append(char)
        else:
            parts.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    name = SANDBOX_PREFIX + "".join(parts)
    if len(name) > _NAME_MAX:
        raise ValueError(f"sandbox id {sandbox_id[:40]!r}... is too long for a cgroup name")
    return name


def sandbox_id_of(name: str) -> str | None:
    """The sandbox id a cgroup name carries, or None if the name is not one of ours."""
    if not name.startswith(SANDBOX_PREFIX) or len(name) == len(SANDBOX_PREFIX):
        return None
    body = name[len(SANDBOX_PREFIX) :]
    out = bytearray()
    i = 0
    while i < len(body):
        if body[i] == "%":
            if not _ESCAPE.fullmatch(body, i, i + 3):
                return None
            out.append(int(body[i + 1 : i + 3], 16))
            i += 3
        elif _SAFE.fullmatch(body[i]):
            out += body[i].encode()
            i += 1
        else:
            return None
    try:
        sandbox_id = out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    # Only the one spelling sandbox_dir_name gives is ours ("%41" is not "A").
    return sandbox_id if sandbox_dir_name(sandbox_id) == name else None


# -- /proc/self/cgroup and /proc/self/mountinfo --------------------------------------------


@attrs.frozen
class ProcCgroups:
    """Where /proc/self/cgroup places a process: its v2 path, and a path per v1 controller."""

    v2: str | None
    v1: Mapping[str, str]  # controller ("memory", "cpu", "name=systemd", ...) -> path


def parse_proc_cgroup(text: str) -> ProcCgroups:
    """Parse /proc/PID/cgroup: lines of ``hierarchy-id:controllers:path``."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        else:
            for controller in controllers.split(","):
                if controller:
                    v1[controller] = path
    return ProcCgroups(v2=v2, v1=v1)


@attrs.frozen
class CgroupMount:
    """One mount of a cgroup hierarchy."""

    version: int  # 1 or 2
    mount_point: str
    root: str  # the hierarchy's path that is mounted there ("/" unless a bind mount)
    controllers: frozenset[str]  # v1: the controllers of the hierarchy; v2: empty
    options: frozenset[str] = frozenset()  # v2: its super options (nsdelegate, favordynmods)


def _unescape_mount_field(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount paths as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts of a /proc/PID/mountinfo text, in its order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            dash = fields.index("-")
        except ValueError:
            continue
        if len(fields) < dash + 4 or dash < 6:
            continue
        fstype, super_options = fields[dash + 1], fields[dash + 3]
        root, mount_point = _unescape_mount_field(fields[3]), _unescape_mount_field(fields[4])
        options = frozenset(super_options.split(",")) - {"rw", "ro"}
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, mount_point, root, frozenset(), options))
        elif fstype == "cgroup":
            controllers = options & V1_CONTROLLERS
            if controllers:
                mounts.append(CgroupMount(1, mount_point, root, controllers))
    return mounts


def dir_of(mount: CgroupMount, cgroup_path: str) -> str | None:
    """The directory of ``cgroup_path`` under ``mount``, or None if the mount does not show it.

    A bind mount of a sub-tree (a container's view) shows only paths under its root.
    """
    root = mount.root.rstrip("/")
    if cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    rest = cgroup_path[len(root) :].strip("/")
    base = mount.mount_point.rstrip("/") or "/"
    return f"{base}/{rest}" if rest else base


# -- the flat files of a cgroup ------------------------------------------------------------


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A ``key value`` file (cgroup.events, cpu.stat, memory.events, memory.oom_control).

    Lines whose value is not an integer are left out.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


@attrs.frozen
class EventsState:
    """What cgroup.events says: whether any process is in the cgroup, whether it is frozen."""

    populated: bool
    frozen: bool


def parse_events(text: str) -> EventsState:
    values = parse_flat_keyed(text)
    return EventsState(populated=values.get("populated", 0) == 1, frozen=values.get("frozen") == 1)


@attrs.frozen
class Usage:
    """What a sandbox's cgroup has used: CPU time so far, memory now, processes now.

    None where the host has no controller to say it. (Here, with the files it is
    read from, so that the protocol's SandboxInfo can carry it without trio.)
    """

    cpu_seconds: float | None
    memory_bytes: int | None
    pids: int


def parse_procs(text: str) -> list[int]:
    """The pids of a cgroup.procs file (one per line)."""
    return [int(line) for line in text.split()]


def parse_limit_value(text: str) -> int | None:
    """A v2 limit file's value (memory.max, pids.max): None for "max"."""
    text = text.strip()
    return None if text == "max" else int(text)


# -- values written into limit files -------------------------------------------------------


def cpu_quota_usec(cores: float, period_usec: int = CPU_PERIOD_USEC) -> int:
    """The CFS quota that gives ``cores`` CPUs' worth of time per period."""
    return max(CPU_MIN_QUOTA_USEC, round(cores * period_usec))


def v2_cpu_max(cores: float | None) -> str:
    """cpu.max's value: ``"quota period"``, or ``"max period"`` for no limit."""
    if cores is None:
        return f"max {CPU_PERIOD_USEC}"
    return f"{cpu_quota_usec(cores)} {CPU_PERIOD_USEC}"
