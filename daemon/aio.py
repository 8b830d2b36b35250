"""sandboxd.aio: the asyncio client, for asyncio programs (an OpenHands app server).

    import sandboxd.aio

    async with sandboxd.aio.open_client("ws://127.0.0.1:8765/v1", token) as client:
        info = await client.start(spec_id="default")

The client lives beside the trio one in the gateway (gateway/aio_client.py),
where both are a transport around the same protocol package; this module is
its public name, and gives the same names as ``sandboxd.gateway.client``: the
result types and exception classes are the very same classes. It needs the
``aio`` extra (the `websockets` package) and imports no trio.
"""

from sandboxd.gateway.aio_client import Client, LogFollow, Subscription, connect, open_client
from sandboxd.gateway.protocol import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    ClientError,
    ConflictError,
    ConnectError,
    ConnectionLostError,
    EventPage,
    FollowedLogs,
    GoneError,
    InternalError,
    LimitExceededError,
    Logs,
    MalformedFrameError,
    NotFoundError,
    SandboxInfo,
    SandboxUsage,
    SearchPage,
    ServerDetails,
    SpecInfo,
    StartFailedError,
    UnavailableError,
    UnknownOpError,
    decode_event,
    error_from_reply,
)

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "BusyError",
    "Client",
    "ClientError",
    "ConflictError",
    "ConnectError",
    "ConnectionLostError",
    "EventPage",
    "FollowedLogs",
    "GoneError",
    "InternalError",
    "LimitExceededError",
    "LogFollow",
    "Logs",
    "MalformedFrameError",
    "NotFoundError",
    "SandboxInfo",
    "SandboxUsage",
    "SearchPage",
    "ServerDetails",
    "SpecInfo",
    "StartFailedError",
    "Subscription",
    "UnavailableError",
    "UnknownOpError",
    "connect",
    "decode_event",
    "error_from_reply",
    "open_client",
]
