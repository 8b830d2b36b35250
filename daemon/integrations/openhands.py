"""sandboxd as the sandbox service of an OpenHands app server.

    OH_SANDBOX_KIND=sandboxd.integrations.openhands.SandboxdSandboxServiceInjector
    OH_SANDBOX_URL=ws://127.0.0.1:8765/v1
    OH_SANDBOX_TOKEN=...            # an admin's: OpenHands' users own their sandboxes

``SandboxdSandboxService`` implements OpenHands' ``SandboxService`` (every
method, upstream's signatures) over ``sandboxd.aio``; its injector gives each
request a service for the request's user over one connection per process;
``SandboxdSandboxSpecService`` lists sandboxd's specs. docs/openhands.md says
how to set an app server up, and what maps to what.

This module imports OpenHands (Python 3.12+), so only an OpenHands process
imports it; nothing else of sandboxd does. Its tests run it against a
stand-in of the upstream modules (tests/integrations/openhands_standin/),
driving a real daemon.

Acting for OpenHands' users: OpenHands knows its users per request, sandboxd
knows its own from its config. The service connects as a sandboxd admin and
names the request's user as the ``owner`` of the sandboxes it starts and
lists; sandboxd then treats them as that user's (``created_by_user_id``,
per-user limits), and the service shows a user only its own: another user's
sandbox is one that does not exist (None, False), as sandboxd shows its own
users.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any, ClassVar, Final
from urllib.parse import urlencode

try:
    import httpx
    from openhands.app_server.errors import SandboxError
    from openhands.app_server.sandbox.sandbox_models import (
        AGENT_SERVER,
        VSCODE,
        ExposedUrl,
        SandboxInfo,
        SandboxPage,
        SandboxStatus,
    )
    from openhands.app_server.sandbox.sandbox_service import (
        ALLOW_CORS_ORIGINS_VARIABLE,
        WEBHOOK_CALLBACK_VARIABLE,
        SandboxService,
        SandboxServiceInjector,
    )
    from openhands.app_server.sandbox.sandbox_spec_models import (
        SandboxSpecInfo,
        SandboxSpecInfoPage,
    )
    from openhands.app_server.sandbox.sandbox_spec_service import (
        SandboxSpecService,
        SandboxSpecServiceInjector,
    )
    from openhands.app_server.services.injector import InjectorState
    from pydantic import Field, SecretStr
except ImportError as missing:  # pragma: no cover - OpenHands is not installed here
    raise ImportError(
        "sandboxd.integrations.openhands runs inside an OpenHands app server (Python 3.12+"
        f" with OpenHands installed), which this environment lacks: {missing}"
    ) from missing

import sandboxd.aio
from sandboxd.events.projection import Status
from sandboxd.events.types import ExposedUrl as ExposedUrlOfSandboxd
from sandboxd.gateway import protocol as p

log = logging.getLogger(__name__)

DEFAULT_URL: Final = "ws://127.0.0.1:8765/v1"
#: protocol.md's largest search page and batch.
PAGE: Final = 100
#: The events after which a sandbox's status may differ: what a wait wakes on.
STATUS_EVENTS: Final = [
    "sandbox.running",
    "sandbox.start_failed",
    "sandbox.unhealthy",
    "sandbox.healthy",
    "sandbox.exited",
    "sandbox.missing",
    "sandbox.paused",
    "sandbox.resumed",
    "sandbox.restarted",
    "sandbox.deleted",
]


# --- What maps to what ----------------------------------------------------------------------


def _sandbox(info: p.SandboxInfo) -> SandboxInfo:
    urls = info.exposed_urls
    return SandboxInfo(
        id=info.id,
        created_by_user_id=info.created_by_user_id,
        sandbox_spec_id=info.sandbox_spec_id,
        status=SandboxStatus(info.status.value),
        session_api_key=info.session_api_key,
        exposed_urls=None
        if urls is None
        else [
            ExposedUrl(
                name=url.name,
                url=_url(info, url),
                # A daemon from before named ports sends no port: its one URL is the sandbox's.
                port=info.port if url.port is None else url.port,
            )
            for url in urls
        ],
        created_at=datetime.fromisoformat(info.created_at),
    )


def _url(info: p.SandboxInfo, url: ExposedUrlOfSandboxd) -> str:
    """The URL as OpenHands' clients open it: VS Code's with its connection token and
    folder, as OpenHands' own services give it (sandboxd's log holds no key, so neither
    does the URL it records)."""
    if url.name != VSCODE or not info.session_api_key:
        return url.url
    query = urlencode({"tkn": info.session_api_key, "folder": info.working_dir})
    return f"{url.url.rstrip('/')}/?{query}"


def _spec(spec: p.SpecInfo) -> SandboxSpecInfo:
    return SandboxSpecInfo(
        id=spec.id,
        command=spec.command,
        created_at=datetime.fromisoformat(spec.created_at),
        initial_env=spec.initial_env,
        working_dir=spec.working_dir,
    )


@contextmanager
def _translated(doing: str) -> Iterator[None]:
    """sandboxd's errors as OpenHands' callers expect them: SandboxError for what the
    sandbox or the daemon refused, with sandboxd's own sentence; ValueError for a bad
    argument. (Not found is each method's own answer: None or False.)"""
    try:
        yield
    except (p.StartFailedError, p.ConflictError, p.LimitExceededError) as exc:
        raise SandboxError(exc.message) from exc
    except p.BadRequestError as exc:
        if "'owner'" in exc.message:
            raise SandboxError(
                f"{exc.message}: sandboxd acts for OpenHands' users only with an admin's token"
                " (OH_SANDBOX_TOKEN)"
            ) from exc
        raise ValueError(exc.message) from exc
    except p.ClientError as exc:  # the daemon away, busy, shutting down, or a bug of its
        raise SandboxError(f"sandboxd could not {doing}: {exc.message}") from exc


# --- The service ----------------------------------------------------------------------------


class SandboxdSandboxService(SandboxService):
    """OpenHands' SandboxService over a sandboxd client, acting for ``user_id``.

    ``user_id`` None (OpenHands without users): the sandboxes of the client's own
    sandboxd user. ``web_url``: the app server's public URL, given to each sandbox
    for its webhooks and CORS, as upstream's services do.
    """

    def __init__(
        self,
        client: sandboxd.aio.Client,
        user_id: str | None = None,
        *,
        web_url: str | None = None,
    ) -> None:
        self.client = client
        self.user_id = user_id
        self.web_url = web_url

    def _mine(self, info: p.SandboxInfo | None) -> p.SandboxInfo | None:
        """The sandbox if it is this user's: another user's is one that does not exist."""
        if info is None or (self.user_id is not None and info.created_by_user_id != self.user_id):
            return None
        return info

    async def _get(self, sandbox_id: str) -> p.SandboxInfo | None:
        if not p.valid_sandbox_id(sandbox_id):
            return None  # an id sandboxd could not have given
        with _translated(f"get sandbox {sandbox_id}"):
            return self._mine(await self.client.get(sandbox_id))

    # -- reading ----------------------------------------------------------------------------

    async def search_sandboxes(
        self,
        page_id: str | None = None,
        limit: int = 100,
    ) -> SandboxPage:
        """Newest first; ``next_page_id`` is sandboxd's cursor (stable while sandboxes come
        and go). A ``limit`` beyond sandboxd's page of 100 gives 100 and a next page."""
        with _translated("search sandboxes"):
            page = await self.client.search(
                page_id=page_id, limit=min(max(limit, 1), PAGE), owner=self.user_id
            )
        return SandboxPage(items=[_sandbox(i) for i in page.items], next_page_id=page.next_page_id)

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo | None:
        info = await self._get(sandbox_id)
        return None if info is None else _sandbox(info)

    async def get_sandbox_by_session_api_key(self, session_api_key: str) -> SandboxInfo | None:
        """The RUNNING sandbox of this user that the key belongs to: one lookup in sandboxd
        (O(1), compared in constant time), not a search through every sandbox."""
        if not 1 <= len(session_api_key) <= 256:
            return None  # not a key sandboxd could have given
        with _translated("find a sandbox by its session key"):
            info = self._mine(await self.client.find_by_session_key(session_api_key))
        return None if info is None else _sandbox(info)

    async def batch_get_sandboxes(self, sandbox_ids: list[str]) -> list[SandboxInfo | None]:
        """One request per 100 ids, not one per id."""
        wanted = list(dict.fromkeys(i for i in sandbox_ids if p.valid_sandbox_id(i)))
        found: dict[str, SandboxInfo] = {}
        for at in range(0, len(wanted), PAGE):
            with _translated("get sandboxes"):
                infos = await self.client.batch_get(wanted[at : at + PAGE])
            for info in map(self._mine, infos):
                if info is not None:
                    found[info.id] = _sandbox(info)
        return [found.get(sandbox_id) for sandbox_id in sandbox_ids]

    # -- starting -----------------------------------------------------------------------------

    async def start_sandbox(
        self,
        sandbox_spec_id: str | None = None,
        sandbox_id: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> SandboxInfo:
        """Start it for this user and return it RUNNING (sandboxd waits for its health
        check). An unknown spec is ValueError, as upstream; a start that fails, a taken id
        or a limit reached is SandboxError with sandboxd's sentence."""
        env = self._app_env() | (extra_env or {})
        with _translated("start a sandbox"):
            try:
                info = await self.client.start(
                    spec_id=sandbox_spec_id,
                    sandbox_id=sandbox_id,
                    env=env or None,
                    owner=self.user_id,
                )
            except p.NotFoundError as exc:  # start's only not_found: the spec
                raise ValueError(exc.message) from exc
        return _sandbox(info)

    def _app_env(self) -> dict[str, str]:
        """What OpenHands' services give every agent server when the app has a public URL:
        where to send its webhooks, and the origin to allow."""
        if not self.web_url:
            return {}
        return {
            WEBHOOK_CALLBACK_VARIABLE: f"{self.web_url.rstrip('/')}/api/v1/webhooks",
            ALLOW_CORS_ORIGINS_VARIABLE: self.web_url,
        }

    async def wait_for_sandbox_running(
        self,
        sandbox_id: str,
        timeout: int = 120,  # noqa: ASYNC109  # upstream's signature
        poll_interval: int = 2,
        httpx_client: httpx.AsyncClient | None = None,
    ) -> SandboxInfo:
        """Wait on sandboxd's event stream, not by polling: each status event of the
        sandbox wakes the wait, which reads the status again. Raises SandboxError when the
        sandbox is missing (or MISSING), enters ERROR (with why), or is not RUNNING within
        ``timeout``. With ``httpx_client``, a RUNNING sandbox's agent server must also
        answer ``/alive``: nothing in the log says when it does, so that alone is asked
        again every ``poll_interval`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watch = _StatusWatch.of(self.client)
        with _translated(f"follow sandbox {sandbox_id}"):
            async with watch.changes(sandbox_id) as changed:
                while True:
                    changed.clear()  # before reading: a change from here on wakes us
                    info = await self._get(sandbox_id)
                    if info is None:
                        raise SandboxError(f"Sandbox not found: {sandbox_id}")
                    if info.status in (Status.ERROR, Status.MISSING):
                        raise SandboxError(
                            f"Sandbox entered {info.status.value.lower()} state: {sandbox_id}"
                            + (f": {info.error}" if info.error else "")
                        )
                    sandbox = _sandbox(info)
                    running = info.status is Status.RUNNING
                    if running and (
                        httpx_client is None or await _agent_server_alive(sandbox, httpx_client)
                    ):
                        return sandbox
                    left = deadline - loop.time()
                    if left <= 0:
                        raise SandboxError(
                            f"Sandbox failed to start within {timeout}s: {sandbox_id}"
                        )
                    if watch.failure is not None:
                        raise SandboxError(f"sandboxd's event stream ended: {watch.failure}")
                    try:
                        async with asyncio.timeout(min(left, poll_interval) if running else left):
                            await changed.wait()
                    except TimeoutError:
                        pass  # read again: at the deadline, the last look decides

    # -- pause, resume, delete ------------------------------------------------------------------

    async def resume_sandbox(self, sandbox_id: str) -> bool:
        return await self._act(sandbox_id, "resume", self.client.resume)

    async def pause_sandbox(self, sandbox_id: str) -> bool:
        return await self._act(sandbox_id, "pause", self.client.pause)

    async def delete_sandbox(self, sandbox_id: str) -> bool:
        """True once its processes are gone and its working dir removed; False if none."""
        return await self._act(sandbox_id, "delete", self.client.delete)

    async def _act(
        self, sandbox_id: str, what: str, act: Callable[[str], Awaitable[object]]
    ) -> bool:
        """True when the sandbox exists (for this user) and the op is done, or was done
        already; False only when there is no such sandbox. A sandbox whose status does not
        allow it (pausing a STARTING one) is SandboxError, with why."""
        if not p.valid_sandbox_id(sandbox_id):
            return False
        if self.user_id is not None and await self._get(sandbox_id) is None:
            return False  # none, or another user's
        with _translated(f"{what} sandbox {sandbox_id}"):
            try:
                await act(sandbox_id)
            except p.NotFoundError:
                return False  # deleted meanwhile
        return True

    async def pause_old_sandboxes(self, max_num_sandboxes: int) -> list[str]:
        """Pause this user's oldest RUNNING sandboxes beyond the newest
        ``max_num_sandboxes``; return their ids, oldest first. sandboxd filters (RUNNING,
        this user) and orders (newest first, by creation) in one search."""
        if max_num_sandboxes <= 0:
            raise ValueError("max_num_sandboxes must be greater than 0")
        with _translated("search sandboxes"):
            running = [
                info.id
                async for info in self.client.search_all(status="RUNNING", owner=self.user_id)
            ]
        paused = []
        for sandbox_id in reversed(running[max_num_sandboxes:]):
            try:
                if await self.pause_sandbox(sandbox_id):
                    paused.append(sandbox_id)
            except (SandboxError, ValueError) as exc:
                # As upstream: one that cannot be paused does not keep the others running.
                log.warning("could not pause sandbox %s: %s", sandbox_id, exc)
        return paused


async def _agent_server_alive(sandbox: SandboxInfo, httpx_client: httpx.AsyncClient) -> bool:
    urls = [url.url for url in sandbox.exposed_urls or () if url.name == AGENT_SERVER]
    if not urls:
        return True  # nothing to ask: RUNNING is all sandboxd can say
    try:
        answer = await httpx_client.get(f"{urls[0].rstrip('/')}/alive", timeout=5.0)
    except httpx.HTTPError:
        return False
    return answer.is_success


class _StatusWatch:
    """One subscription per client to every sandbox's status events, which every wait on
    that client shares: a wait costs no connection of its own (sandboxd allows a user
    ``max_connections_per_user``, 16 by default, and one app server's token is one user).

    Its task starts with the first wait, and ends when the client closes (which closes the
    subscription) or by ``aclose``; a later wait starts it again.
    """

    _of: ClassVar[weakref.WeakKeyDictionary[sandboxd.aio.Client, _StatusWatch]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def of(cls, client: sandboxd.aio.Client) -> _StatusWatch:
        watch = cls._of.get(client)
        if watch is None:
            watch = cls._of[client] = cls(client)
        return watch

    def __init__(self, client: sandboxd.aio.Client) -> None:
        self._client = client
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        #: Why the stream ended, once it has.
        self.failure: str | None = None

    @asynccontextmanager
    async def changes(self, sandbox_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set on each status event of ``sandbox_id`` from the moment this is
        entered (the subscription is live by then)."""
        changed = asyncio.Event()
        self._waiting.setdefault(sandbox_id, set()).add(changed)
        try:
            await self._started()
            yield changed
        finally:
            waiting = self._waiting.get(sandbox_id, set())
            waiting.discard(changed)
            if not waiting:
                self._waiting.pop(sandbox_id, None)

    async def _started(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self.failure = None
            self._subscribed = loop.create_future()
            self._task = loop.create_task(
                self._follow(self._subscribed), name=f"sandboxd status watch of {self._client.url}"
            )
        assert self._subscribed is not None
        # Shielded: one waiter cancelled does not cancel the subscribing for the others.
        await asyncio.shield(self._subscribed)

    async def _follow(self, subscribed: asyncio.Future[None]) -> None:
        ended: p.ClientError | None = None
        try:
            async with self._client.subscribe(types=STATUS_EVENTS) as events:
                await events.open()
                subscribed.set_result(None)
                async for event in events:
                    for changed in self._waiting.get(event.sandbox_id or "", ()):
                        changed.set()
        except p.ClientError as exc:
            ended = exc
        except Exception as exc:  # a bug: logged, and the waits told
            log.exception("the status watch of %s failed", self._client.url)
            ended = p.ConnectionLostError(f"the status watch failed: {exc!r}")
        finally:
            # Closed, cancelled (aclose) or failed: no wait may wait for it any longer.
            if ended is None:
                ended = p.ConnectionLostError("the connection to sandboxd closed")
            self.failure = ended.message
            if not subscribed.done():
                subscribed.set_exception(ended)
                subscribed.add_done_callback(_retrieved)  # even if no wait is there to see it
            for waiting in self._waiting.values():
                for changed in waiting:
                    changed.set()  # they look again, and see the failure

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _retrieved(future: asyncio.Future[None]) -> None:
    future.exception()


# --- One connection per process -------------------------------------------------------------

_shared: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str], sandboxd.aio.Client]
] = weakref.WeakKeyDictionary()
_connecting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def shared_client(url: str, token: str) -> sandboxd.aio.Client:
    """This process's one connection to sandboxd at ``url`` as ``token``'s user (one per
    event loop: asyncio objects belong to theirs), made at first use, and again when it
    was lost (a daemon restarted): requests share it, as many at once as they like."""
    loop = asyncio.get_running_loop()
    clients = _shared.setdefault(loop, {})
    client = clients.get((url, token))
    if client is not None and not client.closed:
        return client
    async with _connecting.setdefault(loop, asyncio.Lock()):
        client = clients.get((url, token))
        if client is None or client.closed:
            if client is not None:
                await _close(client)
            with _translated(f"connect to {url}"):
                client = clients[(url, token)] = await sandboxd.aio.connect(url, token)
    return client


async def close_shared_clients() -> None:
    """Close this event loop's shared connections (an app server's shutdown, tests)."""
    for client in _shared.pop(asyncio.get_running_loop(), {}).values():
        await _close(client)


async def _close(client: sandboxd.aio.Client) -> None:
    watch = _StatusWatch._of.pop(client, None)
    if watch is not None:
        await watch.aclose()
    await client.aclose()


class SandboxdSandboxServiceInjector(SandboxServiceInjector):
    """Chosen by ``OH_SANDBOX_KIND=SandboxdSandboxServiceInjector`` (once this module is
    imported) or by its dotted path; its fields are ``OH_SANDBOX_URL``, ``OH_SANDBOX_TOKEN``
    and ``OH_SANDBOX_WEB_URL``. Each request gets a service for its user; all of them
    share the process's one connection."""

    url: str = Field(default=DEFAULT_URL, description="sandboxd's websocket URL")
    token: SecretStr = Field(
        description="a sandboxd token: an admin's, so that OpenHands' users own their sandboxes"
    )
    web_url: str | None = Field(
        default=None,
        description="the app server's public URL: each sandbox's webhooks go there",
    )

    async def inject(
        self,
        state: InjectorState,
        request: Any | None = None,  # fastapi's Request: typed loosely, to need no fastapi
    ) -> AsyncGenerator[SandboxService, None]:
        # Imported here, as upstream's injectors do: the config module imports them.
        from openhands.app_server.config import get_user_context

        client = await shared_client(self.url, self.token.get_secret_value())
        async with get_user_context(state, request) as user_context:
            user_id = await user_context.get_user_id()
            yield SandboxdSandboxService(client, user_id, web_url=self.web_url)


# --- Specs ----------------------------------------------------------------------------------


class SandboxdSandboxSpecService(SandboxSpecService):
    """sandboxd's specs as OpenHands' sandbox specs (read only, as upstream's are): the
    first is the default one. A token that is not an admin's sees ``initial_env``'s keys
    with every value ``***``."""

    def __init__(self, client: sandboxd.aio.Client) -> None:
        self.client = client

    async def search_sandbox_specs(
        self, page_id: str | None = None, limit: int = 100
    ) -> SandboxSpecInfoPage:
        if page_id is not None and not page_id.isdecimal():
            raise ValueError(f"page_id {page_id!r} is not a page that search gave")
        start = int(page_id or 0)
        with _translated("list specs"):
            specs = await self.client.specs()
        end = start + max(limit, 1)
        return SandboxSpecInfoPage(
            items=[_spec(spec) for spec in specs[start:end]],
            next_page_id=str(end) if end < len(specs) else None,
        )

    async def get_sandbox_spec(self, sandbox_spec_id: str) -> SandboxSpecInfo | None:
        with _translated(f"get spec {sandbox_spec_id}"):
            spec = await self.client.spec(sandbox_spec_id)
        return None if spec is None else _spec(spec)


class SandboxdSandboxSpecServiceInjector(SandboxSpecServiceInjector):
    """Chosen by ``OH_SANDBOX_SPEC_KIND=SandboxdSandboxSpecServiceInjector``; fields
    ``OH_SANDBOX_SPEC_URL`` and ``OH_SANDBOX_SPEC_TOKEN``. Shares the process's connection
    with the sandbox service when they name the same daemon and token."""

    url: str = Field(default=DEFAULT_URL, description="sandboxd's websocket URL")
    token: SecretStr = Field(description="a sandboxd token")

    async def inject(
        self, state: InjectorState, request: Any | None = None
    ) -> AsyncGenerator[SandboxSpecService, None]:
        yield SandboxdSandboxSpecService(
            await shared_client(self.url, self.token.get_secret_value())
        )
