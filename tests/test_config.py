"""Config: every key optional, every rejection names its key, before anything starts."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from sandboxd.config import Config, ConfigError, default_state_dir, load_config, parse_config


def parse(text: str) -> Config:
    return parse_config(tomllib.loads(text))


def test_no_file_is_the_embedded_default(tmp_path: Path) -> None:
    config = load_config(None)
    assert (config.host, config.port, config.on_shutdown) == ("127.0.0.1", 8765, "keep")
    assert [s.id for s in config.specs] == ["default"]
    assert config.specs[0].health_check_path == "/alive"
    assert config.sandboxes_dir == config.state_dir / "sandboxes"
    # Every key is optional: an empty file is the default (but for the spec's created_at).
    assert attrs.evolve(parse(""), specs=config.specs) == config


def test_the_default_state_dir_is_the_systems_for_root_and_the_users_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    if os.geteuid() == 0:
        # Outside /root (0700): sandboxes under uids of their own reach their working dirs.
        assert default_state_dir() == Path("/var/lib/sandboxd")
    # A user's own (as root, this branch can only be reached by pretending).
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_state_dir() == tmp_path / "sandboxd"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == Path.home() / ".local" / "state" / "sandboxd"


def test_a_full_file() -> None:
    config = parse(
        """
        [server]
        host = "0.0.0.0"
        port = 9000
        state_dir = "/var/lib/sandboxd"
        max_connections_per_user = 4
        [sandboxes]
        port_range = [20000, 20099]
        stop_timeout = 2
        on_shutdown = "stop"
        [log]
        snapshot_every = 0
        [[specs]]
        id = "web"
        command = ["python3", "-m", "http.server", "{port}"]
        initial_env = { LOG = "{sandbox_id}" }
        health_check_path = ""
        [[users]]
        id = "alice"
        token = "alice-secret-token"
        """
    )
    assert config.port_range == (20000, 20099) and config.stop_timeout == 2.0
    assert config.on_shutdown == "stop" and config.snapshot_every == 0
    assert config.max_connections_per_user == 4
    assert config.specs[0].command[-1] == "{port}"
    assert config.users[0].token_sha256 == hashlib.sha256(b"alice-secret-token").hexdigest()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[sandboxes]\nstop_timout = 1", "sandboxes.stop_timout"),
        ("[server]\nport = '8765'", "server.port"),
        ("[server]\nport = 70000", "server.port"),
        ("[server]\nmax_connections_per_user = 0", "server.max_connections_per_user"),
        ("[server]\nmax_connections_per_user = 2.5", "server.max_connections_per_user"),
        ("[server]\nmax_connections_per_user = true", "server.max_connections_per_user"),
        ("[sandboxes]\nport_range = [40000, 30000]", "sandboxes.port_range"),
        ("[sandboxes]\nmax_sandboxes = true", "sandboxes.max_sandboxes"),
        ("[sandboxes]\non_shutdown = 'pause'", "sandboxes.on_shutdown"),
        ("[[specs]]\nid = 'x'\ncommand = []", "specs[0].command"),
        ("[[specs]]\nid = 'x'\ncommand = ['a', '{prot}']", "specs[0].command[1]"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nready_timeout = 0", "specs[0].ready_timeout"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nhealth_check_path = 'x'", "health_check_path"),
        ("[[users]]\nid = 'a'", "users[0]"),
        ("[[users]]\nid = 'a'\ntoken = 'short'", "users[0].token"),
        ("[[users]]\nid = 'a'\ntoken_sha256 = 'nothex'", "users[0].token_sha256"),
        ("[surprise]\nx = 1", "surprise"),
        ("[server]\nurl_host = 'a b'", "server.url_host"),
        ("[server]\nurl_host = 'http://x'", "server.url_host"),
        ("[server]\nurl_host = '::1'", "server.url_host"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nports = []", "specs[0].ports"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nports = ['A', 1]", "specs[0].ports[1]"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nports = ['A', '9x']", "specs[0].ports[1]"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nports = ['A-B']", "specs[0].ports[0]"),
        ("[cluster]\nnode_id = 'a.b'", "cluster.node_id"),
        ("[cluster]\nnode_id = ''", "cluster.node_id"),
        ("[cluster]\nnode_id = 'a*'", "cluster.node_id"),
        ("[cluster]\nnode_id = 1", "cluster.node_id"),
        ("[cluster]\nlease_ttl = 0.5", "cluster.lease_ttl"),
        ("[cluster]\nnodes = 3", "cluster.nodes"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nidle_timeout = 0", "specs[0].idle_timeout"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nidle_timeout = -5", "specs[0].idle_timeout"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nidle_timeout = '1m'", "specs[0].idle_timeout"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\non_idle = 'stop'", "specs[0].on_idle"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nidle_cpu_seconds = 0", "idle_cpu_seconds"),
        ("[sandboxes]\nidle_check_interval = 0", "sandboxes.idle_check_interval"),
        ("[sandboxes]\nidle_check_interval = 7200", "sandboxes.idle_check_interval"),
        ("[sandboxes]\nidle_check_interval = true", "sandboxes.idle_check_interval"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse(text)


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="run_as and uid_range apply as root")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "[sandboxes]\nuid_range = [65000, 66000]",
            "sandboxes.uid_range [65000, 66000] overlaps the existing user 'nobody' (uid 65534); "
            "pick a range no account uses, or set sandboxes.allow_existing_uids = true",
            marks=ROOT_ONLY,
        ),
        pytest.param(
            "[sandboxes]\nrun_as = 'no-such-user-here'",
            "sandboxes.run_as names the user 'no-such-user-here', which does not exist",
            marks=ROOT_ONLY,
        ),
        pytest.param(
            "[sandboxes]\nmax_sandboxes = 50\nuid_range = [700000, 700009]",
            "sandboxes.uid_range [700000, 700009] holds 10 uids, fewer than max_sandboxes (50)",
            marks=ROOT_ONLY,
        ),
        ("[sandboxes]\nuid_range = [5]", "sandboxes.uid_range must be a list of two uids"),
        ("[sandboxes]\nallow_existing_uids = 'yes'", "sandboxes.allow_existing_uids must be"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nmemory_max = 0", "specs[0].memory_max must be"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\nmemory_max = -5", "specs[0].memory_max must"),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nmemory_max = '512MB'",
            "specs[0].memory_max has an unknown unit 'MB' in '512MB'",
        ),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\npids_max = 0", "specs[0].pids_max must be at"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\ncpu_max = -1", "specs[0].cpu_max must be more"),
        ("[[specs]]\nid = 'x'\ncommand = ['a']\ncpu_max = 'x'", "specs[0].cpu_max must be a"),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nlimits_required = 1",
            "specs[0].limits_required must be true or false",
        ),
        ("[sandboxes]\ncgroup = 'on'", 'sandboxes.cgroup must be "auto", "off" or an absolute'),
        (
            "[sandboxes]\ncgroup = '/no/such/dir'",
            "sandboxes.cgroup is '/no/such/dir', which is not",
        ),
        (
            "[sandboxes]\ncgroup = '/tmp'",
            "sandboxes.cgroup is '/tmp', which is not in a mounted cgroup v2 hierarchy",
        ),
    ],
)
def test_bad_boundary_settings_are_refused_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(text)
    assert str(refused.value).startswith(message), str(refused.value)


@ROOT_ONLY
def test_existing_uids_are_allowed_when_asked() -> None:
    config = parse("[sandboxes]\nuid_range = [65000, 66000]\nallow_existing_uids = true")
    assert config.uid_range == (65000, 66000) and config.allow_existing_uids


def test_limits_of_a_spec() -> None:
    config = parse(
        "[[specs]]\nid = 'x'\ncommand = ['a']\nmemory_max = '512M'\npids_max = 100\n"
        "cpu_max = 1.5\nlimits_required = true\n"
    )
    limits = config.specs[0].limits
    assert (limits.memory_max, limits.pids_max, limits.cpu_max) == (512 << 20, 100, 1.5)
    assert limits.required


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nports = ['AGENT_SERVER', 'VSCODE', 'VSCODE']",
            "specs[0].ports names the port VSCODE twice",
        ),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a', '--vscode={port_VSCODE}']",
            "specs[0].command[1] has the placeholder {port_VSCODE}, but specs[0].ports has no"
            " port VSCODE (it has: AGENT_SERVER)",
        ),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nports = ['A', 'B']\n"
            "initial_env = { W = '{port_W}' }",
            "specs[0].initial_env.W has the placeholder {port_W}, but specs[0].ports has no"
            " port W (it has: A, B)",
        ),
        (
            "[sandboxes]\nport_range = [30000, 30002]\n"
            "[[specs]]\nid = 'ok'\ncommand = ['a']\nports = ['A', 'B', 'C']\n"
            "[[specs]]\nid = 'x'\ncommand = ['a']\nports = ['A', 'B', 'C', 'D']",
            "specs[1].ports names 4 ports, more than sandboxes.port_range [30000, 30002] holds (3)",
        ),
    ],
)
def test_named_ports_are_checked_at_load(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(text)
    assert str(refused.value) == message


def test_named_ports_and_the_url_host() -> None:
    config = parse(
        """
        [server]
        url_host = "[::1]"
        [[specs]]
        id = "oh"
        command = ["agent", "--port", "{port}", "--vscode-port", "{port_VSCODE}"]
        initial_env = { WORKER_1 = "{port_WORKER_1}" }
        ports = ["AGENT_SERVER", "VSCODE", "WORKER_1", "WORKER_2"]
        """
    )
    assert config.url_host == "[::1]"
    assert config.specs[0].ports == ("AGENT_SERVER", "VSCODE", "WORKER_1", "WORKER_2")
    assert parse("[server]\nurl_host = 'sandboxes.example.com'").url_host == "sandboxes.example.com"
    assert load_config(None).specs[0].ports == ("AGENT_SERVER",)


def test_the_node_id_is_the_hosts_name_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "build-7.example.org")
    assert parse("").node_id == "build-7"
    monkeypatch.setattr(socket, "gethostname", lambda: "weird host!")
    assert parse("").node_id == "weird-host-"
    config = parse("[cluster]\nnode_id = 'node_A-1'\nlease_ttl = 3")
    assert (config.node_id, config.lease_ttl) == ("node_A-1", 3.0)


def test_missing_and_broken_files_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_serve_stops_before_starting_on_a_bad_key(tmp_path: Path) -> None:
    config = tmp_path / "sandboxd.toml"
    config.write_text("[sandboxes]\nstop_timout = 1\n")
    sandboxd = Path(sys.executable).parent / "sandboxd"
    done = subprocess.run(
        [str(sandboxd), "serve", "--config", str(config), "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert "sandboxes.stop_timout" in done.stderr
    assert not (tmp_path / "s").exists()


def test_idle_keys() -> None:
    config = parse(
        "[sandboxes]\nidle_check_interval = 2\n"
        "[[specs]]\nid = 'x'\ncommand = ['a']\nidle_timeout = 600\non_idle = 'delete'\n"
    )
    (spec,) = config.specs
    assert config.idle_check_interval == 2.0
    assert (spec.idle_timeout, spec.on_idle, spec.idle_cpu_seconds) == (600.0, "delete", 0.5)
    # The defaults: no idle timeout, and a sweep every 10 s (which then has nothing to do).
    assert Config().idle_check_interval == 10.0 and Config().specs[0].idle_timeout is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sandboxes]\nmax_running = 0", "sandboxes.max_running must be at least 1, not 0"),
        ("[sandboxes]\nmax_running = -3", "sandboxes.max_running must be at least 1, not -3"),
        ("[sandboxes]\nmax_running = 1.5", "sandboxes.max_running must be an integer, not 1.5"),
        (
            "[sandboxes]\non_full = 'pause'",
            "sandboxes.on_full must be one of 'refuse', 'pause_oldest', not 'pause'",
        ),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nrestart = 'always'",
            "specs[0].restart must be one of 'no', 'on-failure', not 'always'",
        ),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nrestart_window = 0",
            "specs[0].restart_window must be more than 0, not 0",
        ),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nrestart_max = 0",
            "specs[0].restart_max must be at least 1, not 0",
        ),
        (
            "[[specs]]\nid = 'x'\ncommand = ['a']\nrestart_max = 101",
            "specs[0].restart_max must be at most 100, not 101",
        ),
    ],
)
def test_policy_keys_are_checked_at_load(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(text)
    assert str(refused.value) == message


def test_policy_keys() -> None:
    assert (load_config(None).max_running, load_config(None).on_full) == (None, "refuse")
    config = parse(
        """
        [sandboxes]
        max_running = 4
        on_full = "pause_oldest"
        [[specs]]
        id = "x"
        command = ["a"]
        restart = "on-failure"
        restart_max = 5
        restart_window = 30
        """
    )
    assert (config.max_running, config.on_full) == (4, "pause_oldest")
    spec = config.specs[0]
    assert (spec.restart, spec.restart_max, spec.restart_window) == ("on-failure", 5, 30.0)
    assert load_config(None).specs[0].restart == "no"
