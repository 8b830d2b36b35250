"""Limits read from a spec, and how each is enforced where a controller is or is not there."""

from __future__ import annotations

import resource
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.actors.boundary.limits import (
    Limits,
    LimitsNotEnforceable,
    format_bytes,
    parse_limits,
    parse_memory,
    plan_limits,
)

ALL = frozenset({"memory", "pids", "cpu"})


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1 << 20, 1 << 20),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("64MiB", 64 << 20),
        ("1T", 1 << 40),
        (" 256 M ", 256 << 20),
        ("4194304", 4 << 20),
    ],
)
def test_memory_sizes(value: Any, size: int) -> None:
    assert parse_memory("specs[0].memory_max", value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be more than 0"),
        (-5, "must be more than 0"),
        ("0M", "must be more than 0"),
        ("512MB", "unknown unit 'MB'"),
        ("2 gigs", "unknown unit 'gigs'"),
        ("12k", "unknown unit 'k'"),
        ("lots", "a size such as"),
        ("-1G", "a size such as"),
        (True, "bytes (an integer)"),
        (1.5, "bytes (an integer)"),
        (1000, "at least 1M"),
    ],
)
def test_bad_memory_sizes_name_the_key(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=r"^specs\[2\]\.memory_max ") as caught:
        parse_memory("specs[2].memory_max", value)
    assert message in str(caught.value)


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from(["K", "M", "G", "KiB", "GiB"]))
def test_units_are_powers_of_1024(n: int, unit: str) -> None:
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit[0]]
    if n * factor >= 1 << 20:
        assert parse_memory("k", f"{n}{unit}") == n * factor


def test_a_spec_table_gives_its_limits() -> None:
    table = {"memory_max": "512M", "pids_max": 100, "cpu_max": 1.5, "limits_required": True}
    assert parse_limits("specs[0]", table) == Limits(512 << 20, 100, 1.5, True)
    assert parse_limits("specs[0]", {"command": ["x"]}) == Limits()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"pids_max": 0}, "specs[1].pids_max must be at least 1, not 0"),
        ({"pids_max": -3}, "specs[1].pids_max must be at least 1, not -3"),
        ({"pids_max": "many"}, "specs[1].pids_max must be an integer"),
        ({"cpu_max": 0}, "specs[1].cpu_max must be more than 0, not 0"),
        ({"cpu_max": -1.0}, "specs[1].cpu_max must be more than 0"),
        ({"cpu_max": 0.001}, "specs[1].cpu_max must be at least 0.01"),
        ({"cpu_max": "2"}, "specs[1].cpu_max must be a number of CPUs"),
        ({"limits_required": "yes"}, "specs[1].limits_required must be true or false"),
    ],
)
def test_bad_limits_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_limits("specs[1]", table)
    assert str(caught.value).startswith(message)


def test_with_every_controller_the_cgroup_enforces_all() -> None:
    limits = Limits(64 << 20, 50, 0.5)
    plan = plan_limits(limits, controllers=ALL, own_uid=True, boundary="cgroup1")
    assert plan.cgroup == limits
    assert plan.rlimits == ()
    assert plan.unenforced == ()
    assert plan.notes == (
        "memory_max 64 MiB: memory controller",
        "pids_max 50: pids controller",
        "cpu_max 0.5: cpu controller",
    )


def test_without_controllers_rlimits_stand_in_where_they_fit() -> None:
    limits = Limits(64 << 20, 50, 0.5)
    plan = plan_limits(limits, controllers=frozenset(), own_uid=True, boundary="markers")
    assert plan.cgroup == Limits()
    assert plan.rlimits == ((resource.RLIMIT_DATA, 64 << 20), (resource.RLIMIT_NPROC, 50))
    assert plan.unenforced == ("cpu_max",)
    assert "RLIMIT_DATA per process" in plan.notes[0]
    assert "no rlimit caps a rate" in plan.notes[2]


def test_nproc_does_not_fit_a_shared_uid() -> None:
    plan = plan_limits(
        Limits(pids_max=50), controllers=frozenset(), own_uid=False, boundary="markers"
    )
    assert plan.rlimits == ()
    assert plan.unenforced == ("pids_max",)
    assert "RLIMIT_NPROC would count others too" in plan.notes[0]


def test_limits_required_refuses_what_cannot_be_enforced() -> None:
    limits = Limits(pids_max=50, cpu_max=1.0, required=True)
    with pytest.raises(LimitsNotEnforceable, match="pids_max and cpu_max cannot be enforced"):
        plan_limits(limits, controllers=frozenset({"memory"}), own_uid=False, boundary="cgroup1")
    # Enforced by an rlimit counts as enforced.
    plan = plan_limits(
        Limits(memory_max=1 << 30, required=True),
        controllers=frozenset(),
        own_uid=False,
        boundary="markers",
    )
    assert plan.rlimits == ((resource.RLIMIT_DATA, 1 << 30),)


def test_sizes_for_people() -> None:
    assert format_bytes(512 << 20) == "512 MiB"
    assert format_bytes(3 << 29) == "1.5 GiB"
    assert format_bytes(1000) == "1000 bytes"


def test_the_package_names_everything_and_its_pure_modules_need_no_trio() -> None:
    import sandboxd.actors.boundary as boundary

    assert all(getattr(boundary, name) is not None for name in boundary.__all__)
    # What the protocol's models reach through the specs: importable without trio.
    code = (
        "import sys; import sandboxd.actors.boundary.limits, sandboxd.actors.boundary.settings;"
        " sys.exit('trio' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
