"""Stand-in of openhands.app_server.sandbox.sandbox_spec_service."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from openhands.app_server.errors import SandboxError
from openhands.app_server.sandbox.sandbox_spec_models import SandboxSpecInfo, SandboxSpecInfoPage
from openhands.app_server.services.injector import Injector
from openhands.sdk.utils.models import DiscriminatedUnionMixin


class SandboxSpecService(ABC):
    """Service for managing Sandbox specs (read only)."""

    @abstractmethod
    async def search_sandbox_specs(
        self, page_id: str | None = None, limit: int = 100
    ) -> SandboxSpecInfoPage:
        """Search for sandbox specs."""

    @abstractmethod
    async def get_sandbox_spec(self, sandbox_spec_id: str) -> SandboxSpecInfo | None:
        """Get a single sandbox spec, returning None if not found."""

    async def get_default_sandbox_spec(self) -> SandboxSpecInfo:
        """Get the default sandbox spec."""
        page = await self.search_sandbox_specs()
        if not page.items:
            raise SandboxError("No sandbox specs available!")
        return page.items[0]

    async def batch_get_sandbox_specs(
        self, sandbox_spec_ids: list[str]
    ) -> list[SandboxSpecInfo | None]:
        """Get a batch of sandbox specs, returning None for any not found."""
        return list(await asyncio.gather(*(self.get_sandbox_spec(i) for i in sandbox_spec_ids)))


class SandboxSpecServiceInjector(DiscriminatedUnionMixin, Injector[SandboxSpecService], ABC):
    pass
