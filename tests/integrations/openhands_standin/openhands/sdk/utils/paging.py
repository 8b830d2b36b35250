"""Stand-in of openhands.sdk.utils.paging (upstream uses 3.12 generics; the same here in 3.11)."""

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class PageProtocol(Protocol[T]):
    """A page of a search: its items, and the id of the next page (None on the last)."""

    items: list[T]
    next_page_id: str | None


async def page_iterator(
    search_func: Callable[..., Awaitable[PageProtocol[T]]], *args: Any, **kwargs: Any
) -> AsyncGenerator[T, None]:
    """Every item of every page, asking for the next page until there is none."""
    page_id = kwargs.pop("page_id", None)
    while True:
        page = await search_func(*args, page_id=page_id, **kwargs)
        for item in page.items:
            yield item
        page_id = page.next_page_id
        if not page_id:
            return
