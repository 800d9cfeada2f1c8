"""The long-running agent: ``hnv-agent run``.

Owns the reconcile loop and the wiring of the agent's threads; the kernel is reached only
through the Reconciler (agent.reconcile), the controller only through agent.watch, the
disk only through agent.intake.

Threads, and who may do what (Neutron's lesson: callbacks record what changed, one loop
does the work):

- watch (agent.watch.WatchStream): reads the stream of the controller in use; records the
  newest document in the inbox and wakes the loop. Never validates, never applies. Given
  several controllers (replicas of one fabric), it moves to the next when the one in use
  stops answering; ``hnv_agent_controller_info{url}`` (1 for the one in use),
  ``hnv_agent_controller_switches_total`` and /healthz's ``controller`` say which.
- kernel events (agent.events.KernelEventWatch): records "a link or static neighbour
  changed" in the inbox and wakes the loop; marks it urgent when the link is a VM's tap
  the loop waits for (`TapWatch`).
- status (agent.watch.StatusReporter): sends the latest status to the controller the
  watch uses.
- metrics (agent.metrics.ObservabilityServer): answers /metrics and /healthz.
- main thread (this module): waits for a stop signal and talks to systemd
  (agent.sd_notify): READY=1 after the first reconcile, WATCHDOG=1 each second while
  ``feeds_watchdog()`` says healthy, STOPPING=1 on the way out.
- the loop (this module): the only thread that decides, persists and reconciles. It
  wakes for a document, for kernel events (debounced: a burst of notifications, most of
  them caused by our own writes, becomes one reconcile), and every resync interval.

Real VMs' taps (agent.plan, "tap ports"): a tap the hypervisor has not created yet is
waiting, not an error; the loop logs each tap's changes of state (``event=tap_waiting``,
``tap_plugged``, ``tap_refused`` with the device and the expected and seen MAC),
/healthz lists them under ``taps``, and a refused one is an error in the status. The
kernel event of a waited-for tap appearing (or changing, when refused) skips the gap
kept between event reconciles: only the debounce stands between a VM's start and its
tap on the bridge (EVENT_RECONCILE_GAP exists against loops of our own writes, and a
tap's appearance is never ours). The loop then plugs the waited-for taps first, reading
and writing only them (Reconciler.plug_taps), and reconciles the whole host right after:
a VM's start does not wait for the observation of a host with thousands of records.

Supervision: the watch, status, kernel events and loop threads run under
agent.supervision. Whatever one of them raises (a callback that fails, an error no one
foresaw), the supervisor logs it with its traceback, counts it in
``hnv_agent_thread_restarts_total{thread}`` and starts the thread again after a capped
backoff; a restarted kernel event watch also wakes the loop, which reconciles whatever
changed while no one listened. ``healthy()`` (and /healthz, 503 when not) is false while
the loop is stalled or any supervised thread is down or has not yet run a while without
failing; /healthz names the thread and its last error. A systemd watchdog fed only while
``healthy()`` restarts an agent whose thread keeps failing.

Restart semantics: the last accepted state is loaded from disk before the controller is
contacted, and the first reconcile runs against it; when the kernel already matches, its
plan is empty and nothing is written, so tenant traffic never notices the restart. With
every controller down the agent keeps holding (and repairing) that state. Stopping, by
signal or kill -9, leaves the kernel as it is: there is no cleanup on exit, on purpose.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from agent.cli import EXIT_REFUSED
from agent.events import KernelEventWatch
from agent.intake import IntakeDecision, StateFileError, StateStore, Verdict, decide, from_another_fabric
from agent import sd_notify
from agent.metrics import AgentMetrics, ObservabilityServer
from agent.logfmt import quote as _q
from agent.state import HostState
from agent.supervision import Supervisor
from agent.watch import Backoff, ControllerEndpoint, StatusReport, StatusReporter, WatchStream, controller_urls

log = logging.getLogger("agent.daemon")
DRIFT_CHANGES_LOGGED = 5  # the first changes of a drift repair, in its log line

DEFAULT_STATE_DIR = "/var/lib/openhnv-agent"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
EVENT_RECONCILE_GAP = 1.0  # seconds between two event-triggered reconciles, at least
# After a reconcile that wrote, its notifications the event thread reads this late are
# still its own (Inbox); the periodic reconcile covers anything else in that window.
OWN_EVENT_GRACE = 0.5
# The debounce after a waited-for tap appears (at most; the configured one when shorter):
# a hypervisor sets the tap's address and brings it up within milliseconds of creating it.
TAP_DEBOUNCE = 0.1
PERIODIC_DUTY_FACTOR = 2.0  # idle at least this many times the last reconcile's duration
TUNNEL_STATS_WAIT = 1.0  # seconds a scrape waits for another scrape's read of the tunnel counters
NETNS_HELPER_TIMEOUT = 30  # seconds pyroute2 waits for its namespace helper process
LOOP_STALL_LIMIT = 60.0  # seconds without a loop turn before /healthz says 503
SUPERVISED_THREADS = ("watch", "status", "kernel_events", "loop")


class ReconcilerLike(Protocol):
    """What the loop needs from agent.reconcile.Reconciler."""

    def reconcile(self, desired: HostState) -> Any: ...
    # Optional: plug_taps(desired, devices) -> a result like reconcile's, for the taps alone.
    def tunnel_stats(self, timeout: float | None = None) -> list[Any]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class DaemonConfig:
    host: str
    state_dir: Path
    # One controller URL, or several (replicas of one fabric; a string may hold several,
    # comma- or space-separated): agent.watch.controller_urls reads and checks them.
    controller_url: str | tuple[str, ...]
    token: str = field(repr=False)
    metrics_address: str | None = DEFAULT_METRICS_ADDRESS
    resync_interval: float = 2.0
    netns: str | None = None
    heartbeat: float = 5.0  # asked of the controller; 3 missed ones mean a dead stream
    event_debounce: float = 0.2
    reconnect_max_delay: float = 30.0
    watch_kernel_events: bool = True
    ca_file: str | None = None  # CA that signed the controller's certificate (https://)
    # A restarted thread counts as up again once it has run this long without failing.
    thread_stable_after: float = 10.0


@dataclass
class Wakeup:
    """What woke the loop: the newest document (if any) and kernel event descriptions."""

    has_document: bool = False
    document: Any = None
    kernel_events: list[str] = field(default_factory=list)
    urgent: bool = False  # one of the events is a waited-for tap appearing (TapWatch)


class Inbox:
    """Where other threads record what happened; the loop takes it. Latest document wins:
    a generation superseded before the loop got to it is never applied.

    Our own writes raise kernel events too: the loop brackets each reconcile with
    ``writes_begin`` and ``writes_end``, and events noted in between (and for
    OWN_EVENT_GRACE s after, for the notifications the event thread reads late) are the
    reconcile's own when it wrote and succeeded: dropped, not a reason for another
    whole-host reconcile. An urgent event (a waited-for tap) is never dropped; nor is any
    event while a reconcile that wrote nothing runs, or one that failed. The cost: a change
    made by someone else in the very second the agent was writing waits for the periodic
    reconcile (the resync interval) instead of the event's."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._wakeup = Wakeup()
        self._stopping = False
        self._writing = False
        self._held: list[str] = []  # noted while a reconcile runs: its own, if it wrote
        self._own_until = 0.0
        self.own_events_dropped = 0

    def put_document(self, document: Any) -> None:
        with self._condition:
            self._wakeup.has_document = True
            self._wakeup.document = document
            self._condition.notify_all()

    def note_kernel_event(self, description: str, urgent: bool = False, *, ours_possible: bool = True) -> None:
        """Record an event; ``ours_possible=False`` for one no write of ours can raise."""
        with self._condition:
            if not urgent and ours_possible:
                if self._writing:
                    if len(self._held) < 100:
                        self._held.append(description)
                    return
                if time.monotonic() < self._own_until:
                    self.own_events_dropped += 1
                    return
            self._add(description, urgent)

    def _add(self, description: str, urgent: bool) -> None:
        if len(self._wakeup.kernel_events) < 100:  # a burst needs one reconcile, not a log
            self._wakeup.kernel_events.append(description)
        self._wakeup.urgent = self._wakeup.urgent or urgent
        self._condition.notify_all()

    def settled(self) -> bool:
        """No reconcile is writing and its grace is over: an event now is someone else's."""
        with self._condition:
            return not self._writing and time.monotonic() >= self._own_until

    def writes_begin(self) -> None:
        with self._condition:
            self._writing, self._held = True, []

    def writes_end(self, ours: bool) -> int:
        """End of a reconcile; ``ours``: it wrote and succeeded, so what was noted meanwhile
        is its own (dropped; how many is returned). Otherwise it is handed to the loop."""
        with self._condition:
            self._writing, held, self._held = False, self._held, []
            if ours:
                self._own_until = time.monotonic() + OWN_EVENT_GRACE
                self.own_events_dropped += len(held)
                return len(held)
            for description in held:
                self._add(description, False)
            return 0

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def wait_urgent(self, timeout: float) -> bool:
        """Wait up to `timeout` s for an urgent kernel event (left in the inbox for `take`)."""
        with self._condition:
            self._condition.wait_for(lambda: self._stopping or self._wakeup.urgent, timeout=max(0.0, timeout))
            return self._wakeup.urgent

    def take(self, timeout: float) -> Wakeup:
        with self._condition:
            self._condition.wait_for(
                lambda: self._stopping or self._wakeup.has_document or self._wakeup.kernel_events,
                timeout=max(0.0, timeout),
            )
            taken, self._wakeup = self._wakeup, Wakeup()
            return taken


