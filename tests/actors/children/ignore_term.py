"""Ignores SIGTERM, sleeps: usage ``ignore_term.py READYFILE``.

Writes READYFILE once the handler is in place, so that a test signals it only
when it really ignores SIGTERM.
"""

import os
import signal
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
os.write(fd, f"{os.getpid()}\n".encode())
os.close(fd)
while True:
    time.sleep(3600)
