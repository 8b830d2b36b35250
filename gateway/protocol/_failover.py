"""Several daemons for one client, for clients: which URL to try next, with no I/O.

The nodes of a cluster share one log, whose seqs are global (docs/cluster.md),
so a client may talk to any of them and resume a subscription on another node
exactly where it left off. A client given several URLs keeps one ``Endpoints``
per connection it holds (the requests', each subscription's): it tries them in
order from the one that answered last; a URL whose connection dropped moves the
next one to the front, because a drop most often means that node is going away
(killed, restarting), and its peers answer at once where it would be tried in
vain until its port closes.

Two rules, one per kind of connection, both written here:

- a subscription reconnects by the rounds of ``attempts``: every URL once per
  round, the rounds ``reconnect_delays()`` apart. With one URL that is the
  reconnect policy of a single daemon, unchanged.
- the requests' connection, once lost, fails over on the next call to the
  *other* URLs only (``others``), once each. Requests in flight on a lost
  connection have unknown outcomes, so going back to the same daemon is the
  application's decision, as it was before there were several URLs; with one
  URL the client stays lost, as it always did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sandboxd.gateway.protocol import _resume
from sandboxd.gateway.protocol._errors import (
    AuthenticationError,
    ClientError,
    ConnectError,
    ConnectionLostError,
)


class Endpoints:
    """The URLs of the daemons a client may use, in order, and which one to try first."""

    def __init__(self, urls: str | Sequence[str], *, first: str | None = None) -> None:
        listed = [urls] if isinstance(urls, str) else list(urls)
        if not listed:
            raise ValueError("url: give at least one daemon URL")
        for url in listed:
            if not isinstance(url, str) or not url:
                raise ValueError(f"url: {url!r} is not a websocket URL")
        # The same daemon twice would be tried twice a round for nothing.
        self.urls: tuple[str, ...] = tuple(dict.fromkeys(listed))
        self._front = 0 if first is None else self.urls.index(first)

    def __repr__(self) -> str:
        return f"Endpoints({list(self.urls)!r}, first={self.current!r})"

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def current(self) -> str:
        """The URL to try first: the last that answered, else the one after the last lost."""
        return self.urls[self._front]

    def copy(self) -> Endpoints:
        """The same URLs, from the same first one, for a connection of its own."""
        return Endpoints(self.urls, first=self.current)

    def order(self) -> list[str]:
        """Every URL once, from the current one on."""
        return [*self.urls[self._front :], *self.urls[: self._front]]

    def others(self, url: str) -> list[str]:
        """Every URL but ``url``, in order: where a lost requests' connection fails over to."""
        return [other for other in self.order() if other != url]

    def connected(self, url: str) -> None:
        """``url`` answered: try it first from now on."""
        self._front = self.urls.index(url)

    def lost(self, url: str) -> None:
        """The connection to ``url`` dropped: try the next one first from now on."""
        if url == self.current:
            self._front = (self._front + 1) % len(self.urls)

    def attempts(self) -> Iterator[tuple[float, str]]:
        """A subscription's (re)connect attempts: the delay before each, and its URL.

        Every URL once a round, from the current one, with no delay between the
        URLs of a round; the rounds are ``reconnect_delays()`` apart.
        """
        for delay in _resume.reconnect_delays():
            for index, url in enumerate(self.order()):
                yield (delay if index == 0 else 0.0, url)

    def gave_up(self, failure: ClientError) -> ConnectionLostError:
        """A subscription's end once every attempt failed."""
        # Read at each call, as reconnect_delays() reads the policy.
        attempts = _resume.RECONNECT_ATTEMPTS
        where = "" if len(self.urls) == 1 else f" at each of {len(self.urls)} URLs"
        return ConnectionLostError(
            f"the subscription gave up after {attempts} attempts{where}: {failure}"
        )


def first_of(failures: Sequence[ConnectError]) -> ConnectError:
    """The one error for a round in which no URL answered: each URL's reason, in order.

    A refused token (the same for every node of a cluster) is said as it is, so
    that the caller sees it for what it is, not as one reason among others.
    """
    assert failures, "a round tries at least one URL"
    for failure in failures:
        if isinstance(failure, AuthenticationError):
            return failure
    if len(failures) == 1:
        return failures[0]
    reasons = "; ".join(failure.message for failure in failures)
    return ConnectError(
        f"cannot reach sandboxd at any of {len(failures)} URLs: {reasons}", failures[0].url
    )
