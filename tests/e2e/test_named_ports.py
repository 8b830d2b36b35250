"""Named ports, end to end: each its own, in the process's command and environment, in the
exposed URLs (with the configured host), in the log, and still the sandbox's after a crash.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import attrs
import pytest

from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.gateway.client import LimitExceededError, open_client
from tests.daemon_process import SANDBOX_PYTHON, DaemonProcess, daemon_config
from tests.e2e.support import ROOT, end_daemon, read_log
from tests.support import eventually

PORTS = ("AGENT_SERVER", "VSCODE", "WORKER_1")
#: Writes what it was given (argv, environment) where the test reads it, then sleeps: it
#: binds none of its ports, so only the daemon's own bookkeeping keeps them its own.
RECORDER = SpecConfig(
    id="named",
    command=(
        SANDBOX_PYTHON,
        "-c",
        "import json, os, sys, time; "
        "json.dump(dict(argv=sys.argv[1:], env=dict(os.environ)), open('seen.tmp', 'w')); "
        "os.rename('seen.tmp', 'seen.json'); time.sleep(3600)",
        "--vscode={port_VSCODE}",
        "--agent={port}",
    ),
    initial_env={"WORKER_1": "{port_WORKER_1}"},
    ports=PORTS,
    health_check_path="",
    inherit_env=("PATH",),
)


def free_range(size: int) -> int:
    """The first port of ``size`` consecutive ports nobody holds (below the ephemeral range)."""
    for _ in range(200):
        low = random.randrange(20000, 32000 - size)
        try:
            for port in range(low, low + size):
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return low
    pytest.fail(f"no {size} consecutive free ports")


async def test_named_ports_are_each_the_sandbox_s_and_survive_a_crash(tmp_path: Path) -> None:
    low = free_range(2 * len(PORTS))  # room for exactly two such sandboxes
    config = daemon_config(
        tmp_path / "state",
        (RECORDER,),
        on_shutdown="keep",
        port_range=(low, low + 2 * len(PORTS) - 1),
        url_host="localhost",
    )
    daemon = DaemonProcess(tmp_path, config)
    try:
        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            info = await client.start(spec_id="named")
        assert info.exposed_urls is not None
        ports = {url.name: url.port for url in info.exposed_urls}
        assert list(ports) == list(PORTS) and len(set(ports.values())) == len(PORTS)
        assert all(low <= port < low + 2 * len(PORTS) for port in ports.values())  # type: ignore[operator]
        assert info.port == ports["AGENT_SERVER"]
        assert [url.url for url in info.exposed_urls] == [
            f"http://localhost:{ports[name]}" for name in PORTS
        ]

        seen_file = Path(info.working_dir) / "seen.json"
        await eventually(seen_file.exists, what="the sandbox to write what it was given")
        seen = json.loads(seen_file.read_text())
        assert seen["argv"] == [f"--vscode={ports['VSCODE']}", f"--agent={info.port}"]
        env = seen["env"]
        assert env["WORKER_1"] == str(ports["WORKER_1"])
        assert env["PORT"] == str(info.port)
        assert {k: v for k, v in env.items() if k.startswith("SANDBOX_PORT_")} == {
            f"SANDBOX_PORT_{name}": str(port) for name, port in ports.items()
        }

        # The log holds them all, so that recovery claims them all.
        created = next(e.data for e in read_log(daemon.state_dir) if e.sandbox_id == info.id)
        assert isinstance(created, ev.SandboxCreated)
        assert created.ports == [ev.NamedPort(name, port) for name, port in ports.items()]  # type: ignore[arg-type]

        daemon.kill()  # a crash: the sandbox runs on, and is adopted by the next daemon
        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            adopted = await client.get(info.id)
            assert adopted is not None
            # The same sandbox, ports and all; what its cgroup has used moves on.
            assert attrs.evolve(adopted, usage=None) == info
            other = await client.start(spec_id="named")
            assert other.exposed_urls is not None
            assert not {url.port for url in other.exposed_urls} & set(ports.values())
            with pytest.raises(
                LimitExceededError,
                match="port_range has fewer than 3 free ports, which spec named needs",
            ):
                await client.start(spec_id="named")
            # A delete frees every port of the sandbox, and only then.
            assert await client.delete(info.id)
            third = await client.start(spec_id="named")
            assert third.exposed_urls is not None
            assert {url.port for url in third.exposed_urls} == set(ports.values())
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()
