"""Writes a lot to stdout, then serves HTTP: usage ``writer.py PORT MEBIBYTES``.

Writes MEBIBYTES MiB, then the line ``written``, then answers 200 to any GET on
127.0.0.1:PORT. Ready (answering) means it was never blocked on its output.

Half-way it waits (up to 10 s, else exits 1) until it sees its output file
truncated under it: so the test knows a rotation happened while this process
still had half of its writes to make, the case O_APPEND exists for.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


class Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def write_mib(count: int) -> None:
    chunk = (b"x" * 1023 + b"\n") * 1024
    for _ in range(count):
        view = memoryview(chunk)
        while view:
            view = view[os.write(1, view) :]


def main() -> None:
    port, mib = int(sys.argv[1]), int(sys.argv[2])
    write_mib(mib // 2)
    deadline = time.monotonic() + 10
    while os.fstat(1).st_size >= (mib // 2) << 20:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.005)
    write_mib(mib - mib // 2)
    os.write(1, b"written\n")
    HTTPServer(("127.0.0.1", port), Ok).serve_forever()


if __name__ == "__main__":
    main()
