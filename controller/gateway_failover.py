"""Automatic gateway failover: the controller moves a gateway service's active host to
a standby when the active host's agent stops reporting.

An agent *reports* while its watch stream is open on a controller (the agent holds one
open all the time and reconnects within seconds when it breaks) and whenever it sends a
status. Every `interval` seconds `GatewayFailover.tick`:

1. marks the gateway hosts whose watch stream is open on this replica as heard from now
   (`store.save_seen`: in memory on SQLite, where one process serves the fabric; rows
   every replica reads on PostgreSQL, so the replica deciding need not be the one the
   agent talks to);
2. reads when each host was last heard from by any replica: the later of its seen time
   and its last status report (`last_heard`);
3. for each gateway service whose active host has been silent for longer than `after`
   (silence counted from the later of the host's last report and the moment it became
   active, the service's `active_since`: a new service, or a role set by hand, does not
   fail over off a host whose agent is seconds late to connect; an active host that
   never reports loses the role `after` seconds after it got it),
   picks the next host in the service's order after the active one (wrapping round)
   that is reporting, and asks the fabric to move the role there
   (`Fabric.move_gateway_role`: one transaction, the PATCH's path). The decision is
   taken again inside the write serialisation with the seen times read afresh, so with
   several replicas the role moves exactly once.

A host's first apply: a gateway host whose agent has been heard from but has never
reported an applied generation is still coming up, and its first apply (the team, its
management address moved onto the virtual switch) can cut it off from the controller
for seconds, longer than a short failover time. Its silence counts against it only
after `first_apply_grace` (FIRST_APPLY_GRACE_S, or `after` when that is longer), and a
standby that has applied a generation is preferred to one still coming up. Without
this, a gateway service created with its hosts moved its role back and forth while
they came up (three moves in one run of the seed lab with a 2 s failover time). A host
that dies in its first apply therefore keeps the role for the grace, not `after`; one
whose agent was never heard from at all is not in an apply and loses it after `after`.

No flapping: a host that comes back does not take the role back; it stays a standby
until its successor fails in turn or an operator moves the role (PATCH `active`). No
move when no other host of the service reports: the role stays where it is and
`event=gateway_failover_blocked` is logged once per outage. No decision during the
first `grace` seconds after the start, nor after the store failed to answer: agents
are still reconnecting then (their backoff is capped at 30 s) and the seen times
would be stale, so a healthy host would look silent.

Clocks: seen times are the writing replica's wall clock, compared with the deciding
replica's; replicas' clocks must agree to well within `after` (NTP).

Owns the liveness reading and the decision; the move itself is the fabric's. Must not
touch agents, the kernel or the store beyond the seen times.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import timezone

from agent.logfmt import quote
from controller.fabric import Fabric
from controller.models import FabricError, GatewayService, Kind
from controller.store import StoreBusy

log = logging.getLogger("openhnv.controller.gateway_failover")

# Agents reconnect with a backoff capped at 30 s (agent.watch.Backoff): after a start (or a
# store outage) no host counts as silent before each had the time to come back.
RECONNECT_GRACE_S = 30.0
# How long a gateway host that has never applied a generation may be silent before the
# role moves off it (see the module's docstring): a first apply under software emulation
# takes 10-30 s.
FIRST_APPLY_GRACE_S = 60.0


def silence(host: str, last_heard: Mapping[str, float], now: float) -> float:
    """Seconds since the host's agent was last heard from (infinite: never)."""
    heard = last_heard.get(host)
    return math.inf if heard is None else max(0.0, now - heard)


def active_silence(service: GatewayService, last_heard: Mapping[str, float], now: float) -> float:
    """Seconds the service's active host has been silent *as the active host*: since the
    later of its last report and the moment it became active (`active_since`), so a
    host is never found silent for longer than it has held the role. Infinite only
    when it never reported and the service has no `active_since`."""
    silent = silence(service.active, last_heard, now)
    if service.active_since is None:
        return silent
    since = service.active_since
    if since.tzinfo is None:  # stamped in UTC; a store that dropped the zone still means UTC
        since = since.replace(tzinfo=timezone.utc)
    return min(silent, max(0.0, now - since.timestamp()))


def next_reporting_host(service: GatewayService, last_heard: Mapping[str, float], now: float,
                        after: float, settled: Collection[str] | None = None) -> str | None:
    """The first host after the active one in the service's order (wrapping round)
    whose agent reported within `after` seconds, or None; one in `settled` (it has
    applied a generation) before one still coming up, when `settled` is given."""
    hosts = list(service.hosts)
    start = hosts.index(service.active) + 1 if service.active in hosts else 0
    reporting = [host for host in hosts[start:] + hosts[:start]
                 if host != service.active and silence(host, last_heard, now) <= after]
    ready = [host for host in reporting if settled is None or host in settled]
    return (ready or reporting or [None])[0]


def coming_up(host: str, last_heard: Mapping[str, float], settled: Collection[str] | None) -> bool:
    """Whether the host's agent has been heard from but has never applied a generation:
    in its first apply (`settled` not given: never)."""
    return settled is not None and host in last_heard and host not in settled


def silence_limit(service: GatewayService, last_heard: Mapping[str, float], after: float,
                  settled: Collection[str] | None, first_apply_grace: float) -> float:
    """How long the active host may be silent: `after`, or the first-apply grace while
    it is coming up. An agent never heard from at all is not in an apply: `after`."""
    return max(after, first_apply_grace) if coming_up(service.active, last_heard, settled) else after


