"""What clients see of a sandbox and of a spec: the protocol's SandboxInfo and SandboxSpecInfo.

Built from the projection's record plus the session key, which is derived, never stored;
and, for ``sandbox.get`` and ``sandbox.stats`` only, what its cgroup has used.
"""

from __future__ import annotations

import attrs
import msgspec

from sandboxd.actors.boundary.cgroupfs import Usage
from sandboxd.actors.specs import SpecConfig
from sandboxd.events.projection import SandboxRecord, Status
from sandboxd.events.types import ExposedUrl


@attrs.frozen
class SandboxInfo:
    id: str
    created_by_user_id: str | None
    sandbox_spec_id: str
    status: Status
    session_api_key: str | None
    exposed_urls: list[ExposedUrl] | None
    created_at: str
    updated_at: str
    pid: int | None
    port: int
    working_dir: str
    error: str | None
    version: int
    #: Its tags (sandbox.start's labels); {} if none. An extension of protocol.md.
    labels: dict[str, str] = attrs.Factory(dict)
    #: With an idle_timeout: when its current idle period began (actors/idle.py); null while
    #: it is active, or not watched. An extension of protocol.md.
    idle_since: str | None = None
    #: Read from its cgroup for sandbox.get only (null in search and batch_get: four
    #: file reads per sandbox would break search's bound), null under markers.
    usage: Usage | None = None
    #: How many times its command was run again (sandbox.restarted: a resume of a
    #: sandbox whose process was gone, or its restart policy), since it was created.
    restarts: int = 0
    #: The node that runs it (docs/cluster.md); null for one recorded before nodes.
    node: str | None = None


@attrs.frozen
class SandboxUsage:
    """One sandbox's usage, as sandbox.stats gives it (``usage`` null under markers)."""

    id: str
    usage: Usage | None


def sandbox_info(
    record: SandboxRecord, session_api_key: str, usage: Usage | None = None
) -> SandboxInfo:
    running = record.status is Status.RUNNING
    return SandboxInfo(
        id=record.id,
        created_by_user_id=record.created_by_user_id,
        sandbox_spec_id=record.spec_id,
        status=record.status,
        session_api_key=session_api_key if running else None,
        exposed_urls=_exposed_urls(record) if running else None,
        created_at=record.created_at,
        updated_at=record.updated_at,
        pid=record.pid,
        port=record.port,
        working_dir=record.working_dir,
        error=record.error,
        version=record.version,
        labels=record.labels,
        idle_since=record.idle_since,
        usage=usage,
        restarts=record.restarts,
        node=record.node,
    )


def _exposed_urls(record: SandboxRecord) -> list[ExposedUrl]:
    """Each with its port: a URL recorded before named ports has the port of its name."""
    ports = {named.name: named.port for named in record.named_ports}
    return [
        url
        if url.port is not None
        else msgspec.structs.replace(url, port=ports.get(url.name, record.port))
        for url in record.exposed_urls
    ]


@attrs.frozen
class SpecInfo:
    id: str
    command: list[str]
    initial_env: dict[str, str]
    working_dir: str
    health_check_path: str
    ready_timeout: float
    created_at: str
    #: Its named ports, the health-checked one first (an extension of protocol.md).
    ports: list[str] = attrs.Factory(lambda: ["AGENT_SERVER"])


def spec_info(spec: SpecConfig, *, mask_values: bool) -> SpecInfo:
    env = {k: "***" for k in spec.initial_env} if mask_values else dict(spec.initial_env)
    return SpecInfo(
        id=spec.id,
        command=list(spec.command),
        initial_env=env,
        working_dir=spec.working_dir,
        health_check_path=spec.health_check_path,
        ready_timeout=spec.ready_timeout,
        created_at=spec.created_at,
        ports=list(spec.ports),
    )
