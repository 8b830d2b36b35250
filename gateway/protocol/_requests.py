"""Requests of protocol.md as plain code: one frozen class per op, parsed and encoded.

Nothing here touches a socket or trio, in the manner of h11 and wsproto: the
websocket layer feeds text frames in and sends the strings that come out, so
every rule of the contract is tested without a connection.

Requests are validated by hand, field by field, from the annotations of one
frozen class per op: the error a client gets must name the offending field,
and a flat loop over a precomputed schema says that more plainly (and faster)
than unpicking cattrs' exception groups. The same classes are what a client
builds (calls.py): their validators hold a request made in Python to the same
rules before it leaves.
"""

import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
import orjson

from sandboxd.events.projection import Status
from sandboxd.events.types import EVENT_TYPES
from sandboxd.gateway.protocol._converter import converter
from sandboxd.gateway.protocol._errors import ErrorCode, ProtocolError, RequestError


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _show(value: object) -> str:
    # Echoed client values are cut short: a 1 MiB key must not make a 1 MiB error.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- Constraints beyond the JSON type, as attrs validators: a params object
# built in Python (by the client) is held to the same rules as a parsed one.

_SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STATUSES = frozenset(Status)
_Validator = Callable[[object, "attrs.Attribute[Any]", Any], None]


def valid_sandbox_id(value: str) -> bool:
    """Whether ``value`` can be a sandbox's id at all (``[A-Za-z0-9_-]{1,64}``)."""
    return _SANDBOX_ID.fullmatch(value) is not None


def _check_sandbox_id(name: str, value: str) -> None:
    if not _SANDBOX_ID.fullmatch(value):
        raise _bad(f"'{name}' must be 1 to 64 letters, digits, '_' or '-', not {_show(value)}.")


def _sandbox_id(_: object, attribute: "attrs.Attribute[Any]", value: str | None) -> None:
    if value is not None:
        _check_sandbox_id(attribute.name, value)


def _sandbox_ids(_: object, attribute: "attrs.Attribute[Any]", value: list[str]) -> None:
    if len(value) > 100:
        raise _bad(f"'{attribute.name}' may hold at most 100 ids, not {len(value)}.")
    for i, item in enumerate(value):
        _check_sandbox_id(f"{attribute.name}[{i}]", item)


def _between(low: int, high: int | None = None) -> _Validator:
    def check(_: object, attribute: "attrs.Attribute[Any]", value: int | None) -> None:
        if value is None or (low <= value and (high is None or value <= high)):
            return
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise _bad(f"'{attribute.name}' must be {bounds}, not {value}.")

    return check


def _status(_: object, attribute: "attrs.Attribute[Any]", value: str | None) -> None:
    if value is not None and value not in _STATUSES:
        raise _bad(f"'{attribute.name}' must be one of {', '.join(Status)}, not {_show(value)}.")


def _event_types(_: object, attribute: "attrs.Attribute[Any]", value: list[str] | None) -> None:
    for i, item in enumerate(value or ()):
        if item not in EVENT_TYPES:
            raise _bad(
                f"'{attribute.name}[{i}]' is {_show(item)}, which is not an event type"
                " of protocol.md (such as 'sandbox.running')."
            )


def _env(_: object, attribute: "attrs.Attribute[Any]", value: dict[str, str] | None) -> None:
    # execve cannot carry these: better a bad_request now than a start_failed later.
    for key, item in (value or {}).items():
        if not key or "=" in key or "\0" in key:
            raise _bad(
                f"'{attribute.name}' has the name {_show(key)}, which is not a variable name."
            )
        if "\0" in item:
            raise _bad(f"'{attribute.name}[{_show(key)}]' must not contain a NUL character.")


def _owner(_: object, attribute: "attrs.Attribute[Any]", value: str | None) -> None:
    # A user id of the admin's own choosing (an OpenHands user, say): any printable text.
    if value is not None and not (1 <= len(value) <= 256 and value.isprintable()):
        raise _bad(
            f"'{attribute.name}' must be a user id of 1 to 256 printable characters,"
            f" not {_show(value)}."
        )


#: A node id (config.md's cluster.node_id): it names NATS subjects, so no ".", "*", ">".
NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _node(_: object, attribute: "attrs.Attribute[Any]", value: str | None) -> None:
    if value is not None and not NODE_ID.fullmatch(value):
        raise _bad(
            f"'{attribute.name}' must be a node id, 1 to 64 of A-Z a-z 0-9 _ -, not {_show(value)}."
        )


def _session_key(_: object, attribute: "attrs.Attribute[Any]", value: str) -> None:
    if not 1 <= len(value) <= 256:
        raise _bad(f"'{attribute.name}' must be 1 to 256 characters, not {len(value)}.")


