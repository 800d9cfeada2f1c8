"""The agent's observability endpoint: Prometheus ``/metrics`` and ``/healthz``.

Owns the agent's metric registry (one per daemon, not prometheus_client's global one, so
two agents in one process, as in tests, never mix), the per-tunnel collector that reads
the kernel's link counters at scrape time, and a small threaded HTTP server. It reads
what the daemon records and what the reconciler reports; it never changes either, and
never touches the kernel itself (tunnel counters come through ``Reconciler.tunnel_stats``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.logfmt import quote
from agent.state import HostState

log = logging.getLogger(__name__)

# Reconciles take milliseconds when nothing changes and up to seconds for a first apply
# of thousands of objects under software emulation.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

TUNNEL_COUNTERS = (
    ("rx_packets", "Packets received on the tunnel port (kernel link statistics)"),
    ("tx_packets", "Packets sent on the tunnel port (kernel link statistics)"),
    ("rx_bytes", "Bytes received on the tunnel port (kernel link statistics)"),
    ("tx_bytes", "Bytes sent on the tunnel port (kernel link statistics)"),
)


class TunnelStatsCollector(Collector):
    """``hnv_agent_tunnel_{rx,tx}_{packets,bytes}_total{tunnel,vsid,remote}`` at scrape time.

    ``read_stats`` returns objects with name, vsid, remote and the four counters (the
    reconciler's TunnelStats). A failing read yields no tunnel series rather than a
    failed scrape: the other metrics still matter most when the kernel misbehaves.
    """

    def __init__(self, read_stats: Callable[[], Iterable[Any]]):
        self.read_stats = read_stats

    def describe(self):  # no series at registration time: do not call the kernel then
        return []

    def collect(self):
        families = {
            field: CounterMetricFamily(
                f"hnv_agent_tunnel_{field}", help_text, labels=("tunnel", "vsid", "remote")
            )
            for field, help_text in TUNNEL_COUNTERS
        }
        try:
            stats = list(self.read_stats())
        except Exception as exc:
            log.warning("event=tunnel_stats_failed reason=%s", quote(f"{type(exc).__name__}: {exc}"))
            stats = []
        for tunnel in stats:
            labels = (str(tunnel.name), str(tunnel.vsid), str(tunnel.remote))
            for field, family in families.items():
                family.add_metric(labels, float(getattr(tunnel, field)))
        yield from families.values()


class AgentMetrics:
    """Every metric the agent exposes, in a registry of its own."""

    def __init__(self, read_tunnel_stats: Callable[[], Iterable[Any]] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconcile_duration = Histogram(
            "hnv_agent_reconcile_duration_seconds",
            "Time one reconcile took (read kernel, plan, apply)",
            buckets=RECONCILE_BUCKETS, registry=r,
        )
        self.objects = Gauge(
            "hnv_agent_objects", "Objects of the held state, by kind, as the last reconcile counted them",
            ["kind"], registry=r,
        )
        self.lookup_records = Gauge(
            "hnv_agent_lookup_records", "Lookup records of the held state, by VSID", ["vsid"], registry=r,
        )
        self.apply_errors = Counter(
            "hnv_agent_apply_errors", "Objects the kernel refused during a reconcile, by errno",
            ["errno"], registry=r,
        )
        self.drift_repairs = Counter(
            "hnv_agent_drift_repairs",
            "Reconciles of an unchanged, previously clean generation that found work to do",
            registry=r,
        )
        self.state_refusals = Counter(
            "hnv_agent_state_refusals", "State documents from the controller that were refused",
            registry=r,
        )
        self.controller_connected = Gauge(
            "hnv_agent_controller_connected", "1 while the watch stream to the controller is up",
            registry=r,
        )
        self.controller_info = Gauge(
            "hnv_agent_controller_info",
            "One series per configured controller URL: 1 for the one the agent watches, 0 for the others",
            ["url"], registry=r,
        )
        self.controller_switches = Counter(
            "hnv_agent_controller_switches",
            "Times the agent moved to the next controller because the one in use stopped answering",
            registry=r,
        )
        self.desired_generation = Gauge(
            "hnv_agent_desired_generation", "Newest generation the controller announced", registry=r,
        )
        self.applied_generation = Gauge(
            "hnv_agent_applied_generation", "Generation the last reconcile applied", registry=r,
        )
        self.thread_restarts = Counter(
            "hnv_agent_thread_restarts",
            "Times a thread of the agent (watch, status, kernel_events, loop) failed and was "
            "started again by its supervisor", ["thread"], registry=r,
        )
        if read_tunnel_stats is not None:
            r.register(TunnelStatsCollector(read_tunnel_stats))

    def set_objects(self, by_kind: Mapping[str, int]) -> None:
        _replace_series(self.objects, {(kind,): count for kind, count in by_kind.items()})

    def set_lookup_records(self, state: HostState | None) -> None:
        tally = Tally(record.vsid for record in state.records) if state else Tally()
        _replace_series(self.lookup_records, {(str(vsid),): n for vsid, n in tally.items()})

    def count_apply_error(self, errno: int | None) -> None:
        self.apply_errors.labels(errno="none" if errno is None else str(errno)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _replace_series(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    """Set a labelled gauge to exactly these series: set the new, then drop the gone."""
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    for labels in {tuple(s.labels.values()) for m in gauge.collect() for s in m.samples}:
        if labels not in values:
            gauge.remove(*labels)


class ObservabilityServer:
    """A threaded HTTP server: GET /metrics and GET /healthz, nothing else.

    ``health()`` returns (healthy, body); /healthz answers 200 with the body when healthy,
    503 otherwise (the daemon's health: the loop turning and every supervised thread up). ``address`` is "host:port" or "[v6]:port"; port 0 picks a free one
    (``port`` tells which).
    """

    def __init__(self, address: str, metrics: AgentMetrics, health: Callable[[], tuple[bool, dict[str, Any]]]):
        host, port = parse_listen_address(address)
        handler = _make_handler(metrics, health)
        server_class = _server_class_for(host)
        self.httpd = server_class((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # A short poll interval only makes stop() quick; serving does not poll.
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="hnv-metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def parse_listen_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:9464' -> ('127.0.0.1', 9464); '[::1]:9464' -> ('::1', 9464)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"metrics address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"metrics address {address!r}: the host part is empty")
    return host, int(port_text)


def _server_class_for(host: str) -> type[ThreadingHTTPServer]:
    if ":" not in host:
        return ThreadingHTTPServer
    import socket

    class ThreadingHTTPServerV6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    return ThreadingHTTPServerV6


def _make_handler(metrics: AgentMetrics, health: Callable[[], tuple[bool, dict[str, Any]]]):
    class Handler(BaseHTTPRequestHandler):
        server_version = "openhnv-agent"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path == "/healthz":
                alive, body = health()
                self._reply(200 if alive else 503, "application/json", json.dumps(body).encode())
            else:
                body = {"error": f"no such path {path}: try /metrics or /healthz", "field": None, "reason": "not found"}
                self._reply(404, "application/json", json.dumps(body).encode())

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the scraper gave up waiting; nothing to tell it

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not events
            pass

    return Handler
