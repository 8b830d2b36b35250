"""The ``[sandboxes]`` keys of the boundary, read strictly, for daemon/config.py to call.

    [sandboxes]
    cgroup = "auto"              # "auto" | "off" | "/sys/fs/cgroup/.../a writable v2 dir"
    run_as = "dynamic"           # "dynamic" (default as root) | "daemon" | a user name
    uid_range = [600000, 665535] # dynamic uids; must not overlap existing accounts ...
    allow_existing_uids = false  # ... unless this is true

and, per spec (``[[specs]]``), ``memory_max``, ``pids_max``, ``cpu_max`` and
``limits_required`` (boundary/limits.py). Every error is a ValueError whose
message names the key; config.py turns it into its ConfigError as it is.

The settings are kept as written (so a config file can be written back from
them); :meth:`BoundarySettings.resolve_run_as` gives the ``RunAs`` the daemon
runs with, checked against the host's accounts, at load and again at start.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from sandboxd.actors.boundary.discovery import parse_cgroup_setting
from sandboxd.actors.boundary.identities import (
    DEFAULT_UID_RANGE,
    Accounts,
    RunAs,
    parse_run_as,
    parse_uid_range,
)

#: The [sandboxes] keys read here; config.py lets them through its unknown-key check.
SANDBOXES_KEYS = ("cgroup", "run_as", "uid_range", "allow_existing_uids")


@attrs.frozen
class BoundarySettings:
    """The boundary keys as the config says them (each checked already)."""

    cgroup: Literal["auto", "off"] | Path = "auto"
    run_as: str | None = None  # None: "dynamic" when the daemon is root, else "daemon"
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    allow_existing_uids: bool = False

    def resolve_run_as(
        self,
        key: str,
        *,
        max_sandboxes: int,
        euid: int | None = None,
        accounts: Accounts | None = None,
    ) -> RunAs:
        """Who sandboxes run as, checked against the host (users, groups, the daemon's uid)."""
        table: dict[str, Any] = {
            "uid_range": list(self.uid_range),
            "allow_existing_uids": self.allow_existing_uids,
        }
        if self.run_as is not None:
            table["run_as"] = self.run_as
        return parse_run_as(key, table, max_sandboxes=max_sandboxes, euid=euid, accounts=accounts)


def parse_boundary_settings(
    key: str,
    table: Mapping[str, Any],
    *,
    max_sandboxes: int,
    euid: int | None = None,
    accounts: Accounts | None = None,
    mountinfo: str | None = None,
) -> BoundarySettings:
    """The boundary keys of the ``key`` table (``"sandboxes"``); other keys are the caller's."""
    cgroup = parse_cgroup_setting(f"{key}.cgroup", table.get("cgroup", "auto"), mountinfo=mountinfo)
    run_as = table.get("run_as")
    if run_as is not None and (not isinstance(run_as, str) or not run_as):
        raise ValueError(f'{key}.run_as must be "dynamic", "daemon" or a user name, not {run_as!r}')
    uid_range = DEFAULT_UID_RANGE
    if "uid_range" in table:
        uid_range = parse_uid_range(f"{key}.uid_range", table["uid_range"])
    allow = table.get("allow_existing_uids", False)
    if not isinstance(allow, bool):
        raise ValueError(f"{key}.allow_existing_uids must be true or false, not {allow!r}")
    settings = BoundarySettings(cgroup, run_as, uid_range, allow)
    settings.resolve_run_as(key, max_sandboxes=max_sandboxes, euid=euid, accounts=accounts)
    return settings
