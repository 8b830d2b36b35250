"""The suites' config file says exactly what their Config says (tests/daemon_process.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs

from sandboxd.actors.boundary.limits import Limits
from sandboxd.actors.specs import SpecConfig
from sandboxd.config import Config, parse_config
from sandboxd.events.nats.settings import NatsSettings
from tests.daemon_process import config_toml, daemon_config


def without_created_at(config: Config) -> Config:
    return attrs.evolve(config, specs=tuple(attrs.evolve(s, created_at="") for s in config.specs))


def test_config_toml_round_trips_every_key(tmp_path: Path) -> None:
    specs = (
        SpecConfig(id="plain", command=("sleep", "1")),
        SpecConfig(
            id="full",
            command=("python3", "-c", 'print("{port}")', "{session_api_key}"),
            initial_env={"A": "1", "WITH SPACE": 'quote " and \\ slash', "UNICODE": "é"},
            inherit_env=("PATH",),
            working_dir=str(tmp_path / "shared"),
            health_check_path="",
            ready_timeout=2.5,
            health_interval=0.0,
            limits=Limits(memory_max=64 << 20, pids_max=50, cpu_max=0.5, required=True),
            ports=("AGENT_SERVER", "VSCODE"),
            idle_timeout=30.0,
            on_idle="delete",
            idle_cpu_seconds=0.25,
            restart="on-failure",
            restart_max=7,
            restart_window=2.5,
        ),
        SpecConfig(id="some-limits", command=("true",), limits=Limits(pids_max=3)),
    )
    # Every field away from its default, so that a key the writer forgets shows.
    config = daemon_config(
        tmp_path / "state",
        specs,
        port=4321,
        max_connections_per_user=9,
        metrics_public=True,
        metrics_per_sandbox=True,
        url_host="sandboxes.example.com",
        base_working_dir=tmp_path / "work",
        port_range=(31000, 31010),
        stop_timeout=1.5,
        max_sandboxes=7,
        max_sandboxes_per_user=3,
        on_shutdown="stop",
        max_running=2,
        on_full="pause_oldest",
        output_cap_bytes=8192,
        unhealthy_after=5,
        shutdown_grace=0.5,
        segment_bytes=4096,
        snapshot_every=0,
        retention="snapshots",
        cgroup="off",
        run_as="daemon",
        uid_range=(700000, 700099),
        allow_existing_uids=True,
        node_id="node-x",
        lease_ttl=2.5,
        idle_check_interval=2.5,
    )
    defaults = Config()
    for field in attrs.fields(Config):
        # nats: with retention "snapshots" it cannot be; the next test round-trips it.
        if field.name not in ("host", "nats"):
            assert getattr(config, field.name) != getattr(defaults, field.name), field.name
    parsed = parse_config(tomllib.loads(config_toml(config)))
    assert without_created_at(parsed) == without_created_at(config)


def test_config_toml_round_trips_the_nats_keys(tmp_path: Path) -> None:
    credentials = tmp_path / "user.creds"
    credentials.write_text("not checked here, only that it can be read")
    nats = NatsSettings(("nats://10.0.0.1:4222", "tls://h:4443"), "EV", 5, credentials, 2.5)
    config = daemon_config(tmp_path / "state", (), nats=nats)
    parsed = parse_config(tomllib.loads(config_toml(config)))
    assert parsed.nats == nats
