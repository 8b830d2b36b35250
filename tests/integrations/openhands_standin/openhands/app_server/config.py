"""Stand-in of openhands.app_server.config: the app's config of injectors, read from the
environment (``OH_...``), and the getters the injectors use."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from pydantic import BaseModel

from openhands.agent_server.env_parser import from_env
from openhands.app_server.sandbox.sandbox_service import SandboxService, SandboxServiceInjector
from openhands.app_server.sandbox.sandbox_spec_service import (
    SandboxSpecService,
    SandboxSpecServiceInjector,
)
from openhands.app_server.services.injector import InjectorState, Request
from openhands.app_server.user.user_context import UserContext, UserContextInjector


class AppServerConfig(BaseModel):
    sandbox: SandboxServiceInjector | None = None
    sandbox_spec: SandboxSpecServiceInjector | None = None
    user: UserContextInjector | None = None


def config_from_env() -> AppServerConfig:
    return from_env(AppServerConfig, "OH")


_global_config: AppServerConfig | None = None


def get_global_config() -> AppServerConfig:
    global _global_config
    if _global_config is None:
        _global_config = config_from_env()
    return _global_config


def get_sandbox_service(
    state: InjectorState, request: Request | None = None
) -> AbstractAsyncContextManager[SandboxService]:
    injector = get_global_config().sandbox
    assert injector is not None
    return injector.context(state, request)


def get_sandbox_spec_service(
    state: InjectorState, request: Request | None = None
) -> AbstractAsyncContextManager[SandboxSpecService]:
    injector = get_global_config().sandbox_spec
    assert injector is not None
    return injector.context(state, request)


def get_user_context(
    state: InjectorState, request: Request | None = None
) -> AbstractAsyncContextManager[UserContext]:
    injector = get_global_config().user
    assert injector is not None
    return injector.context(state, request)
