"""Labels end to end, with both clients: bounds answered bad_request naming the field and the
key, labels in SandboxInfo and sandbox.created, and the labels filters of sandbox.search,
events.read and events.subscribe (all must match; a deleted sandbox's events keep its labels;
another user's never show)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
import trio

from sandboxd.events import types as ev
from sandboxd.gateway.client import BadRequestError
from sandboxd.gateway.client import open_client as open_trio_client
from sandboxd.gateway.protocol import calls
from tests.daemon_process import DaemonProcess
from tests.gateway.aio_bridge import open_aio_client
from tests.gateway.support import Daemon
from tests.gateway.test_cli_client import one_line_error, sandboxd
from tests.support import TOKENS

ALICE, BOB, ROOT = TOKENS["alice"], TOKENS["bob"], TOKENS["root"]


@pytest.fixture(params=["trio", "asyncio"])
def open_client(request: pytest.FixtureRequest) -> Any:
    return open_trio_client if request.param == "trio" else open_aio_client


def new_id() -> str:
    return "l-" + uuid.uuid4().hex[:12]


BAD_LABELS = [
    ({f"k{i}": "v" for i in range(33)}, "'labels' may hold at most 32 labels, not 33."),
    ({"Team": "a"}, "'labels' has the key 'Team'"),
    ({"": "a"}, "'labels' has the key ''"),
    ({"k" * 64: "a"}, "'labels' has the key 'kkkk"),
    ({"team": "a" * 257}, "'labels['team']' is 257 characters long"),
    ({"team": 1}, "'labels['team']' must be a string, not an integer."),
    (["team=a"], "'labels' must be an object of strings, not a list."),
]


@pytest.mark.parametrize(("labels", "message"), BAD_LABELS)
@pytest.mark.parametrize(
    ("op", "required"),
    [
        ("sandbox.start", {"spec_id": "sleep"}),
        ("sandbox.search", {}),
        ("events.read", {"after_seq": 0}),
        ("events.subscribe", {}),
    ],
)
async def test_bad_labels_are_bad_requests_naming_the_field_and_key(
    daemon: Daemon, op: str, required: dict[str, Any], labels: Any, message: str
) -> None:
    async with open_trio_client(daemon.url, ALICE) as client:
        with pytest.raises(BadRequestError) as caught:
            await client.request(op, {**required, "labels": labels})
        assert message in caught.value.message
        # Nothing was started, and the connection (and the daemon) goes on.
        assert [s async for s in client.search_all()] == []


def test_the_clients_check_labels_before_sending() -> None:
    with pytest.raises(BadRequestError, match="'labels' has the key 'Team'"):
        calls.start(labels={"Team": "a"})
    with pytest.raises(BadRequestError, match="at most 32 labels"):
        calls.search(labels={f"k{i}": "v" for i in range(33)})
    with pytest.raises(BadRequestError, match="256"):
        calls.subscribe(labels={"k": "v" * 257})
    # The most the bounds allow is fine.
    calls.start(labels={f"k.{i:02}-" + "x" * 58: "v" * 256 for i in range(32)})


async def test_labels_are_kept_and_searched(daemon: Daemon, open_client: Any) -> None:
    async with open_client(daemon.url, ALICE) as alice, open_client(daemon.url, BOB) as bob:
        web = await alice.start(spec_id="sleep", labels={"team": "web", "env": "dev"})
        api = await alice.start(spec_id="sleep", labels={"team": "api", "env": "dev"})
        plain = await alice.start(spec_id="sleep")
        bobs = await bob.start(spec_id="sleep", labels={"team": "web", "env": "dev"})
        assert web.labels == {"team": "web", "env": "dev"} and plain.labels == {}
        got = await alice.get(web.id)
        assert got is not None and got.labels == web.labels

        async def ids(client: Any, **labels: str) -> list[str]:
            return [s.id async for s in client.search_all(labels=labels)]

        assert await ids(alice, team="web") == [web.id]
        assert await ids(alice, env="dev") == [api.id, web.id]  # newest first
        assert await ids(alice, team="web", env="dev") == [web.id]  # all must match
        assert await ids(alice, team="web", env="prod") == []
        assert await ids(alice) == [plain.id, api.id, web.id]  # no filter: all
        assert await ids(bob, team="web") == [bobs.id]  # only one's own
        page = await alice.search(labels={"team": "api"}, limit=1)
        assert [s.id for s in page.items] == [api.id] and page.next_page_id is None


async def test_events_are_filtered_by_the_labels_of_their_sandbox(
    daemon: Daemon, open_client: Any
) -> None:
    async with open_client(daemon.url, ALICE) as alice, open_client(daemon.url, BOB) as bob:
        head = (await alice.server_info()).head_seq
        async with alice.subscribe(head, labels={"team": "web"}) as stream:
            web = await alice.start(spec_id="sleep", labels={"team": "web"})
            api = await alice.start(spec_id="sleep", labels={"team": "api"})
            await bob.start(spec_id="sleep", labels={"team": "web"})  # not alice's to see
            await alice.delete(api.id)
            await alice.delete(web.id)  # its events keep its labels after its deletion
            seen: list[ev.Event] = []
            with trio.fail_after(10):
                async for event in stream:
                    seen.append(event)
                    if event.type == "sandbox.deleted":
                        break
        assert {e.sandbox_id for e in seen} == {web.id}
        created = seen[0].data
        assert isinstance(created, ev.SandboxCreated) and created.labels == {"team": "web"}

        page = await alice.read_events(head, labels={"team": "web"})
        assert [e.seq for e in page.events] == [e.seq for e in seen]
        page = await alice.read_events(head, labels={"team": "web", "env": "x"})
        assert page.events == []
    async with open_client(daemon.url, ROOT) as root:
        # An admin sees every sandbox's, bob's included; no daemon event has labels.
        page = await root.read_events(head, labels={"team": "web"})
        assert {e.sandbox_id for e in page.events} - {web.id} != set()
        assert all(e.sandbox_id is not None for e in page.events)


def test_the_cli_starts_and_lists_by_label(daemon_process: DaemonProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    started = sandboxd(
        daemon_process, "start", "--spec", "sleep", "--label", f"run={tag}", "--json"
    )
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    assert info["labels"] == {"run": tag}
    other = sandboxd(daemon_process, "start", "--spec", "sleep", "--json")
    assert other.returncode == 0, other.stderr

    listed = sandboxd(daemon_process, "ls", "--label", f"run={tag}", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [s["id"] for s in json.loads(listed.stdout)] == [info["id"]]
    table = sandboxd(daemon_process, "ls", "--label", f"run={tag}", "--label", "x=y")
    assert table.returncode == 0 and table.stdout == ""  # all must match: none does
    shown = sandboxd(daemon_process, "get", info["id"])
    assert re.search(rf"^label run +{tag}$", shown.stdout, re.MULTILINE), shown.stdout

    assert "'labels' has the key 'Run'" in one_line_error(
        sandboxd(daemon_process, "start", "--spec", "sleep", "--label", "Run=1")
    )
    assert "--label 'run' must be NAME=VALUE" in one_line_error(
        sandboxd(daemon_process, "ls", "--label", "run")
    )
