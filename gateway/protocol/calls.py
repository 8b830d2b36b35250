"""One call per op, for clients: the request to send, and how to read its reply.

    call = calls.get("4Xb9")            # checked by the protocol's own rules here
    send(call.encode(request_id=7))     # the client's I/O, whatever it is
    info = call.result(reply)           # a Reply from parse_frame: SandboxInfo | None,
                                        # or the exception of its error code

Building a call validates its parameters as the server would (a bad one
raises ``BadRequestError`` before anything is sent); ``result`` gives the
typed result or raises a ``ClientError``. Nothing here does I/O: the trio
client (client.py) is a transport around these, and so can any other be.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs

from sandboxd.events.types import Event
from sandboxd.gateway.protocol._converter import converter
from sandboxd.gateway.protocol._errors import BadRequestError, MalformedFrameError, ProtocolError
from sandboxd.gateway.protocol._frames import Reply
from sandboxd.gateway.protocol._requests import (
    EventsRead,
    EventsSubscribe,
    EventsUnsubscribe,
    Params,
    Request,
    SandboxBatchGet,
    SandboxDelete,
    SandboxFindBySessionKey,
    SandboxGet,
    SandboxLogs,
    SandboxPause,
    SandboxResume,
    SandboxSearch,
    SandboxStart,
    SandboxStats,
    ServerInfo,
    SpecGet,
    SpecList,
    encode_request,
    encode_unchecked,
)
from sandboxd.gateway.protocol._results import (
    EventPage,
    Logs,
    SandboxInfo,
    SandboxUsage,
    SearchPage,
    ServerDetails,
    SpecInfo,
    Subscribed,
    decode_event,
)

T = TypeVar("T")
P = TypeVar("P", bound=Params)


@attrs.frozen
class Unchecked:
    """The params of any op, as given: sent without a check, for ops this code does not know."""

    OP: str
    values: Mapping[str, Any] = attrs.Factory(dict)


@attrs.frozen
class Call(Generic[T]):
    """One op's request, and the decoder of its result."""

    params: Params | Unchecked
    decode: Callable[[Any], T]

    @property
    def op(self) -> str:
        return self.params.OP

    def encode(self, request_id: str | int) -> str:
        """The request's frame."""
        if isinstance(self.params, Unchecked):
            return encode_unchecked(request_id, self.op, self.params.values)
        return encode_request(Request(request_id, self.op, self.params))

    def result(self, reply: Reply) -> T:
        """The typed result of ``reply``, or the exception of its error code."""
        if not reply.ok:
            raise reply.exception()
        try:
            return self.decode(reply.result)
        except MalformedFrameError:
            raise
        except Exception as exc:
            raise MalformedFrameError(
                f"the result of {self.op} is not what protocol.md says: {exc}"
            ) from exc


def _params(cls: type[P], **values: Any) -> P:
    # The protocol's own validators check the params before they leave.
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ProtocolError as exc:
        raise BadRequestError(exc.message) from None


def _as(cls: type[T] | Any) -> Callable[[Any], T]:
    def decode(result: Any) -> T:
        value: T = converter.structure(result, cls)
        return value

    return decode


def _optional(cls: type[T]) -> Callable[[Any], T | None]:
    def decode(result: Any) -> T | None:
        return None if result is None else converter.structure(result, cls)

    return decode


def _true(result: Any) -> bool:
    if result is not True:
        raise MalformedFrameError(f"the result is {result!r}, not true")
    return True


def _event_page(result: Any) -> EventPage[Event]:
    if type(result) is not dict or type(result.get("events")) is not list:
        raise MalformedFrameError(f"an event page must hold a list of events, not {result!r:.80}")
    events = [decode_event(raw) for raw in result["events"]]
    # Events of types this client does not know (a newer server's) are skipped.
    return EventPage([e for e in events if e is not None], int(result["next_after_seq"]))


# --- Sandboxes ----------------------------------------------------------------------------


