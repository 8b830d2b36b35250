"""The boundary a daemon runs with: how its sandboxes' trees are held, who they run as, limits.

One per daemon, opened at start-up from the ``[sandboxes]`` settings and
shared by the registry, the actors and recovery:

- the tree boundary: ``cgroup2`` or ``cgroup1`` (this daemon's cgroups, made
  here) or ``markers`` (the fallback: no writable cgroup hierarchy, or
  ``cgroup = "off"``), with one sentence why;
- the identities: ``run_as`` resolved, and the pool of uids when each sandbox
  has its own;
- how each limit is enforced, given the controllers and the identities.

It also says all of that in plain words, for the start-up log and
``server.info``.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Collection
from pathlib import Path

import trio

from sandboxd.actors.boundary.cgroupfs import daemon_dir_name
from sandboxd.actors.boundary.cgroups import CgroupBoundary, CgroupError
from sandboxd.actors.boundary.discovery import BoundaryMode, discover
from sandboxd.actors.boundary.identities import Identity, RunAs, UidPool, UidPoolExhausted
from sandboxd.actors.boundary.limits import Enforcement, Limits, plan_limits
from sandboxd.actors.boundary.settings import BoundarySettings
from sandboxd.actors.boundary.trees import SandboxTree
from sandboxd.actors.proctree import DAEMON_MARKER

__all__ = ["Boundary", "UidPoolExhausted", "open_boundary"]


class Boundary:
    """This daemon's boundary: trees, identities and limits (see the module's docstring)."""

    def __init__(
        self,
        *,
        mode: BoundaryMode,
        reason: str,
        cgroups: CgroupBoundary | None,
        run_as: RunAs,
        marker: str,
    ) -> None:
        self.mode = mode
        #: One sentence: why this tree boundary (and what the cgroups could not do).
        self.reason = reason
        self.cgroups = cgroups
        self.run_as = run_as
        #: Which daemon: ``sandboxd-`` and a hash of its state dir, never the path itself.
        #: The per-daemon cgroups are named so, and under markers every process carries it.
        self.marker = marker
        self.uids = UidPool(*run_as.uid_range) if run_as.kind == "dynamic" else None
        self._homes: dict[int, str] = {}

    # -- the daemon's life ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The cgroup events watcher (nothing to run under markers); start it before any wait."""
        if self.cgroups is None:
            task_status.started()
            await trio.sleep_forever()
        await self.cgroups.run(task_status=task_status)

    def close(self, *, remove_parents: bool = False) -> None:
        """Stop watching. The parents stay (the sandboxes may outlive the daemon) unless asked."""
        if self.cgroups is not None:
            self.cgroups.close(remove_parents=remove_parents)

    # -- trees -------------------------------------------------------------------------------

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(self.cgroups.controllers) if self.cgroups is not None else frozenset()

    def marker_env(self) -> dict[str, str]:
        """What every process of a sandbox carries besides SANDBOX_ID: under markers, the
        daemon's marker (how its processes are found); with cgroups, nothing."""
        return {DAEMON_MARKER: self.marker} if self.cgroups is None else {}

    def tree(self, sandbox_id: str, limits: Limits | None = None) -> SandboxTree:
        """The sandbox's tree for a new process: its cgroups made (or found empty) with
        ``limits``. Raises CgroupError if they cannot be, or still hold processes."""
        cgroup = self.cgroups.create(sandbox_id, limits) if self.cgroups is not None else None
        return SandboxTree(sandbox_id, cgroup=cgroup, marker=self.marker)

    def adopted_tree(self, sandbox_id: str) -> SandboxTree:
        """The tree a sandbox already has (after a restart): its cgroup as it was found, made
        again (empty, no limits until its next start) if the daemon had not made it yet."""
        if self.cgroups is None:
            return SandboxTree(sandbox_id, cgroup=None, marker=self.marker)
        cgroup = self.cgroups.adopt(sandbox_id) or self.cgroups.create(sandbox_id)
        return SandboxTree(sandbox_id, cgroup=cgroup, marker=self.marker)

    def marked_tree(self, sandbox_id: str) -> SandboxTree:
        """A tree found by markers whatever the boundary: a sandbox whose process was started
        outside any cgroup (by an earlier version, or with ``cgroup = "off"``)."""
        return SandboxTree(sandbox_id, cgroup=None, marker=self.marker)

    async def remove_tree(self, tree: SandboxTree) -> None:
        """The sandbox is deleted: kill what is left of its tree and remove its cgroups
        (one it has even if its tree was found by markers: recovery made it)."""
        if self.cgroups is None:
            return
        cgroup = tree.cgroup or self.cgroups.adopt(tree.sandbox_id)
        if cgroup is not None:
            await self.cgroups.remove(cgroup)

    def sandboxes_with_cgroups(self) -> list[str]:
        return self.cgroups.sandbox_ids() if self.cgroups is not None else []

    async def remove_strays(self, keep: Collection[str]) -> list[str]:
        """Kill and remove every sandbox cgroup whose id is not in ``keep``; return those ids."""
        return await self.cgroups.remove_strays(keep) if self.cgroups is not None else []

    # -- identities --------------------------------------------------------------------------

    def allocate_uid(self, sandbox_id: str) -> int | None:
        """The uid a new sandbox runs under: its own, the run_as user's, or None (the daemon's).

        Raises UidPoolExhausted when every uid of the range is held or draining.
        """
        if self.uids is not None:
            return self.uids.allocate(sandbox_id)
        if self.run_as.identity is not None:
            return self.run_as.identity.uid
        return None

    def identity(self, uid: int | None) -> Identity | None:
        """The credentials of a sandbox that runs under ``uid`` (None: the daemon's own).

        The run_as user's uid brings that account's gid and groups; any other uid
        (one of the pool, or one a sandbox kept from before a config change) is a
        sandbox's own: the gid of the same number, no supplementary groups.
        """
        if uid is None:
            return None
        fixed = self.run_as.identity
        if fixed is not None and fixed.uid == uid:
            return fixed
        return Identity(uid, uid)

    def home(self, identity: Identity | None, working_dir: str) -> str | None:
        """What HOME means for a sandbox, if not the daemon's own: a sandbox uid's home is its
        working dir (it owns nothing else), the run_as user's is that account's home."""
        if identity is None:
            return None
        fixed = self.run_as.identity
        if fixed is not None and fixed.uid == identity.uid:
            if identity.uid not in self._homes:
                try:
                    self._homes[identity.uid] = pwd.getpwuid(identity.uid).pw_dir
                except KeyError:
                    self._homes[identity.uid] = working_dir
            return self._homes[identity.uid]
        return working_dir

    def assign_uid(self, sandbox_id: str, uid: int | None) -> None:
        """Recovery: a sandbox keeps the uid its events recorded."""
        if self.uids is not None and uid is not None:
            self.uids.assign(sandbox_id, uid)

    def release_uid(self, sandbox_id: str) -> int | None:
        """The sandbox is deleted: its uid drains until nothing runs or remains under it."""
        return self.uids.release(sandbox_id) if self.uids is not None else None

    @property
    def own_uids(self) -> bool:
        """Whether each sandbox runs under a uid no other process uses."""
        return self.uids is not None

    # -- limits ------------------------------------------------------------------------------

    def enforcement(self, limits: Limits) -> Enforcement:
        """How ``limits`` are enforced here; raises LimitsNotEnforceable (limits_required)."""
        return plan_limits(
            limits, controllers=self.controllers, own_uid=self.own_uids, boundary=self.mode
        )

    def limits_in_force(self) -> dict[str, str]:
        """Per limit key, what enforces it here: "cgroup", an rlimit's name, or "none"."""
        controllers = self.controllers
        return {
            "memory_max": "cgroup" if "memory" in controllers else "RLIMIT_DATA",
            "pids_max": "cgroup"
            if "pids" in controllers
            else "RLIMIT_NPROC"
            if self.own_uids
            else "none",
            "cpu_max": "cgroup" if "cpu" in controllers else "none",
        }

    # -- what it says ------------------------------------------------------------------------

    @property
    def isolation(self) -> str:
        """Who sandboxes run as, in one word or two: server.info's ``isolation``."""
        match self.run_as.kind:
            case "dynamic":
                return "dynamic"
            case "user":
                return f"user:{self.run_as.user}"
            case _:
                # As root only by explicit choice; otherwise the daemon cannot switch users.
                return "daemon" if os.geteuid() == 0 else "none (daemon not root)"

    def describe(self) -> list[str]:
        """The start-up log's lines: the boundary and why, who sandboxes run as, the limits."""
        limits = ", ".join(f"{key} by {how}" for key, how in self.limits_in_force().items())
        return [
            f"boundary: {self.mode} ({self.reason})",
            f"isolation: {self.isolation}: {self.run_as.note}",
            f"limits: {limits}",
        ]


