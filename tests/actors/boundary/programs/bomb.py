"""A fork bomb: every process forks in a loop for ever. Run it only under a pids limit."""

import contextlib
import os

while True:
    with contextlib.suppress(OSError):  # EAGAIN at the limit: try again
        os.fork()
