"""Stand-in of openhands.app_server.user.user_context: as much of UserContext as an
injector uses (who the request's user is)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from openhands.app_server.services.injector import Injector
from openhands.sdk.utils.models import DiscriminatedUnionMixin


class UserContext(ABC):
    """The user of a request."""

    @abstractmethod
    async def get_user_id(self) -> str | None:
        """The id of the user, None when there is no user (single-user mode)."""


class UserContextInjector(DiscriminatedUnionMixin, Injector[UserContext], ABC):
    pass
