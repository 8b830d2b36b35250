"""Stand-in of openhands.app_server.sandbox.sandbox_service: ``SandboxService`` with upstream's
abstract and concrete methods, their exact signatures, and the behaviour upstream's
concrete ones document (written here, not copied); its injector base; the variables the
app passes to a sandbox."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod

import httpx

from openhands.app_server.errors import SandboxError
from openhands.app_server.sandbox.sandbox_models import (
    AGENT_SERVER,
    SandboxInfo,
    SandboxPage,
    SandboxStatus,
)
from openhands.app_server.services.injector import Injector
from openhands.sdk.utils.models import DiscriminatedUnionMixin
from openhands.sdk.utils.paging import page_iterator

SESSION_API_KEY_VARIABLE = "OH_SESSION_API_KEYS_0"
WEBHOOK_CALLBACK_VARIABLE = "OH_WEBHOOKS_0_BASE_URL"
ALLOW_CORS_ORIGINS_VARIABLE = "OH_ALLOW_CORS_ORIGINS_0"


class SandboxService(ABC):
    """Service for accessing sandboxes in which conversations may be run."""

    @abstractmethod
    async def search_sandboxes(
        self,
        page_id: str | None = None,
        limit: int = 100,
    ) -> SandboxPage:
        """Search for sandboxes."""

    @abstractmethod
    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo | None:
        """Get a single sandbox. Return None if the sandbox was not found."""

    @abstractmethod
    async def get_sandbox_by_session_api_key(self, session_api_key: str) -> SandboxInfo | None:
        """Get a single sandbox by session API key. Return None if not found."""

    async def batch_get_sandboxes(self, sandbox_ids: list[str]) -> list[SandboxInfo | None]:
        """Get a batch of sandboxes, returning None for any which were not found."""
        return list(await asyncio.gather(*(self.get_sandbox(i) for i in sandbox_ids)))

    @abstractmethod
    async def start_sandbox(
        self,
        sandbox_spec_id: str | None = None,
        sandbox_id: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> SandboxInfo:
        """Begin the process of starting a sandbox; the default spec if none is given."""

    @abstractmethod
    async def resume_sandbox(self, sandbox_id: str) -> bool:
        """True if the sandbox exists and is being resumed or already runs; else False."""

    async def wait_for_sandbox_running(
        self,
        sandbox_id: str,
        timeout: int = 120,  # noqa: ASYNC109  # upstream's signature
        poll_interval: int = 2,
        httpx_client: httpx.AsyncClient | None = None,
    ) -> SandboxInfo:
        """Wait until RUNNING (and, given httpx_client, its agent server answers /alive).

        Raises SandboxError if the sandbox is missing, enters ERROR, or is not
        RUNNING within ``timeout``. Upstream polls every ``poll_interval`` s.
        """
        began = time.monotonic()
        while time.monotonic() - began <= timeout:
            sandbox = await self.get_sandbox(sandbox_id)
            if sandbox is None:
                raise SandboxError(f"Sandbox not found: {sandbox_id}")
            if sandbox.status == SandboxStatus.ERROR:
                raise SandboxError(f"Sandbox entered error state: {sandbox_id}")
            if sandbox.status == SandboxStatus.RUNNING:
                if httpx_client is None or not sandbox.exposed_urls:
                    return sandbox
                urls = [u.url for u in sandbox.exposed_urls if u.name == AGENT_SERVER]
                try:
                    answer = await httpx_client.get(f"{urls[0].rstrip('/')}/alive", timeout=5)
                    if answer.is_success:
                        return sandbox
                except (httpx.HTTPError, IndexError):
                    pass
            await asyncio.sleep(poll_interval)
        raise SandboxError(f"Sandbox failed to start within {timeout}s: {sandbox_id}")

    @abstractmethod
    async def pause_sandbox(self, sandbox_id: str) -> bool:
        """True if the sandbox exists and is being paused or already is; else False."""

    @abstractmethod
    async def delete_sandbox(self, sandbox_id: str) -> bool:
        """Begin deleting a sandbox (stopping it first); False if it did not exist."""

    async def pause_old_sandboxes(self, max_num_sandboxes: int) -> list[str]:
        """Pause the oldest RUNNING sandboxes beyond the newest ``max_num_sandboxes``
        (the current user's only); return the ids paused."""
        if max_num_sandboxes <= 0:
            raise ValueError("max_num_sandboxes must be greater than 0")
        running = [
            sandbox
            async for sandbox in page_iterator(self.search_sandboxes, limit=100)
            if sandbox.status == SandboxStatus.RUNNING
        ]
        if len(running) <= max_num_sandboxes:
            return []
        running.sort(key=lambda sandbox: sandbox.created_at)
        paused = []
        for sandbox in running[: len(running) - max_num_sandboxes]:
            try:
                if await self.pause_sandbox(sandbox.id):
                    paused.append(sandbox.id)
            except Exception:
                pass  # upstream goes on with the others
        return paused


class SandboxServiceInjector(DiscriminatedUnionMixin, Injector[SandboxService], ABC):
    pass
