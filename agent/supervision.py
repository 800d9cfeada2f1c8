"""Supervised threads: a thread that ends for any reason other than a stop is started again.

Owns running the agent's long-lived threads (the watch stream, the status reporter, the
kernel event watch, the reconcile loop) so that none can die silently. Each runs a
*body*, a function that returns only when asked to stop. When a body raises anything, or
returns while no stop was asked, the supervisor logs it with its traceback, counts it
(``on_restart(thread, reason)``: the daemon's ``hnv_agent_thread_restarts_total``),
waits a capped exponential backoff (agent.watch.Backoff) and runs the body again in the
same thread.

Health, as /healthz and the systemd watchdog see it: a thread is *down* from the moment
its body fails until the restarted body has run ``stable_after`` seconds without failing
again. So one failure shows as a short dip, and a body that fails on every start stays
down for good, which is what a watchdog must see. The backoff starts over once a body
has been stable that long.

It knows nothing of what the bodies do; it never touches the kernel or the controller.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.logfmt import quote
from agent.watch import Backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadHealth:
    """One supervised thread as /healthz shows it."""

    name: str
    up: bool  # running and stable (see the module docstring)
    state: str  # "running", "restarting" (waiting its backoff), "recovering", "stopped"
    restarts: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"up": self.up, "state": self.state, "restarts": self.restarts, "last_error": self.last_error}


class SupervisedThread:
    """One named thread running ``body`` again after every failure, until ``stop``."""

    def __init__(
        self,
        name: str,
        body: Callable[[], None],
        *,
        stopping: threading.Event,
        backoff: Backoff,
        stable_after: float,
        on_restart: Callable[[str, str], None] = lambda thread, reason: None,
    ):
        self.name = name
        self.body = body
        self.stopping = stopping
        self.backoff = backoff
        self.stable_after = stable_after
        self.on_restart = on_restart
        self.restarts = 0
        self.last_error: str | None = None
        self._state = "stopped"
        self._failed_at: float | None = None  # when the body last failed
        self._started_at = 0.0  # when the body last (re)started
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name=f"hnv-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> ThreadHealth:
        with self._lock:
            state, failed_at, started_at = self._state, self._failed_at, self._started_at
        if state == "running" and failed_at is not None and time.monotonic() - started_at < self.stable_after:
            state = "recovering"
        alive = self.is_alive() or state == "stopped"
        up = alive and state in ("running", "stopped")
        return ThreadHealth(self.name, up, state if alive else "dead", self.restarts, self.last_error)

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state
            if state == "running":
                self._started_at = time.monotonic()

    def _supervise(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            self._set_state("running")
            try:
                self.body()
                if self.stopping.is_set():
                    break
                reason = "the thread ended without being asked to stop"
                details = None
            except BaseException as exc:  # noqa: BLE001 - any failure is restarted, by design
                if self.stopping.is_set():
                    break
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                details = traceback.format_exc()
            ran_for = time.monotonic() - self._started_at
            attempt = 0 if ran_for >= self.stable_after else attempt + 1
            delay = self.backoff.delay(attempt)
            with self._lock:
                self._state = "restarting"
                self._failed_at = time.monotonic()
            self.restarts += 1
            self.last_error = reason
            log.error("event=thread_failed thread=%s restarts=%d delay_s=%.2f reason=%s%s",
                      self.name, self.restarts, delay, quote(reason),
                      f" traceback={quote(details)}" if details else "")
            self.on_restart(self.name, reason)
            self.stopping.wait(delay)
        self._set_state("stopped")


class Supervisor:
    """The agent's supervised threads, by name; one stop for all of them."""

    def __init__(self, *, backoff: Backoff, stable_after: float,
                 on_restart: Callable[[str, str], None] = lambda thread, reason: None):
        self.backoff = backoff
        self.stable_after = stable_after
        self.on_restart = on_restart
        self.stopping = threading.Event()
        self.threads: dict[str, SupervisedThread] = {}

    def start(self, name: str, body: Callable[[], None]) -> SupervisedThread:
        thread = SupervisedThread(name, body, stopping=self.stopping, backoff=self.backoff,
                                  stable_after=self.stable_after, on_restart=self.on_restart)
        self.threads[name] = thread
        thread.start()
        return thread

    def stop(self) -> None:
        """No more restarts; the bodies themselves are told to stop by their owners."""
        self.stopping.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def health(self) -> dict[str, ThreadHealth]:
        return {name: thread.health() for name, thread in self.threads.items()}
