"""What clients see of a sandbox, from the projection's record: pure, no processes."""

from __future__ import annotations

from sandboxd.actors.info import sandbox_info
from sandboxd.events import types as ev
from sandboxd.events.projection import State, apply


def created(seq: int, data: ev.SandboxCreated) -> ev.Event:
    return ev.Event(seq, "2026-01-01T00:00:00.000000Z", "a", None, data)


def test_every_exposed_url_carries_its_port_even_from_records_before_named_ports() -> None:
    state = State()
    apply(state, created(1, ev.SandboxCreated("s", None, "/w", 30001)))  # an older record
    running = ev.SandboxRunning([ev.ExposedUrl("AGENT_SERVER", "http://127.0.0.1:30001")])
    apply(state, ev.Event(2, "t", "a", None, running))
    record = state.sandboxes["a"]
    assert record.named_ports == (ev.NamedPort("AGENT_SERVER", 30001),)
    info = sandbox_info(record, "key")
    assert info.exposed_urls == [ev.ExposedUrl("AGENT_SERVER", "http://127.0.0.1:30001", 30001)]


def test_a_sandbox_with_named_ports() -> None:
    ports = [ev.NamedPort("AGENT_SERVER", 30001), ev.NamedPort("VSCODE", 30002)]
    state = State()
    apply(state, created(1, ev.SandboxCreated("s", "alice", "/w", 30001, ports)))
    urls = [ev.ExposedUrl(p.name, f"http://h:{p.port}", p.port) for p in ports]
    apply(state, ev.Event(2, "t", "a", None, ev.SandboxRunning(urls)))
    record = state.sandboxes["a"]
    assert record.named_ports == tuple(ports) and record.port == 30001
    assert sandbox_info(record, "key").exposed_urls == urls