class TapWatch:
    """The taps the loop waits for, shared by the loop (which tells it, after each
    reconcile, every tap it wants and which are plugged) and the kernel event thread
    (which asks whether an event is urgent).

    Urgent: a link message for a wanted tap that is not plugged (absent, refused, or
    deleted since: a restarting VM's). Not urgent: anything else, including the messages
    our own writes to a plugged tap raise, so the gap between event reconciles still
    holds against a loop of our own writes.

    Deletions are numbered: a reconcile that read the kernel before a tap was deleted
    (the VM restarting while it ran) must not mark the new tap as plugged. The loop takes
    `begin()` before it reads the kernel and hands it back with what it found."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._plugged: set[str] = set()
        self._seq = 0
        self._deleted: dict[str, int] = {}  # tap -> the number of its last deletion
        self._plugging: set[str] = set()  # being plugged now: its notifications are our writes

    def begin(self) -> int:
        with self._lock:
            return self._seq

    def deleted_since(self, seq: int) -> set[str]:
        """The taps deleted after `begin()` returned `seq`."""
        with self._lock:
            return {name for name, number in self._deleted.items() if number > seq}

    def update(self, taps: Any, seq: int) -> None:
        """Every tap the state wants, as a reconcile that began at `seq` found them."""
        with self._lock:
            self._wanted = {tap.device for tap in taps}
            self._plugged = {tap.device for tap in taps
                             if tap.state == "plugged" and self._deleted.get(tap.device, 0) <= seq}

    def plugging(self, devices: set[str]) -> None:
        """Taps about to be plugged: the notifications of our writes to them are not urgent."""
        with self._lock:
            self._plugging = set(devices)

    def mark_plugged(self, devices: set[str], seq: int) -> None:
        """Taps just plugged by a plan that began at `seq` (before the full reconcile says
        so): our writes to them are not urgent. Ends `plugging`."""
        with self._lock:
            self._plugging = set()
            self._plugged |= {name for name in devices & self._wanted if self._deleted.get(name, 0) <= seq}

    def unplugged(self) -> set[str]:
        with self._lock:
            return self._wanted - self._plugged

    def urgent(self, description: str) -> bool:
        """Whether a kernel event ('RTM_NEWLINK hnvn...', agent.events) should skip the gap."""
        event, _, name = description.partition(" ")
        with self._lock:
            if name not in self._wanted:
                return False
            if event == "RTM_DELLINK":
                self._plugged.discard(name)  # the VM stopped: its next tap is urgent again
                self._seq += 1
                self._deleted[name] = self._seq
                return False
            return event == "RTM_NEWLINK" and name not in self._plugged and name not in self._plugging


def _error_entry(error: Any) -> dict[str, Any]:
    """A reconciler ObjectError (or a dict) as the status protocol's error object."""
    if isinstance(error, dict):
        return {k: error.get(k) for k in ("kind", "object", "errno", "message")}
    return {
        "kind": error.kind, "object": error.object,
        "errno": error.errno, "message": error.message,
    }


