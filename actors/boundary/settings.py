"""The ``[sandboxes]`` keys of the boundary, read strictly, for daemon/config.py to call.

    [sandboxes]
    cgroup = "auto"              # "auto" | "off" | "/sys/fs/cgroup/.../a writable v2 dir"
    run_as = "dynamic"           # "dynamic" (default as root) | "daemon" | a user name
    uid_range = [600000, 665535] # dynamic uids; must not overlap existing accounts ...
    allow_existing_uids = false  # ... unless this is true

and, per spec (``[[specs]]``), ``memory_max``, ``pids_max``, ``cpu_max`` and
``limits_required`` (boundary/limits.py). Every error is a ValueError whose
message names the key; config.py turns it into its ConfigError as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from sandboxd.actors.boundary.discovery import parse_cgroup_setting
from sandboxd.actors.boundary.identities import Accounts, RunAs, parse_run_as

#: The [sandboxes] keys read here; config.py lets them through its unknown-key check.
SANDBOXES_KEYS = ("cgroup", "run_as", "uid_range", "allow_existing_uids")


@attrs.frozen
class BoundarySettings:
    cgroup: Literal["auto", "off"] | Path
    run_as: RunAs


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
    run_as = parse_run_as(key, table, max_sandboxes=max_sandboxes, euid=euid, accounts=accounts)
    return BoundarySettings(cgroup=cgroup, run_as=run_as)
