"""systemd supervision without systemd: a real AF_UNIX datagram socket stands in for the
service manager's $NOTIFY_SOCKET, and the daemons' own code paths talk to it.

The agent runs ``AgentDaemon.run_forever`` (the path ``hnv-agent run`` takes) against a
fake controller and a fake reconciler (tests/unit/test_daemon.py's); the controller runs
as the real ``hnv-controller run`` process. What systemd would read is what is asserted:
READY=1 only after the first reconcile, WATCHDOG=1 while running, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid

import pytest

from agent import sd_notify
from tests.lib.controller import LiveController
from tests.lib.sample_states import host_state
from tests.unit.test_daemon import HOST, make_daemon

# The fixtures the agent test uses (imported so pytest finds them here).
from tests.unit.test_daemon import controller  # noqa: F401


class NotifySocket:
    """A bound AF_UNIX datagram socket collecting what a daemon sends, with timestamps."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.address = address
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.extend((time.monotonic(), line) for line in data.decode().split("\n"))

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _, line in self.messages]

    def first(self, line: str) -> float | None:
        with self._lock:
            return next((at for at, got in self.messages if got == line), None)

    def wait_for(self, line: str, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.first(line)
            if at is not None:
                return at
            time.sleep(0.02)
        raise AssertionError(f"{line} never arrived on {self.address}; got {self.lines()}")

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    listener = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_agent_is_ready_after_its_first_reconcile_feeds_the_watchdog_and_says_stopping(
        tmp_path, controller, notify_socket, restore_signals):  # noqa: F811
    daemon = make_daemon(tmp_path, controller.url)
    published = {}

    def drive() -> None:
        # Running but holding nothing yet: the watchdog is fed, READY is not sent.
        notify_socket.wait_for("WATCHDOG=1")
        published["ready_before"] = notify_socket.first("READY=1")
        published["at"] = time.monotonic()
        controller.publish(HOST, host_state(HOST, 3))
        notify_socket.wait_for("READY=1")
        os.kill(os.getpid(), signal.SIGTERM)  # what `systemctl stop` sends

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    assert daemon.run_forever() == 0  # the main thread's path, signal handlers and all
    driver.join(5)
    assert published["ready_before"] is None, "READY=1 before any reconcile"
    assert notify_socket.first("READY=1") > published["at"]
    assert "STATUS=generation 3 applied" in notify_socket.lines()
    notify_socket.wait_for("STOPPING=1", timeout=5)
    assert daemon.applied_generation == 3
    # A stop is not a failure: no thread was counted as failed and restarted.
    assert {name: t.restarts for name, t in daemon.supervisor.threads.items() if t.restarts} == {}


def test_agent_stops_feeding_the_watchdog_when_unhealthy(tmp_path, controller, notify_socket):  # noqa: F811
    daemon = make_daemon(tmp_path, controller.url)
    daemon.start()
    try:
        before = len(notify_socket.lines())
        assert daemon._notify_systemd(ready=False) is False  # nothing reconciled: not ready
        assert notify_socket.wait_for("WATCHDOG=1")
        daemon._stop.set()  # the loop thread ends: /healthz would answer 503
        daemon.inbox.stop()
        daemon.supervisor.threads["loop"].join(5)
        assert not daemon.feeds_watchdog()
        count = notify_socket.lines().count("WATCHDOG=1")
        daemon._notify_systemd(ready=True)
        time.sleep(0.3)  # a datagram sent would be here by now; nothing may arrive
        assert notify_socket.lines().count("WATCHDOG=1") == count, notify_socket.lines()[before:]
    finally:
        daemon.stop()


def test_abstract_socket_names_are_understood(monkeypatch):
    name = f"@openhnv-test-{uuid.uuid4().hex}"
    listener = NotifySocket(name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sd_notify.notify("READY=1", "STATUS=abstract")
        listener.wait_for("STATUS=abstract")
    finally:
        listener.close()


def test_outside_systemd_nothing_is_sent_and_nothing_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))  # the manager went away
    assert sd_notify.notify("WATCHDOG=1") is False


def test_watchdog_interval_is_half_of_watchdog_sec_for_the_watched_pid_only(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sd_notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # a child that inherited it
    assert sd_notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sd_notify.watchdog_interval() is None


def test_controller_process_is_ready_with_its_store_and_feeds_the_watchdog(tmp_path, notify_socket):
    with LiveController(tmp_path / "state", process=True) as live:
        ready = notify_socket.wait_for("READY=1")
        notify_socket.wait_for("WATCHDOG=1")
        # Fed again and again, not once (WATCHDOG_USEC 2 s: every second).
        deadline = time.monotonic() + 10
        while notify_socket.lines().count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert notify_socket.lines().count("WATCHDOG=1") >= 2
        assert live.process is not None
        assert ready < notify_socket.first("WATCHDOG=1")
        live.stop()  # SIGTERM, as systemctl stop
    notify_socket.wait_for("STOPPING=1", timeout=5)


def test_controller_reports_a_lost_database_in_its_metrics(tmp_path):
    with LiveController(tmp_path / "state") as live:
        metrics = live.client().get("/metrics").text
        assert "hnv_controller_database_up 1.0" in metrics
        live.fabric.store.close()  # the database is gone from under the controller
        metrics = live.client().get("/metrics").text
        assert "hnv_controller_database_up 0.0" in metrics
