"""The client commands of the CLI against a daemon subprocess: tables, --json, and one clear
line (no traceback) for every error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.daemon_process import DaemonProcess, free_port
from tests.gateway.support import env_for_cli
from tests.support import TOKENS

ALICE, ROOT = TOKENS["alice"], TOKENS["root"]
SYSTEM_TOKEN = Path("/var/lib/sandboxd/admin.token")


def sandboxd(
    daemon: DaemonProcess | None, *args: str, token: str | None = ALICE, **env: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sandboxd.cli", *args]
    if daemon is not None and "--url" not in args:
        command += ["--url", daemon.url]
    if token is not None:
        command += ["--token", token]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parent,  # not the project's root, whose ./sandboxd shadows the package
        env=env_for_cli(**env),
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_sandbox_commands(daemon_process: DaemonProcess) -> None:
    sandbox_id = "cli-" + uuid.uuid4().hex[:10]
    started = sandboxd(
        daemon_process, "start", "--spec", "sleep", "--id", sandbox_id, "--env", "A=1", "--json"
    )
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    assert info["id"] == sandbox_id and info["status"] == "RUNNING"

    listed = sandboxd(daemon_process, "ls")
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "SPEC"]
    assert any(row.split()[:3] == [sandbox_id, "RUNNING", "sleep"] for row in rows)
    as_json = json.loads(sandboxd(daemon_process, "ls", "--status", "RUNNING", "--json").stdout)
    assert sandbox_id in [item["id"] for item in as_json]

    shown = sandboxd(daemon_process, "get", sandbox_id)
    assert shown.returncode == 0 and "RUNNING" in shown.stdout and "session_api_key" in shown.stdout
    paused = sandboxd(daemon_process, "pause", sandbox_id, "--json")
    assert json.loads(paused.stdout)["status"] == "PAUSED"
    resumed = sandboxd(daemon_process, "resume", sandbox_id, "--json")
    assert json.loads(resumed.stdout)["status"] == "RUNNING"
    assert sandboxd(daemon_process, "logs", sandbox_id, "--tail", "100").returncode == 0

    events = sandboxd(daemon_process, "events", "--sandbox", sandbox_id, "--json")
    assert events.returncode == 0, events.stderr
    types = [json.loads(line)["type"] for line in events.stdout.splitlines()]
    assert types == [
        "sandbox.created",
        "sandbox.process_started",
        "sandbox.running",
        "sandbox.paused",
        "sandbox.resumed",
    ]
    table = sandboxd(daemon_process, "events", "--sandbox", sandbox_id, "--type", "sandbox.paused")
    assert len(table.stdout.splitlines()) == 1 and "sandbox.paused" in table.stdout

    removed = sandboxd(daemon_process, "rm", sandbox_id)
    assert removed.returncode == 0 and removed.stdout.strip() == f"deleted {sandbox_id}"
    for command in ("get", "rm", "pause", "resume", "logs"):
        assert one_line_error(sandboxd(daemon_process, command, sandbox_id)) == (
            f"sandboxd: no sandbox {sandbox_id}"
        )


def test_an_admin_starts_and_lists_for_an_owner(daemon_process: DaemonProcess) -> None:
    owner, sandbox_id = "cli-owner-" + uuid.uuid4().hex[:6], "cli-" + uuid.uuid4().hex[:10]
    started = sandboxd(
        daemon_process, "start", "--spec", "sleep", "--id", sandbox_id, "--owner", owner, "--json",
        token=ROOT,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    assert info["created_by_user_id"] == owner
    listed = json.loads(
        sandboxd(daemon_process, "ls", "--owner", owner, "--json", token=ROOT).stdout
    )
    assert [item["id"] for item in listed] == [info["id"]]
    assert one_line_error(sandboxd(daemon_process, "ls", "--owner", owner)) == (
        "sandboxd: 'owner' may be given by an admin only; a user's sandboxes are its own"
    )
    assert sandboxd(daemon_process, "rm", info["id"], token=ROOT).returncode == 0


def test_specs(daemon_process: DaemonProcess) -> None:
    table = sandboxd(daemon_process, "specs")
    assert table.returncode == 0
    assert [line.split()[0] for line in table.stdout.splitlines()] == [
        "ID",
        "sleep",
        "stuck",
        "fails",
    ]
    specs = json.loads(sandboxd(daemon_process, "specs", "--json").stdout)
    assert specs[2]["initial_env"] == {"SECRET_SETTING": "***"}


def test_events_follow(daemon_process: DaemonProcess) -> None:
    command = [
        sys.executable, "-m", "sandboxd.cli", "events", "--follow", "--after-seq", "0",
        "--json", "--url", daemon_process.url, "--token", ROOT,
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent, env=env_for_cli()
    ) as follower:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert first["seq"] == 1 and first["type"] == "daemon.started"
        sandbox_id = "cli-" + uuid.uuid4().hex[:10]
        sandboxd(daemon_process, "start", "--spec", "sleep", "--id", sandbox_id, token=ROOT)
        while True:  # the follower's output ends with the new sandbox's events
            event = json.loads(follower.stdout.readline())
            if event["sandbox_id"] == sandbox_id and event["type"] == "sandbox.running":
                break
        follower.terminate()
    sandboxd(daemon_process, "rm", sandbox_id, token=ROOT)


def test_several_urls_the_first_that_answers(daemon_process: DaemonProcess) -> None:
    down = f"ws://127.0.0.1:{free_port()}/v1"
    for args, env in (
        (("--url", down, "--url", daemon_process.url), {}),
        (("--url", f"{down},{daemon_process.url}"), {}),
        ((), {"SANDBOXD_URL": f"{down}, {daemon_process.url}"}),
    ):
        listed = sandboxd(None, "specs", "--json", *args, **env)
        assert listed.returncode == 0, (args, env, listed.stderr)
        assert json.loads(listed.stdout)[0]["id"] == "sleep"
    other = f"ws://127.0.0.1:{free_port()}/v1"
    both = one_line_error(sandboxd(None, "ls", "--url", f"{down},{other}"))
    assert both.startswith("sandboxd: cannot reach sandboxd at any of 2 URLs: ")
    assert down in both and other in both and both.endswith("running on any of them?)")
    assert "empty URL" in one_line_error(sandboxd(None, "ls", "--url", f"{down},"))


def test_errors_are_one_line(daemon_process: DaemonProcess, tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1"
    assert one_line_error(sandboxd(None, "ls", "--url", url)) == (
        f"sandboxd: cannot reach sandboxd at {url}: is `sandboxd serve` running?"
    )
    refused = one_line_error(sandboxd(daemon_process, "ls", token="wrong-token-0123456789"))
    assert "refused the token" in refused
    no_token = one_line_error(
        sandboxd(daemon_process, "ls", "--state-dir", str(tmp_path), token=None)
    )
    assert "no token" in no_token and str(tmp_path / "admin.token") in no_token
    failed = one_line_error(sandboxd(daemon_process, "start", "--spec", "fails"))
    assert failed.startswith("sandboxd: sandbox ") and "did not start" in failed
    assert "--env" in one_line_error(sandboxd(daemon_process, "start", "--env", "NOVALUE"))
    # A daemon with no cluster runs nothing on another node; the message names it.
    elsewhere = one_line_error(sandboxd(daemon_process, "start", "--node", "elsewhere"))
    assert "node 'elsewhere' is not a node of this daemon's cluster" in elsewhere
    assert "sandbox_id" in one_line_error(sandboxd(daemon_process, "get", "not an id"))


def test_token_sources(daemon_process: DaemonProcess, tmp_path: Path) -> None:
    # STATE_DIR/admin.token, as the daemon writes it without [[users]].
    (tmp_path / "admin.token").write_text(ROOT + "\n")
    from_file = sandboxd(daemon_process, "specs", "--state-dir", str(tmp_path), token=None)
    assert from_file.returncode == 0, from_file.stderr
    from_env = sandboxd(daemon_process, "specs", token=None, SANDBOXD_TOKEN=ALICE)
    assert from_env.returncode == 0, from_env.stderr
    # The default state dir, as the daemon's: XDG_STATE_HOME/sandboxd for a user, and
    # /var/lib/sandboxd for root, wherever XDG_STATE_HOME points.
    (tmp_path / "sandboxd").mkdir()
    (tmp_path / "sandboxd" / "admin.token").write_text(ROOT)
    default = sandboxd(daemon_process, "specs", token=None, XDG_STATE_HOME=str(tmp_path))
    if os.geteuid() != 0:
        assert default.returncode == 0, default.stderr
    elif not SYSTEM_TOKEN.exists():
        assert f"start the daemon once so that {SYSTEM_TOKEN} exists" in one_line_error(default)
