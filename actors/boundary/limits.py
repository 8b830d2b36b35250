"""A sandbox's resource limits: read from a spec, and how each is enforced on this host.

A spec may set ``memory_max`` (bytes, or a number with K, M, G or T: powers of
1024, as cgroups and systemd count), ``pids_max`` (processes and threads at
once) and ``cpu_max`` (CPUs' worth of time, a float: 0.5 is half of one CPU), and
``limits_required = true`` to refuse to start rather than run with a limit that
cannot be enforced.

Where a controller is missing, an rlimit stands in where one fits, and the
plan says so in words the daemon logs and shows in ``server.info``:

- ``memory_max`` -> RLIMIT_DATA, not RLIMIT_AS. Both are per process (a tree
  of N processes may use N times the limit) and both make allocations fail
  (MemoryError, NULL) instead of an OOM kill. RLIMIT_AS counts address space
  that runtimes reserve without using it; measured here, RLIMIT_AS = 1 GiB stops
  the JVM from starting (``java -version``) and 256 MiB stops node, while
  RLIMIT_DATA (private writable memory, since Linux 4.7) lets node start at 256
  MiB and the JVM at 1 GiB. It is the closer stand-in for "memory".
- ``pids_max`` -> RLIMIT_NPROC, only when the sandbox has a uid of its own: the
  kernel counts it per real uid, so under a shared uid it would count every
  sandbox (and the daemon) together, and root ignores it.
- ``cpu_max`` -> nothing: RLIMIT_CPU caps total CPU seconds and then kills;
  there is no rlimit for a rate.

Pure: no I/O. The caller says which controllers its boundary has.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Mapping
from typing import Any

import attrs

#: The spec keys this module reads.
LIMIT_KEYS = ("memory_max", "pids_max", "cpu_max", "limits_required")

_POWERS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_UNITS = {"": 1} | _POWERS | {unit + "iB": factor for unit, factor in _POWERS.items()}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
#: Below this a process cannot even start; a smaller value is a mistake, not a limit.
MIN_MEMORY_BYTES = 1 << 20
#: The kernel's smallest CFS quota is 1 ms per 100 ms period: a hundredth of a CPU.
MIN_CPU = 0.01


@attrs.frozen
class Limits:
    """A sandbox's limits; None means none."""

    memory_max: int | None = None  # bytes
    pids_max: int | None = None
    cpu_max: float | None = None  # CPUs
    required: bool = False  # limits_required: refuse to start rather than not enforce

    def set_keys(self) -> list[str]:
        """The spec keys of the limits that are set."""
        return [
            key
            for key, value in (
                ("memory_max", self.memory_max),
                ("pids_max", self.pids_max),
                ("cpu_max", self.cpu_max),
            )
            if value is not None
        ]


