"""Which boundary is in force: discovery on other hosts' texts and on this one, and the setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sandboxd.actors.boundary.discovery import Discovery, Layout, discover, parse_cgroup_setting
from sandboxd.actors.boundary.in_force import open_boundary
from sandboxd.actors.boundary.settings import BoundarySettings
from tests.actors.boundary.test_cgroupfs import HYBRID_CGROUP, HYBRID_MOUNTINFO

PURE_V2_MOUNTINFO = (
    "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
SERVICE = "/sys/fs/cgroup/system.slice/sandboxd.service"


def files(contents: dict[str, str]) -> Any:
    def read(path: str) -> str:
        try:
            return contents[path]
        except KeyError:
            raise FileNotFoundError(path) from None

    return read


def on_the_hybrid_host(mountinfo: str = HYBRID_MOUNTINFO) -> Discovery:
    """Discovery on the hybrid layout's host, every cgroup writable."""
    return discover(
        proc_cgroup=HYBRID_CGROUP,
        mountinfo=mountinfo,
        writable=lambda path: True,
        read=files({"/sys/fs/cgroup/unified/cgroup.controllers": "\n"}),
    )


def test_the_hybrid_layout_is_cgroup1() -> None:
    found = on_the_hybrid_host()
    assert found.mode == "cgroup1"
    assert found.layout == Layout(
        tree="/sys/fs/cgroup/unified",
        controllers={
            # The daemon's own memory cgroup: a limit on it still holds its sandboxes.
            "memory": "/sys/fs/cgroup/memory/process_api/9e90d40e",
            "pids": "/sys/fs/cgroup/pids",
            "cpu": "/sys/fs/cgroup/cpu",
        },
    )
    assert found.reason.endswith("limit controllers: memory (v1), pids (v1), cpu (v1)")


@pytest.mark.parametrize(
    ("options", "noted"), [("rw", True), ("rw,nsdelegate,favordynmods", False)]
)
def test_a_mount_without_favordynmods_is_noted(options: str, noted: bool) -> None:
    # Each start moves its child into its cgroup; without favordynmods the move can wait
    # for an RCU grace period (4.8 ms p50 here, 0.4 ms with it): the operator is told.
    mountinfo = HYBRID_MOUNTINFO.replace("cgroup2 cgroup2 rw\n", f"cgroup2 cgroup2 {options}\n")
    found = on_the_hybrid_host(mountinfo)
    assert found.mode == "cgroup1"
    if noted:
        (note,) = found.notes
        assert note.startswith("cgroup2 at /sys/fs/cgroup/unified is mounted without favordynmods")
    else:
        assert found.notes == ()


def test_a_delegated_systemd_service_on_pure_v2_is_cgroup2() -> None:
    found = discover(
        proc_cgroup="0::/system.slice/sandboxd.service\n",
        mountinfo=PURE_V2_MOUNTINFO,
        writable=lambda path: path == SERVICE,
        read=files({f"{SERVICE}/cgroup.controllers": "cpuset cpu io memory pids\n"}),
    )
    assert found.mode == "cgroup2"
    assert found.layout is not None
    assert found.layout.tree == SERVICE
    assert found.layout.v2_controllers == {"memory", "pids", "cpu"}
    assert found.layout.v1_dirs == {}


def test_v2_without_controllers_and_no_v1_is_still_cgroup2() -> None:
    # The tree, kill and freeze still come from v2; limits fall back to rlimits.
    found = discover(
        proc_cgroup="0::/user.slice/user-1000.slice/app.scope\n",
        mountinfo=PURE_V2_MOUNTINFO,
        writable=lambda path: True,
        read=files({}),
    )
    assert found.mode == "cgroup2"
    assert found.layout is not None and found.layout.controllers == {}
    assert found.reason.endswith("limit controllers: none")


@pytest.mark.parametrize(
    ("proc_cgroup", "mountinfo", "writable", "reason"),
    [
        ("0::/\n", "", True, "no cgroup v2 hierarchy is mounted"),
        ("4:memory:/\n", PURE_V2_MOUNTINFO, True, "names no cgroup v2 path"),
        ("0::/system.slice/x\n", PURE_V2_MOUNTINFO, False, "is not writable by uid"),
    ],
)
def test_no_writable_v2_means_markers(
    proc_cgroup: str, mountinfo: str, writable: bool, reason: str
) -> None:
    found = discover(
        proc_cgroup=proc_cgroup,
        mountinfo=mountinfo,
        writable=lambda path: writable,
        read=files({}),
    )
    assert found.mode == "markers" and found.layout is None
    assert reason in found.reason