class AgentDaemon:
    """The reconcile loop and its helpers; ``start`` then ``stop`` (or ``run_forever``)."""

    def __init__(self, config: DaemonConfig, reconciler: ReconcilerLike):
        self.config = config
        self.reconciler = reconciler
        self.store = StateStore(config.state_dir)
        self.inbox = Inbox()
        self.metrics = AgentMetrics(self._tunnel_stats)
        self.endpoint = ControllerEndpoint(config.controller_url, config.host, config.token, config.ca_file,
                                           on_switch=self._on_controller_switch)
        for url in self.endpoint.urls:  # every series present from the first scrape
            self.metrics.controller_info.labels(url=url).set(1 if url == self.endpoint.url else 0)
        backoff = Backoff(initial=0.5, cap=config.reconnect_max_delay)
        self.watch = WatchStream(
            self.endpoint,
            on_state=self._on_document,
            on_connection=self._on_connection,
            on_heartbeat=self._on_heartbeat,
            heartbeat=config.heartbeat,
            backoff=backoff,
        )
        self.reporter = StatusReporter(self.endpoint, backoff=backoff)
        self.tap_watch = TapWatch()
        self.kernel_events = (
            KernelEventWatch(self._on_kernel_event, netns=config.netns)
            if config.watch_kernel_events else None
        )
        self.server = (
            ObservabilityServer(config.metrics_address, self.metrics, self.health)
            if config.metrics_address else None
        )
        # Held by the loop thread; read (never written) by /healthz.
        self.held: HostState | None = None
        self.applied_generation: int | None = None
        self.desired_generation: int | None = None
        self.controller_connected = False
        self.last_reconcile: dict[str, Any] | None = None
        self.reconcile_count = 0
        self._last_clean_generation: int | None = None  # reconciled without errors
        self._object_errors: list[dict[str, Any]] = []
        self.taps: dict[str, dict[str, Any]] = {}  # device -> the tap as /healthz shows it
        self._refusal: dict[str, Any] | None = None  # the last refused document, as an error
        self._unsaved: HostState | None = None  # accepted but not yet persisted
        self._loop_tick = time.monotonic()
        self._last_event_reconcile = 0.0
        self._tap_seq = 0  # TapWatch.begin() of the last reconcile
        self._stop = threading.Event()
        self._loop_runs = 0  # how many times the loop body started (more than 1: restarted)
        self.supervisor = Supervisor(
            backoff=Backoff(initial=0.5, cap=config.reconnect_max_delay),
            stable_after=config.thread_stable_after,
            on_restart=self._on_thread_restart,
        )
        for name in SUPERVISED_THREADS:  # every series present from the first scrape, at 0
            self.metrics.thread_restarts.labels(thread=name)

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        # Why this order: the state on disk is loaded before anything can reach the
        # controller, so a controller outage at start-up still finds the agent holding
        # (and repairing) the last accepted state; the kernel event watch subscribes
        # before the first reconcile so that no change after it goes unnoticed.
        self._load_from_disk()
        if self.server is not None:
            self.server.start()
            log.info("event=metrics_listening address=%s port=%d", self.config.metrics_address, self.server.port)
        if self.kernel_events is not None:
            self.supervisor.start("kernel_events", self.kernel_events.run)
            self.kernel_events.ready.wait(5.0)
        self.supervisor.start("loop", self._loop)
        self.supervisor.start("status", self.reporter.run)
        self.supervisor.start("watch", self.watch.run)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads. The kernel is left exactly as it is (no cleanup on exit)."""
        # Why the supervisor first: a thread told to stop must not be restarted.
        self.supervisor.stop()
        self._stop.set()
        self.inbox.stop()
        self.watch.stop()
        self.reporter.stop()
        if self.kernel_events is not None:
            self.kernel_events.stop()
        self.supervisor.join(timeout)
        if self.server is not None:
            self.server.stop()

    def run_forever(self) -> int:
        main_pid = os.getpid()

        def on_signal(signum: int, frame: Any) -> None:
            if os.getpid() != main_pid:
                # A child pyroute2 forked to open a socket in another namespace, told to
                # stop by its parent (the child inherits this handler): just go.
                os._exit(0)
            # No logging here: the handler runs between two bytecodes of the main thread,
            # which may be inside a write to the same stream (a reentrant-call error).
            received.append(signum)
            # The supervisor first (an Event.set, safe here): the loop thread returns as
            # soon as _stop is set, and must be seen as asked to stop, not as failed.
            self.supervisor.stop()
            self._stop.set()
            self.inbox.stop()

        received: list[int] = []
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        ready = False
        while not self._stop.wait(1.0):
            ready = self._notify_systemd(ready)
        sd_notify.notify("STOPPING=1")
        if received:
            log.info("event=agent_stopping signal=%s kernel=left_in_place",
                     signal.Signals(received[0]).name)
        self.stop()
        log.info("event=agent_stopped")
        return 0

    def healthy(self) -> bool:
        """True while the agent works: the loop turns and every supervised thread is up.

        What /healthz answers (200 or 503) and what a systemd watchdog should be fed on.
        """
        return self.health()[0]

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the /healthz body): generations, connection, last reconcile, threads."""
        # The loop turns at least once per resync interval, or once per reconcile when a
        # large first apply takes long; a loop stuck far longer (a hung netlink call) is
        # not alive even if the process is.
        stall_limit = max(10 * self.config.resync_interval, LOOP_STALL_LIMIT)
        threads = self.supervisor.health()
        loop = threads.get("loop")
        loop_turning = loop is not None and loop.up and time.monotonic() - self._loop_tick < stall_limit
        down = sorted(name for name, thread in threads.items() if not thread.up)
        if loop is not None and loop.up and not loop_turning:
            down.append("loop")  # alive, but stuck
        body = {
            "applied_generation": self.applied_generation,
            "desired_generation": self.desired_generation,
            "controller_connected": self.controller_connected,
            "controller": self.endpoint.url,
            "last_reconcile": self.last_reconcile,
            "threads": {name: thread.as_dict() for name, thread in threads.items()},
            "threads_down": down,
            "taps": [dict(tap) for tap in self.taps.values()],
        }
        return loop_turning and not down, body

    # --- systemd supervision (agent.sd_notify; no-ops outside systemd) -----------------

    def feeds_watchdog(self) -> bool:
        """Whether the daemon is healthy enough to feed systemd's watchdog.

        What /healthz checks (`healthy`: the loop turns and every supervised thread is
        up); a daemon that stops answering yes is killed and restarted by systemd after
        WatchdogSec.
        """
        return self.healthy()

    def _notify_systemd(self, ready: bool) -> bool:
        """One turn of the main thread: READY=1 once, after the first reconcile (the
        kernel then holds the last accepted state), and WATCHDOG=1 while healthy."""
        if not ready and self.reconcile_count > 0:
            sd_notify.notify("READY=1", f"STATUS=generation {self.applied_generation} applied")
            ready = True
        if self.feeds_watchdog():
            sd_notify.notify("WATCHDOG=1")
        return ready

    def _tunnel_stats(self) -> list[Any]:
        """Per-tunnel counters for a scrape; gives up rather than hold a scrape for long.

        Read beside a running reconcile, not after it (the reconciler reads them on a
        socket of their own), so a long first apply never costs a scrape its counters.
        """
        return self.reconciler.tunnel_stats(timeout=TUNNEL_STATS_WAIT)

    # --- callbacks from other threads: record and signal only ---------------------------

    def _on_thread_restart(self, thread: str, reason: str) -> None:
        self.metrics.thread_restarts.labels(thread=thread).inc()
        if thread == "kernel_events":
            # Notifications were missed while no one listened: reconcile once for them.
            self.inbox.note_kernel_event("kernel event watch restarted", ours_possible=False)

    def _on_kernel_event(self, description: str) -> None:
        self.inbox.note_kernel_event(description, urgent=self.tap_watch.urgent(description))

    def _on_controller_switch(self, old: str, new: str, reason: str) -> None:
        self.metrics.controller_switches.inc()
        self.metrics.controller_info.labels(url=old).set(0)
        self.metrics.controller_info.labels(url=new).set(1)

    def _on_document(self, document: Any) -> None:
        self.inbox.put_document(document)

    def _on_connection(self, connected: bool, reason: str) -> None:
        self.controller_connected = connected
        self.metrics.controller_connected.set(1 if connected else 0)
        if connected:
            # The controller may have restarted and forgotten our status: send it again.
            self.reporter.resend()

    def _on_heartbeat(self, generation: int | None) -> None:
        if generation is not None:
            self._note_desired(generation)

    def _note_desired(self, generation: int) -> None:
        self.desired_generation = generation
        self.metrics.desired_generation.set(generation)

    # --- the loop -------------------------------------------------------------------

    def _load_from_disk(self) -> None:
        try:
            state = self.store.load(host=self.config.host)
        except StateFileError as exc:
            # Unusable file: hold nothing and change nothing until the controller gives a
            # valid state. Never "nothing held, so delete everything".
            log.error("event=state_file_unusable reason=%s", _q(exc))
            return
        if state is None:
            log.info("event=state_file_absent path=%s", self.store.path)
            return
        self.held = state
        self._note_desired(state.generation)
        self.metrics.set_lookup_records(state)
        log.info("event=state_loaded generation=%d path=%s", state.generation, self.store.path)

    def _loop(self) -> None:
        self._loop_runs += 1
        self._loop_tick = time.monotonic()
        if self.held is not None:
            self._reconcile(self.held, reason="startup" if self._loop_runs == 1 else "loop_restart")
        next_resync = self._next_resync()
        while not self._stop.is_set():
            self._loop_tick = time.monotonic()
            wakeup = self.inbox.take(timeout=next_resync - time.monotonic())
            if self._stop.is_set():
                break
            if wakeup.kernel_events and not wakeup.has_document:
                # Debounce: let the burst (a deleted bridge takes its ports and FDB
                # entries with it) finish, then reconcile once for all of it. Never
                # more than one event reconcile per EVENT_RECONCILE_GAP: our own writes
                # raise events too, and a reconciler that can never converge must not
                # become a busy loop.
                # A waited-for tap appearing is never our own write: it ends the gap, and
                # only the debounce (counted from its event) stands before the reconcile
                # (TapWatch). A restarting VM's tap is deleted (not urgent) and made again
                # (urgent) while the loop already waits out the gap: hence the wait.
                debounce = self.config.event_debounce
                tap_debounce = min(debounce, TAP_DEBOUNCE)
                started = time.monotonic()
                since_last = started - self._last_event_reconcile
                until = started + (tap_debounce if wakeup.urgent
                                   else max(debounce, EVENT_RECONCILE_GAP - since_last))
                if not wakeup.urgent and self.inbox.wait_urgent(until - started):
                    until = min(until, time.monotonic() + tap_debounce)
                self._stop.wait(max(0.0, until - time.monotonic()))
                later = self.inbox.take(timeout=0)
                wakeup.kernel_events += later.kernel_events
                wakeup.urgent = wakeup.urgent or later.urgent
                if later.has_document:
                    wakeup.has_document, wakeup.document = True, later.document
            reconciled = False
            if wakeup.has_document:
                reconciled = self._take_document(wakeup.document)
            elif self._unsaved is not None and time.monotonic() >= next_resync:
                reconciled = self._accept(self._unsaved)
            if reconciled:
                next_resync = self._next_resync()
                continue
            if self.held is None:
                next_resync = self._next_resync()
                continue
            if wakeup.kernel_events:
                log.info(
                    "event=kernel_changed count=%d first=%s tap=%s",
                    len(wakeup.kernel_events), _q(wakeup.kernel_events[0]), int(wakeup.urgent),
                )
                if wakeup.urgent:
                    self._plug_taps(self.held)
                self._reconcile(self.held, reason="event")
                self._last_event_reconcile = time.monotonic()
                next_resync = self._next_resync()
            elif time.monotonic() >= next_resync:
                self._reconcile(self.held, reason="periodic")
                next_resync = self._next_resync()

    def _next_resync(self) -> float:
        """When the next periodic reconcile is due, counted from now (the end of the last).

        Never sooner than the resync interval, nor sooner than twice the last reconcile's
        duration: where reconciles are slow (a huge host, an emulated CPU) the periodic
        safety net takes at most a third of a CPU; kernel events still trigger at once.
        """
        last = self.last_reconcile["duration_s"] if self.last_reconcile else 0.0
        return time.monotonic() + max(self.config.resync_interval, PERIODIC_DUTY_FACTOR * last)

    def _take_document(self, document: Any) -> bool:
        """Decide on one document; returns whether it led to a reconcile."""
        decision = decide(document, host=self.config.host, held=self.held)
        if decision.generation is not None and decision.verdict is not Verdict.stale:
            self._note_desired(decision.generation)
        if decision.verdict is Verdict.stale:
            log.info(
                "event=state_ignored reason=stale generation=%s held=%s",
                decision.generation, self.held.generation if self.held else None,
            )
            return False
        if decision.verdict is Verdict.unchanged:
            log.info("event=state_unchanged generation=%s", decision.generation)
            if self._refusal is not None:
                # The controller is back to what we hold: the refused document is gone.
                self._refusal = None
                self._report()
            return False
        if decision.verdict is Verdict.refused:
            self._refuse(decision)
            return False
        assert decision.state is not None
        return self._accept(decision.state)

    def _refuse(self, decision: IntakeDecision) -> None:
        self.metrics.state_refusals.inc()
        for problem in decision.problems:
            log.error(
                "event=state_refused generation=%s held=%s problem=%s",
                decision.generation, self.held.generation if self.held else None, _q(problem),
            )
        shown = f"generation {decision.generation}" if decision.generation is not None else "without a generation"
        self._refusal = {
            "kind": "state",
            "object": f"host state {self.config.host} {shown}",
            "errno": None,
            "message": decision.reason,
        }
        self._report()

    def _accept(self, state: HostState) -> bool:
        # Why persist first: if the agent dies half-way through applying, the restart
        # must resume the generation the kernel was moving towards, not the one before.
        try:
            self.store.save(state)
        except OSError as exc:
            self._unsaved = state
            message = f"cannot persist generation {state.generation}: {exc.strerror or exc}"
            log.error("event=state_unsaved path=%s reason=%s", self.store.path, _q(message))
            self._refusal = {"kind": "state", "object": str(self.store.path), "errno": exc.errno, "message": message}
            self._report()
            return False
        self._unsaved = None
        self._refusal = None
        previous = self.held.generation if self.held else None
        if from_another_fabric(state.fabric, self.held):
            assert self.held is not None
            log.warning("event=fabric_changed generation=%d held_generation=%d fabric=%s held_fabric=%s",
                        state.generation, self.held.generation, state.fabric, self.held.fabric)
        self.held = state
        self.metrics.set_lookup_records(state)
        log.info("event=state_accepted generation=%d previous=%s", state.generation, previous)
        self._reconcile(state, reason="generation")
        return True

    def _reconcile(self, state: HostState, *, reason: str) -> None:
        started = time.monotonic()
        tap_seq = self.tap_watch.begin()
        self.inbox.writes_begin()
        wrote = False
        try:
            result = self.reconciler.reconcile(state)
            planned, applied = int(result.planned), int(result.applied)
            wrote = applied > 0 and not result.errors
            errors = [_error_entry(e) for e in result.errors]
            objects_by_kind = dict(result.objects_by_kind)
            taps = tuple(getattr(result, "taps", ()))
            plan = getattr(result, "plan", None)
            changes = [op.describe() for op in plan.ops[:DRIFT_CHANGES_LOGGED]] if plan is not None else []
        except Exception as exc:  # a reconciler bug must not kill the loop
            log.exception("event=reconcile_crashed generation=%d", state.generation)
            planned, applied, objects_by_kind = -1, 0, {}
            taps = None  # not known: keep what the last reconcile said
            changes = []
            errors = [{
                "kind": "agent", "object": f"reconcile of generation {state.generation}",
                "errno": None, "message": f"{type(exc).__name__}: {exc}",
            }]
        finally:
            own_events = self.inbox.writes_end(wrote)
        duration = time.monotonic() - started
        if own_events:
            log.debug("event=own_kernel_events count=%d generation=%d", own_events, state.generation)
        self.reconcile_count += 1
        self.metrics.reconcile_duration.observe(duration)
        if objects_by_kind:
            self.metrics.set_objects(objects_by_kind)
        for error in errors:
            self.metrics.count_apply_error(error.get("errno"))
        same_generation = state.generation == self._last_clean_generation
        # A VM's tap that appeared (plugged) or changed its address (released) is the
        # hypervisor's doing, not drift: a host whose VMs start would raise the drift alert.
        # A tap deleted since the last reconcile began and found plugged now is a new one.
        tap_moved = taps is not None and (any(
            (self.taps.get(tap.device) or {}).get("state") != tap.state for tap in taps)
            or bool(self.tap_watch.deleted_since(self._tap_seq)))
        self._tap_seq = tap_seq
        if reason in ("periodic", "event") and same_generation and planned > 0 and not tap_moved:
            # The kernel moved away from a generation we had fully applied: drift.
            self.metrics.drift_repairs.inc()
            # What drifted, so that an operator (or a repair that never sticks) can be traced.
            log.warning("event=drift_repaired generation=%d reason=%s planned=%d changes=%s", state.generation,
                        reason, planned, _q("; ".join(changes) + ("; ..." if planned > len(changes) else "")))
        self._last_clean_generation = state.generation if not errors else None
        if taps is not None:
            self._note_taps(taps, errors, tap_seq)
        self._object_errors = errors
        self.applied_generation = state.generation
        self.metrics.applied_generation.set(state.generation)
        self.last_reconcile = {
            "time": time.time(), "reason": reason, "generation": state.generation,
            "planned": planned, "applied": applied, "errors": len(errors),
            "duration_s": round(duration, 6),
        }
        # A quiet periodic reconcile is not an event worth a line at info (every 2 s),
        # only at debug; everything else is.
        quiet = planned == 0 and not errors and reason == "periodic"
        level = logging.DEBUG if quiet else logging.WARNING if errors else logging.INFO
        log.log(
            level,
            "event=reconcile reason=%s generation=%d planned=%d applied=%d errors=%d duration_ms=%.1f",
            reason, state.generation, planned, applied, len(errors), duration * 1000,
        )
        if not quiet:
            if reason == "startup" and planned == 0 and not errors:
                log.info("event=startup_in_sync generation=%d kernel=unchanged", state.generation)
            for error in errors[:20]:
                log.warning(
                    "event=object_error kind=%s object=%s errno=%s message=%s",
                    _q(error["kind"]), _q(error["object"]), error["errno"], _q(error["message"]),
                )
        self._report()

    def _plug_taps(self, state: HostState) -> None:
        """Plug the taps the loop waits for, touching nothing else (Reconciler.plug_taps);
        the full reconcile that follows reports them. Best effort: a failure here is the
        full reconcile's to meet and report."""
        plug = getattr(self.reconciler, "plug_taps", None)
        devices = self.tap_watch.unplugged()
        if plug is None or not devices:
            return
        seq = self.tap_watch.begin()
        self.tap_watch.plugging(devices)
        try:
            result = plug(state, devices)
        except Exception:  # a bug here must not keep the full reconcile from running
            self.tap_watch.mark_plugged(set(), seq)
            log.exception("event=tap_plug_crashed generation=%d", state.generation)
            return
        failed = {error.object for error in result.errors}
        plugged = {tap.device for tap in result.taps if tap.state == "plugged"} - failed
        self.tap_watch.mark_plugged(plugged, seq)
        log.info("event=taps_plugged devices=%s planned=%d applied=%d errors=%d duration_ms=%.1f taps=%s",
                 ",".join(sorted(plugged)) or "-", result.planned, result.applied, len(result.errors),
                 result.duration_s * 1000, ",".join(f"{tap.device}:{tap.state}" for tap in result.taps) or "-")

    def _note_taps(self, taps: tuple[Any, ...], errors: list[dict[str, Any]], seq: int) -> None:
        """Keep each tap's state for /healthz and the event thread; log what changed.

        A tap the plan would plug but whose operations failed is ``failed`` (its errors
        are in the status and the log like any object's)."""
        failed = {error["object"] for error in errors if error.get("kind") == "external"}
        now: dict[str, dict[str, Any]] = {}
        for tap in taps:
            shown = tap.as_dict()
            if shown["state"] == "plugged" and tap.device in failed:
                shown["state"] = "failed"
            now[tap.device] = shown
            before = self.taps.get(tap.device)
            if before is not None and (before["state"], before["seen_mac"]) == (shown["state"], shown["seen_mac"]):
                continue
            if shown["state"] == "refused":
                log.warning("event=tap_refused vm=%s device=%s expected_mac=%s seen_mac=%s reason=%s",
                            _q(tap.vm), tap.device, tap.expected_mac, tap.seen_mac, _q(tap.reason))
            elif shown["state"] != "failed":
                log.info("event=tap_%s vm=%s device=%s bridge=%s mac=%s", shown["state"], _q(tap.vm),
                         tap.device, tap.bridge, tap.seen_mac or tap.expected_mac)
        self.taps = now
        self.tap_watch.update(taps, seq)

    def _report(self) -> None:
        if self.applied_generation is None:
            return  # nothing applied yet: nothing truthful to report
        errors = ([self._refusal] if self._refusal else []) + self._object_errors
        self.reporter.submit(StatusReport(self.applied_generation, tuple(errors)))



