"""The cgroup filesystem's texts, sans-IO: names, /proc/self/cgroup, mountinfo, flat files."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.actors.boundary.cgroupfs import (
    CgroupMount,
    EventsState,
    cpu_quota_usec,
    daemon_dir_name,
    dir_of,
    parse_events,
    parse_flat_keyed,
    parse_limit_value,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_procs,
    sandbox_dir_name,
    sandbox_id_of,
    v2_cpu_max,
)

PROTOCOL_ID = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)

#: /proc/self/mountinfo and /proc/self/cgroup of this project's CI machine (hybrid).
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/9e90d40e
2:cpuacct:/
1:cpu:/
0::/
"""


@given(PROTOCOL_ID)
def test_a_protocol_id_is_its_own_cgroup_name(sandbox_id: str) -> None:
    assert sandbox_dir_name(sandbox_id) == "sb-" + sandbox_id
    assert sandbox_id_of("sb-" + sandbox_id) == sandbox_id


# 20 characters of up to 4 UTF-8 bytes each, escaped as %XX: 243 bytes with "sb-", under
# the 255 a directory name may hold (40 could pass it: that is refused, below).
@given(st.text(min_size=1, max_size=20))
def test_any_id_maps_to_a_safe_name_and_back(sandbox_id: str) -> None:
    name = sandbox_dir_name(sandbox_id)
    assert re.fullmatch(r"sb-[A-Za-z0-9_%-]+", name)  # no "/", "\n", "." or space
    assert sandbox_id_of(name) == sandbox_id


def test_a_name_is_at_most_255_bytes_long() -> None:
    assert len(sandbox_dir_name("a" * 252)) == 255
    with pytest.raises(ValueError, match="too long for a cgroup name"):
        sandbox_dir_name("a" * 253)
    with pytest.raises(ValueError, match="too long for a cgroup name"):
        sandbox_dir_name("\U00010000" * 22)  # 22 x 4 bytes x 3 characters: 264 + 3


@pytest.mark.parametrize(
    "name",
    ["sandboxd-1234", "sb-", "sb-a.b", "sb-%4", "sb-%41", "sb-%zz", "cgroup.procs", "sb-%FF"],
)
def test_names_that_are_not_ours_are_left_alone(name: str) -> None:
    # "%41" is "A" spelled another way: only the one spelling is ours.
    assert sandbox_id_of(name) is None


def test_an_id_too_long_for_a_directory_name_is_refused() -> None:
    with pytest.raises(ValueError, match="too long"):
        sandbox_dir_name("é" * 50)
    with pytest.raises(ValueError, match="empty"):
        sandbox_dir_name("")


def test_the_daemon_name_is_stable_and_tells_daemons_apart() -> None:
    a = daemon_dir_name("/var/lib/sandboxd")
    assert a == daemon_dir_name("/var/lib/sandboxd")
    assert a != daemon_dir_name("/var/lib/sandboxd-2")
    assert re.fullmatch(r"sandboxd-[0-9a-f]{12}", a)


def test_proc_cgroup_of_the_hybrid_layout() -> None:
    placed = parse_proc_cgroup(HYBRID_CGROUP)
    assert placed.v2 == "/"
    assert placed.v1["memory"] == "/process_api/9e90d40e"
    assert placed.v1["pids"] == "/"
    assert placed.v1["name=systemd"] == "/"


def test_proc_cgroup_of_a_pure_v2_host() -> None:
    placed = parse_proc_cgroup("0::/system.slice/sandboxd.service\n")
    assert placed.v2 == "/system.slice/sandboxd.service" and placed.v1 == {}


def test_proc_cgroup_with_comounted_controllers() -> None:
    placed = parse_proc_cgroup("3:cpu,cpuacct:/user.slice\n0::/user.slice/x\n")
    assert placed.v1 == {"cpu": "/user.slice", "cpuacct": "/user.slice"}


def test_mountinfo_finds_cgroup_mounts_and_their_controllers() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    by_point = {m.mount_point: m for m in mounts}
    assert by_point["/sys/fs/cgroup/unified"] == CgroupMount(
        2, "/sys/fs/cgroup/unified", "/", frozenset()
    )
    assert by_point["/sys/fs/cgroup/memory"].controllers == {"memory"}
    assert "/sys/fs/cgroup/systemd" not in by_point  # a named hierarchy with no controller
    assert "/sys/fs/cgroup" not in by_point  # the tmpfs


def test_mountinfo_optional_fields_and_escapes() -> None:
    text = (
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate\n"
        "50 25 0:40 / /mnt/my\\040cgroups rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    v2, v1 = parse_mountinfo(text)
    assert v2.version == 2 and v2.mount_point == "/sys/fs/cgroup"
    assert v2.options == {"nsdelegate"}  # rw and ro are the mount's, not the hierarchy's
    assert v1.mount_point == "/mnt/my cgroups" and v1.controllers == {"cpu", "cpuacct"}


def test_dir_of_follows_the_mount_root() -> None:
    whole = CgroupMount(2, "/sys/fs/cgroup", "/", frozenset())
    assert dir_of(whole, "/") == "/sys/fs/cgroup"
    assert dir_of(whole, "/system.slice/x.service") == "/sys/fs/cgroup/system.slice/x.service"
    # A container's view: only the sub-tree under its root is there.
    part = CgroupMount(2, "/sys/fs/cgroup", "/docker/abc", frozenset())
    assert dir_of(part, "/docker/abc/app") == "/sys/fs/cgroup/app"
    assert dir_of(part, "/docker/abc") == "/sys/fs/cgroup"
    assert dir_of(part, "/docker/abcdef") is None
    assert dir_of(part, "/other") is None


def test_flat_keyed_files() -> None:
    assert parse_events("populated 1\nfrozen 0\n") == EventsState(populated=True, frozen=False)
    assert parse_events("populated 0\nfrozen 1\n") == EventsState(populated=False, frozen=True)
    oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert parse_flat_keyed(oom_control)["oom_kill"] == 3
    assert parse_flat_keyed("usage_usec 1151\nweird line here\nname x\n") == {"usage_usec": 1151}
    assert parse_procs("12\n345\n") == [12, 345]
    assert parse_limit_value("max\n") is None and parse_limit_value("1024\n") == 1024


def test_cpu_values() -> None:
    assert v2_cpu_max(None) == "max 100000"
    assert v2_cpu_max(0.5) == "50000 100000"
    assert v2_cpu_max(2) == "200000 100000"
    assert cpu_quota_usec(0.001) == 1000  # the kernel's floor
