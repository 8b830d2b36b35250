"""`make cluster`: three nats-servers and three sandboxd nodes on loopback, for trying it.

    python -m sandboxd.cluster.local [DIR]      (default DIR: /tmp/sandboxd-cluster)

Everything lives in DIR: the servers' stores and configs (``DIR/nats``), each
node's config (``DIR/nodeN.toml``) and state dir (``DIR/nodeN``), its output
(``DIR/nodeN.log``). The nodes share one secret (session keys match on every
node, docs/cluster.md) and one admin token, printed with the nodes' URLs once
all three listen. Ctrl-C (or SIGTERM) stops the nodes, each by its own pid
(SIGTERM, SIGKILL after a grace), then the servers. The nodes' sandboxes are
deleted when they stop (``on_shutdown = "stop"``): a try leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from sandboxd.events.nats.local_cluster import LocalCluster, free_ports, local_cluster

NODES = ("node-a", "node-b", "node-c")
#: Seconds a node has to listen after it was started (it replays the stream first).
LISTEN_WITHIN = 60.0
#: Seconds a node has to stop on SIGTERM before it is killed.
STOP_WITHIN = 20.0


def node_config(
    node: str, index: int, port: int, state_dir: Path, servers: Sequence[str], token: str
) -> str:
    """One node's config file: docs/cluster.md's, on loopback."""
    low = 30000 + 1000 * index  # disjoint port ranges: three nodes share one host here
    urls = ", ".join(f'"{url}"' for url in servers)
    return f"""[server]
host = "127.0.0.1"
port = {port}
state_dir = "{state_dir}"

[sandboxes]
port_range = [{low}, {low + 999}]
on_shutdown = "stop"

[log]
backend = "nats"

[log.nats]
servers = [{urls}]
stream = "SANDBOXD"
replicas = 3

[cluster]
node_id = "{node}"
lease_ttl = 3.0

[[users]]
id = "admin"
token = "{token}"
admin = true
"""


def write_nodes(base: Path, cluster: LocalCluster, token: str) -> list[tuple[str, int, Path]]:
    """Each node's config, state dir (with the shared secret), and port."""
    secret = secrets.token_bytes(32)
    nodes = []
    for index, (node, port) in enumerate(zip(NODES, free_ports(len(NODES)), strict=True)):
        state_dir = base / node
        state_dir.mkdir(parents=True, exist_ok=True)
        secret_file = state_dir / "secret"
        if not secret_file.exists():
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(secret)
        config = base / f"{node}.toml"
        config.write_text(node_config(node, index, port, state_dir, cluster.urls, token))
        nodes.append((node, port, config))
    return nodes


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def running_nodes(
    base: Path, nodes: list[tuple[str, int, Path]]
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """The nodes started and listening, each its URL and process; stopped (each by its pid)
    on the way out."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for node, _port, config in nodes:
            with open(base / f"{node}.log", "ab") as output:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "sandboxd.cli", "serve", "--config", str(config)],
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        deadline = time.monotonic() + LISTEN_WITHIN
        for (node, port, _), process in zip(nodes, processes, strict=True):
            while not _listening(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{node} did not start: see {base / f'{node}.log'}")
                time.sleep(0.1)
        yield [
            (f"ws://127.0.0.1:{port}/v1", process)
            for (_, port, _), process in zip(nodes, processes, strict=True)
        ]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(STOP_WITHIN)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    base = Path(args[0] if args else "/tmp/sandboxd-cluster").absolute()
    base.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    stop = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with local_cluster(base / "nats") as cluster:
            nodes = write_nodes(base, cluster, token)
            with running_nodes(base, nodes) as running:
                urls = [url for url, _ in running]
                print(f"NATS:  {' '.join(cluster.urls)}")
                for (node, _, config), url in zip(nodes, urls, strict=True):
                    print(f"{node}: {url}  (config {config})")
                print(f"admin token: {token}")
                print(
                    f"try:   SANDBOXD_URL={','.join(urls)} SANDBOXD_TOKEN={token} sandboxd start"
                    "\n       (Ctrl-C stops the nodes, then the servers)",
                    flush=True,
                )
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
