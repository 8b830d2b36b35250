"""A process tree that sleeps: usage ``tree.py PIDFILE [FANOUT ...]``.

The root starts FANOUT[0] children, each starts FANOUT[1] children, and so on.
Every process appends its pid to PIDFILE once it has started its own children,
so the test knows the whole tree exists when the file has all the lines.
"""

import os
import subprocess
import sys
import time


def main() -> None:
    pidfile, fanout = sys.argv[1], sys.argv[2:]
    if fanout:
        for _ in range(int(fanout[0])):
            subprocess.Popen([sys.executable, __file__, pidfile, *fanout[1:]])
    fd = os.open(pidfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
