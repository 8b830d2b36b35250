"""Stand-in of openhands.app_server.sandbox.sandbox_models: the same models and names."""

from datetime import datetime
from enum import Enum

from pydantic import BaseModel, Field

from openhands.agent_server.utils import utc_now


class SandboxStatus(Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    ERROR = "ERROR"
    MISSING = "MISSING"


class ExposedUrl(BaseModel):
    """URL to access some named service within the container."""

    name: str
    url: str
    port: int


AGENT_SERVER = "AGENT_SERVER"
VSCODE = "VSCODE"
WORKER_1 = "WORKER_1"
WORKER_2 = "WORKER_2"


class SandboxInfo(BaseModel):
    """Information about a sandbox."""

    id: str
    created_by_user_id: str | None
    sandbox_spec_id: str
    status: SandboxStatus
    session_api_key: str | None = Field(description="Only while RUNNING, and for its owner.")
    exposed_urls: list[ExposedUrl] | None = Field(default=None)
    created_at: datetime = Field(default_factory=utc_now)


class SandboxPage(BaseModel):
    items: list[SandboxInfo]
    next_page_id: str | None = None