def start(
    *,
    spec_id: str | None = None,
    sandbox_id: str | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    owner: str | None = None,
    node: str | None = None,
) -> Call[SandboxInfo]:
    params = _params(
        SandboxStart,
        spec_id=spec_id,
        sandbox_id=sandbox_id,
        env=None if env is None else dict(env),
        wait=wait,
        owner=owner,
        node=node,
    )
    return Call(params, _as(SandboxInfo))


def get(sandbox_id: str) -> Call[SandboxInfo | None]:
    return Call(_params(SandboxGet, sandbox_id=sandbox_id), _optional(SandboxInfo))


def batch_get(sandbox_ids: list[str]) -> Call[list[SandboxInfo | None]]:
    params = _params(SandboxBatchGet, sandbox_ids=list(sandbox_ids))
    return Call(params, _as(list[SandboxInfo | None]))


def stats(sandbox_ids: list[str]) -> Call[list[SandboxUsage | None]]:
    params = _params(SandboxStats, sandbox_ids=list(sandbox_ids))
    return Call(params, _as(list[SandboxUsage | None]))


def search(
    *,
    page_id: str | None = None,
    limit: int = 100,
    status: str | None = None,
    owner: str | None = None,
) -> Call[SearchPage]:
    params = _params(SandboxSearch, page_id=page_id, limit=limit, status=status, owner=owner)
    return Call(params, _as(SearchPage))


def find_by_session_key(session_api_key: str) -> Call[SandboxInfo | None]:
    params = _params(SandboxFindBySessionKey, session_api_key=session_api_key)
    return Call(params, _optional(SandboxInfo))


def pause(sandbox_id: str) -> Call[SandboxInfo]:
    return Call(_params(SandboxPause, sandbox_id=sandbox_id), _as(SandboxInfo))


def resume(sandbox_id: str) -> Call[SandboxInfo]:
    return Call(_params(SandboxResume, sandbox_id=sandbox_id), _as(SandboxInfo))


def delete(sandbox_id: str) -> Call[bool]:
    return Call(_params(SandboxDelete, sandbox_id=sandbox_id), _true)


def logs(sandbox_id: str, *, tail_bytes: int = 65536) -> Call[Logs]:
    params = _params(SandboxLogs, sandbox_id=sandbox_id, tail_bytes=tail_bytes)
    return Call(params, _as(Logs))


# --- Specs and the server -----------------------------------------------------------------


def spec_list() -> Call[list[SpecInfo]]:
    return Call(SpecList(), _as(list[SpecInfo]))


def spec_get(spec_id: str) -> Call[SpecInfo | None]:
    return Call(_params(SpecGet, spec_id=spec_id), _optional(SpecInfo))


def server_info() -> Call[ServerDetails]:
    return Call(ServerInfo(), _as(ServerDetails))


# --- Events -------------------------------------------------------------------------------


def subscribe(
    after_seq: int | None = None,
    *,
    sandbox_id: str | None = None,
    types: list[str] | None = None,
    batch: bool = False,
) -> Call[Subscribed]:
    params = _params(
        EventsSubscribe,
        after_seq=after_seq,
        sandbox_id=sandbox_id,
        types=types,
        batch=batch or None,  # left out unless asked for: an older server knows no batch
    )
    return Call(params, _as(Subscribed))


def unsubscribe(subscription: str) -> Call[bool]:
    return Call(_params(EventsUnsubscribe, subscription=subscription), _true)


def read_events(
    after_seq: int,
    *,
    limit: int = 1000,
    sandbox_id: str | None = None,
    types: list[str] | None = None,
) -> Call[EventPage[Event]]:
    params = _params(
        EventsRead, after_seq=after_seq, limit=limit, sandbox_id=sandbox_id, types=types
    )
    return Call(params, _event_page)


# --- Anything else ------------------------------------------------------------------------


def unchecked(op: str, params: Mapping[str, Any] | None = None) -> Call[Any]:
    """Any op with any params, unchecked: its result is the reply's JSON as it came."""
    return Call(Unchecked(op, dict(params or {})), _as_is)


def _as_is(result: Any) -> Any:
    return result
