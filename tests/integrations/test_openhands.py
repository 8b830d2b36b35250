"""sandboxd as OpenHands' SandboxService: the adapter, against the stand-in of OpenHands'
modules (openhands_standin/), driving a real daemon. The behaviour upstream's own service
tests ask of a SandboxService, and what this adapter promises besides (acting per user, the
event stream, one connection per process).

The adapter is asyncio's: each test runs its scenario with asyncio.run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import pytest
from openhands.app_server import config as oh_config
from openhands.app_server.errors import SandboxError
from openhands.app_server.sandbox.sandbox_models import (
    AGENT_SERVER,
    VSCODE,
    ExposedUrl,
    SandboxInfo,
    SandboxStatus,
)
from openhands.app_server.sandbox.sandbox_service import SandboxService
from openhands.app_server.sandbox.sandbox_spec_service import SandboxSpecService
from openhands.app_server.services.injector import InjectorState, Request, State
from openhands.app_server.user.user_context import UserContext, UserContextInjector

import sandboxd.aio
from sandboxd.integrations import openhands as adapter
from sandboxd.integrations.openhands import (
    SandboxdSandboxService,
    SandboxdSandboxServiceInjector,
    SandboxdSandboxSpecService,
    SandboxdSandboxSpecServiceInjector,
)
from tests.daemon_process import DaemonProcess
from tests.integrations.conftest import OH_PORTS
from tests.support import TOKENS

ROOT, ALICE = TOKENS["root"], TOKENS["alice"]
T = TypeVar("T")


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an asyncio scenario; afterwards no task of the adapter or the client is left."""

    async def checked() -> T:
        try:
            return await scenario()
        finally:
            await adapter.close_shared_clients()
            assert asyncio.all_tasks() == {asyncio.current_task()}

    return asyncio.run(checked())


def new_user() -> str:
    return "oh-user-" + uuid.uuid4().hex[:8]


async def service_for(daemon: DaemonProcess, user_id: str | None) -> SandboxdSandboxService:
    return SandboxdSandboxService(await adapter.shared_client(daemon.url, ROOT), user_id)


def recorded_env(info: SandboxInfo, daemon: DaemonProcess) -> dict[str, str]:
    env_file = daemon.config.sandboxes_dir / info.id / "env.json"
    deadline = time.monotonic() + 10
    while not env_file.exists():
        assert time.monotonic() < deadline, "the sandbox never wrote its environment"
        time.sleep(0.01)
    env: dict[str, str] = json.loads(env_file.read_text())
    return env


# --- The interface --------------------------------------------------------------------------


def test_every_method_of_upstream_s_interfaces_with_its_signature() -> None:
    for interface, implementation in (
        (SandboxService, SandboxdSandboxService),
        (SandboxSpecService, SandboxdSandboxSpecService),
    ):
        assert not inspect.isabstract(implementation)
        for name, method in inspect.getmembers(interface, inspect.isfunction):
            if not name.startswith("_"):
                mine = getattr(implementation, name)
                assert inspect.signature(mine) == inspect.signature(method), name


# --- Starting, reading ----------------------------------------------------------------------


