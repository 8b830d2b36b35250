"""A client's follow of a sandbox's output, with no I/O: what to send, what each frame means.

``sandbox.logs`` with ``follow`` answers the tail and names a subscription;
the frames of that subscription carry the output written after the tail, then
one ``ended`` frame. A follow has a connection of its own (as an event
subscription has), so that a reader that falls behind holds back only itself.
It is not resumed across connections: output has no position a client could
resubscribe from (a restarted daemon counts its output afresh), so a dropped
connection ends the follow with ``ConnectionLostError``, and the caller may
start another from a new tail.
"""

from __future__ import annotations

from sandboxd.gateway.protocol._frames import OutputEndedFrame, OutputFrame, Reply, parse_frame
from sandboxd.gateway.protocol._requests import SandboxLogs
from sandboxd.gateway.protocol._results import FollowedLogs
from sandboxd.gateway.protocol.calls import Call, follow_logs

#: The id of the logs request: the only request on a follow's own connection.
FOLLOW_ID = 1


class OutputEnd:
    """``OutputStream.receive``'s answer when the server ended the follow."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class OutputStream:
    """One follow's state: its request, its subscription's id, whether it ended and why."""

    def __init__(self, sandbox_id: str, *, tail_bytes: int = 65536) -> None:
        self._call = follow_logs(sandbox_id, tail_bytes=tail_bytes)  # checked here
        self.subscription: str | None = None
        #: Why the server ended the follow (None while it goes on).
        self.ended: str | None = None

    @property
    def params(self) -> SandboxLogs:
        params = self._call.params
        assert isinstance(params, SandboxLogs)
        return params

    def request(self) -> str:
        """The frame to send on the follow's fresh connection."""
        return self._call.encode(FOLLOW_ID)

    def reply(self, frame: str | bytes) -> FollowedLogs | None:
        """The tail, if ``frame`` is the reply (its error raised); None for anything else."""
        reply = parse_frame(frame)
        if not (isinstance(reply, Reply) and reply.id == FOLLOW_ID):
            return None
        logs = self._call.result(reply)
        self.subscription = logs.subscription
        return logs

    def receive(self, frame: str | bytes) -> str | OutputEnd | None:
        """What one frame means: output to deliver, the follow's end, or nothing."""
        parsed = parse_frame(frame)
        if isinstance(parsed, Reply) or parsed.subscription != self.subscription:
            return None
        if isinstance(parsed, OutputFrame):
            return parsed.output
        if isinstance(parsed, OutputEndedFrame):
            self.ended = parsed.reason
            return OutputEnd(parsed.reason)
        return None


__all__ = ["FOLLOW_ID", "Call", "OutputEnd", "OutputStream"]
