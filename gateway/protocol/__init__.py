"""The wire protocol of protocol.md as plain code, one model for both ends.

Nothing here touches a socket or trio, in the manner of h11 and wsproto: text
frames go in, typed values or typed exceptions come out, and strings to send
come out of typed values, so every rule of the contract is tested without a
connection and any transport (the server, the trio client, an asyncio client)
is a thin layer around it.

    _transport   frame size, in-flight requests, close codes
    _errors      error codes; ProtocolError (the server's), ClientError and one
                 subclass per code (a client's)
    _requests    one frozen class per op; parse_request, encode_request
    _results     what the ops answer: SandboxInfo, SandboxUsage, SpecInfo, SearchPage,
                 Logs, ServerDetails, Subscribed, EventPage; decode_event
    _frames      the server's frames: encode_* on its side, parse_frame on a client's
    calls        one Call per op for clients: its request, and its typed result
    _client_ops  every op as a typed method over an abstract call: both clients' API
    _exchanges   a client's requests in flight on one connection, by id
    _resume      a client's subscription across connections, and its reconnect policy
    _failover    a client's several daemons: which URL to try next
    _converter   the one cattrs converter of these types
"""

from sandboxd.gateway.protocol import calls
from sandboxd.gateway.protocol._client_ops import ClientOps, SubscriptionOps
from sandboxd.gateway.protocol._converter import converter
from sandboxd.gateway.protocol._errors import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    ClientError,
    ConflictError,
    ConnectError,
    ConnectionLostError,
    ErrorCode,
    GoneError,
    InternalError,
    LimitExceededError,
    MalformedFrameError,
    NotFoundError,
    ProtocolError,
    RequestError,
    StartFailedError,
    UnavailableError,
    UnknownOpError,
    closed,
    error_from_reply,
    not_a_url,
    refused,
    unreachable,
)
from sandboxd.gateway.protocol._exchanges import Exchanges
from sandboxd.gateway.protocol._failover import Endpoints, first_of
from sandboxd.gateway.protocol._frames import (
    CaughtUpFrame,
    EndedFrame,
    EventFrame,
    EventsFrame,
    Frame,
    Reply,
    encode_caught_up,
    encode_ended,
    encode_error,
    encode_event_frame,
    encode_events_frame,
    encode_ok,
    parse_frame,
)
from sandboxd.gateway.protocol._requests import (
    OPS,
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
    parse_request,
    valid_sandbox_id,
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
    Usage,
    decode_event,
)
from sandboxd.gateway.protocol._resume import (
    SUBSCRIBE_ID,
    Ended,
    Resumption,
    gave_up,
    reconnect_delays,
    worth_retrying,
)
from sandboxd.gateway.protocol._transport import (
    CLOSE_GOING_AWAY,
    CLOSE_NO_PONG,
    CLOSE_NOT_READING,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
    CONNECT_TIMEOUT,
    MAX_FRAME_BYTES,
    MAX_IN_FLIGHT,
    MAX_REPLY_BYTES,
)
from sandboxd.gateway.protocol.calls import Call, Unchecked

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NOT_READING",
    "CLOSE_NO_PONG",
    "CLOSE_TOO_BIG",
    "CLOSE_UNSUPPORTED",
    "CONNECT_TIMEOUT",
    "MAX_FRAME_BYTES",
    "MAX_IN_FLIGHT",
    "MAX_REPLY_BYTES",
    "OPS",
    "SUBSCRIBE_ID",
    "AuthenticationError",
    "BadRequestError",
    "BusyError",
    "Call",
    "CaughtUpFrame",
    "ClientError",
    "ClientOps",
    "ConflictError",
    "ConnectError",
    "ConnectionLostError",
    "Ended",
    "EndedFrame",
    "Endpoints",
    "ErrorCode",
    "EventFrame",
    "EventPage",
    "EventsFrame",
    "EventsRead",
    "EventsSubscribe",
    "EventsUnsubscribe",
    "Exchanges",
    "Frame",
    "GoneError",
    "InternalError",
    "LimitExceededError",
    "Logs",
    "MalformedFrameError",
    "NotFoundError",
    "Params",
    "ProtocolError",
    "Reply",
    "Request",
    "RequestError",
    "Resumption",
    "SandboxBatchGet",
    "SandboxDelete",
    "SandboxFindBySessionKey",
    "SandboxGet",
    "SandboxInfo",
    "SandboxLogs",
    "SandboxPause",
    "SandboxResume",
    "SandboxSearch",
    "SandboxStart",
    "SandboxStats",
    "SandboxUsage",
    "SearchPage",
    "ServerDetails",
    "ServerInfo",
    "SpecGet",
    "SpecInfo",
    "SpecList",
    "StartFailedError",
    "Subscribed",
    "SubscriptionOps",
    "UnavailableError",
    "Unchecked",
    "UnknownOpError",
    "Usage",
    "calls",
    "closed",
    "converter",
    "decode_event",
    "encode_caught_up",
    "encode_ended",
    "encode_error",
    "encode_event_frame",
    "encode_events_frame",
    "encode_ok",
    "encode_request",
    "error_from_reply",
    "first_of",
    "gave_up",
    "not_a_url",
    "parse_frame",
    "parse_request",
    "reconnect_delays",
    "refused",
    "unreachable",
    "valid_sandbox_id",
    "worth_retrying",
]
