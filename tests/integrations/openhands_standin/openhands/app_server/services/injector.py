"""Stand-in of openhands.app_server.services.injector.

Upstream's ``InjectorState`` is starlette's ``State`` and ``Request`` is fastapi's;
this environment has neither, so two small classes of the same role stand in.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Generic, TypeAlias, TypeVar

T = TypeVar("T")


class State:
    """starlette.datastructures.State: an object that takes any attribute."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.__dict__.update(state or {})


class Request:
    """fastapi.Request, as far as injectors use it: its ``state``."""

    def __init__(self) -> None:
        self.state = State()


InjectorState: TypeAlias = State


class Injector(Generic[T], ABC):
    """Object designed to facilitate dependency injection"""

    @abstractmethod
    def inject(
        self, state: InjectorState, request: Request | None = None
    ) -> AsyncGenerator[T, None]:
        """Inject an object (an async generator yielding it once)."""

    @contextlib.asynccontextmanager
    async def context(
        self, state: InjectorState, request: Request | None = None
    ) -> AsyncIterator[T]:
        """Context function suitable for use in async with clauses"""
        async for result in self.inject(state, request):
            yield result

    async def depends(self, request: Request) -> AsyncGenerator[T, None]:
        """Depends function suitable for use with FastAPI dependency injection."""
        async for result in self.inject(request.state, request):
            yield result
