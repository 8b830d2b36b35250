"""The daemon's Prometheus metrics: counted where things happen, the rest read at scrape time.

Counters and histograms are bumped where things happen:

- from the events the store has made durable and folded (``observe_events``, the store's
  ``on_applied``): starts and their outcome, the time to RUNNING, exits. Derived from the
  log, they say what the log says, and no actor needs to know that metrics exist;
- from the log's writer (``observe_sync``, the log's ``on_synced``): each batch's write
  and fdatasync, timed in the thread that does them;
- from the gateway (``count_request``): every request's op and the code of its reply.

Gauges are not kept current at all: a collector reads the projection, the log and the
gateway when Prometheus scrapes, so every value is the one at scrape time by construction.
Counting sandboxes by status walks the projection: about 0.1 ms per 1,000 sandboxes.

Each daemon has its own ``CollectorRegistry`` (not prometheus_client's global one), so
several daemons can run in one process, as the tests do. Every label is bounded: statuses
and ops are protocol.md's, codes its table's plus ``ok``, spec ids the config's, reasons
and outcomes the few below. A sandbox id (unbounded) is a label only with ``[server]
metrics_per_sandbox = true``.
"""

from __future__ import annotations

import collections
import platform
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Final, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from sandboxd import __version__
from sandboxd.events import types as ev
from sandboxd.events.projection import State, Status
from sandboxd.gateway import protocol as p

#: The op label of a frame that is no valid request (not JSON, no id, an unknown op, bad
#: params): what it names as its op is whatever the client sent, so it is never a label.
INVALID_OP: Final = "invalid"
OK: Final = "ok"

#: sandbox_starts_total{outcome}: how a start ended (one deleted while starting has none).
START_OUTCOMES: Final = ("running", "failed")
#: sandbox_exits_total{reason}: how a sandbox's process ended once it had started.
EXIT_REASONS: Final = ("exited", "failed", "killed", "unknown", "missing")

#: Seconds to RUNNING: a `sleep` is RUNNING in milliseconds, an agent server in seconds.
START_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: Seconds of one batch's write and fdatasync: ~1 ms on an SSD, tens of ms on a busy disk.
SYNC_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# `_created` series beside every counter are noise in the text format: the process
# metrics' process_start_time_seconds says when every counter here began.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream


class LogView(Protocol):
    """What the metrics read of the event log at scrape time."""

    @property
    def head_seq(self) -> int: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def segment_count(self) -> int: ...

    @property
    def subscriber_count(self) -> int: ...

    @property
    def subscriber_lag(self) -> int: ...


class GatewayView(Protocol):
    """What the metrics read of the gateway at scrape time."""

    @property
    def connection_count(self) -> int: ...


