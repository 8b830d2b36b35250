"""Specs: what a sandbox runs, a domain type shared by the actors, the gateway and the config.

The config file fills them (daemon/config.py validates every key); the actors run them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import attrs

from sandboxd.actors.boundary.limits import Limits
from sandboxd.actors.boundary.workdirs import unreachable
from sandboxd.events.codec import now_ts

#: The placeholders a spec's command and initial_env values may use; besides these,
#: ``{port_NAME}`` for each of its named ports (``{port}`` is the first).
PLACEHOLDERS = frozenset({"port", "sandbox_id", "working_dir", "session_api_key"})
#: The system's interpreter: what a sandbox's uid runs when the daemon's own python is
#: out of its reach (a virtualenv or pyenv under /root, mode 0700).
SYSTEM_PYTHON = "/usr/bin/python3"
#: A named port's placeholder is ``{port_NAME}``.
PORT_PLACEHOLDER_PREFIX = "port_"
#: What a port may be called: a name that ``SANDBOX_PORT_<NAME>`` and ``{port_NAME}`` can carry.
PORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: The values of a spec's ``restart``.
RESTART_POLICIES = ("no", "on-failure")
#: At most this many restarts on failure in this many seconds (systemd's StartLimitBurst
#: and StartLimitIntervalSec, Erlang supervisors' intensity and period), by default.
DEFAULT_RESTART_MAX = 3
DEFAULT_RESTART_WINDOW = 60.0
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
    limits: Limits = attrs.Factory(Limits)  # memory_max, pids_max, cpu_max, limits_required
    #: The named ports each sandbox gets, each its own: the first is health-checked, is
    #: ``{port}`` and ``PORT``; every one is ``{port_NAME}`` and ``SANDBOX_PORT_NAME``.
    ports: tuple[str, ...] = DEFAULT_PORTS
    #: Seconds a RUNNING sandbox may stay idle before ``on_idle`` is done to it (None: for
    #: ever). Idle: nothing connected to its ports, and under ``idle_cpu_seconds`` of CPU
    #: used by its whole tree in each of the idle sweep's windows (actors/idle.py).
    idle_timeout: float | None = None
    on_idle: Literal["pause", "delete"] = "pause"
    idle_cpu_seconds: float = 0.5
    #: "on-failure": run the command again when its process fails (ends with a code other
    #: than 0 or by a signal, turns unhealthy, or is gone after a daemon restart), at most
    #: ``restart_max`` times in ``restart_window`` seconds, then ERROR. "no": never.
    #: See actors/restarts.py.
    restart: str = "no"
    restart_max: int = DEFAULT_RESTART_MAX
    restart_window: float = DEFAULT_RESTART_WINDOW
    created_at: str = attrs.Factory(now_ts)

    def placeholders(self) -> frozenset[str]:
        """The placeholders its command and initial_env may use."""
        return PLACEHOLDERS | {PORT_PLACEHOLDER_PREFIX + name for name in self.ports}


def not_runnable_by_others(path: str | Path) -> str | None:
    """Why a user other than the daemon's cannot run the program at ``path``; None if it can.

    Every directory on the way to it (through symlinks too) must let others
    pass, and the file itself must let others execute it. For a Python
    interpreter, its standard library must be readable too.
    """
    path = os.path.abspath(path)
    real = os.path.realpath(path)
    for where in dict.fromkeys([path, real]):
        if (blocked := unreachable(where)) is not None:
            return blocked
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        return f"{real} cannot be read: {exc.strerror}"
    if not mode & stat.S_IXOTH:
        return f"{real} is mode {stat.S_IMODE(mode):04o}: other users cannot execute it"
    return None


def _stdlib_readable_by_others() -> bool:
    stdlib = os.path.dirname(os.__file__)
    mode = os.stat(stdlib).st_mode
    return unreachable(stdlib) is None and mode & (stat.S_IROTH | stat.S_IXOTH) == (
        stat.S_IROTH | stat.S_IXOTH
    )


def python_for_sandboxes() -> str:
    """An interpreter every uid can run: the daemon's own if others can, else the system's.

    The daemon's python is tried first (the same version it was tested with); a
    virtualenv or pyenv under /root (0700) is out of a sandbox's reach, so then
    /usr/bin/python3, if others can run it. With neither, the daemon's own: a
    daemon that is not root runs sandboxes as itself anyway, and one that is
    says at start-up that the spec cannot run (see :func:`not_runnable_by_others`).
    """
    if not_runnable_by_others(sys.executable) is None and _stdlib_readable_by_others():
        return sys.executable
    if os.path.exists(SYSTEM_PYTHON) and not_runnable_by_others(SYSTEM_PYTHON) is None:
        return SYSTEM_PYTHON
    return sys.executable


def default_spec() -> SpecConfig:
    """The project's own reference agent server: works with no set-up at all.

    It is standard library only, so it is run by its file's path with an
    interpreter every uid can run (``-I``: nothing of the environment, nor the
    script's own directory, on its import path), not as ``-m sandboxd...``,
    which would need the daemon's own environment.
    """
    # Found, not imported: http.server would cost the daemon a megabyte it never uses.
    found = importlib.util.find_spec("sandboxd.actors.agent_server")
    assert found is not None and found.origin is not None
    script = os.path.realpath(found.origin)
    return SpecConfig(
        id="default",
        command=(python_for_sandboxes(), "-I", script, "--port", "{port}"),
        health_check_path="/alive",
    )
