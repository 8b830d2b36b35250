"""Which boundary holds a sandbox's processes on this host: cgroup2, cgroup1 or markers.

- ``cgroup2``: a pure cgroup v2 host, the daemon's cgroup writable (a systemd
  unit with ``Delegate=yes``, or root). The tree (membership, kill, freeze,
  events) and every limit come from v2; the memory, pids and cpu controllers
  are enabled in the subtree where the host offers them.
- ``cgroup1``: the hybrid layout (this project's CI machines): v2 mounted at
  ``/sys/fs/cgroup/unified`` with no controllers gives the tree, and the v1
  memory, pids and cpu hierarchies give the limits, each under the cgroup
  /proc/self/cgroup names for it (the daemon's own cgroup in that hierarchy, so
  a limit on the daemon's cgroup still holds its sandboxes).
- ``markers``: no writable cgroup hierarchy (or ``cgroup = "off"``). The
  environment markers of actors/proctree.py find a sandbox's processes, and the
  limits fall back to rlimits (boundary/limits.py).

Discovery reads /proc/self/cgroup and /proc/self/mountinfo (both texts can be
passed in, so it is tested on other hosts' texts) and checks access; it creates
nothing. :func:`sandboxd.actors.boundary.cgroups.open_boundary` makes the cgroups.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from sandboxd.actors.boundary.cgroupfs import (
    LIMIT_CONTROLLERS,
    CgroupMount,
    dir_of,
    parse_mountinfo,
    parse_proc_cgroup,
)

BoundaryMode = Literal["cgroup2", "cgroup1", "markers"]
#: The config value: "auto", "off", or the v2 directory to make the daemon's cgroups in.
CgroupSetting = Literal["auto", "off"] | Path


def parse_cgroup_setting(
    key: str, value: Any, *, mountinfo: str | None = None
) -> Literal["auto", "off"] | Path:
    """``sandboxes.cgroup``: "auto", "off", or the path of a writable cgroup v2 directory.

    A path is checked now, so a mistake stops the daemon before it starts: it must
    be absolute, a directory of a mounted cgroup2 hierarchy (the tree, kill, freeze
    and events come from v2), and writable by this process. Raises ValueError
    naming ``key``.
    """
    if not isinstance(value, str):
        raise ValueError(f'{key} must be "auto", "off" or a path, not {value!r}')
    if value in ("auto", "off"):
        return value  # type: ignore[return-value]  # narrowed by the test above
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f'{key} must be "auto", "off" or an absolute path, not {value!r}')
    if not path.is_dir():
        raise ValueError(f"{key} is {value!r}, which is not a directory")
    text = mountinfo if mountinfo is not None else _read("/proc/self/mountinfo")
    resolved = os.path.realpath(path)
    if not any(
        m.version == 2 and _is_under(resolved, m.mount_point) for m in parse_mountinfo(text)
    ):
        raise ValueError(f"{key} is {value!r}, which is not in a mounted cgroup v2 hierarchy")
    if not (path / "cgroup.procs").exists():
        raise ValueError(f"{key} is {value!r}, which is not a cgroup directory (no cgroup.procs)")
    if not os.access(path, os.W_OK):
        raise ValueError(f"{key} is {value!r}, which this daemon (uid {os.geteuid()}) cannot write")
    return Path(resolved)


def _is_under(path: str, mount_point: str) -> bool:
    base = mount_point.rstrip("/")
    return path == base or path.startswith(base + "/")


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


@attrs.frozen
class Layout:
    """Where this daemon's cgroups go.

    ``tree`` is the v2 directory the per-daemon parent is made in; ``controllers``
    maps each limit controller the host offers to the directory its parent is
    made in: ``tree`` itself when v2 has it, else the daemon's cgroup in the v1
    hierarchy that carries it.
    """

    tree: str
    controllers: Mapping[str, str]

    @property
    def mode(self) -> BoundaryMode:
        return "cgroup1" if any(d != self.tree for d in self.controllers.values()) else "cgroup2"

    @property
    def v2_controllers(self) -> frozenset[str]:
        return frozenset(c for c, d in self.controllers.items() if d == self.tree)

    @property
    def v1_dirs(self) -> dict[str, frozenset[str]]:
        """Each v1 directory in use and the limit controllers it gives."""
        dirs: dict[str, set[str]] = {}
        for controller, directory in self.controllers.items():
            if directory != self.tree:
                dirs.setdefault(directory, set()).add(controller)
        return {d: frozenset(c) for d, c in dirs.items()}


@attrs.frozen
class Discovery:
    """The boundary found, and one sentence why (for the log and ``server.info``)."""

    mode: BoundaryMode
    layout: Layout | None
    reason: str
    notes: tuple[str, ...] = ()  # what the host could do better, for the operator


def discover(
    setting: Literal["auto", "off"] | Path = "auto",
    *,
    proc_cgroup: str | None = None,
    mountinfo: str | None = None,
    writable: Callable[[str], bool] | None = None,
    read: Callable[[str], str] = _read,
) -> Discovery:
    """Find the boundary in force for ``setting``; creates nothing.

    ``proc_cgroup`` and ``mountinfo`` default to this process's; ``writable``
    (default: ``os.access(path, W_OK)``) and ``read`` are the only other I/O.
    """
    if setting == "off":
        return Discovery("markers", None, 'cgroup = "off" in the config')
    writable = writable or (lambda path: os.access(path, os.W_OK))
    mounts = parse_mountinfo(mountinfo if mountinfo is not None else read("/proc/self/mountinfo"))
    placed = parse_proc_cgroup(
        proc_cgroup if proc_cgroup is not None else read("/proc/self/cgroup")
    )
    v2_mounts = [m for m in mounts if m.version == 2]

    if isinstance(setting, Path):
        tree = str(setting)
    else:
        if not v2_mounts:
            return Discovery(
                "markers",
                None,
                "no cgroup v2 hierarchy is mounted (the tree, kill, freeze and events come "
                "from v2)",
            )
        if placed.v2 is None:
            return Discovery("markers", None, "/proc/self/cgroup names no cgroup v2 path")
        visible = next((d for m in v2_mounts if (d := dir_of(m, placed.v2)) is not None), None)
        if visible is None:
            return Discovery(
                "markers", None, f"this process's cgroup {placed.v2} is not visible in any mount"
            )
        tree = visible
        if not writable(tree):
            return Discovery(
                "markers",
                None,
                f"this process's cgroup {tree} is not writable by uid {os.geteuid()} "
                "(run as root, or under systemd with Delegate=yes)",
            )

    controllers: dict[str, str] = {}
    try:
        offered = set(read(os.path.join(tree, "cgroup.controllers")).split())
    except OSError:
        offered = set()
    for controller in LIMIT_CONTROLLERS:
        if controller in offered:
            controllers[controller] = tree
            continue
        directory = _v1_dir(controller, mounts, placed.v1)
        if directory is not None and writable(directory):
            controllers[controller] = directory
    layout = Layout(tree=tree, controllers=controllers)
    have = ", ".join(f"{c} (v{'2' if d == tree else '1'})" for c, d in controllers.items())
    return Discovery(
        layout.mode,
        layout,
        f"cgroup v2 at {tree}; limit controllers: {have or 'none'}",
        _slow_moves_note(tree, v2_mounts),
    )


def _slow_moves_note(tree: str, v2_mounts: list[CgroupMount]) -> tuple[str, ...]:
    """A note if moving a child into its cgroup waits for an RCU grace period.

    Measured here (docs/boundary.md): a move takes 4.8 ms p50 and up to 16 ms
    without ``favordynmods``, 0.4 ms with it, and every start pays one move per
    hierarchy. Mounting is the host's business, not the daemon's: it says so.
    """
    mount = max(
        (m for m in v2_mounts if _is_under(tree, m.mount_point)),
        key=lambda m: len(m.mount_point),
        default=None,
    )
    if mount is None or "favordynmods" in mount.options:
        return ()
    return (
        f"cgroup2 at {mount.mount_point} is mounted without favordynmods, so each start can "
        "wait for a kernel RCU grace period (5-16 ms) to move its child into its cgroup; "
        "docs/boundary.md says how to remove that wait",
    )


def _v1_dir(controller: str, mounts: list[CgroupMount], placed: Mapping[str, str]) -> str | None:
    path = placed.get(controller)
    if path is None:
        return None
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers:
            directory = dir_of(mount, path)
            if directory is not None:
                return directory
    return None
