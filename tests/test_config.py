"""Config: every key optional, every rejection names its key, before anything starts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from sandboxd.config import Config, ConfigError, load_config, parse_config


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
    ],
)
def test_a_bad_value_is_refused_naming_its_key(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse(text)


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
