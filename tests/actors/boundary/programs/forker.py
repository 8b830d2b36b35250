"""A tree that forks without pause: ``forker.py WORKERS``.

WORKERS processes each fork a child in a loop, without sleeping; each child
forks a grandchild and exits, each grandchild exits at once (reaped by
whoever adopts it). The tree's members change all the time. Run it under a
pids limit: a fork refused at the limit is simply tried again.
"""

import os
import sys


def churn() -> None:
    while True:
        try:
            pid = os.fork()
        except OSError:
            continue
        if pid == 0:
            try:
                if os.fork() == 0:
                    os._exit(0)
            except OSError:
                pass
            os._exit(0)
        os.waitpid(pid, 0)


def main() -> None:
    for _ in range(int(sys.argv[1]) - 1):
        try:
            if os.fork() == 0:
                break
        except OSError:
            break
    churn()


if __name__ == "__main__":
    main()