def open_boundary(
    settings: BoundarySettings,
    *,
    state_dir: Path | str,
    max_sandboxes: int,
    run_as: RunAs | None = None,
) -> Boundary:
    """Discover the tree boundary, make this daemon's cgroups, resolve ``run_as``.

    With ``cgroup = "auto"``, a host where the cgroups cannot be made falls back
    to markers and the reason says why. With a path, that is an error
    (CgroupError): the operator asked for cgroups there. ``run_as`` problems
    (a user removed since the config was read) raise ValueError naming the key.
    """
    if run_as is None:
        run_as = settings.resolve_run_as("sandboxes", max_sandboxes=max_sandboxes)
    marker = daemon_dir_name(os.path.realpath(state_dir))
    found = discover(settings.cgroup)
    cgroups = None
    mode: BoundaryMode = found.mode
    reason = found.reason
    if found.layout is not None:
        try:
            cgroups = CgroupBoundary.open(found.layout, state_dir=state_dir)
        except CgroupError as exc:
            if isinstance(settings.cgroup, Path):
                raise
            mode, reason = "markers", f"cgroups unavailable: {exc}"
        else:
            mode, reason = cgroups.mode, "; ".join([found.reason, *found.notes, *cgroups.notes])
    return Boundary(mode=mode, reason=reason, cgroups=cgroups, run_as=run_as, marker=marker)
