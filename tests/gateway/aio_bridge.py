"""The asyncio client (sandboxd.aio), driven from trio tests: one contract, two clients.

The client tests are trio tests against a daemon running in the test's own
trio loop. To hold the asyncio client to the very same tests, it runs where an
asyncio program runs it: in an asyncio event loop, here one in a thread of its
own for the test's duration, and every call the test makes is handed to that
loop and awaited from trio without blocking it (a trio task waits for the
asyncio task's outcome, and a trio cancel cancels the asyncio task). So many
trio tasks calling at once are as many concurrent callers of the one asyncio
client, which is what its multiplexing must bear.

When the test ends, the loop must hold no task: closing the client (and its
subscriptions) leaves none behind, as sandboxd.aio promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import trio

import sandboxd.aio
from sandboxd.events.types import Event

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncio", daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` as a task of the loop; wait for it from trio, cancellably."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    def tasks_left(self) -> set[asyncio.Task[Any]]:
        async def others() -> set[asyncio.Task[Any]]:
            return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

        return asyncio.run_coroutine_threadsafe(others(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
        left = thread.tasks_left()
        assert not left, f"the asyncio client left tasks behind: {left}"
    finally:
        thread.stop()


class SubscriptionInTrio:
    """A sandboxd.aio Subscription, iterated from trio."""

    def __init__(self, thread: LoopThread, subscription: sandboxd.aio.Subscription) -> None:
        self._thread = thread
        self._subscription = subscription

    def __getattr__(self, name: str) -> Any:
        return getattr(self._subscription, name)  # last_seq, head_seq, reconnects

    async def open(self) -> None:
        await self._thread.run(self._subscription.open())

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._thread.run(self._subscription.aclose())

    async def __aenter__(self) -> SubscriptionInTrio:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> SubscriptionInTrio:
        return self

    async def __anext__(self) -> Event:
        event = await self._thread.run(_next(self._subscription))
        if event is None:
            raise StopAsyncIteration
        return event


async def _next(iterator: AsyncIterator[T]) -> T | None:
    # StopAsyncIteration does not cross a future well: the end is None here.
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


class ClientInTrio:
    """A sandboxd.aio Client whose every method is called from trio, run in its loop."""

    def __init__(self, thread: LoopThread, client: sandboxd.aio.Client) -> None:
        self._thread = thread
        self._client = client

    @property
    def url(self) -> str:
        return self._client.url

    @property
    def closed(self) -> bool:
        return self._client.closed

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._client, name)

        async def in_loop(*args: Any, **kwargs: Any) -> Any:
            return await self._thread.run(method(*args, **kwargs))

        return in_loop

    def subscribe(self, *args: Any, **kwargs: Any) -> SubscriptionInTrio:
        return SubscriptionInTrio(self._thread, self._client.subscribe(*args, **kwargs))

    async def search_all(self, **kwargs: Any) -> AsyncIterator[Any]:
        pages = self._client.search_all(**kwargs)
        while (item := await self._thread.run(_next(pages))) is not None:
            yield item


@contextlib.asynccontextmanager
async def open_aio_client(url: str | Sequence[str], token: str) -> AsyncIterator[ClientInTrio]:
    """``sandboxd.aio.open_client`` in an asyncio loop of its own, used from trio."""
    with loop_thread() as thread:
        manager = sandboxd.aio.open_client(url, token)
        client = await thread.run(manager.__aenter__())
        try:
            yield ClientInTrio(thread, client)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                swallowed = await thread.run(manager.__aexit__(type(exc), exc, exc.__traceback__))
            if not swallowed:
                raise
        else:
            with trio.CancelScope(shield=True):
                await thread.run(manager.__aexit__(None, None, None))