class Metrics:
    """Every metric of one daemon, and its exposition (``render``)."""

    def __init__(self, *, specs: Sequence[str] = (), per_sandbox: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.per_sandbox = per_sandbox
        self._state: State | None = None
        self._log: LogView | None = None
        self._gateway: GatewayView | None = None
        r = self.registry
        Info("sandboxd_build", "The running sandboxd.", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.starts = Counter(
            "sandboxd_sandbox_starts",
            "Sandbox starts that ended, by spec and outcome (running, failed).",
            ["spec", "outcome"],
            registry=r,
        )
        self.start_duration = Histogram(
            "sandboxd_sandbox_start_duration_seconds",
            "Seconds from sandbox.created to sandbox.running, by the events' timestamps.",
            buckets=START_BUCKETS,
            registry=r,
        )
        self.exits = Counter(
            "sandboxd_sandbox_exits",
            "Started sandboxes whose process ended, by spec and reason"
            " (exited: code 0, failed: another code, killed: a signal,"
            " unknown: an adopted process, missing: gone while the daemon was down).",
            ["spec", "reason"],
            registry=r,
        )
        self.fsync_duration = Histogram(
            "sandboxd_event_log_fsync_duration_seconds",
            "Seconds each batch of the event log took to write and fdatasync.",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "sandboxd_requests",
            "Websocket requests by op and the code of their reply (ok, or the error's code).",
            ["op", "code"],
            registry=r,
        )
        # Series that exist from the start read 0 instead of being absent until the first.
        for spec in specs:
            for outcome in START_OUTCOMES:
                self.starts.labels(spec, outcome)
            for reason in EXIT_REASONS:
                self.exits.labels(spec, reason)
        # The children of (op, code), so that a reply costs a dict lookup and an inc.
        self._requests: dict[tuple[str, str], Counter] = {}
        for op in p.OPS:
            self.count_request(op, OK, 0)
        prometheus_client.ProcessCollector(registry=r)
        r.register(_ScrapeTime(self))

    # -- what is read at scrape time ----------------------------------------------------

    def watch_log(self, state: State, log: LogView) -> None:
        """Read this projection and log (the store's) from now on."""
        self._state = state
        self._log = log

    def watch_gateway(self, gateway: GatewayView) -> None:
        self._gateway = gateway

    # -- bumped where things happen ----------------------------------------------------

    def observe_events(self, events: Iterable[ev.Event]) -> None:
        """Count what durable, folded events say (the store's ``on_applied``)."""
        sandboxes = self._state.sandboxes if self._state is not None else {}
        for event in events:
            data = event.data
            if type(data) not in _COUNTED or event.sandbox_id is None:
                continue
            # Each of these leaves the sandbox's record in the projection.
            record = sandboxes.get(event.sandbox_id)
            spec = record.spec_id if record is not None else "unknown"
            if isinstance(data, ev.SandboxRunning):
                self.starts.labels(spec, "running").inc()
                if record is not None:
                    self.start_duration.observe(
                        max(0.0, _seconds(event.ts) - _seconds(record.created_at))
                    )
            elif isinstance(data, ev.StartFailed):
                self.starts.labels(spec, "failed").inc()
            elif isinstance(data, ev.SandboxExited):
                self.exits.labels(spec, _exit_reason(data)).inc()
            elif isinstance(data, ev.SandboxMissing):
                self.exits.labels(spec, "missing").inc()

    def observe_sync(self, seconds: float) -> None:
        """One batch written and fdatasynced (the log's ``on_synced``)."""
        self.fsync_duration.observe(seconds)

    def count_request(self, op: str, code: str, amount: int = 1) -> None:
        """One reply: ``op`` must be an op of protocol.md or INVALID_OP."""
        child = self._requests.get((op, code))
        if child is None:
            child = self._requests[op, code] = self.requests.labels(op, code)
        child.inc(amount)

    # -- exposition ----------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics if ``accept`` asks for it, else
        Prometheus' text format, as prometheus_client negotiates it."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


_COUNTED: Final = frozenset(
    {ev.SandboxRunning, ev.StartFailed, ev.SandboxExited, ev.SandboxMissing}
)


def _exit_reason(data: ev.SandboxExited) -> str:
    if data.signal is not None:
        return "killed"
    if data.exit_code is None:
        return "unknown"  # an adopted process: not the daemon's child, its status unread
    return "exited" if data.exit_code == 0 else "failed"


def _seconds(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


class _ScrapeTime:
    """The gauges, read from the daemon's parts when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        if m._state is not None:
            yield from self._sandboxes(m._state)
        log = m._log
        if log is not None:
            yield _gauge(
                "sandboxd_event_log_head_seq", "The seq of the newest durable event.", log.head_seq
            )
            yield _gauge(
                "sandboxd_event_log_bytes",
                "Bytes of the event log's segment files.",
                log.size_bytes,
            )
            yield _gauge(
                "sandboxd_event_log_segments", "Segment files of the event log.", log.segment_count
            )
            yield _gauge(
                "sandboxd_subscriptions", "Open event subscriptions.", log.subscriber_count
            )
            yield _gauge(
                "sandboxd_subscriber_lag_events",
                "Events the slowest subscription has yet to pass (head_seq minus its position).",
                log.subscriber_lag,
            )
        if m._gateway is not None:
            yield _gauge(
                "sandboxd_connections", "Open websocket connections.", m._gateway.connection_count
            )

    def _sandboxes(self, state: State) -> Iterator[Metric]:
        records = state.sandboxes.values()
        counts = collections.Counter(record.status for record in records)
        by_status = GaugeMetricFamily(
            "sandboxd_sandboxes",
            "Sandboxes now, by status (deleted ones are gone).",
            labels=["status"],
        )
        for status in Status:
            by_status.add_metric([status.value], counts[status])
        yield by_status
        if self._metrics.per_sandbox:
            info = GaugeMetricFamily(
                "sandboxd_sandbox_info",
                "1 for every sandbox, with its spec, owner and status"
                " ([server] metrics_per_sandbox = true).",
                labels=["sandbox_id", "spec", "user", "status"],
            )
            for record in records:
                info.add_metric(
                    [
                        record.id,
                        record.spec_id,
                        record.created_by_user_id or "",
                        record.status.value,
                    ],
                    1,
                )
            yield info


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
