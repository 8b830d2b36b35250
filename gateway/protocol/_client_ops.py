"""Every op of protocol.md as a typed method, over one abstract ``call``: both clients' API.

A client is this class plus a transport: the trio client (gateway/client.py)
and the asyncio one (gateway/aio_client.py) implement ``call`` (send a Call's
frame, wait for its reply, give ``Call.result``) and ``subscribe`` (which needs
connections of its own), and inherit the rest, so their methods, parameters,
result types and exceptions are the same by construction. Nothing here does
I/O or names an event loop: each method only builds its ``calls.X`` and awaits
the transport's ``call``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

from sandboxd.events.types import Event
from sandboxd.gateway.protocol import calls
from sandboxd.gateway.protocol._results import (
    EventPage,
    Logs,
    SandboxInfo,
    SandboxUsage,
    SearchPage,
    ServerDetails,
    SpecInfo,
)
from sandboxd.gateway.protocol._resume import Resumption

T = TypeVar("T")


class ClientOps(ABC):
    """The ops of protocol.md, typed; a transport supplies ``call``."""

    @abstractmethod
    async def call(self, call: calls.Call[T]) -> T:
        """Send one op and return its typed result, or raise the error of its reply."""

    async def request(self, op: str, params: Mapping[str, Any] | None = None) -> Any:
        """Any op, unchecked: its result as JSON, or the error of its reply raised."""
        return await self.call(calls.unchecked(op, params))

    # -- sandboxes ----------------------------------------------------------------------

    async def start(
        self,
        *,
        spec_id: str | None = None,
        sandbox_id: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        owner: str | None = None,
        node: str | None = None,
    ) -> SandboxInfo:
        """``owner`` (admins only): the user the sandbox is started for, and belongs to.
        ``node``: the node of a cluster to run it on (default: the least busy one)."""
        return await self.call(
            calls.start(
                spec_id=spec_id, sandbox_id=sandbox_id, env=env, wait=wait, owner=owner, node=node
            )
        )

    async def get(self, sandbox_id: str) -> SandboxInfo | None:
        return await self.call(calls.get(sandbox_id))

    async def batch_get(self, sandbox_ids: list[str]) -> list[SandboxInfo | None]:
        return await self.call(calls.batch_get(sandbox_ids))

    async def stats(self, sandbox_ids: list[str]) -> list[SandboxUsage | None]:
        """Each sandbox's usage (its cgroup's CPU, memory, processes), in the same order."""
        return await self.call(calls.stats(sandbox_ids))

    async def search(
        self,
        *,
        page_id: str | None = None,
        limit: int = 100,
        status: str | None = None,
        owner: str | None = None,
    ) -> SearchPage:
        """``owner`` (admins only): that user's sandboxes alone."""
        return await self.call(
            calls.search(page_id=page_id, limit=limit, status=status, owner=owner)
        )

    async def search_all(
        self, *, status: str | None = None, owner: str | None = None
    ) -> AsyncIterator[SandboxInfo]:
        """Every visible sandbox, newest first, page by page."""
        page_id: str | None = None
        while True:
            page = await self.search(page_id=page_id, status=status, owner=owner)
            for item in page.items:
                yield item
            if page.next_page_id is None:
                return
            page_id = page.next_page_id

    async def find_by_session_key(self, session_api_key: str) -> SandboxInfo | None:
        """The RUNNING sandbox whose session key this is, if this user sees it."""
        return await self.call(calls.find_by_session_key(session_api_key))

    async def pause(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(calls.pause(sandbox_id))

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(calls.resume(sandbox_id))

    async def delete(self, sandbox_id: str) -> bool:
        return await self.call(calls.delete(sandbox_id))

    async def logs(self, sandbox_id: str, *, tail_bytes: int = 65536) -> Logs:
        return await self.call(calls.logs(sandbox_id, tail_bytes=tail_bytes))

    # -- specs and the server -----------------------------------------------------------

    async def specs(self) -> list[SpecInfo]:
        return await self.call(calls.spec_list())

    async def spec(self, spec_id: str) -> SpecInfo | None:
        return await self.call(calls.spec_get(spec_id))

    async def server_info(self) -> ServerDetails:
        return await self.call(calls.server_info())

    # -- events -------------------------------------------------------------------------

    async def read_events(
        self,
        after_seq: int,
        *,
        limit: int = 1000,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
    ) -> EventPage[Event]:
        return await self.call(
            calls.read_events(after_seq, limit=limit, sandbox_id=sandbox_id, types=types)
        )

    @abstractmethod
    def subscribe(
        self,
        after_seq: int | None = None,
        *,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
    ) -> Any:
        """Events with seq > after_seq (None: from now on), on a connection of their own,
        resumed across drops (``Resumption``); the transport's async iterator of ``Event``s."""


class SubscriptionOps(ABC):
    """What both clients' subscriptions are, but for their I/O: where the stream is
    (``Resumption``'s), the async context and iterator protocols, and ``open``. A
    transport supplies ``_reconnect``, ``aclose`` and ``__anext__``."""

    _resumption: Resumption
    _ws: object | None
    _closed: bool

    @property
    def last_seq(self) -> int | None:
        """The seq to resume after: the last delivered, else where the stream began."""
        return self._resumption.last_seq

    @property
    def head_seq(self) -> int | None:
        """The head_seq of the first subscribe reply (None until connected)."""
        return self._resumption.head_seq

    @property
    def reconnects(self) -> int:
        return self._resumption.reconnects

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def open(self) -> None:
        """Connect and subscribe now (iterating does it on demand): ``head_seq`` is then set."""
        if self._ws is None and not self._closed:
            await self._reconnect()

    @abstractmethod
    async def aclose(self) -> None: ...

    @abstractmethod
    async def _reconnect(self) -> None: ...
