"""The ``sandboxd`` command: ``serve``, offline ``log dump|verify``, and the client commands.

A user's mistake (a bad config key, a daemon that is not running, an unknown
sandbox) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from sandboxd import __version__
from sandboxd.config import Config, ConfigError, default_state_dir, load_config
from sandboxd.events.types import EVENT_TYPES

#: The garbage collector's thresholds in the daemon's process: the youngest generation is
#: collected every 50,000 allocations rather than Python's 700. The daemon allocates fast
#: (requests, events, frames) over a large steady heap (sandboxes, connections): at 700,
#: short-lived objects were caught alive, promoted, and set off full collections of the
#: whole heap every few seconds, 100-220 ms each (7 in one run of bench/gateway.py's
#: fan-out, the requests and deliveries beside them waiting them out); at 50,000, one of
#: 38 ms, and about ten young ones of 10-44 ms in the whole run (docs/performance.md).
GC_THRESHOLD: Final = (50_000, 10, 10)


def _serve(args: argparse.Namespace) -> int:
    from sandboxd.daemon import DaemonError, run_daemon
    from sandboxd.state_dir import StateDirError

    try:
        config = load_config(args.config).with_overrides(
            state_dir=args.state_dir, host=args.host, port=args.port
        )
    except ConfigError as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    gc.set_threshold(*GC_THRESHOLD)  # the process is the daemon's from here on
    try:
        trio.run(run_daemon, config)
    except (DaemonError, StateDirError) as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sandboxd: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _log_source(args: argparse.Namespace) -> tuple[Path, Config | None]:
    """The state dir (--state-dir, else the config's, else the default) and the config, if
    one was given: its log.backend says where the log is."""
    config = load_config(args.config) if args.config is not None else None
    state_dir = args.state_dir or (config.state_dir if config else default_state_dir())
    return state_dir, config


def _log_dump(args: argparse.Namespace) -> int:
    from sandboxd.events import audit

    try:
        state_dir, config = _log_source(args)
    except ConfigError as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        return 2
    types = set(args.type) if args.type else None
    if config is not None and config.nats is not None:
        from sandboxd.events.nats import audit as nats_audit

        return nats_audit.dump(
            config.nats, sys.stdout, after_seq=args.after_seq, sandbox_id=args.sandbox, types=types
        )
    return audit.dump(
        state_dir,
        sys.stdout,
        after_seq=args.after_seq,
        sandbox_id=args.sandbox,
        types=types,
    )


def _log_verify(args: argparse.Namespace) -> int:
    from sandboxd.events import audit

    try:
        state_dir, config = _log_source(args)
    except ConfigError as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        return 2
    if config is not None and config.nats is not None:
        from sandboxd.events.nats import audit as nats_audit

        return nats_audit.verify(config.nats, state_dir, sys.stdout)
    return audit.verify(state_dir, sys.stdout)


def _event_type(text: str) -> str:
    if text not in EVENT_TYPES:
        raise argparse.ArgumentTypeError(
            f"unknown event type {text!r}; known: {', '.join(sorted(EVENT_TYPES))}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandboxd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="TOML config file (spec/config.md)")
    serve.add_argument("--state-dir", type=Path, help="overrides server.state_dir")
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--port", type=int, help="overrides server.port (0: any free port)")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    serve.set_defaults(handler=_serve)

    log_cmd = commands.add_parser("log", help="read the event log offline (no daemon needed)")
    log_commands = log_cmd.add_subparsers(dest="log_command", required=True, metavar="ACTION")
    for name, handler, text in (
        ("dump", _log_dump, "print events as JSON lines"),
        ("verify", _log_verify, "check every checksum and seq; exit 1 naming the first bad one"),
    ):
        sub = log_commands.add_parser(name, help=text)
        sub.add_argument("--state-dir", type=Path, help="default: the config's, else the default")
        sub.add_argument(
            "--config",
            type=Path,
            help='the daemon\'s config: with log.backend = "nats", its stream',
        )
        sub.set_defaults(handler=handler)
        if name == "dump":
            sub.add_argument("--after-seq", type=int, default=0)
            sub.add_argument("--sandbox", help="only this sandbox's events")
            sub.add_argument("--type", action="append", type=_event_type, help="repeatable")

    from sandboxd.gateway.cli_client import add_client_commands

    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0  # `sandboxd log dump | head` is not an error
    return code


if __name__ == "__main__":
    sys.exit(main())