# --- One frozen class per op; ``OP`` is its stable wire name.


@attrs.frozen
class SandboxStart:
    OP: ClassVar[str] = "sandbox.start"
    spec_id: str | None = None
    sandbox_id: str | None = attrs.field(default=None, validator=_sandbox_id)
    env: dict[str, str] | None = attrs.field(default=None, validator=_env)
    wait: bool = True
    #: Admins only: the user the sandbox is started for, and belongs to.
    owner: str | None = attrs.field(default=None, validator=_owner)
    #: The node to run it on (docs/cluster.md); None: the one with the fewest running.
    node: str | None = attrs.field(default=None, validator=_node)


@attrs.frozen
class SandboxGet:
    OP: ClassVar[str] = "sandbox.get"
    sandbox_id: str = attrs.field(validator=_sandbox_id)


@attrs.frozen
class SandboxBatchGet:
    OP: ClassVar[str] = "sandbox.batch_get"
    sandbox_ids: list[str] = attrs.field(validator=_sandbox_ids)


@attrs.frozen
class SandboxStats:
    OP: ClassVar[str] = "sandbox.stats"
    sandbox_ids: list[str] = attrs.field(validator=_sandbox_ids)


@attrs.frozen
class SandboxSearch:
    OP: ClassVar[str] = "sandbox.search"
    page_id: str | None = None
    limit: int = attrs.field(default=100, validator=_between(1, 100))
    status: str | None = attrs.field(default=None, validator=_status)
    #: Admins only: the sandboxes of this user alone.
    owner: str | None = attrs.field(default=None, validator=_owner)


@attrs.frozen
class SandboxFindBySessionKey:
    OP: ClassVar[str] = "sandbox.find_by_session_key"
    session_api_key: str = attrs.field(validator=_session_key, repr=False)


@attrs.frozen
class SandboxPause:
    OP: ClassVar[str] = "sandbox.pause"
    sandbox_id: str = attrs.field(validator=_sandbox_id)


@attrs.frozen
class SandboxResume:
    OP: ClassVar[str] = "sandbox.resume"
    sandbox_id: str = attrs.field(validator=_sandbox_id)


@attrs.frozen
class SandboxDelete:
    OP: ClassVar[str] = "sandbox.delete"
    sandbox_id: str = attrs.field(validator=_sandbox_id)


@attrs.frozen
class SandboxLogs:
    OP: ClassVar[str] = "sandbox.logs"
    sandbox_id: str = attrs.field(validator=_sandbox_id)
    tail_bytes: int = attrs.field(default=65536, validator=_between(0, 1 << 20))


@attrs.frozen
class SpecList:
    OP: ClassVar[str] = "spec.list"


@attrs.frozen
class SpecGet:
    OP: ClassVar[str] = "spec.get"
    spec_id: str


@attrs.frozen
class ServerInfo:
    OP: ClassVar[str] = "server.info"


@attrs.frozen
class EventsSubscribe:
    OP: ClassVar[str] = "events.subscribe"
    after_seq: int | None = attrs.field(default=None, validator=_between(0))
    sandbox_id: str | None = attrs.field(default=None, validator=_sandbox_id)
    types: list[str] | None = attrs.field(default=None, validator=_event_types)
    #: True: events come several to a frame, ``{"subscription", "events": [...]}``;
    #: absent (None) or false: one a frame, as before batches.
    batch: bool | None = None


@attrs.frozen
class EventsUnsubscribe:
    OP: ClassVar[str] = "events.unsubscribe"
    subscription: str


@attrs.frozen
class EventsRead:
    OP: ClassVar[str] = "events.read"
    after_seq: int = attrs.field(validator=_between(0))
    limit: int = attrs.field(default=1000, validator=_between(1, 1000))
    sandbox_id: str | None = attrs.field(default=None, validator=_sandbox_id)
    types: list[str] | None = attrs.field(default=None, validator=_event_types)


Params = (
    SandboxStart
    | SandboxGet
    | SandboxBatchGet
    | SandboxStats
    | SandboxSearch
    | SandboxFindBySessionKey
    | SandboxPause
    | SandboxResume
    | SandboxDelete
    | SandboxLogs
    | SpecList
    | SpecGet
    | ServerInfo
    | EventsSubscribe
    | EventsUnsubscribe
    | EventsRead
)

#: Wire op name -> params class.
OPS: dict[str, type[Params]] = {cls.OP: cls for cls in typing.get_args(Params)}


@attrs.frozen
class Request:
    id: str | int
    op: str
    params: Params


# --- The JSON type checks, derived once per op from the annotations.

_KINDS: dict[type, str] = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


_Check = Callable[[str, object], None]