def failover_decision(service: GatewayService, last_heard: Mapping[str, float], now: float,
                      after: float, settled: Collection[str] | None = None,
                      first_apply_grace: float = FIRST_APPLY_GRACE_S) -> tuple[str, str] | None:
    """(the host to move the role to, why) when the active host has been silent longer
    than its limit (`silence_limit`) and another host reports; else None. `settled`:
    the hosts that have applied a generation (None: treat every host as settled)."""
    silent = active_silence(service, last_heard, now)
    limit = silence_limit(service, last_heard, after, settled, first_apply_grace)
    if silent <= limit:
        return None
    target = next_reporting_host(service, last_heard, now, after, settled)
    if target is None:
        return None
    never = service.active not in last_heard
    first = ", in its first apply" if coming_up(service.active, last_heard, settled) else ""
    return target, f"failover: {service.active}'s agent {_silent_text(silent, never)} (limit {limit:g} s{first})"


def _silent_text(silent: float, never: bool) -> str:
    if math.isinf(silent):
        return "never reported to this controller"
    if never:
        return f"never reported in the {silent:.1f} s since it became active"
    return f"silent for {silent:.1f} s"


class GatewayFailover:
    """The failover loop of one controller replica (a thread; `start`/`stop`)."""

    def __init__(self, fabric: Fabric, after: float, watched: Callable[[], Iterable[str]],
                 grace: float = RECONNECT_GRACE_S, interval: float | None = None,
                 clock: Callable[[], float] = time.time, first_apply_grace: float = FIRST_APPLY_GRACE_S):
        self.fabric = fabric
        self.after = after
        self.first_apply_grace = first_apply_grace
        self.watched = watched  # hosts with a watch stream open on this replica
        self.grace = grace
        # Often enough that a move comes within a fraction of `after` of the deadline.
        self.interval = interval if interval is not None else min(1.0, max(0.05, after / 4))
        self.clock = clock
        self.failovers: dict[str, int] = {}  # service -> moves this replica made
        self._blocked: set[str] = set()  # services whose active host is silent with no host to move to
        self._refused: dict[str, str] = {}  # service -> why its last move was refused (logged once)
        self._quiet_until = clock() + grace
        self._store_failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gateway-failover", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("event=gateway_failover_error reason=%s", quote(f"{type(exc).__name__}: {exc}"))

    def last_heard(self) -> dict[str, float]:
        """Host -> when any replica last heard from its agent (seen or status)."""
        heard = dict(self.fabric.store.seen_times())
        for host, status in list(self.fabric.statuses.items()):
            reported = (status or {}).get("time")
            if isinstance(reported, (int, float)) and reported > heard.get(host, -math.inf):
                heard[host] = float(reported)
        return heard

    def tick(self) -> None:
        """One round: mark the hosts watching here, then move every role that is due."""
        now = self.clock()
        services = self.fabric.inventory.committed.all(Kind.gateway_service)
        gateway_hosts = {host for service in services for host in service.hosts}
        try:
            self.fabric.store.save_seen(sorted(gateway_hosts.intersection(self.watched())), now)
            heard = self.last_heard()
        except StoreBusy as exc:
            if not self._store_failing:
                log.warning("event=gateway_failover_paused reason=%s", quote(f"the store did not answer: {exc}"))
            self._store_failing = True
            self._quiet_until = now + self.grace
            return
        if self._store_failing:
            log.info("event=gateway_failover_resumed quiet_s=%g", self.grace)
            self._store_failing = False
        if now < self._quiet_until:
            return
        for service in services:
            self._check(service, heard, now)

    def settled(self) -> set[str]:
        """The hosts that have reported an applied generation (to any replica)."""
        return {host for host, generation in list(self.fabric.applied.items()) if generation is not None}

    def _check(self, service: GatewayService, heard: Mapping[str, float], now: float) -> None:
        silent = active_silence(service, heard, now)
        settled = self.settled()
        if silent <= silence_limit(service, heard, self.after, settled, self.first_apply_grace):
            self._blocked.discard(service.name)
            return
        if failover_decision(service, heard, now, self.after, settled, self.first_apply_grace) is None:
            if service.name not in self._blocked:
                self._blocked.add(service.name)
                log.warning("event=gateway_failover_blocked service=%s active=%s silent_s=%.1f reason=%s",
                            service.name, service.active, silent, quote("no other host of the service is reporting"))
            return
        self._blocked.discard(service.name)
        try:
            moved = self.fabric.move_gateway_role(service.name, self._decide_again)
        except FabricError as exc:
            # Refused (the service no longer validates) or the store busy: logged once
            # per reason, tried again next round.
            if self._refused.get(service.name) != exc.reason:
                self._refused[service.name] = exc.reason
                log.warning("event=gateway_failover_refused service=%s active=%s status=%d reason=%s", service.name,
                            service.active, exc.status, quote(exc.reason))
            return
        self._refused.pop(service.name, None)
        if moved is None:
            return  # another replica moved it first, or the host came back meanwhile
        self.failovers[service.name] = self.failovers.get(service.name, 0) + 1
        log.warning("event=gateway_failover service=%s from=%s to=%s silent_s=%.1f after_s=%g reason=%s",
                    service.name, service.active, moved.active, silent, self.after, quote(moved.active_reason))

    def _decide_again(self, service: GatewayService) -> tuple[str, str] | None:
        """The decision, inside the write serialisation: the service as committed by
        every replica so far, the seen times read afresh."""
        return failover_decision(service, self.last_heard(), self.clock(), self.after, self.settled(),
                                 self.first_apply_grace)
