"""Escapes every convention: ``escapee.py OUTFILE``.

Forks; the child calls setsid() and forks again; the grandchild execs a fresh
python3 with an *empty* environment (no marker survives), which appends
``escaped PID`` to OUTFILE and sleeps in a loop. The root sleeps too. Only the
cgroup still holds the grandchild.
"""

import os
import sys
import time

GRANDCHILD = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)\n"
    "os.write(fd, f'escaped {os.getpid()}\\n'.encode())\n"
    "os.close(fd)\n"
    "while True:\n"
    "    time.sleep(0.01)\n"
)


def main() -> None:
    out = sys.argv[1]
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.execve(sys.executable, [sys.executable, "-c", GRANDCHILD, out], {})
        os._exit(0)
    os.waitpid(middle, 0)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
