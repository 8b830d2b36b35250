"""The reference agent server, run as a real process."""

from __future__ import annotations

import http.client
import json
import os
import signal
from typing import Any

import trio

from sandboxd.actors import health
from sandboxd.actors.proctree import ExitStatus
from tests.actors.children.support import Sandboxes, free_port

Request = tuple[str, str, dict[str, str], bytes | None]  # method, path, headers, body


def _request(port: int, requests: list[Request]) -> list[tuple[int, Any]]:
    """Send the requests on one connection (keep-alive); return statuses and JSON bodies."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        answers = []
        for method, path, headers, body in requests:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            answers.append((response.status, json.loads(response.read())))
        return answers
    finally:
        conn.close()


async def get(port: int, path: str, key: str | None = None) -> tuple[int, Any]:
    headers = {} if key is None else {"X-Session-API-Key": key}
    requests: list[Request] = [("GET", path, headers, None)]
    [answer] = await trio.to_thread.run_sync(_request, port, requests)
    return answer


async def test_alive_and_health_need_no_key(sandboxes: Sandboxes) -> None:
    _, port = await sandboxes.agent_server()
    assert await get(port, "/alive") == (200, {"status": "ok"})
    assert await get(port, "/health") == (200, {"status": "ok"})
    assert await get(port, "/health?verbose=1") == (200, {"status": "ok"})


async def test_other_paths_need_the_session_key(sandboxes: Sandboxes) -> None:
    spawned, port = await sandboxes.agent_server(key="right-key")
    assert (await get(port, "/api/conversations"))[0] == 401
    assert (await get(port, "/api/conversations", key="wrong-key"))[0] == 401
    assert (await get(port, "/api/conversations", key="right-key-but-longer"))[0] == 401
    status, body = await get(port, "/api/conversations", key="right-key")
    assert status == 200
    assert body["status"] == "ok"
    assert body["path"] == "/api/conversations"
    assert body["sandbox_id"].startswith("test-")
    assert spawned.process.returncode is None


async def test_keep_alive_with_bodies(sandboxes: Sandboxes) -> None:
    _, port = await sandboxes.agent_server(key="k")
    key = {"X-Session-API-Key": "k"}
    answers = await trio.to_thread.run_sync(
        _request,
        port,
        [
            ("POST", "/api/x", key, b'{"a": 1}'),
            ("POST", "/api/x", {}, b"ignored"),
            ("GET", "/alive", {}, None),
            ("DELETE", "/api/x", key, None),
        ],
    )
    assert [status for status, _ in answers] == [200, 401, 200, 200]


async def test_the_key_may_come_from_the_openhands_variable(sandboxes: Sandboxes) -> None:
    _, port = await sandboxes.agent_server(key=None, OH_SESSION_API_KEYS_0="oh-key")
    assert (await get(port, "/x", key="oh-key"))[0] == 200
    assert (await get(port, "/x", key="other"))[0] == 401


async def test_without_a_key_every_authenticated_path_is_refused(sandboxes: Sandboxes) -> None:
    _, port = await sandboxes.agent_server(key=None)
    assert (await get(port, "/x"))[0] == 401
    assert (await get(port, "/x", key=""))[0] == 401
    assert (await get(port, "/alive"))[0] == 200


async def test_port_flag_wins_over_the_environment(sandboxes: Sandboxes) -> None:
    port, other = free_port(), free_port()
    _, listening = await sandboxes.agent_server("--port", str(port), port=port, PORT=str(other))
    assert listening == port
    assert not await health.probe(other, "/alive", timeout=1)


async def test_no_port_at_all_is_a_usage_error(sandboxes: Sandboxes) -> None:
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn("-m", "sandboxd.actors.agent_server", sandbox_id=sandbox_id)
    with trio.fail_after(10):
        assert (await spawned.wait()).exit_code == 2
    assert "PORT" in sandboxes.output_path(sandbox_id).read_text()


async def test_sigterm_stops_it_cleanly_and_it_says_one_line(sandboxes: Sandboxes) -> None:
    spawned, port = await sandboxes.agent_server()
    await get(port, "/alive")
    os.kill(spawned.id.pid, signal.SIGTERM)
    with trio.fail_after(5):
        assert await spawned.wait() == ExitStatus(exit_code=0, signal=None)
    log = sandboxes.output_path(sandboxes.ids[-1]).read_text()
    assert log == f"agent_server listening on http://127.0.0.1:{port}\n"
    assert not await health.probe(port, "/alive", timeout=1)
