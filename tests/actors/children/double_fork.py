"""Escapes its process group like a daemon: usage ``double_fork.py PIDFILE [--root-exits]``.

Forks, the child calls setsid() and forks again, the grandchild (in a session
and group of its own, reparented away from the root) writes ``escaped PID`` to
PIDFILE and sleeps. The root sleeps too, or with --root-exits exits once the
middle child is gone. Only the inherited SANDBOX_ID still ties the grandchild
to the sandbox.
"""

import os
import sys
import time


def main() -> None:
    pidfile = sys.argv[1]
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            fd = os.open(pidfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, f"escaped {os.getpid()}\n".encode())
            os.close(fd)
            while True:
                time.sleep(3600)
        os._exit(0)
    os.waitpid(middle, 0)
    if "--root-exits" in sys.argv:
        return
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
