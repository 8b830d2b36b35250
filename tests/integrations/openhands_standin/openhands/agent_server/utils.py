"""Stand-in of openhands.agent_server.utils (software-agent-sdk): the one function used here."""

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)
