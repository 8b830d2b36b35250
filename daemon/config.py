"""The daemon's configuration: spec/config.md, read strictly.

Every key is optional. An unknown key, a wrong type or an impossible value
raises ``ConfigError`` naming the key, before anything starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

from sandboxd.actors.boundary.identities import DEFAULT_UID_RANGE
from sandboxd.actors.boundary.limits import Limits, parse_cpu, parse_memory, parse_pids
from sandboxd.actors.boundary.settings import (
    SANDBOXES_KEYS,
    BoundarySettings,
    parse_boundary_settings,
)
from sandboxd.actors.specs import (
    DEFAULT_PORTS,
    PLACEHOLDERS,
    PORT_NAME,
    PORT_PLACEHOLDER_PREFIX,
    RESTART_POLICIES,
    SpecConfig,
    default_spec,
)
from sandboxd.events.nats.settings import STREAM_NAME, NatsSettings
from sandboxd.events.projection import MAX_FAILURE_RESTARTS

T = TypeVar("T")

SPEC_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_PORT_RANGE = (30000, 39999)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


#: Where a daemon run by root keeps its state: a system service's place, outside /root
#: (mode 0700), so that sandboxes under uids of their own can reach their working dirs.
SYSTEM_STATE_DIR = Path("/var/lib/sandboxd")


def default_state_dir() -> Path:
    """/var/lib/sandboxd for root; else ``$XDG_STATE_HOME/sandboxd`` or ~/.local/state/sandboxd.

    The daemon and the CLI both call it, so `sandboxd ls` finds the admin token
    wherever `sandboxd serve` made it for the same user.
    """
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sandboxd"


DEFAULT_MAX_SANDBOXES = 1000

#: A node id names NATS subjects and KV keys (docs/cluster.md), where "." separates tokens
#: and "*", ">" and blanks are wildcards or invalid: so none of them.
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def default_node_id() -> str:
    """The host's name up to its first dot, each character a node id cannot hold made "-"."""
    name = socket.gethostname().split(".", 1)[0][:64]
    return re.sub(r"[^A-Za-z0-9_-]", "-", name) or "node"


@attrs.frozen
class UserConfig:
    id: str
    token_sha256: str  # only the digest is kept in memory
    admin: bool = False


@attrs.frozen
class Config:
    host: str = "127.0.0.1"
    port: int = 8765
    state_dir: Path = attrs.Factory(default_state_dir)
    max_connections_per_user: int = 16  # open websockets per user (docs/operations.md)
    url_host: str = "127.0.0.1"  # the host written into sandboxes' exposed URLs
    base_working_dir: Path | None = None  # None: STATE_DIR/sandboxes
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    stop_timeout: float = 10.0
    max_sandboxes: int = DEFAULT_MAX_SANDBOXES
    max_sandboxes_per_user: int = 100
    on_shutdown: Literal["keep", "stop"] = "keep"
    #: Sandboxes one user (the admin: those it owns) may have running at once; None: no
    #: limit. A start or resume past it is refused, or first pauses the user's oldest
    #: RUNNING ones (on_full).
    max_running: int | None = None
    on_full: Literal["refuse", "pause_oldest"] = "refuse"
    # The boundary (docs/boundary.md), kept as written; see boundary_settings.
    cgroup: Literal["auto", "off"] | Path = "auto"
    run_as: str | None = None  # None: "dynamic" when the daemon is root, else "daemon"
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    allow_existing_uids: bool = False
    # The project's own keys (docs/operations.md):
    output_cap_bytes: int = 8 << 20  # per sandbox, before its one rotation
    unhealthy_after: int = 3  # failed liveness probes in a row before ERROR
    shutdown_grace: float = 10.0  # seconds for in-flight ops on SIGTERM
    idle_check_interval: float = 10.0  # seconds between idle sweeps (actors/idle.py)
    segment_bytes: int = 64 << 20
    snapshot_every: int = 10_000
    retention: Literal["all", "snapshots"] = "all"
    #: [log] backend = "nats": the JetStream log ([log.nats], docs/cluster.md); else None.
    nats: NatsSettings | None = None
    metrics_public: bool = False  # GET /metrics without the admin token
    metrics_per_sandbox: bool = False  # series labelled by sandbox id (unbounded)
    specs: tuple[SpecConfig, ...] = attrs.Factory(lambda: (default_spec(),))
    users: tuple[UserConfig, ...] = ()
    # A cluster's (docs/cluster.md):
    node_id: str = attrs.Factory(default_node_id)  # this daemon's name among its peers
    lease_ttl: float = 3.0  # seconds a node's lease lasts unless renewed (failover within ~4 s)

    @property
    def sandboxes_dir(self) -> Path:
        return self.base_working_dir or self.state_dir / "sandboxes"

    @property
    def boundary_settings(self) -> BoundarySettings:
        return BoundarySettings(self.cgroup, self.run_as, self.uid_range, self.allow_existing_uids)

    def with_overrides(
        self, *, state_dir: Path | None = None, host: str | None = None, port: int | None = None
    ) -> Config:
        changes: dict[str, Any] = {}
        if state_dir is not None:
            changes["state_dir"] = state_dir
        if host is not None:
            changes["host"] = host
        if port is not None:
            _listen_port("--port", port)
            changes["port"] = port
        return attrs.evolve(self, **changes)


