"""The JetStream log's settings: the ``[log.nats]`` keys, and the subjects they imply.

Pure: the daemon's config builds these without importing nats-py.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

#: What JetStream allows in a stream name (and what a subject token may hold).
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


@attrs.frozen
class NatsSettings:
    """The ``[log.nats]`` keys (docs/cluster.md)."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    stream: str = "SANDBOXD"
    replicas: int = 3
    credentials: Path | None = None
    #: Seconds NATS has to acknowledge an append before it answers ``unavailable``.
    ack_within: float = 5.0

    def subject_of(self, sandbox_id: str | None) -> str:
        if sandbox_id is None:
            return f"{self.stream}.daemon"
        return f"{self.stream}.sandbox.{sandbox_id}"
