"""What a spec becomes for one sandbox: the Launch it runs, and the command the log records.

config.md's placeholders (``{port}``, ``{sandbox_id}``, ``{working_dir}``,
``{session_api_key}``), and ``{port_NAME}`` for each of the spec's named ports,
are filled in the spec's command, its ``initial_env`` values and its
``working_dir``. The environment is only what config.md allows: the variables
of ``inherit_env`` that the daemon has (but HOME, for a sandbox under a uid of
its own, is its home, not the daemon's), ``initial_env``, the client's extra
variables, then the sandbox's own (its id, its ports as ``PORT`` and
``SANDBOX_PORT_<NAME>``, its key), and the markers last so that nothing
overrides them: ``SANDBOX_ID`` always, and, under the markers boundary only,
which daemon (a hash, never the state dir's path: a sandbox is not told where
the daemon keeps its secrets).

The session key never reaches the log: the command recorded in
``sandbox.process_started`` has every placeholder filled but
``{session_api_key}``, which stays as the spec wrote it. The record still says
exactly what ran (the port, the id and the working dir are in
``sandbox.created`` too; the key is derived, never stored), without a search
for the key's value in the arguments, as masking would need.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from sandboxd.actors.boundary.confine import Confinement
from sandboxd.actors.proctree import MARKER_VAR
from sandboxd.actors.spawn import Launch
from sandboxd.actors.specs import PORT_PLACEHOLDER_PREFIX, SpecConfig
from sandboxd.events.types import NamedPort

#: The placeholder whose value is a secret: filled for the process, never in the record.
SECRET_PLACEHOLDER = "session_api_key"


#: Each named port of a sandbox is in its environment as this prefix and the port's name.
PORT_VARIABLE_PREFIX = "SANDBOX_PORT_"


@attrs.frozen
class Placeholders:
    """The values of config.md's placeholders for one sandbox."""

    ports: tuple[NamedPort, ...]  # the first is ``{port}``
    sandbox_id: str
    working_dir: str
    session_api_key: str = attrs.field(repr=False)

    @property
    def port(self) -> int:
        return self.ports[0].port

    def values(self, *, secret: bool = True) -> dict[str, str]:
        """Name -> value; without ``secret``, the key's placeholder is left out."""
        values = {
            "port": str(self.port),
            "sandbox_id": self.sandbox_id,
            "working_dir": self.working_dir,
        }
        for named in self.ports:
            values[PORT_PLACEHOLDER_PREFIX + named.name] = str(named.port)
        if secret:
            values[SECRET_PLACEHOLDER] = self.session_api_key
        return values


@attrs.frozen
class StartPlan:
    """How a sandbox is started: its Launch, and its command as the log records it."""

    launch: Launch
    recorded_command: list[str]


def plan_start(
    spec: SpecConfig,
    placeholders: Placeholders,
    *,
    environ: Mapping[str, str],
    extra_env: Mapping[str, str],
    markers: Mapping[str, str],
    home: str | None = None,
    confinement: Confinement | None = None,
) -> StartPlan:
    """The spec, filled for one sandbox. ``environ`` is the daemon's own environment;
    ``markers`` what the boundary adds; ``home`` the sandbox's HOME if not the daemon's."""
    values = placeholders.values()
    cwd = fill(spec.working_dir, values) if spec.working_dir else placeholders.working_dir
    launch = Launch(
        command=tuple(fill(arg, values) for arg in spec.command),
        env=build_env(spec, environ, extra_env, placeholders, markers, home=home),
        cwd=cwd,
        confinement=confinement or Confinement(),
    )
    public = placeholders.values(secret=False)
    return StartPlan(launch, [fill(arg, public) for arg in spec.command])


def build_env(
    spec: SpecConfig,
    environ: Mapping[str, str],
    extra: Mapping[str, str],
    placeholders: Placeholders,
    markers: Mapping[str, str],
    *,
    home: str | None = None,
) -> dict[str, str]:
    """The sandbox's environment: only what config.md allows, the markers last so they hold.

    Every descendant inherits SANDBOX_ID (which sandbox), and under the markers
    boundary SANDBOXD_DAEMON (which daemon: two daemons on one machine never take
    each other's processes for their own).
    """
    values = placeholders.values()
    env = {name: environ[name] for name in spec.inherit_env if name in environ}
    if home is not None and "HOME" in spec.inherit_env:
        env["HOME"] = home  # the sandbox's own: the daemon's (/root) is not its to use
    env.update({k: fill(v, values) for k, v in spec.initial_env.items()})
    env.update(extra)
    key = placeholders.session_api_key
    env.update(PORT=str(placeholders.port), SESSION_API_KEY=key, OH_SESSION_API_KEYS_0=key)
    env.update({PORT_VARIABLE_PREFIX + p.name: str(p.port) for p in placeholders.ports})
    env[MARKER_VAR] = placeholders.sandbox_id
    env.update(markers)
    return env


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{name}`` of ``values`` replaced; anything else left as it is."""
    # Plain replacement, not str.format: a literal "{" elsewhere in a command must survive.
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template