def test_a_container_that_cannot_see_its_cgroup_is_markers() -> None:
    mountinfo = "30 25 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    found = discover(
        proc_cgroup="0::/elsewhere\n", mountinfo=mountinfo, writable=lambda p: True, read=files({})
    )
    assert found.mode == "markers" and "not visible" in found.reason


def test_off_is_markers_without_looking() -> None:
    found = discover("off", proc_cgroup="", mountinfo="", read=files({}))
    assert found.mode == "markers" and 'cgroup = "off"' in found.reason


def test_a_path_setting_puts_the_tree_there() -> None:
    found = discover(
        Path("/sys/fs/cgroup/unified/delegated"),
        proc_cgroup=HYBRID_CGROUP,
        mountinfo=HYBRID_MOUNTINFO,
        writable=lambda path: True,
        read=files({}),
    )
    assert found.layout is not None and found.layout.tree == "/sys/fs/cgroup/unified/delegated"
    assert found.mode == "cgroup1"  # the v1 limits still come from the daemon's own cgroups


# -- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, 'sandboxes.cgroup must be "auto", "off" or a path, not True'),
        ("on", 'sandboxes.cgroup must be "auto", "off" or an absolute path, not \'on\''),
        ("/no/such/dir", "sandboxes.cgroup is '/no/such/dir', which is not a directory"),
        ("/tmp", "sandboxes.cgroup is '/tmp', which is not in a mounted cgroup v2 hierarchy"),
    ],
)
def test_bad_settings_name_the_key(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_cgroup_setting("sandboxes.cgroup", value)
    assert str(caught.value) == message


def test_auto_and_off_are_kept() -> None:
    assert parse_cgroup_setting("sandboxes.cgroup", "auto") == "auto"
    assert parse_cgroup_setting("sandboxes.cgroup", "off") == "off"


def test_a_v1_directory_is_refused(layout: Layout) -> None:
    v1 = next((d for d in layout.v1_dirs), None)
    if v1 is None:
        pytest.skip("no cgroup v1 hierarchy here")
    with pytest.raises(ValueError, match="not in a mounted cgroup v2 hierarchy"):
        parse_cgroup_setting("sandboxes.cgroup", v1)


def test_a_v2_directory_is_taken(layout: Layout) -> None:
    delegated = os.path.join(layout.tree, f"sandboxd-setting-{os.getpid()}")
    os.mkdir(delegated)
    try:
        assert parse_cgroup_setting("sandboxes.cgroup", delegated) == Path(delegated)
        # A file inside a cgroup is no cgroup directory.
        with pytest.raises(ValueError, match="not a directory"):
            parse_cgroup_setting("sandboxes.cgroup", os.path.join(delegated, "cgroup.procs"))
    finally:
        os.rmdir(delegated)


# -- on this host --------------------------------------------------------------------------


def test_this_host(layout: Layout) -> None:
    found = discover()
    assert found.layout == layout
    if os.path.isdir("/sys/fs/cgroup/unified") and os.path.isdir("/sys/fs/cgroup/memory"):
        assert found.mode == "cgroup1"  # the CI machines' hybrid layout


def test_open_boundary_says_what_is_in_force(layout: Layout, tmp_path: Path) -> None:
    in_force = open_boundary(BoundarySettings("auto"), state_dir=tmp_path, max_sandboxes=10)
    assert in_force.cgroups is not None
    try:
        assert in_force.mode == layout.mode
        assert in_force.controllers == set(layout.controllers)
        assert in_force.reason.startswith("cgroup v2 at ")
        assert in_force.marker_env() == {}  # the cgroup holds the tree: no marker needed
        assert in_force.isolation == "dynamic"  # root's default
        assert in_force.limits_in_force() == {
            "memory_max": "cgroup" if "memory" in layout.controllers else "RLIMIT_DATA",
            "pids_max": "cgroup" if "pids" in layout.controllers else "RLIMIT_NPROC",
            "cpu_max": "cgroup" if "cpu" in layout.controllers else "none",
        }
    finally:
        in_force.close(remove_parents=True)
    off = open_boundary(
        BoundarySettings("off", run_as="daemon"), state_dir=tmp_path, max_sandboxes=10
    )
    assert off.mode == "markers" and off.cgroups is None and off.controllers == set()
    # The marker says which daemon without saying where its state is.
    assert off.marker_env() == {"SANDBOXD_DAEMON": off.marker}
    assert off.marker.startswith("sandboxd-") and str(tmp_path) not in off.marker
    assert off.isolation == "daemon"
    assert off.limits_in_force() == {
        "memory_max": "RLIMIT_DATA",
        "pids_max": "none",  # RLIMIT_NPROC would count the daemon's own processes too
        "cpu_max": "none",
    }
