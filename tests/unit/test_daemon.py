"""The agent daemon over real HTTP on loopback: a fake controller, a fake Reconciler.

This tier does not claim the kernel: the reconciler here is a stand-in that records what
it was asked to apply and can pretend the kernel drifted. The daemon, the watch stream,
the status reports, the state file, /metrics and /healthz are all real. The kernel tier
(tests/kernel/test_daemon_*.py) runs the real `hnv-agent run` against the real kernel.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from agent.daemon import AgentDaemon, DaemonConfig
from agent.intake import StateStore
from agent.state import HostState, parse_host_state
from tests.lib.fake_controller import FakeController, free_port
from tests.lib.sample_states import host_state, with_bad_record_ca

HOST = "CON-HyperV6"
TOKEN = "host-token-6f1d2c0e9b"


@dataclass(frozen=True)
class FakeObjectError:
    kind: str
    object: str
    errno: int | None
    message: str


@dataclass
class FakeResult:
    generation: int
    planned: int
    applied: int
    errors: list
    duration_s: float
    objects_by_kind: dict
    plan: Any = None


@dataclass(frozen=True)
class FakeOp:
    text: str

    def describe(self) -> str:
        return self.text


@dataclass
class FakeTunnel:
    name: str
    vsid: int
    local: str
    remote: str
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int


@dataclass
class FakeReconciler:
    """Remembers the 'kernel' as the digest of the last state applied."""

    kernel_digest: str | None = None
    drifted: bool = False
    failing_objects: list = field(default_factory=list)
    applied_generations: list[int] = field(default_factory=list)
    plans: list[int] = field(default_factory=list)

    def reconcile(self, desired: HostState) -> FakeResult:
        in_sync = self.kernel_digest == desired.content_digest() and not self.drifted
        planned = 0 if in_sync and not self.failing_objects else 1 + len(desired.records)
        self.kernel_digest = desired.content_digest()
        self.drifted = False
        self.plans.append(planned)
        if planned:
            self.applied_generations.append(desired.generation)
        return FakeResult(
            generation=desired.generation, planned=planned, applied=planned - len(self.failing_objects),
            errors=list(self.failing_objects), duration_s=0.001,
            objects_by_kind={"tunnel": 1, "fdb": len(desired.records)},
            plan=SimpleNamespace(ops=[FakeOp(f"add fdb {r.mac}") for r in desired.records][:planned]),
        )

    def tunnel_stats(self, timeout: float | None = None) -> list[FakeTunnel]:
        return [FakeTunnel("hnvt35f4210a", 3535905, "10.80.2.20", "10.80.2.21", 11, 12, 1100, 1200)]

    def close(self) -> None:
        pass


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def controller():
    fake = FakeController({TOKEN: HOST}).start()
    yield fake
    fake.stop()


def make_daemon(tmp_path: Path, controller_url: str, reconciler=None, **overrides) -> AgentDaemon:
    settings = dict(
        host=HOST, state_dir=tmp_path / "state", controller_url=controller_url, token=TOKEN,
        metrics_address="127.0.0.1:0", resync_interval=0.2, heartbeat=0.2,
        reconnect_max_delay=0.5, watch_kernel_events=False,
    )
    config = DaemonConfig(**{**settings, **overrides})
    return AgentDaemon(config, reconciler or FakeReconciler())


@pytest.fixture
def daemons():
    started: list[AgentDaemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start(daemons, daemon: AgentDaemon) -> AgentDaemon:
    daemons.append(daemon)
    daemon.start()
    return daemon


def on_disk(tmp_path: Path) -> int:
    return StateStore(tmp_path / "state").load(host=HOST).generation


def test_applies_each_new_generation_and_reports_it(tmp_path, controller, daemons):
    reconciler = FakeReconciler()
    controller.publish(HOST, host_state(HOST, 1))
    daemon = start(daemons, make_daemon(tmp_path, controller.url, reconciler))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1 and s["sync"] == "InSync")

    controller.publish(HOST, host_state(HOST, 2, ca="192.168.0.20"))
    status = controller.wait_for_status(HOST, lambda s: s["generation"] == 2)
    assert status["errors"] == [] and status["sync"] == "InSync"
    assert status["agent"].startswith("openhnv-agent/")
    assert reconciler.applied_generations == [1, 2]
    assert on_disk(tmp_path) == 2
    assert daemon.applied_generation == daemon.desired_generation == 2


def test_bad_document_is_refused_with_field_and_reason_and_previous_kept(tmp_path, controller, daemons, caplog):
    reconciler = FakeReconciler()
    good = host_state(HOST, 1)
    controller.publish(HOST, good)
    start(daemons, make_daemon(tmp_path, controller.url, reconciler))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)

    with caplog.at_level(logging.INFO):
        controller.publish(HOST, with_bad_record_ca(good, 2))
        status = controller.wait_for_status(HOST, lambda s: s["errors"])
    assert status["generation"] == 1, "the report must still name the generation held"
    assert status["sync"] == "Error"
    error = status["errors"][0]
    assert error["kind"] == "state"
    assert "generation 2" in error["object"]
    assert error["message"].startswith("records[0].ca: lookup record 172.16.0.9 in VSID 3535905 is outside")
    assert reconciler.applied_generations == [1], "a refused document must not reach the kernel"
    assert on_disk(tmp_path) == 1
    refused = [r.getMessage() for r in caplog.records if "event=state_refused" in r.getMessage()]
    assert refused and 'problem="records[0].ca:' in refused[0]

    # The controller fixes it with a new generation: accepted, error gone.
    controller.publish(HOST, host_state(HOST, 3))
    status = controller.wait_for_status(HOST, lambda s: s["generation"] == 3)
    assert status["errors"] == [] and status["sync"] == "InSync"


def test_older_generation_is_ignored(tmp_path, controller, daemons):
    reconciler = FakeReconciler()
    controller.publish(HOST, host_state(HOST, 3))
    daemon = start(daemons, make_daemon(tmp_path, controller.url, reconciler))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 3)

    controller.publish(HOST, host_state(HOST, 2, ca="192.168.0.99"))
    controller.publish(HOST, host_state(HOST, 4))  # a marker: once 4 is in, 2 was seen
    controller.wait_for_status(HOST, lambda s: s["generation"] == 4)
    assert 2 not in reconciler.applied_generations
    assert daemon.held.generation == 4


def test_survives_a_stream_drop_and_reconnects(tmp_path, controller, daemons):
    controller.publish(HOST, host_state(HOST, 1))
    daemon = start(daemons, make_daemon(tmp_path, controller.url))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)

    controller.drop_streams()
    controller.publish(HOST, host_state(HOST, 2, ca="192.168.0.30"))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 2, timeout=10)
    assert daemon.watch.connects >= 2


def test_a_silent_stream_is_declared_dead_and_replaced(tmp_path, controller, daemons):
    controller.publish(HOST, host_state(HOST, 1))
    daemon = start(daemons, make_daemon(tmp_path, controller.url))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    first_connects = controller.watch_connects

    controller.silent = True  # the TCP connection stays up, nothing arrives
    wait_until(lambda: not daemon.controller_connected, timeout=3, what="the dead stream to be noticed")
    controller.silent = False
    wait_until(lambda: controller.watch_connects > first_connects, timeout=5, what="a new watch connection")
    wait_until(lambda: daemon.controller_connected, timeout=5, what="reconnection")


def test_restarts_from_disk_with_controller_down_and_reports_when_back(tmp_path, daemons):
    StateStore(tmp_path / "state").save(parse_host_state(host_state(HOST, 5)))
    reconciler = FakeReconciler(kernel_digest=parse_host_state(host_state(HOST, 5)).content_digest())
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    daemon = start(daemons, make_daemon(tmp_path, url, reconciler))
    wait_until(lambda: daemon.applied_generation == 5, what="the on-disk generation to be held")
    assert reconciler.plans[0] == 0, "the kernel already matched: the first plan must be empty"
    assert reconciler.applied_generations == []
    time.sleep(0.6)  # several resyncs and reconnect attempts against nothing
    assert daemon.held.generation == 5 and not daemon.controller_connected
    assert reconciler.applied_generations == [], "a controller outage must change nothing"

    controller = FakeController({TOKEN: HOST}, port=port)
    controller.publish(HOST, host_state(HOST, 5))
    controller.start()
    try:
        status = controller.wait_for_status(HOST, lambda s: s["generation"] == 5, timeout=10)
        assert status["sync"] == "InSync"
        assert reconciler.applied_generations == []
    finally:
        controller.stop()


def test_unknown_token_is_retried_and_the_token_never_logged(tmp_path, daemons, caplog):
    controller = FakeController({"some-other-token": HOST}).start()
    controller.publish(HOST, host_state(HOST, 1))
    try:
        with caplog.at_level(logging.DEBUG):
            daemon = start(daemons, make_daemon(tmp_path, controller.url))
            wait_until(
                lambda: sum("event=watch_refused" in r.getMessage() for r in caplog.records) >= 2,
                what="two refused attempts",
            )
        assert daemon.held is None and not daemon.controller_connected
        refused = next(r.getMessage() for r in caplog.records if "event=watch_refused" in r.getMessage())
        assert "status=401" in refused and "a valid bearer token is required" in refused
        assert not any(TOKEN in r.getMessage() for r in caplog.records)
        assert TOKEN not in repr(daemon.config) and TOKEN not in repr(daemon.endpoint)
    finally:
        controller.stop()


def test_drift_is_repaired_and_counted(tmp_path, controller, daemons, caplog):
    caplog.set_level(logging.WARNING, logger="agent.daemon")
    reconciler = FakeReconciler()
    controller.publish(HOST, host_state(HOST, 1))
    daemon = start(daemons, make_daemon(tmp_path, controller.url, reconciler))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    assert daemon.metrics.drift_repairs._value.get() == 0

    reconciler.drifted = True  # someone deleted a tunnel by hand
    wait_until(lambda: daemon.metrics.drift_repairs._value.get() == 1, timeout=3, what="a drift repair")
    assert reconciler.applied_generations == [1, 1]
    # The log line says what was repaired (the first changes of the plan).
    [line] = [r.getMessage() for r in caplog.records if "event=drift_repaired" in r.getMessage()]
    first = parse_host_state(json.dumps(host_state(HOST, 1))).records[0]
    assert f'changes="add fdb {first.mac}' in line, line


def test_object_errors_are_reported_and_counted_by_errno(tmp_path, controller, daemons):
    error = FakeObjectError("tunnel", "hnvt35f4210a", 17, "File exists")
    reconciler = FakeReconciler(failing_objects=[error])
    controller.publish(HOST, host_state(HOST, 1))
    daemon = start(daemons, make_daemon(tmp_path, controller.url, reconciler))
    status = controller.wait_for_status(HOST, lambda s: s["errors"])
    assert status["generation"] == 1 and status["sync"] == "Error"
    assert status["errors"] == [{"kind": "tunnel", "object": "hnvt35f4210a", "errno": 17, "message": "File exists"}]
    body = httpx.get(f"http://127.0.0.1:{daemon.server.port}/metrics").text
    assert sample(body, 'hnv_agent_apply_errors_total{errno="17"}') >= 1
    # Failing again every resync is not drift.
    time.sleep(0.5)
    assert daemon.metrics.drift_repairs._value.get() == 0


def sample(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{exposition}")


def test_metrics_and_healthz_expose_real_values(tmp_path, controller, daemons):
    peers = (("TenantVM02", "192.168.0.11", "00:15:5d:00:00:02", "10.80.2.21"),)
    controller.publish(HOST, host_state(HOST, 7, peers=peers))
    daemon = start(daemons, make_daemon(tmp_path, controller.url))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 7)
    base = f"http://127.0.0.1:{daemon.server.port}"

    body = httpx.get(f"{base}/metrics").text
    assert sample(body, "hnv_agent_applied_generation") == 7
    assert sample(body, "hnv_agent_desired_generation") == 7
    assert sample(body, "hnv_agent_controller_connected") == 1
    assert sample(body, 'hnv_agent_objects{kind="fdb"}') == 2
    assert sample(body, 'hnv_agent_lookup_records{vsid="3535905"}') == 2
    assert sample(body, "hnv_agent_reconcile_duration_seconds_count") >= 1
    assert sample(body, "hnv_agent_drift_repairs_total") == 0
    tunnel = '{remote="10.80.2.21",tunnel="hnvt35f4210a",vsid="3535905"}'
    assert sample(body, f"hnv_agent_tunnel_rx_packets_total{tunnel}") == 11
    assert sample(body, f"hnv_agent_tunnel_tx_bytes_total{tunnel}") == 1200

    health = httpx.get(f"{base}/healthz")
    assert health.status_code == 200
    assert health.json()["applied_generation"] == 7
    assert health.json()["controller_connected"] is True
    assert health.json()["last_reconcile"]["generation"] == 7

    controller.stop()
    wait_until(lambda: sample(httpx.get(f"{base}/metrics").text, "hnv_agent_controller_connected") == 0,
               timeout=3, what="the connection gauge to drop")


def test_healthz_is_503_when_the_loop_is_not_running(tmp_path, controller):
    daemon = make_daemon(tmp_path, controller.url)
    daemon.server.start()  # the HTTP side only: the loop never started
    try:
        reply = httpx.get(f"http://127.0.0.1:{daemon.server.port}/healthz")
        assert reply.status_code == 503
        assert reply.json()["applied_generation"] is None
    finally:
        daemon.server.stop()


def restarts_of(daemon: AgentDaemon, thread: str) -> float:
    exposition = httpx.get(f"http://127.0.0.1:{daemon.server.port}/metrics").text
    return sample(exposition, f'hnv_agent_thread_restarts_total{{thread="{thread}"}}')


def test_a_raising_watch_callback_does_not_stop_the_watch(tmp_path, controller, daemons, caplog):
    reconciler = FakeReconciler()
    controller.publish(HOST, host_state(HOST, 1))
    daemon = make_daemon(tmp_path, controller.url, reconciler)
    deliver, failed = daemon.watch.on_state, []

    def fails_once(document):
        if not failed:
            failed.append(document)
            raise RuntimeError("a bug in the state callback")
        deliver(document)

    daemon.watch.on_state = fails_once
    with caplog.at_level(logging.ERROR, logger="agent.supervision"):
        start(daemons, daemon)
        # The supervisor starts the watch again: it reconnects and gets generation 1 anew.
        controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    controller.publish(HOST, host_state(HOST, 2, ca="192.168.0.20"))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 2 and s["sync"] == "InSync")
    assert failed and reconciler.applied_generations == [1, 2]
    assert restarts_of(daemon, "watch") == 1
    assert restarts_of(daemon, "loop") == restarts_of(daemon, "status") == 0
    line = next(r.getMessage() for r in caplog.records if "event=thread_failed" in r.getMessage())
    assert 'thread=watch' in line and 'reason="RuntimeError: a bug in the state callback"' in line


def test_healthz_names_a_thread_that_keeps_failing_until_it_recovers(tmp_path, controller, daemons):
    controller.publish(HOST, host_state(HOST, 1))
    daemon = make_daemon(tmp_path, controller.url, thread_stable_after=0.5)
    deliver, broken = daemon.watch.on_state, threading.Event()
    broken.set()

    def callback(document):
        if broken.is_set():
            raise RuntimeError("the state handler is broken")
        deliver(document)

    daemon.watch.on_state = callback
    start(daemons, daemon)
    healthz = f"http://127.0.0.1:{daemon.server.port}/healthz"
    replies = []
    wait_until(lambda: replies.append(httpx.get(healthz)) or replies[-1].status_code == 503,
               what="/healthz to report the failing watch thread")
    body = replies[-1].json()
    assert body["threads_down"] == ["watch"]
    assert body["threads"]["watch"]["last_error"] == "RuntimeError: the state handler is broken"
    assert body["threads"]["loop"]["up"] is True
    assert not daemon.healthy()
    wait_until(lambda: restarts_of(daemon, "watch") >= 2, what="the watch to be restarted again")

    broken.clear()
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    wait_until(lambda: httpx.get(healthz).status_code == 200, what="/healthz to recover")
    assert daemon.healthy()
    assert httpx.get(healthz).json()["threads"]["watch"]["restarts"] >= 2


def test_stopping_does_not_touch_the_kernel(tmp_path, controller):
    reconciler = FakeReconciler()
    controller.publish(HOST, host_state(HOST, 1))
    daemon = make_daemon(tmp_path, controller.url, reconciler)
    daemon.start()
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    calls = len(reconciler.plans)
    daemon.stop()
    assert len(reconciler.plans) == calls
    assert not daemon.supervisor.threads["loop"].is_alive()
    time.sleep(0.5)  # several resync intervals: a stopped agent does not reconcile
    assert len(reconciler.plans) == calls
    assert json.loads((tmp_path / "state" / "state.json").read_text())["generation"] == 1


def test_a_burst_of_kernel_events_triggers_one_prompt_reconcile(tmp_path, controller, daemons):
    reconciler = FakeReconciler()
    controller.publish(HOST, host_state(HOST, 1))
    daemon = start(daemons, make_daemon(tmp_path, controller.url, reconciler, resync_interval=30.0))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    time.sleep(1.1)  # past the minimum gap between event reconciles
    wait_until(daemon.inbox.settled, timeout=3, what="the grace of the agent's own writes to end")
    reconciles = daemon.reconcile_count

    reconciler.drifted = True
    for name in ("hnvt35f4210a", "hnvp1a2b3c4d5e", "hnvb3535905"):
        daemon.inbox.note_kernel_event(f"RTM_DELLINK {name}")
    wait_until(lambda: daemon.reconcile_count > reconciles, timeout=2, what="an event reconcile")
    time.sleep(0.3)
    assert daemon.reconcile_count == reconciles + 1, "a burst must be debounced into one reconcile"
    assert daemon.last_reconcile["reason"] == "event"
    assert daemon.metrics.drift_repairs._value.get() == 1


class WritingReconciler(FakeReconciler):
    """Notes kernel events while it reconciles, as the kernel does for our own writes."""

    def __init__(self, inbox_of) -> None:
        super().__init__()
        self.inbox_of = inbox_of
        self.raise_events = True

    def reconcile(self, desired: HostState) -> FakeResult:
        result = super().reconcile(desired)
        if self.raise_events:
            for name in ("hnvt35f4210a", "hnvb3535905"):
                self.inbox_of().note_kernel_event(f"RTM_NEWLINK {name}")
        return result


def test_the_events_of_our_own_writes_trigger_no_reconcile_but_anothers_do(tmp_path, controller, daemons):
    holder = {}
    reconciler = WritingReconciler(lambda: holder["daemon"].inbox)
    controller.publish(HOST, host_state(HOST, 1))
    daemon = make_daemon(tmp_path, controller.url, reconciler, resync_interval=30.0)
    holder["daemon"] = daemon
    start(daemons, daemon)
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    controller.publish(HOST, host_state(HOST, 2, ca="192.168.0.40"))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 2)
    time.sleep(1.5)  # past the gap and the grace: an event reconcile would have run
    assert [r for r in reconciler.plans if r == 0] == [], "the events of the writes woke a reconcile"
    assert daemon.inbox.own_events_dropped >= 4

    # The same events while a reconcile that wrote nothing runs are someone else's.
    reconciles = daemon.reconcile_count
    reconciler.raise_events = False
    wait_until(daemon.inbox.settled, timeout=3, what="the grace of the agent's own writes to end")
    daemon.inbox.note_kernel_event("RTM_DELLINK hnvt35f4210a")
    wait_until(lambda: daemon.reconcile_count > reconciles, timeout=3, what="an event reconcile")
    assert daemon.last_reconcile["reason"] == "event"


def test_a_state_that_cannot_be_persisted_is_not_applied_until_it_is(tmp_path, controller, daemons):
    reconciler = FakeReconciler()
    controller.publish(HOST, host_state(HOST, 1))
    daemon = start(daemons, make_daemon(tmp_path, controller.url, reconciler))
    controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
    real_save = daemon.store.save

    def disk_full(state):
        raise OSError(28, "No space left on device")

    daemon.store.save = disk_full
    controller.publish(HOST, host_state(HOST, 2, ca="192.168.0.40"))
    status = controller.wait_for_status(HOST, lambda s: s["errors"])
    assert status["generation"] == 1
    assert status["errors"][0]["errno"] == 28
    assert "cannot persist generation 2" in status["errors"][0]["message"]
    assert reconciler.applied_generations == [1], "never apply what the disk does not hold"

    daemon.store.save = real_save  # space again: the next resync persists, then applies
    status = controller.wait_for_status(HOST, lambda s: s["generation"] == 2)
    assert status["errors"] == []
    assert on_disk(tmp_path) == 2 and reconciler.applied_generations == [1, 2]