def test_a_sandbox_started_for_a_user_is_that_user_s_alone(daemon: DaemonProcess) -> None:
    user, other = new_user(), new_user()

    async def scenario() -> None:
        service = await service_for(daemon, user)
        service.web_url = "https://openhands.example.com"
        info = await service.start_sandbox(extra_env={"GREETING": "hello", "LOG_LEVEL": "debug"})
        assert isinstance(info, SandboxInfo)
        assert info.status == SandboxStatus.RUNNING and info.created_by_user_id == user
        assert info.sandbox_spec_id == "recorder"  # the daemon's default spec
        assert info.exposed_urls is not None and info.session_api_key
        assert [url.name for url in info.exposed_urls] == list(OH_PORTS)
        raw = await service.client.get(info.id)
        assert raw is not None
        for url in info.exposed_urls:
            expected = f"http://localhost:{url.port}"
            if url.name == VSCODE:  # with its token and folder, as OpenHands' services give it
                expected += "/?" + urlencode(
                    {"tkn": info.session_api_key, "folder": raw.working_dir}
                )
            assert url == ExposedUrl(name=url.name, url=expected, port=url.port)
        assert info.created_at.tzinfo is not None

        # extra_env reaches the process's environment, with what the app server passes.
        env = await asyncio.to_thread(recorded_env, info, daemon)
        assert env["GREETING"] == "hello" and env["LOG_LEVEL"] == "debug"
        assert env["OH_SESSION_API_KEYS_0"] == info.session_api_key
        assert env["OH_WEBHOOKS_0_BASE_URL"] == "https://openhands.example.com/api/v1/webhooks"
        assert env["OH_ALLOW_CORS_ORIGINS_0"] == "https://openhands.example.com"
        ports = {url.name: url.port for url in info.exposed_urls}
        assert env["WORKER_1"] == str(ports["WORKER_1"])
        assert env["SANDBOX_PORT_VSCODE"] == str(ports["VSCODE"])

        assert await service.get_sandbox(info.id) == info
        theirs = await service_for(daemon, other)
        assert await theirs.get_sandbox(info.id) is None
        assert await theirs.get_sandbox_by_session_api_key(info.session_api_key) is None
        assert (await theirs.search_sandboxes()).items == []
        assert await theirs.batch_get_sandboxes([info.id]) == [None]
        # OpenHands without users: the token's own user, an admin here, sees every sandbox.
        assert await (await service_for(daemon, None)).get_sandbox(info.id) == info

    run(scenario)


def test_get_sandbox_by_session_api_key_finds_running_sandboxes_and_only_them(
    daemon: DaemonProcess,
) -> None:
    async def scenario() -> None:
        service = await service_for(daemon, new_user())
        info = await service.start_sandbox()
        key = info.session_api_key
        assert key is not None
        assert await service.get_sandbox_by_session_api_key(key) == info
        assert await service.pause_sandbox(info.id) is True
        assert await service.get_sandbox_by_session_api_key(key) is None
        assert await service.resume_sandbox(info.id) is True
        found = await service.get_sandbox_by_session_api_key(key)
        assert found is not None and found.status == SandboxStatus.RUNNING
        assert await service.get_sandbox_by_session_api_key(key[::-1]) is None
        assert await service.get_sandbox_by_session_api_key("") is None
        assert await service.get_sandbox_by_session_api_key("k" * 1000) is None
        assert await service.delete_sandbox(info.id) is True
        assert await service.get_sandbox_by_session_api_key(key) is None

    run(scenario)


