"""The command line's client commands: start, ls, get, pause, resume, rm, logs, events, specs.

daemon/cli.py adds them with ``add_client_commands(subparsers)``; each sets
``handler`` to its ``run_<cmd>(args) -> int``. Tables by default, ``--json`` for
JSON. Any error ends the command with one line on stderr and a non-zero exit
code, never a traceback for a mistake of the user's or a daemon that is down.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import orjson
import trio

from sandboxd.config import default_state_dir
from sandboxd.events.codec import event_to_dict
from sandboxd.events.projection import Status
from sandboxd.events.types import EVENT_TYPES, Event
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import ADMIN_TOKEN_FILE
from sandboxd.gateway.client import (
    AuthenticationError,
    Client,
    ClientError,
    ConnectError,
    NotFoundError,
    StartFailedError,
    open_client,
)
from sandboxd.gateway.protocol import SandboxInfo

DEFAULT_URL: Final = "ws://127.0.0.1:8765/v1"
EXIT_ERROR: Final = 1
EXIT_NOT_FOUND: Final = 2
EXIT_INTERRUPTED: Final = 130


class UsageError(Exception):
    """A mistake on the command line that argparse could not see."""


def add_client_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands; each parser's ``handler`` is its ``run_<cmd>``."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--url",
        dest="urls",
        action="append",
        metavar="URL",
        help="the daemon's websocket URL; repeat it, or give a comma list, for the nodes of"
        " a cluster: the first that answers is used, the others are failed over to"
        f" (default: $SANDBOXD_URL, also a comma list, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--token",
        help="bearer token (default: $SANDBOXD_TOKEN, else STATE_DIR/admin.token)",
    )
    group.add_argument(
        "--state-dir",
        type=Path,
        help="where to find admin.token (default: the daemon's default state dir)",
    )
    group.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def add(name: str, run: Callable[[argparse.Namespace], int], text: str) -> Any:
        parser = subparsers.add_parser(name, parents=[common], help=text, description=text)
        parser.set_defaults(handler=run)
        return parser

    start = add("start", run_start, "start a sandbox and wait until it runs")
    start.add_argument("--spec", dest="spec_id", help="spec id (default: the first spec)")
    start.add_argument("--id", dest="sandbox_id", help="choose the sandbox's id")
    start.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="set a variable over the spec's (repeatable)",
    )
    start.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return at once, STARTING"
    )
    start.add_argument(
        "--owner", metavar="USER", help="admins: start it for this user, whose it then is"
    )
    start.add_argument(
        "--node", metavar="NODE", help="a cluster's node to run it on (default: the least busy)"
    )

    ls = add("ls", run_ls, "list sandboxes, newest first")
    ls.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    ls.add_argument("--owner", metavar="USER", help="admins: only this user's sandboxes")

    for name, run, text in (
        ("get", run_get, "show one sandbox"),
        ("pause", run_pause, "pause a sandbox (freeze every process of its tree)"),
        ("resume", run_resume, "resume a paused sandbox"),
        ("rm", run_rm, "delete a sandbox: its processes and working dir"),
    ):
        add(name, run, text).add_argument("sandbox_id", metavar="ID")

    logs = add("logs", run_logs, "print the end of a sandbox's output")
    logs.add_argument("sandbox_id", metavar="ID")
    logs.add_argument(
        "--tail", type=int, default=65536, metavar="N", help="bytes to print (default 65536)"
    )

    events = add("events", run_events, "print events of the log")
    events.add_argument(
        "--after-seq",
        type=int,
        metavar="N",
        help="events after seq N (default: all without --follow, new ones with --follow)",
    )
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--sandbox", dest="sandbox_id", metavar="ID", help="one sandbox's")
    events.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=sorted(EVENT_TYPES),
        metavar="T",
        help="only events of this type (repeatable)",
    )

    add("specs", run_specs, "list the specs sandboxes start from")


# --- Running a command ------------------------------------------------------------------


def _urls(args: argparse.Namespace) -> list[str]:
    """The URLs of --url (each may be a comma list), else of $SANDBOXD_URL, else the default."""
    given = args.urls or [os.environ.get("SANDBOXD_URL") or DEFAULT_URL]
    urls = [url.strip() for text in given for url in text.split(",")]
    if not all(urls):
        raise UsageError(f"--url {','.join(given)!r} has an empty URL in its list")
    return urls


def _token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if token := os.environ.get("SANDBOXD_TOKEN"):
        return token
    path = (args.state_dir or default_state_dir()) / ADMIN_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise UsageError(
            f"no token: pass --token, set SANDBOXD_TOKEN, or start the daemon once so that"
            f" {path} exists"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read the token from {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"{path} is empty; pass --token or set SANDBOXD_TOKEN")
    return token


def _run(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    """Connect, run ``body``, and turn every failure into one line on stderr."""

    async def main() -> int:
        async with open_client(urls, token) as client:
            return await body(client)

    urls: list[str] = []
    try:
        urls = _urls(args)
        token = _token(args)
        return trio.run(main)
    except UsageError as exc:
        return _fail(str(exc))
    except AuthenticationError as exc:
        return _fail(
            f"sandboxd at {exc.url} refused the token: check --token, $SANDBOXD_TOKEN"
            " or STATE_DIR/admin.token"
        )
    except ConnectError as exc:
        if exc.message.startswith("cannot reach") and len(urls) == 1:
            return _fail(f"cannot reach sandboxd at {urls[0]}: is `sandboxd serve` running?")
        if exc.message.startswith("cannot reach"):
            return _fail(f"{exc.message} (is `sandboxd serve` running on any of them?)")
        return _fail(exc.message)
    except NotFoundError as exc:
        return _fail(exc.message, EXIT_NOT_FOUND)
    except StartFailedError as exc:
        hint = "" if exc.sandbox is None else f"; `sandboxd rm {exc.sandbox.id}` removes it"
        return _fail(exc.message.rstrip(".") + hint)
    except ClientError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `sandboxd events -f | head`: the reader left, which is no error.
        _silence_stdout()
        return 0


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"sandboxd: {message.rstrip('.')}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    # Python flushes stdout at exit; a closed pipe would print a traceback then.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _no_sandbox(sandbox_id: str) -> NotFoundError:
    return NotFoundError(f"no sandbox {sandbox_id}")


# --- Output -------------------------------------------------------------------------------


def _print_json(value: object, out: TextIO | None = None) -> None:
    text = orjson.dumps(value, default=p.converter.unstructure, option=orjson.OPT_INDENT_2)
    print(text.decode(), file=out or sys.stdout)


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


_SANDBOX_COLUMNS = ("ID", "STATUS", "SPEC", "USER", "PORT", "PID", "CREATED", "NODE")


def _sandbox_row(info: SandboxInfo) -> list[str]:
    return [
        info.id,
        str(info.status),
        info.sandbox_spec_id,
        info.created_by_user_id or "-",
        str(info.port),
        "-" if info.pid is None else str(info.pid),
        info.created_at,
        info.node or "-",
    ]


def _print_sandbox(info: SandboxInfo, as_json: bool) -> None:
    if as_json:
        _print_json(info)
        return
    fields: list[tuple[str, str]] = [
        ("id", info.id),
        ("status", str(info.status)),
        ("spec", info.sandbox_spec_id),
        ("user", info.created_by_user_id or "-"),
        ("port", str(info.port)),
        ("pid", "-" if info.pid is None else str(info.pid)),
        ("working_dir", info.working_dir),
        ("created_at", info.created_at),
        ("updated_at", info.updated_at),
        ("node", info.node or "-"),
    ]
    for url in info.exposed_urls or ():
        fields.append((f"url {url.name}", url.url))
    if info.session_api_key:
        fields.append(("session_api_key", info.session_api_key))
    if info.error:
        fields.append(("error", info.error))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name.ljust(width)}  {value}")


def _print_event(event: Event, as_json: bool) -> None:
    record = event_to_dict(event, with_version=False)
    if as_json:
        print(orjson.dumps(record).decode(), flush=True)
        return
    data = orjson.dumps(record["data"]).decode()
    print(
        f"{event.seq:>6}  {event.ts}  {event.type:<24} {event.sandbox_id or '-'}"
        f"  by={event.by or '-'}  {data}",
        flush=True,
    )


# --- The commands -------------------------------------------------------------------------


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {pair!r} must be NAME=VALUE")
        env[name] = value
    return env


def run_start(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        info = await client.start(
            spec_id=args.spec_id,
            sandbox_id=args.sandbox_id,
            env=_parse_env(args.env) or None,
            wait=args.wait,
            owner=args.owner,
            node=args.node,
        )
        _print_sandbox(info, args.json)
        return 0

    return _run(args, body)


def run_ls(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        items = [info async for info in client.search_all(status=args.status, owner=args.owner)]
        if args.json:
            _print_json(items)
        elif items:
            print(_table([_sandbox_row(i) for i in items], _SANDBOX_COLUMNS))
        else:
            print("no sandboxes", file=sys.stderr)
        return 0

    return _run(args, body)


def run_get(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        info = await client.get(args.sandbox_id)
        if info is None:
            raise _no_sandbox(args.sandbox_id)
        _print_sandbox(info, args.json)
        return 0

    return _run(args, body)


def _sandbox_command(args: argparse.Namespace, op: str) -> int:
    async def body(client: Client) -> int:
        try:
            if op == "pause":
                _print_sandbox(await client.pause(args.sandbox_id), args.json)
            elif op == "resume":
                _print_sandbox(await client.resume(args.sandbox_id), args.json)
            else:
                await client.delete(args.sandbox_id)
                if args.json:
                    _print_json(True)
                else:
                    print(f"deleted {args.sandbox_id}")
        except NotFoundError:
            raise _no_sandbox(args.sandbox_id) from None
        return 0

    return _run(args, body)


def run_pause(args: argparse.Namespace) -> int:
    return _sandbox_command(args, "pause")


def run_resume(args: argparse.Namespace) -> int:
    return _sandbox_command(args, "resume")


def run_rm(args: argparse.Namespace) -> int:
    return _sandbox_command(args, "delete")


def run_logs(args: argparse.Namespace) -> int:
    if not 0 <= args.tail <= 1 << 20:
        return _fail(f"--tail must be from 0 to {1 << 20} bytes, not {args.tail}")

    async def body(client: Client) -> int:
        try:
            logs = await client.logs(args.sandbox_id, tail_bytes=args.tail)
        except NotFoundError:
            raise _no_sandbox(args.sandbox_id) from None
        if args.json:
            _print_json(logs)
        else:
            sys.stdout.write(logs.data)
            sys.stdout.flush()
        return 0

    return _run(args, body)


def run_events(args: argparse.Namespace) -> int:
    if args.after_seq is not None and args.after_seq < 0:
        return _fail(f"--after-seq must be 0 or more, not {args.after_seq}")

    async def body(client: Client) -> int:
        try:
            if args.follow:
                async with client.subscribe(
                    args.after_seq, sandbox_id=args.sandbox_id, types=args.types
                ) as events:
                    async for event in events:
                        _print_event(event, args.json)
            else:
                after = args.after_seq or 0
                head = (await client.server_info()).head_seq
                while after < head:
                    page = await client.read_events(
                        after, sandbox_id=args.sandbox_id, types=args.types
                    )
                    for event in page.events:
                        _print_event(event, args.json)
                    if page.next_after_seq <= after:
                        break
                    after = page.next_after_seq
        except NotFoundError:
            if args.sandbox_id is not None:
                raise _no_sandbox(args.sandbox_id) from None
            raise
        return 0

    return _run(args, body)


def run_specs(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        specs = await client.specs()
        if args.json:
            _print_json(specs)
            return 0
        rows = [
            [s.id, " ".join(s.command), s.health_check_path or "-", f"{s.ready_timeout:g}s"]
            for s in specs
        ]
        print(_table(rows, ("ID", "COMMAND", "HEALTH", "READY_TIMEOUT")))
        return 0

    return _run(args, body)
