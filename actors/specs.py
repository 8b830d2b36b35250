"""Specs: what a sandbox runs, a domain type shared by the actors, the gateway and the config.

The config file fills them (daemon/config.py validates every key); the actors run them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import attrs

from sandboxd.events.codec import now_ts

#: The placeholders a spec's command and initial_env values may use.
PLACEHOLDERS = frozenset({"port", "sandbox_id", "working_dir", "session_api_key"})


@attrs.frozen
class SpecConfig:
    id: str
    command: tuple[str, ...]
    initial_env: Mapping[str, str] = attrs.Factory(dict)
    inherit_env: tuple[str, ...] = ("PATH", "HOME", "LANG")
    working_dir: str = ""
    health_check_path: str = "/"
    ready_timeout: float = 30.0
    health_interval: float = 10.0
    created_at: str = attrs.Factory(now_ts)


def default_spec() -> SpecConfig:
    """The project's own reference agent server: works with no set-up at all."""
    return SpecConfig(
        id="default",
        command=(sys.executable, "-m", "sandboxd.actors.agent_server", "--port", "{port}"),
        health_check_path="/alive",
    )
