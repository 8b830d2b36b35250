"""The sandbox boundary: what holds a sandbox's processes together, and apart from the rest.

One job per module (docs/boundary.md):

- ``cgroupfs``: the cgroup filesystem's texts, sans-IO;
- ``discovery``: which boundary this host allows (cgroup2, cgroup1, markers);
- ``cgroups``: the daemon's parent cgroups and each sandbox's;
- ``events``: one inotify descriptor for every sandbox's ``cgroup.events``;
- ``limits``: ``memory_max``, ``pids_max``, ``cpu_max``, and how each is enforced;
- ``confine``: the spawn primitive that starts a child inside its boundary;
- ``identities``: ``run_as``, the uid pool, what still holds a uid;
- ``workdirs``: working dirs private to their uid, removed whatever was done to them;
- ``settings``: the ``[sandboxes]`` keys of all this, for the config;
- ``trees``: one sandbox's tree on the boundary in force (its cgroup, or its markers);
- ``in_force``: the daemon's boundary: trees, identities and limits together.

The public names are re-exported here, each loaded on first use (PEP 562): the
sans-IO modules (limits, settings, cgroupfs) stay importable without trio, which
the protocol's models (through the specs) rely on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandboxd.actors.boundary.cgroupfs import (
        Usage,
        daemon_dir_name,
        sandbox_dir_name,
        sandbox_id_of,
    )
    from sandboxd.actors.boundary.cgroups import (
        CgroupBoundary,
        CgroupError,
        CgroupTimeout,
        SandboxCgroup,
        remove_daemon_cgroups,
    )
    from sandboxd.actors.boundary.confine import (
        Confinement,
        ConfinementError,
        open_confined_process,
    )
    from sandboxd.actors.boundary.discovery import (
        BoundaryMode,
        Discovery,
        Layout,
        discover,
        parse_cgroup_setting,
    )
    from sandboxd.actors.boundary.events import CgroupEventsWatcher
    from sandboxd.actors.boundary.identities import (
        Identity,
        RunAs,
        UidPool,
        UidPoolExhausted,
        holders,
        parse_run_as,
    )
    from sandboxd.actors.boundary.in_force import Boundary, open_boundary
    from sandboxd.actors.boundary.limits import (
        Enforcement,
        Limits,
        LimitsNotEnforceable,
        format_bytes,
        parse_limits,
        plan_limits,
    )
    from sandboxd.actors.boundary.settings import BoundarySettings, parse_boundary_settings
    from sandboxd.actors.boundary.trees import SandboxTree
    from sandboxd.actors.boundary.workdirs import (
        RemoveError,
        make_base_dir,
        make_working_dir,
        remove_tree,
        unreachable,
    )

#: Public name -> the module of this package that defines it.
_WHERE = {
    "daemon_dir_name": "cgroupfs",
    "sandbox_dir_name": "cgroupfs",
    "sandbox_id_of": "cgroupfs",
    "CgroupBoundary": "cgroups",
    "CgroupError": "cgroups",
    "CgroupTimeout": "cgroups",
    "SandboxCgroup": "cgroups",
    "Usage": "cgroupfs",
    "remove_daemon_cgroups": "cgroups",
    "Confinement": "confine",
    "ConfinementError": "confine",
    "open_confined_process": "confine",
    "BoundaryMode": "discovery",
    "Discovery": "discovery",
    "Layout": "discovery",
    "discover": "discovery",
    "parse_cgroup_setting": "discovery",
    "CgroupEventsWatcher": "events",
    "Identity": "identities",
    "RunAs": "identities",
    "UidPool": "identities",
    "UidPoolExhausted": "identities",
    "holders": "identities",
    "parse_run_as": "identities",
    "Boundary": "in_force",
    "open_boundary": "in_force",
    "Enforcement": "limits",
    "Limits": "limits",
    "LimitsNotEnforceable": "limits",
    "format_bytes": "limits",
    "parse_limits": "limits",
    "plan_limits": "limits",
    "BoundarySettings": "settings",
    "parse_boundary_settings": "settings",
    "SandboxTree": "trees",
    "RemoveError": "workdirs",
    "make_base_dir": "workdirs",
    "make_working_dir": "workdirs",
    "remove_tree": "workdirs",
    "unreachable": "workdirs",
}

__all__ = [
    "Boundary",
    "BoundaryMode",
    "BoundarySettings",
    "CgroupBoundary",
    "CgroupError",
    "CgroupEventsWatcher",
    "CgroupTimeout",
    "Confinement",
    "ConfinementError",
    "Discovery",
    "Enforcement",
    "Identity",
    "Layout",
    "Limits",
    "LimitsNotEnforceable",
    "RemoveError",
    "RunAs",
    "SandboxCgroup",
    "SandboxTree",
    "UidPool",
    "UidPoolExhausted",
    "Usage",
    "daemon_dir_name",
    "discover",
    "format_bytes",
    "holders",
    "make_base_dir",
    "make_working_dir",
    "open_boundary",
    "open_confined_process",
    "parse_boundary_settings",
    "parse_cgroup_setting",
    "parse_limits",
    "parse_run_as",
    "plan_limits",
    "remove_daemon_cgroups",
    "remove_tree",
    "sandbox_dir_name",
    "sandbox_id_of",
    "unreachable",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: the next lookup is a plain attribute
    return value