def test_search_and_batch_get(daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        service = await service_for(daemon, new_user())
        started = [await service.start_sandbox() for _ in range(3)]
        first = await service.search_sandboxes(limit=2)
        assert [s.id for s in first.items] == [started[2].id, started[1].id]  # newest first
        assert first.next_page_id is not None
        rest = await service.search_sandboxes(page_id=first.next_page_id, limit=2)
        assert [s.id for s in rest.items] == [started[0].id] and rest.next_page_id is None
        assert len((await service.search_sandboxes(limit=1000)).items) == 3
        with pytest.raises(ValueError, match="page_id"):
            await service.search_sandboxes(page_id="nonsense")

        someone_else_s = await (await service_for(daemon, new_user())).start_sandbox()
        ids = [started[0].id, "not an id!", "no-such-sandbox", someone_else_s.id, started[2].id]
        got = await service.batch_get_sandboxes(ids)
        assert got == [started[0], None, None, None, started[2]]

    run(scenario)


# --- Pause, resume, delete ------------------------------------------------------------------


def test_pause_resume_and_delete_of_an_unknown_sandbox_return_false(
    daemon: DaemonProcess,
) -> None:
    async def scenario() -> None:
        service = await service_for(daemon, new_user())
        theirs = await (await service_for(daemon, new_user())).start_sandbox()
        for sandbox_id in ("no-such-sandbox", "not an id!", theirs.id):
            assert await service.pause_sandbox(sandbox_id) is False
            assert await service.resume_sandbox(sandbox_id) is False
            assert await service.delete_sandbox(sandbox_id) is False
        assert (await (await service_for(daemon, None)).get_sandbox(theirs.id)) == theirs

        mine = await service.start_sandbox()
        assert await service.pause_sandbox(mine.id) is True
        assert await service.pause_sandbox(mine.id) is True  # already paused
        paused = await service.get_sandbox(mine.id)
        assert paused is not None and paused.status == SandboxStatus.PAUSED
        assert paused.session_api_key is None and paused.exposed_urls is None
        assert await service.resume_sandbox(mine.id) is True
        assert await service.resume_sandbox(mine.id) is True  # already running
        assert await service.delete_sandbox(mine.id) is True
        assert await service.get_sandbox(mine.id) is None
        assert await service.delete_sandbox(mine.id) is False

    run(scenario)


def test_pause_old_sandboxes_keeps_the_newest_running(daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        service = await service_for(daemon, new_user())
        other = await service_for(daemon, new_user())
        others = [await other.start_sandbox() for _ in range(2)]
        started = [await service.start_sandbox() for _ in range(5)]
        assert await service.pause_sandbox(started[1].id)  # already paused: not counted
        assert await service.pause_old_sandboxes(5) == []
        paused = await service.pause_old_sandboxes(2)
        assert paused == [started[0].id, started[2].id]  # the oldest running, oldest first
        statuses = [(await service.get_sandbox(s.id)).status for s in started]  # type: ignore[union-attr]
        assert statuses == [SandboxStatus.PAUSED] * 3 + [SandboxStatus.RUNNING] * 2
        # Another user's sandboxes are not this user's to count or pause.
        for info in others:
            assert (await other.get_sandbox(info.id)).status == SandboxStatus.RUNNING  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="greater than 0"):
            await service.pause_old_sandboxes(0)

    run(scenario)


# --- What fails -----------------------------------------------------------------------------


def test_what_sandboxd_refuses_is_a_sandbox_error_with_its_sentence(
    daemon: DaemonProcess,
) -> None:
    async def scenario() -> None:
        service = await service_for(daemon, new_user())
        with pytest.raises(ValueError, match="spec 'no-such-spec' does not exist"):
            await service.start_sandbox(sandbox_spec_id="no-such-spec")
        with pytest.raises(SandboxError, match="did not start: the process exited with code 1"):
            await service.start_sandbox(sandbox_spec_id="fails")
        taken = await service.start_sandbox(sandbox_id="oh-" + uuid.uuid4().hex[:10])
        with pytest.raises(SandboxError, match=f"sandbox id '{taken.id}' is taken"):
            await service.start_sandbox(sandbox_id=taken.id)
        with pytest.raises(ValueError, match="'sandbox_id'"):
            await service.start_sandbox(sandbox_id="not an id!")
        # The "fails" sandbox (ERROR) and "taken" count: 2 of the 6 a user may have.
        for _ in range(4):
            await service.start_sandbox()
        with pytest.raises(SandboxError, match="the limit max_sandboxes_per_user is 6"):
            await service.start_sandbox()

        # A token that is not an admin's cannot act for OpenHands' users, and says so.
        async with sandboxd.aio.open_client(daemon.url, ALICE) as alice:
            with pytest.raises(SandboxError, match="an admin's token"):
                await SandboxdSandboxService(alice, new_user()).start_sandbox()
            # Without users, it acts as its own sandboxd user.
            own = await SandboxdSandboxService(alice).start_sandbox()
            assert own.created_by_user_id == "alice"
            assert await SandboxdSandboxService(alice).delete_sandbox(own.id) is True

    run(scenario)


# --- Waiting for RUNNING, on the event stream ------------------------------------------------


def test_wait_for_sandbox_running_follows_the_event_stream(daemon: DaemonProcess) -> None:
    user = new_user()

    async def scenario() -> None:
        service = await service_for(daemon, user)
        client = service.client
        # A poll_interval longer than the timeout: only the event stream can end these
        # waits in time.
        starting = await client.start(spec_id="agent", wait=False, owner=user)
        assert starting.status.value == "STARTING"
        async with httpx.AsyncClient() as http:
            began = time.monotonic()
            running = await service.wait_for_sandbox_running(
                starting.id, timeout=30, poll_interval=60, httpx_client=http
            )
        assert running.status == SandboxStatus.RUNNING and time.monotonic() - began < 20
        assert running.exposed_urls and running.exposed_urls[0].name == AGENT_SERVER
        # RUNNING already: at once.
        assert (await service.wait_for_sandbox_running(starting.id, timeout=1)).id == starting.id

        stuck = await client.start(spec_id="stuck", wait=False, owner=user)
        began = time.monotonic()
        with pytest.raises(SandboxError, match=f"failed to start within 1s: {stuck.id}"):
            await service.wait_for_sandbox_running(stuck.id, timeout=1, poll_interval=60)
        assert time.monotonic() - began >= 1  # and it ended by the timeout, as the message says

        # Then its start fails (ERROR): the waiting ends at once, saying why.
        with pytest.raises(SandboxError, match=f"entered error state: {stuck.id}: .* 200 on /"):
            await service.wait_for_sandbox_running(stuck.id, timeout=30, poll_interval=60)
        assert time.monotonic() - began < 10

        with pytest.raises(SandboxError, match="Sandbox not found: no-such-sandbox"):
            await service.wait_for_sandbox_running("no-such-sandbox", timeout=5)
        theirs = await (await service_for(daemon, new_user())).start_sandbox()
        with pytest.raises(SandboxError, match="Sandbox not found"):
            await service.wait_for_sandbox_running(theirs.id, timeout=5)

        # Many waits at once share the client's one subscription.
        many = [await client.start(spec_id="agent", wait=False, owner=user) for _ in range(3)]
        done = await asyncio.gather(
            *(service.wait_for_sandbox_running(s.id, timeout=30, poll_interval=60) for s in many)
        )
        assert [s.status for s in done] == [SandboxStatus.RUNNING] * 3

    run(scenario)


def test_a_wait_ends_when_its_connection_does(daemon: DaemonProcess) -> None:
    user = new_user()

    async def scenario() -> None:
        service = await service_for(daemon, user)
        stuck = await service.client.start(spec_id="stuck", wait=False, owner=user)
        waiting = asyncio.create_task(
            service.wait_for_sandbox_running(stuck.id, timeout=30, poll_interval=60)
        )
        watch = adapter._StatusWatch.of(service.client)

        def watching() -> bool:
            subscribed = watch._subscribed
            return subscribed is not None and subscribed.done() and stuck.id in watch._waiting

        async with asyncio.timeout(10):  # until it waits on the live stream
            while not watching():  # noqa: ASYNC110  # no event says so: a deadline bounds it
                await asyncio.sleep(0.005)
        assert not waiting.done()
        began = time.monotonic()
        await adapter.close_shared_clients()  # an app server's shutdown, or a lost daemon
        with pytest.raises(SandboxError, match="sandboxd"):
            await waiting
        assert time.monotonic() - began < 5  # at once, not at its timeout

    run(scenario)


# --- Chosen by OH_SANDBOX_KIND, built per request -------------------------------------------


class FixedUserContext(UserContext):
    def __init__(self, user_id: str | None) -> None:
        self.user_id = user_id

    async def get_user_id(self) -> str | None:
        return self.user_id


class FixedUserContextInjector(UserContextInjector):
    """The request's user, as an app server's auth would give it."""

    user_id: str | None = None

    async def inject(
        self, state: InjectorState, request: Request | None = None
    ) -> AsyncGenerator[UserContext, None]:
        yield FixedUserContext(self.user_id)


@pytest.mark.parametrize(
    "kind",
    [
        "SandboxdSandboxServiceInjector",
        "sandboxd.integrations.openhands.SandboxdSandboxServiceInjector",
    ],
)
def test_oh_sandbox_kind_chooses_sandboxd_and_requests_share_one_connection(
    daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv("OH_SANDBOX_KIND", kind)
    monkeypatch.setenv("OH_SANDBOX_URL", daemon.url)
    monkeypatch.setenv("OH_SANDBOX_TOKEN", ROOT)
    monkeypatch.setenv("OH_SANDBOX_SPEC_KIND", "SandboxdSandboxSpecServiceInjector")
    monkeypatch.setenv("OH_SANDBOX_SPEC_URL", daemon.url)
    monkeypatch.setenv("OH_SANDBOX_SPEC_TOKEN", ROOT)
    config = oh_config.config_from_env()
    assert isinstance(config.sandbox, SandboxdSandboxServiceInjector)
    assert isinstance(config.sandbox_spec, SandboxdSandboxSpecServiceInjector)
    assert config.sandbox.url == daemon.url
    assert ROOT not in repr(config.sandbox)  # the token stays out of logs
    user = new_user()
    config.user = FixedUserContextInjector(user_id=user)
    monkeypatch.setattr(oh_config, "_global_config", config)

    async def request() -> tuple[SandboxdSandboxService, SandboxInfo]:
        async with oh_config.get_sandbox_service(State(), Request()) as service:
            assert isinstance(service, SandboxdSandboxService)
            return service, await service.start_sandbox()

    async def scenario() -> None:
        results = await asyncio.gather(*(request() for _ in range(5)))
        services = [service for service, _ in results]
        assert len({id(service.client) for service in services}) == 1  # one connection
        assert {info.created_by_user_id for _, info in results} == {user}
        # A lost connection is made again by the next request.
        await services[0].client.aclose()
        service, _ = await request()
        assert service.client is not services[0].client and not service.client.closed

        async with oh_config.get_sandbox_spec_service(State()) as specs:
            assert isinstance(specs, SandboxdSandboxSpecService)
            assert specs.client is service.client  # the same daemon and token: shared
            default = await specs.get_default_sandbox_spec()
            assert default.id == "recorder" and default.command is not None
            first = await specs.search_sandbox_specs(limit=3)
            assert [s.id for s in first.items] == ["recorder", "agent", "stuck"]
            rest = await specs.search_sandbox_specs(page_id=first.next_page_id)
            assert [s.id for s in rest.items] == ["fails"] and rest.next_page_id is None
            assert await specs.get_sandbox_spec("agent") == first.items[1]
            assert await specs.get_sandbox_spec("nope") is None
            assert await specs.batch_get_sandbox_specs(["nope", "fails"]) == [None, rest.items[0]]

    run(scenario)


def test_an_unknown_kind_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OH_SANDBOX_KIND", "SandboxdSandboxServiceInjektor")
    with pytest.raises(ValueError, match="Unknown kind 'SandboxdSandboxServiceInjektor'"):
        oh_config.config_from_env()


def test_openhands_is_imported_by_the_adapter_alone(tmp_path: Path) -> None:
    # sandboxd never imports OpenHands; its adapter, without it, says what it needs.
    check = (
        "import sys, sandboxd, sandboxd.aio, sandboxd.integrations;"
        " assert 'openhands' not in sys.modules and 'pydantic' not in sys.modules\n"
        "try:\n    import sandboxd.integrations.openhands\n"
        "except ImportError as exc:\n    print(exc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "runs inside an OpenHands app server (Python 3.12+" in done.stdout


def test_the_adapter_runs_against_this_stand_in(tmp_path: Path) -> None:
    # What these tests ran against: the stand-in, not an OpenHands installed by chance.
    import openhands

    assert Path(openhands.__file__).parent.parent.name == "openhands_standin"