def _scalar(expected: type, description: str) -> _Check:
    # `type(...) is`, not isinstance: JSON true is not an integer here.
    def check(name: str, value: object) -> None:
        if type(value) is not expected:
            raise _bad(f"'{name}' must be {description}, not {_kind(value)}.")

    return check


def _list_of_str(name: str, value: object) -> None:
    if type(value) is not list:
        raise _bad(f"'{name}' must be a list of strings, not {_kind(value)}.")
    for i, item in enumerate(value):
        if type(item) is not str:
            raise _bad(f"'{name}[{i}]' must be a string, not {_kind(item)}.")


def _dict_of_str(name: str, value: object) -> None:
    if type(value) is not dict:
        raise _bad(f"'{name}' must be an object of strings, not {_kind(value)}.")
    for key, item in value.items():
        if type(item) is not str:
            raise _bad(f"'{name}[{_show(key)}]' must be a string, not {_kind(item)}.")


def _optional(check: _Check) -> _Check:
    def optional(name: str, value: object) -> None:
        if value is not None:
            check(name, value)

    return optional


_CHECKS: dict[object, _Check] = {
    str: _scalar(str, "a string"),
    int: _scalar(int, "an integer"),
    bool: _scalar(bool, "true or false"),
    list[str]: _list_of_str,
    dict[str, str]: _dict_of_str,
}


def _check_for(hint: object) -> _Check:
    if isinstance(hint, types.UnionType):
        # `X | None`: null is allowed and means the same as leaving it out.
        (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return _optional(_CHECKS[inner])
    return _CHECKS[hint]


@attrs.frozen
class _Param:
    name: str
    required: bool
    check: _Check


@attrs.frozen
class _Schema:
    cls: type[Params]
    params: tuple[_Param, ...]
    names: frozenset[str]


def _schema(cls: type[Params]) -> _Schema:
    hints = typing.get_type_hints(cls)
    params = tuple(
        _Param(field.name, field.default is attrs.NOTHING, _check_for(hints[field.name]))
        for field in attrs.fields(cls)
    )
    return _Schema(cls, params, frozenset(p.name for p in params) | {"id", "op"})


_SCHEMAS: dict[str, _Schema] = {op: _schema(cls) for op, cls in OPS.items()}


def _params(op: str, schema: _Schema, frame: dict[str, object]) -> Params:
    if unknown := frame.keys() - schema.names:
        takes = ", ".join(p.name for p in schema.params) or "none"
        raise _bad(f"{_show(min(unknown))} is not a parameter of {op} (it takes: {takes}).")
    values: dict[str, object] = {}
    for param in schema.params:
        if param.name in frame:
            value = frame[param.name]
            param.check(param.name, value)
            values[param.name] = value
        elif param.required:
            raise _bad(f"'{param.name}' is required by {op}.")
    return schema.cls(**values)  # type: ignore[arg-type]  # checked above, per field


def parse_request(frame: str | bytes) -> Request:
    """Parse one text frame into a request, or raise RequestError and nothing else."""
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        # Invalid UTF-8 and lone surrogates land here too: orjson refuses both.
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"The frame is not valid JSON: {exc}.", None
        ) from None
    if type(doc) is not dict:
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"The frame must be a JSON object, not {_kind(doc)}.", None
        )
    if "id" not in doc:
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            "'id' is missing; give each request a string or integer id.",
            None,
        )
    request_id = doc["id"]
    if type(request_id) is not str and type(request_id) is not int:
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f"'id' must be a string or an integer, not {_kind(request_id)}.",
            None,
        )
    op = doc.get("op")
    if type(op) is not str:
        what = "missing" if op is None and "op" not in doc else f"{_kind(op)}, not a string"
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"'op' must name an op; it is {what}.", request_id
        )
    schema = _SCHEMAS.get(op)
    if schema is None:
        raise RequestError(
            ErrorCode.UNKNOWN_OP,
            f"'op' is {_show(op)}, which is not an op of protocol.md.",
            request_id,
        )
    try:
        params = _params(op, schema, doc)
    except ProtocolError as exc:
        raise RequestError(exc.code, exc.message, request_id, **exc.extra) from None
    return Request(request_id, op, params)


def encode_request(request: Request) -> str:
    """The frame a client sends; the inverse of parse_request. A parameter that is None
    is left out, which protocol.md says means the same."""
    params = {k: v for k, v in converter.unstructure(request.params).items() if v is not None}
    return orjson.dumps({"id": request.id, "op": request.op, **params}).decode()


def encode_unchecked(request_id: str | int, op: str, params: Mapping[str, Any]) -> str:
    """The frame of any op, its params sent as given: for ops a client does not know yet."""
    return orjson.dumps({"id": request_id, "op": op, **params}).decode()
