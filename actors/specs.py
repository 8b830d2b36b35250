"""Specs: what a sandbox runs, a domain type shared by the actors, the gateway and the config.

The config file fills them (daemon/config.py validates every key); the actors run them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

import attrs

from sandboxd.events.codec import now_ts

#: The placeholders a spec's command and initial_env values may use; besides these,
#: ``{port_NAME}`` for each of its named ports (``{port}`` is the first).
PLACEHOLDERS = frozenset({"port", "sandbox_id", "working_dir", "session_api_key"})
#: A named port's placeholder is ``{port_NAME}``.
PORT_PLACEHOLDER_PREFIX = "port_"
#: What a port may be called: a name that ``SANDBOX_PORT_<NAME>`` and ``{port_NAME}`` can carry.
PORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: The ports a spec names when it names none: the one its health check asks, the agent server's.
DEFAULT_PORTS = ("AGENT_SERVER",)


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
    #: The named ports each sandbox gets, each its own: the first is health-checked, is
    #: ``{port}`` and ``PORT``; every one is ``{port_NAME}`` and ``SANDBOX_PORT_NAME``.
    ports: tuple[str, ...] = DEFAULT_PORTS
    created_at: str = attrs.Factory(now_ts)

    def placeholders(self) -> frozenset[str]:
        """The placeholders its command and initial_env may use."""
        return PLACEHOLDERS | {PORT_PLACEHOLDER_PREFIX + name for name in self.ports}


def default_spec() -> SpecConfig:
    """The project's own reference agent server: works with no set-up at all."""
    return SpecConfig(
        id="default",
        command=(sys.executable, "-m", "sandboxd.actors.agent_server", "--port", "{port}"),
        health_check_path="/alive",
    )
