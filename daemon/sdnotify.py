"""Tell systemd how the daemon is doing (sd_notify), with no extra dependency.

systemd's protocol (sd_notify(3)): one datagram of newline-separated
``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``. A name
starting with "@" is in the abstract namespace (a NUL byte in its place). With
``Type=notify`` in the unit (contrib/sandboxd.service), systemd considers the
service started only once ``READY=1`` arrives: the daemon sends it after
recovery, when its gateway answers.
"""

from __future__ import annotations

import os
import socket


def notify(state: str = "READY=1", *, socket_path: str | None = None) -> bool:
    """Send ``state`` to systemd; return False if no notify socket is set (not under systemd).

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``. Raises ValueError for an
    address this helper cannot reach (systemd's vsock: form), OSError if the send
    fails. One non-blocking datagram: call it from anywhere.
    """
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):
        address = "\0" + path[1:]
    elif path.startswith("/"):
        address = path
    else:
        raise ValueError(f"NOTIFY_SOCKET={path!r} is not a unix socket path or @abstract name")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        sock.sendto(state.encode("utf-8"), address)
    return True