# -- validation: small checks, each naming the key it rejects ---------------------------


def _expect(key: str, value: Any, kind: type[T], what: str) -> T:
    # bool is an int in Python, never in a config file.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {what}, not {value!r}")
    return value


def _number(key: str, value: Any, *, minimum: float, allow_min: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, not {value!r}")
    if value < minimum or (value == minimum and not allow_min):
        bound = "at least" if allow_min else "more than"
        raise ConfigError(f"{key} must be {bound} {minimum}, not {value!r}")
    return float(value)


def _interval(key: str, value: Any, *, low: float, high: float) -> float:
    seconds = _number(key, value, minimum=low)
    if seconds > high:
        raise ConfigError(f"{key} must be at most {high:g} seconds, not {value!r}")
    return seconds


def _count(key: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    _expect(key, value, int, "an integer")
    if value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, not {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be at most {maximum}, not {value!r}")
    return int(value)


def _port(key: str, value: Any, *, minimum: int = 1) -> int:
    _expect(key, value, int, "an integer")
    if not minimum <= value <= 65535:
        raise ConfigError(f"{key} must be a port from {minimum} to 65535, not {value!r}")
    return int(value)


def _listen_port(key: str, value: Any) -> int:
    return _port(key, value, minimum=0)  # 0: any free port, the daemon logs which


def _path(key: str, value: Any) -> Path:
    text = _expect(key, value, str, "a path")
    if not text:
        raise ConfigError(f"{key} must not be empty")
    return Path(text).expanduser()


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, not {value!r}")
    return str(value)


def _strings(key: str, value: Any) -> tuple[str, ...]:
    items = _expect(key, value, list, "a list of strings")
    for i, item in enumerate(items):
        _expect(f"{key}[{i}]", item, str, "a string")
    return tuple(items)


def _env(key: str, value: Any) -> dict[str, str]:
    table = _expect(key, value, dict, "a table of strings")
    for name, item in table.items():
        _expect(f"{key}.{name}", item, str, "a string")
    return dict(table)


def _check_placeholders(key: str, text: str, ports: tuple[str, ...], ports_key: str) -> None:
    for name in re.findall(r"\{([^{}]*)\}", text):
        if name in PLACEHOLDERS:
            continue
        if name.startswith(PORT_PLACEHOLDER_PREFIX):
            port = name.removeprefix(PORT_PLACEHOLDER_PREFIX)
            if port not in ports:
                raise ConfigError(
                    f"{key} has the placeholder {{{name}}}, but {ports_key} has no port {port}"
                    f" (it has: {', '.join(ports)})"
                )
            continue
        known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
        raise ConfigError(
            f"{key} has an unknown placeholder {{{name}}}; known: {known}, and"
            f" {{{PORT_PLACEHOLDER_PREFIX}NAME}} for each name of {ports_key}"
        )


def _port_names(key: str, value: Any) -> tuple[str, ...]:
    names = _strings(key, value)
    if not names:
        raise ConfigError(f"{key} must name at least one port (the first is health-checked)")
    for i, name in enumerate(names):
        if not PORT_NAME.fullmatch(name):
            raise ConfigError(
                f"{key}[{i}] must be 1 to 64 of A-Z a-z 0-9 _, not starting with a digit,"
                f" not {name!r}"
            )
        if name in names[:i]:
            raise ConfigError(f"{key} names the port {name} twice")
    return names


def _url_host(key: str, value: Any) -> str:
    host = _expect(key, value, str, "a host name or address")
    # What goes between "http://" and ":PORT": a name, an IPv4 address, or [an IPv6 one].
    if not re.fullmatch(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]", host):
        raise ConfigError(
            f"{key} must be a host name, an IPv4 address or a bracketed IPv6 address"
            f" such as [::1], not {host!r}"
        )
    return host


def _from_value_error(parse: Callable[[str, Any], T]) -> Callable[[str, Any], T]:
    """A parser of the boundary modules (ValueError naming the key), raising ConfigError."""

    def check(key: str, value: Any) -> T:
        try:
            return parse(key, value)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    return check


def _table(key: str, raw: Any, checks: Mapping[str, Callable[[str, Any], Any]]) -> dict[str, Any]:
    table = _expect(key, raw, dict, "a table")
    unknown = sorted(set(table) - set(checks))
    if unknown:
        known = ", ".join(sorted(checks))
        raise ConfigError(f"unknown key {key}.{unknown[0]}; known keys are: {known}")
    return {name: checks[name](f"{key}.{name}", value) for name, value in table.items()}


def _port_range(key: str, value: Any) -> tuple[int, int]:
    items = _expect(key, value, list, "a list of two ports")
    if len(items) != 2:
        raise ConfigError(f"{key} must be a list of two ports [low, high], not {value!r}")
    low, high = _port(f"{key}[0]", items[0]), _port(f"{key}[1]", items[1])
    if low > high:
        raise ConfigError(f"{key} must be [low, high] with low <= high, not {value!r}")
    return low, high


_SERVER = {
    "host": lambda k, v: _expect(k, v, str, "a host name or address"),
    "port": _listen_port,
    "state_dir": _path,
    "max_connections_per_user": _count,
    "metrics_public": lambda k, v: _expect(k, v, bool, "true or false"),
    "metrics_per_sandbox": lambda k, v: _expect(k, v, bool, "true or false"),
    "url_host": _url_host,
}
_SANDBOXES = {
    "base_working_dir": _path,
    "port_range": _port_range,
    "stop_timeout": lambda k, v: _number(k, v, minimum=0),
    "max_sandboxes": _count,
    "max_sandboxes_per_user": _count,
    "on_shutdown": lambda k, v: _choice(k, v, ("keep", "stop")),
    "max_running": _count,
    "on_full": lambda k, v: _choice(k, v, ("refuse", "pause_oldest")),
    "output_cap_bytes": lambda k, v: _count(k, v, minimum=4096),
    "unhealthy_after": _count,
    "shutdown_grace": lambda k, v: _number(k, v, minimum=0),
    "idle_check_interval": lambda k, v: _interval(k, v, low=0.05, high=3600),
    # Checked together by parse_boundary_settings, once the table's other keys are known.
    **{name: lambda k, v: v for name in SANDBOXES_KEYS},
}


def _nats_urls(key: str, value: Any) -> tuple[str, ...]:
    urls = _strings(key, value)
    if not urls:
        raise ConfigError(f"{key} must name at least one NATS server, such as nats://host:4222")
    for i, url in enumerate(urls):
        if not re.fullmatch(r"(nats|tls|ws|wss)://([^/@\s]+@)?[^/\s:]+(:\d{1,5})?/?", url):
            raise ConfigError(
                f"{key}[{i}] must be a server URL such as nats://127.0.0.1:4222, not {url!r}"
            )
    return urls


def _stream_name(key: str, value: Any) -> str:
    name = _expect(key, value, str, "a stream name")
    if not STREAM_NAME.fullmatch(name):
        raise ConfigError(f"{key} must be 1 to 32 of A-Z a-z 0-9 _ -, not {name!r}")
    return name


def _replicas(key: str, value: Any) -> int:
    _expect(key, value, int, "an integer")
    if not 1 <= value <= 5:
        raise ConfigError(f"{key} must be from 1 to 5 (JetStream's limit), not {value!r}")
    return int(value)


def _readable_file(key: str, value: Any) -> Path:
    path = _path(key, value)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path} cannot be read: {exc.strerror or exc}") from None
    return path


_NATS = {
    "servers": _nats_urls,
    "stream": _stream_name,
    "replicas": _replicas,
    "credentials": _readable_file,
    "ack_within": lambda k, v: _number(k, v, minimum=0, allow_min=False),
}


def _nats(key: str, value: Any) -> NatsSettings:
    return NatsSettings(**_table(key, value, _NATS))


_LOG = {
    "segment_bytes": lambda k, v: _count(k, v, minimum=4096),
    "snapshot_every": lambda k, v: _count(k, v, minimum=0),
    "retention": lambda k, v: _choice(k, v, ("all", "snapshots")),
    "backend": lambda k, v: _choice(k, v, ("file", "nats")),
    "nats": _nats,
}


def _node_id(key: str, value: Any) -> str:
    text = _expect(key, value, str, "a string")
    if not NODE_ID_PATTERN.fullmatch(text):
        raise ConfigError(
            f"{key} must be 1 to 64 of A-Z a-z 0-9 _ - (it names NATS subjects), not {text!r}"
        )
    return text


_CLUSTER = {
    "node_id": _node_id,
    # Renewed every third of it: a node is declared lost within one TTL of its death.
    "lease_ttl": lambda k, v: _number(k, v, minimum=1),
}
#: Which section of the file each Config field is read from (specs and users aside).
SECTION_KEYS: Mapping[str, frozenset[str]] = {
    "server": frozenset(_SERVER),
    "sandboxes": frozenset(_SANDBOXES),
    "log": frozenset(_LOG),
    "cluster": frozenset(_CLUSTER),
}
_SPEC = {
    "id": lambda k, v: _expect(k, v, str, "a string"),
    "command": _strings,
    "initial_env": _env,
    "inherit_env": _strings,
    "working_dir": lambda k, v: _expect(k, v, str, "a path or an empty string"),
    "health_check_path": lambda k, v: _expect(k, v, str, "a path such as /health, or empty"),
    "ready_timeout": lambda k, v: _number(k, v, minimum=0, allow_min=False),
    "health_interval": lambda k, v: _number(k, v, minimum=0),
    "memory_max": _from_value_error(parse_memory),
    "pids_max": _from_value_error(parse_pids),
    "cpu_max": _from_value_error(parse_cpu),
    "limits_required": lambda k, v: _expect(k, v, bool, "true or false"),
    "ports": _port_names,
    "idle_timeout": lambda k, v: _number(k, v, minimum=0, allow_min=False),
    "on_idle": lambda k, v: _choice(k, v, ("pause", "delete")),
    "idle_cpu_seconds": lambda k, v: _number(k, v, minimum=0, allow_min=False),
    "restart": lambda k, v: _choice(k, v, RESTART_POLICIES),
    "restart_max": lambda k, v: _count(k, v, maximum=MAX_FAILURE_RESTARTS),
    "restart_window": lambda k, v: _number(k, v, minimum=0, allow_min=False),
}
#: The spec keys that make its Limits.
_LIMIT_KEYS = ("memory_max", "pids_max", "cpu_max")
_USER = {
    "id": lambda k, v: _expect(k, v, str, "a string"),
    "token": lambda k, v: _expect(k, v, str, "a string"),
    "token_sha256": lambda k, v: _expect(k, v, str, "a hex SHA-256 digest"),
    "admin": lambda k, v: _expect(k, v, bool, "true or false"),
}


def _spec(key: str, raw: Any) -> SpecConfig:
    fields = _table(key, raw, _SPEC)
    if "id" not in fields or not SPEC_ID_PATTERN.fullmatch(fields["id"]):
        raise ConfigError(f"{key}.id must be 1 to 64 of A-Z a-z 0-9 _ . -")
    if not fields.get("command"):
        raise ConfigError(f"{key}.command must be a non-empty list of strings")
    ports: tuple[str, ...] = fields.get("ports", DEFAULT_PORTS)
    for i, arg in enumerate(fields["command"]):
        _check_placeholders(f"{key}.command[{i}]", arg, ports, f"{key}.ports")
    for name, value in fields.get("initial_env", {}).items():
        _check_placeholders(f"{key}.initial_env.{name}", value, ports, f"{key}.ports")
    path = fields.get("health_check_path", "/")
    if path and not path.startswith("/"):
        raise ConfigError(f"{key}.health_check_path must start with / (or be empty), not {path!r}")
    limits = Limits(
        **{name: fields.pop(name) for name in _LIMIT_KEYS if name in fields},
        required=fields.pop("limits_required", False),
    )
    return SpecConfig(**fields, limits=limits)


def _user(key: str, raw: Any) -> UserConfig:
    fields = _table(key, raw, _USER)
    if not fields.get("id"):
        raise ConfigError(f"{key}.id is required")
    token, digest = fields.pop("token", None), fields.pop("token_sha256", None)
    if (token is None) == (digest is None):
        raise ConfigError(f"{key} needs exactly one of token or token_sha256")
    if token is not None:
        if len(token) < 16:
            raise ConfigError(f"{key}.token must be at least 16 characters")
        digest = hashlib.sha256(token.encode()).hexdigest()
    elif not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ConfigError(f"{key}.token_sha256 must be 64 hex digits")
    return UserConfig(token_sha256=digest.lower(), **fields)


def _log(raw: Any) -> dict[str, Any]:
    """The [log] table: the file log's keys, and the JetStream log's if it is the backend."""
    fields = _table("log", raw, _LOG)
    backend = fields.pop("backend", "file")
    nats = fields.pop("nats", None)
    if backend == "file":
        if nats is not None:
            raise ConfigError(
                'log.nats is set, but log.backend is "file": set log.backend = "nats"'
            )
        return fields
    if fields.get("retention", "all") != "all":
        raise ConfigError(
            'log.retention must be "all" with log.backend = "nats": the stream is shared by'
            " every node, so it is the stream's own limits that retain, not one node"
        )
    return fields | {"nats": nats or NatsSettings()}


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Build a ``Config`` from a parsed TOML document."""
    sections = {"server", "sandboxes", "log", "cluster", "specs", "users"}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]}; known sections are: {', '.join(sorted(sections))}"
        )
    values: dict[str, Any] = {}
    values |= _table("server", raw.get("server", {}), _SERVER)
    values |= _table("sandboxes", raw.get("sandboxes", {}), _SANDBOXES)
    try:
        boundary = parse_boundary_settings(
            "sandboxes",
            raw.get("sandboxes", {}),
            max_sandboxes=values.get("max_sandboxes", DEFAULT_MAX_SANDBOXES),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    values |= attrs.asdict(boundary, recurse=False)
    values |= _log(raw.get("log", {}))
    values |= _table("cluster", raw.get("cluster", {}), _CLUSTER)
    if "specs" in raw:
        specs_raw = _expect("specs", raw["specs"], list, "an array of tables ([[specs]])")
        specs = tuple(_spec(f"specs[{i}]", s) for i, s in enumerate(specs_raw))
        if not specs:
            raise ConfigError("specs must hold at least one spec, or be left out")
        ids = [s.id for s in specs]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"specs has two specs with id {duplicate!r}")
        values["specs"] = specs
    low, high = values.get("port_range", DEFAULT_PORT_RANGE)
    for i, spec in enumerate(values.get("specs", ())):
        if len(spec.ports) > high - low + 1:
            raise ConfigError(
                f"specs[{i}].ports names {len(spec.ports)} ports, more than"
                f" sandboxes.port_range [{low}, {high}] holds ({high - low + 1})"
            )
    if "users" in raw:
        users_raw = _expect("users", raw["users"], list, "an array of tables ([[users]])")
        users = tuple(_user(f"users[{i}]", u) for i, u in enumerate(users_raw))
        ids = [u.id for u in users]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"users has two users with id {duplicate!r}")
        values["users"] = users
    return Config(**values)


def load_config(path: Path | None) -> Config:
    """Read ``path`` (or the embedded default when None)."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(raw)
