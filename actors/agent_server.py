"""The project's own small reference agent server: what the default spec runs.

    python3 -I .../sandboxd/actors/agent_server.py --port N    # as the default spec runs it
    python -m sandboxd.actors.agent_server --port N

Standard library only, so that it runs wherever the daemon does, and under
any interpreter a sandbox's uid may run, by its file's path. It binds
127.0.0.1. ``/alive`` and ``/health`` answer 200 ``{"status": "ok"}`` to
anyone (the daemon's health check has no key); every other path wants the
header ``X-Session-API-Key`` equal to the sandbox's key, else 401. The port
comes from ``--port`` or ``PORT``; the key only from the environment
(``SESSION_API_KEY``, else ``OH_SESSION_API_KEYS_0``), never from the command
line, which any local user can read in /proc. Without a key, every
authenticated path answers 401. SIGTERM or SIGINT stop it cleanly, exit code 0.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

HOST = "127.0.0.1"
KEY_HEADER = "X-Session-API-Key"
OPEN_PATHS = frozenset({"/alive", "/health"})
MAX_BODY = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients may reuse a connection
    server: _AgentServer

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def _answer(self) -> None:
        if not self._discard_body():
            self.close_connection = True
            self._json(400, {"detail": "unreadable request body"})
            return
        path = self.path.split("?", 1)[0]
        if path in OPEN_PATHS:
            self._json(200, {"status": "ok"})
        elif not self._authorized():
            self._json(401, {"detail": f"missing or wrong {KEY_HEADER} header"})
        else:
            self._json(200, {"status": "ok", "path": path, "sandbox_id": self.server.sandbox_id})

    def _authorized(self) -> bool:
        expected, given = self.server.session_api_key, self.headers.get(KEY_HEADER)
        # compare_digest: the time taken does not tell how much of a guess was right.
        return (
            bool(expected)
            and given is not None
            and hmac.compare_digest(given.encode(), expected.encode())
        )

    def _discard_body(self) -> bool:
        # A body left unread would be parsed as the next request on this
        # connection. Chunked or oversized bodies are not read: the connection
        # is closed after the answer instead.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return False
        if length > MAX_BODY:
            self.close_connection = True
        elif length > 0:
            self.rfile.read(length)
        return length >= 0

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: a health check every few seconds would fill the sandbox's output


class _AgentServer(ThreadingHTTPServer):
    daemon_threads = True  # a client holding a connection open must not delay exit

    def __init__(self, port: int, session_api_key: str, sandbox_id: str | None) -> None:
        self.session_api_key = session_api_key
        self.sandbox_id = sandbox_id
        super().__init__((HOST, port), _Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent_server")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: $PORT; 0: any)")
    args = parser.parse_args(argv)
    port = args.port
    if port is None:
        try:
            port = int(os.environ["PORT"])
        except (KeyError, ValueError):
            parser.error("give --port or set PORT to a number")
    key = os.environ.get("SESSION_API_KEY") or os.environ.get("OH_SESSION_API_KEYS_0") or ""

    server = _AgentServer(port, key, os.environ.get("SANDBOX_ID"))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Serve from a thread, wait in the main one: shutdown() must not be called
    # from the thread running serve_forever(), and only the main thread gets signals.
    serving = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="serve", daemon=True
    )
    serving.start()
    print(
        f"agent_server listening on http://{HOST}:{server.server_address[1]}"
        + ("" if key else " (no SESSION_API_KEY: every authenticated path answers 401)"),
        file=sys.stderr,
        flush=True,
    )
    while not stop.wait(1.0):  # a timeout keeps the wait interruptible on every Python
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