# --- command line -----------------------------------------------------------------------


class _LogfmtFormatter(logging.Formatter):
    """ts=... level=... component=... followed by the event's own key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        component = record.name.removeprefix("agent.")
        line = f"ts={ts} level={record.levelname.lower()} component={component} {record.getMessage()}"
        if record.exc_info:
            line += " traceback=" + _q(self.formatException(record.exc_info))
        return line


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; the watch stream logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"hnv-agent run: --token-file {path}: cannot read: {exc.strerror}") from None
    if not token:
        raise SystemExit(f"hnv-agent run: --token-file {path}: the file is empty")
    return token


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def _heartbeat_seconds(text: str) -> float:
    value = _positive_seconds(text)
    if value < 0.5:
        raise argparse.ArgumentTypeError(f"{text} is below 0.5 seconds, which the controller refuses")
    return value


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``run`` to hnv-agent's subcommands (agent/cli.py calls this)."""
    parser = subparsers.add_parser(
        "run",
        help="follow the controller and keep the kernel in the desired state",
        description="Follow the controller's watch stream (one of several replicas, moving to the next "
        "when it stops answering), keep the last accepted state on disk and reconcile the kernel to it; "
        "with no controller answering the kernel is kept as it is; stopping leaves the kernel as it is.",
    )
    parser.add_argument("--controller", action="append", metavar="URL",
                        help="controller base URL, e.g. https://10.0.0.2:8080; repeat it (or give several, "
                             "comma- or space-separated) for replicas of one fabric: the agent watches one "
                             "and moves to the next when it stops answering (env HNV_CONTROLLER_URL)")
    parser.add_argument("--ca-file", default=os.environ.get("HNV_CA_FILE") or None, metavar="FILE",
                        help="CA certificate that signed the controller's (the controller's tls/ca.crt; "
                             "env HNV_CA_FILE; default: the system's CAs)")
    parser.add_argument("--host", required=True, metavar="NAME", help="this host's name in the fabric")
    parser.add_argument("--token-file", required=True, metavar="FILE", help="file holding this host's bearer token")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                        help=f"where the last accepted state is kept (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--metrics-address", default=DEFAULT_METRICS_ADDRESS, metavar="HOST:PORT",
                        help=f"/metrics and /healthz listen here; '' disables (default {DEFAULT_METRICS_ADDRESS})")
    parser.add_argument("--resync-interval", type=_positive_seconds, default=2.0, metavar="SECONDS",
                        help="periodic reconcile (drift repair) interval (default 2)")
    parser.add_argument("--netns", default=None, metavar="NS", help="manage this network namespace instead of the agent's own")
    parser.add_argument("--heartbeat", type=_heartbeat_seconds, default=5.0, metavar="SECONDS",
                        help="heartbeat interval asked of the controller, at least 0.5 (the controller "
                             "refuses less); 3 missed = dead stream (default 5)")
    parser.add_argument("--reconnect-max-delay", type=_positive_seconds, default=30.0, metavar="SECONDS",
                        help="cap of the reconnect backoff (default 30)")
    parser.add_argument("--vm-dhcp", action="store_true",
                        help="lab: the namespace VMs of IPv4 VM subnets ask the host's DHCP server for their "
                             "address (busybox udhcpc in the VM), instead of the agent setting it")
    parser.add_argument("--no-kernel-events", action="store_true",
                        help="reconcile only periodically, not on netlink link/neighbour events")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    configure_logging(getattr(logging, args.log_level.upper()))
    # Checked first, before the token or the kernel: a mistyped URL is one line and exit 2.
    given = args.controller or os.environ.get("HNV_CONTROLLER_URL", "")
    if not given:
        print("hnv-agent run: --controller: required (or HNV_CONTROLLER_URL in the environment)", file=sys.stderr)
        return EXIT_REFUSED
    try:
        controllers = controller_urls(given)
    except ValueError as exc:
        print(f"hnv-agent run: --controller: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.vm_dhcp:
        from agent.guest import client_program

        if client_program() is None:
            print("hnv-agent run: --vm-dhcp: busybox is not installed (its udhcpc is the lab guests' DHCP client)",
                  file=sys.stderr)
            return EXIT_REFUSED
    config = DaemonConfig(
        host=args.host,
        state_dir=Path(args.state_dir),
        controller_url=controllers,
        token=read_token(args.token_file),
        metrics_address=args.metrics_address or None,
        resync_interval=args.resync_interval,
        netns=args.netns,
        heartbeat=args.heartbeat,
        reconnect_max_delay=args.reconnect_max_delay,
        watch_kernel_events=not args.no_kernel_events,
        ca_file=args.ca_file,
    )
    import pyroute2.config

    from agent.reconcile import Reconciler  # the kernel side; imported only to run

    # pyroute2 forks a helper to open sockets in another namespace (--netns, and a VM's
    # namespace for its port): let SIGTERM from its parent end it instead of running the
    # agent's own handler in the child, and give it more than pyroute2's default 2 s to
    # answer, which a busy or emulated CPU overruns (the reconcile then fails with
    # "child process is dead" and only the next resync succeeds).
    pyroute2.config.disable_mp_signal = True
    pyroute2.config.default_communicate_timeout = NETNS_HELPER_TIMEOUT

    reconciler = Reconciler(netns=config.netns, vm_dhcp=args.vm_dhcp)
    try:
        try:
            daemon = AgentDaemon(config, reconciler)
        except ValueError as exc:  # a bad URL or metrics address
            raise SystemExit(f"hnv-agent run: {exc}") from None
        except (OSError, ssl.SSLError) as exc:  # an unreadable or invalid --ca-file
            raise SystemExit(f"hnv-agent run: --ca-file {config.ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
        except OSError as exc:  # the metrics port is taken
            raise SystemExit(f"hnv-agent run: --metrics-address {args.metrics_address}: {exc.strerror}") from None
        log.info(
            "event=agent_starting host=%s controllers=%s controller=%s state_dir=%s netns=%s resync_s=%g",
            config.host, ",".join(daemon.endpoint.urls), daemon.endpoint.url, config.state_dir, config.netns,
            config.resync_interval,
        )
        return daemon.run_forever()
    finally:
        reconciler.close()