def parse_memory(key: str, value: Any) -> int:
    """``memory_max``: an integer of bytes, or a string such as "512M", "2G", "1.5GiB"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f'{key} must be bytes (an integer) or a size such as "512M", not {value!r}'
        )
    if isinstance(value, int):
        size = value
    else:
        match = _MEMORY.fullmatch(value)
        if not match:
            raise ValueError(f'{key} must be a size such as "512M" or "2G", not {value!r}')
        number, unit = match.groups()
        if unit not in _UNITS:
            raise ValueError(
                f"{key} has an unknown unit {unit!r} in {value!r}; "
                "use K, M, G or T (powers of 1024), or KiB, MiB, GiB, TiB"
            )
        size = int(float(number) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{key} must be more than 0, not {value!r}")
    if size < MIN_MEMORY_BYTES:
        raise ValueError(f"{key} must be at least 1M (1048576 bytes), not {value!r}")
    return size


def parse_pids(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, not {value!r}")
    if value <= 0:
        raise ValueError(f"{key} must be at least 1, not {value!r}")
    return value


def parse_cpu(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number of CPUs such as 0.5 or 2, not {value!r}")
    if value <= 0:
        raise ValueError(f"{key} must be more than 0, not {value!r}")
    if value < MIN_CPU:
        raise ValueError(f"{key} must be at least {MIN_CPU} (the kernel's smallest quota)")
    return float(value)


def parse_limits(key: str, table: Mapping[str, Any]) -> Limits:
    """The limits of a spec table (other keys are the caller's); ``key`` names the table.

    Raises ValueError with one sentence naming the offending key, e.g.
    ``specs[0].memory_max has an unknown unit 'MB' ...``.
    """
    required = table.get("limits_required", False)
    if not isinstance(required, bool):
        raise ValueError(f"{key}.limits_required must be true or false, not {required!r}")
    return Limits(
        memory_max=_optional(table, key, "memory_max", parse_memory),
        pids_max=_optional(table, key, "pids_max", parse_pids),
        cpu_max=_optional(table, key, "cpu_max", parse_cpu),
        required=required,
    )


def _optional(table: Mapping[str, Any], key: str, name: str, parse: Any) -> Any:
    return None if name not in table else parse(f"{key}.{name}", table[name])


def format_bytes(size: int) -> str:
    """A size for people: "512 MiB", "1.5 GiB", "1000 bytes"."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


# -- enforcement ---------------------------------------------------------------------------


class LimitsNotEnforceable(Exception):
    """The spec requires limits this host cannot enforce; the message says which and why."""


@attrs.frozen
class Enforcement:
    """How one sandbox's limits are enforced here."""

    cgroup: Limits  # the limits written into its cgroup (controllers present only)
    rlimits: tuple[tuple[int, int], ...]  # (resource.RLIMIT_*, value) set in the child
    notes: tuple[str, ...]  # one sentence per limit that is set: how, or that it is not
    unenforced: tuple[str, ...]  # spec keys left unenforced


def plan_limits(
    limits: Limits, *, controllers: frozenset[str], own_uid: bool, boundary: str
) -> Enforcement:
    """Decide how each set limit is enforced given the boundary's ``controllers``.

    ``own_uid``: the sandbox runs under a uid no other process uses (RLIMIT_NPROC
    then counts exactly its processes). ``boundary`` ("cgroup2", "cgroup1",
    "markers") only words the notes. Raises LimitsNotEnforceable when
    ``limits.required`` and a set limit has no enforcement.
    """
    cgroup: dict[str, Any] = {}
    rlimits: list[tuple[int, int]] = []
    notes: list[str] = []
    unenforced: list[str] = []
    where = f"the {boundary} boundary" if boundary != "markers" else "no cgroup (markers)"

    if limits.memory_max is not None:
        if "memory" in controllers:
            cgroup["memory_max"] = limits.memory_max
            notes.append(f"memory_max {format_bytes(limits.memory_max)}: memory controller")
        else:
            rlimits.append((resource.RLIMIT_DATA, limits.memory_max))
            notes.append(
                f"memory_max {format_bytes(limits.memory_max)}: RLIMIT_DATA per process "
                f"(no memory controller under {where})"
            )
    if limits.pids_max is not None:
        if "pids" in controllers:
            cgroup["pids_max"] = limits.pids_max
            notes.append(f"pids_max {limits.pids_max}: pids controller")
        elif own_uid:
            rlimits.append((resource.RLIMIT_NPROC, limits.pids_max))
            notes.append(
                f"pids_max {limits.pids_max}: RLIMIT_NPROC of the sandbox's own uid "
                f"(no pids controller under {where})"
            )
        else:
            unenforced.append("pids_max")
            notes.append(
                f"pids_max {limits.pids_max}: not enforced (no pids controller under {where}, "
                "and the sandbox shares its uid, so RLIMIT_NPROC would count others too)"
            )
    if limits.cpu_max is not None:
        if "cpu" in controllers:
            cgroup["cpu_max"] = limits.cpu_max
            notes.append(f"cpu_max {limits.cpu_max:g}: cpu controller")
        else:
            unenforced.append("cpu_max")
            notes.append(
                f"cpu_max {limits.cpu_max:g}: not enforced "
                f"(no cpu controller under {where}, and no rlimit caps a rate)"
            )
    if limits.required and unenforced:
        raise LimitsNotEnforceable(
            f"limits_required is true but {' and '.join(unenforced)} cannot be enforced here: "
            + "; ".join(n for n in notes if "not enforced" in n)
        )
    return Enforcement(
        cgroup=Limits(**cgroup),
        rlimits=tuple(rlimits),
        notes=tuple(notes),
        unenforced=tuple(unenforced),
    )
