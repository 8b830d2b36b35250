"""The OpenHands adapter's tests: the stand-in of OpenHands' modules on sys.path, and a real
daemon (a subprocess) with specs of the shapes an app server uses."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.actors.specs import SpecConfig
from tests.daemon_process import SANDBOX_PYTHON, DaemonProcess, agent_command, daemon_config

STANDIN = Path(__file__).with_name("openhands_standin")
if str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))

SLEEP = shutil.which("sleep") or "/bin/sleep"
FALSE = shutil.which("false") or "/bin/false"

#: The ports of OpenHands' agent server, and where the process finds them.
OH_PORTS = ("AGENT_SERVER", "VSCODE", "WORKER_1", "WORKER_2")
#: Writes its environment where the tests read it (env.json in its working dir), then sleeps;
#: RUNNING as soon as it runs.
RECORDER = SpecConfig(
    id="recorder",
    command=(
        SANDBOX_PYTHON,
        "-c",
        "import json, os, time; json.dump(dict(os.environ), open('env.tmp', 'w')); "
        "os.rename('env.tmp', 'env.json'); time.sleep(3600)",
    ),
    initial_env={"WORKER_1": "{port_WORKER_1}", "WORKER_2": "{port_WORKER_2}"},
    ports=OH_PORTS,
    health_check_path="",
    inherit_env=("PATH",),
)
SPECS = (
    RECORDER,
    # The project's agent server: RUNNING once it answers /alive, as OpenHands' does.
    SpecConfig(
        id="agent",
        command=agent_command(),
        health_check_path="/alive",
        ready_timeout=20.0,
        health_interval=0,
        ports=OH_PORTS,
        inherit_env=("PATH",),
    ),
    # Never healthy (nothing listens): its start fails after 3 s.
    SpecConfig(
        id="stuck",
        command=(SLEEP, "600"),
        health_check_path="/",
        ready_timeout=3.0,
        inherit_env=("PATH",),
    ),
    SpecConfig(id="fails", command=(FALSE,), health_check_path="/", inherit_env=("PATH",)),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("daemon")
    config = daemon_config(
        root / "state", SPECS, on_shutdown="stop", max_sandboxes_per_user=6, url_host="localhost"
    )
    running = DaemonProcess(root, config)
    running.start_blocking()
    try:
        yield running
    finally:
        running.stop()
    assert "Traceback" not in running.output(), running.output()
