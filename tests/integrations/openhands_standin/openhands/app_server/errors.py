"""Stand-in of openhands.app_server.errors.

Upstream ``OpenHandsError`` is a fastapi ``HTTPException``, which this environment
lacks: here it is an Exception with the same constructor and the same ``str()``
(starlette's: ``"STATUS: DETAIL"``).
"""

from typing import Any


class OpenHandsError(Exception):
    """General Error"""

    def __init__(
        self,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        status_code: int = 500,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        self.status_code = status_code

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


class AuthError(OpenHandsError):
    """Error in authentication."""

    def __init__(
        self,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        status_code: int = 401,
    ) -> None:
        super().__init__(detail=detail, headers=headers, status_code=status_code)


class SandboxError(OpenHandsError):
    """Error in Sandbox."""
