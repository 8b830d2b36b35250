"""What the registry and actors raise: one type per outcome a caller must tell apart.

The gateway translates each, once, into the protocol's error code of the same name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandboxd.actors.info import SandboxInfo


class SandboxError(Exception):
    """Base of the errors below; ``str(error)`` is one sentence a person can act on."""


class BadRequest(SandboxError):
    """A parameter the protocol layer could not judge alone is wrong (a stale cursor)."""


class NotFound(SandboxError):
    """No such sandbox or spec visible to this user."""


class Conflict(SandboxError):
    """The sandbox's state does not allow the op, or the id is taken."""


class LimitExceeded(SandboxError):
    """A configured limit (sandboxes in total, or per user) is reached."""


class Unavailable(SandboxError):
    """The daemon cannot take the op now: shutting down, or the log is not writable."""


class StartFailed(SandboxError):
    """The sandbox did not become ready; ``sandbox`` is its info, status ERROR."""

    def __init__(self, message: str, sandbox: SandboxInfo) -> None:
        super().__init__(message)
        self.sandbox = sandbox
