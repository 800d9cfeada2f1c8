"""Reconcile: observe the kernel, plan against a HostState, apply; one namespace.

Owns the glue and the per-namespace sockets: one pyroute2 IPRoute and one netlink_batch
NeighbourSocket, opened on first use and reused for every reconcile (opening one per
call costs ~10 ms and, in a loop, file descriptors). The daemon (agent.daemon) calls
`reconcile` on every new generation and periodically to repair drift; `hnv-agent apply`
calls it once.

    rec = Reconciler(netns="hnv-host1")
    result = rec.reconcile(state)        # ReconcileResult; never raises for a kernel refusal
    rec.plan(state).describe()           # what would change, without writing
    rec.tunnel_stats()                   # per-tunnel counters
    rec.close()

It may not talk netlink itself (agent.observe reads, agent.apply writes) nor decide
what the kernel should hold (agent.plan).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pyroute2.config
from pyroute2 import IPRoute

from agent.apply import Applier, ObjectError
from agent.kernel_model import KernelState
from agent.netlink_batch import NeighbourSocket
from agent.observe import observe, read_tunnel_stats
from agent.plan import Plan, desired_kernel_state, diff
from agent.state import HostState
from agent.tunnels import TunnelStats

__all__ = ["ObjectError", "ReconcileResult", "Reconciler", "Plan", "TunnelStats"]

log = logging.getLogger("openhnv.agent.reconcile")
NETNS_HELPER_TIMEOUT_S = 30


@dataclass
class ReconcileResult:
    generation: int
    planned: int  # operations in the plan
    applied: int  # operations the kernel accepted
    errors: list[ObjectError] = field(default_factory=list)
    duration_s: float = 0.0
    objects_by_kind: dict[str, int] = field(default_factory=dict)  # desired objects
    plan: Plan | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors


class Reconciler:
    """Observe + plan + apply for one network namespace (None: the agent's own)."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._ipr: IPRoute | None = None
        self._records: NeighbourSocket | None = None

    def _sockets(self) -> tuple[IPRoute, NeighbourSocket]:
        if self._ipr is None:
            # IPRoute(netns=...) (here, and for a lab VM's namespace in agent.apply) forks
            # a helper that must answer within pyroute2's 2 s default, which a busy or
            # emulated CPU overruns ("child process is dead"); give it what a slow host needs.
            pyroute2.config.default_communicate_timeout = max(
                pyroute2.config.default_communicate_timeout, NETNS_HELPER_TIMEOUT_S)
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        if self._records is None:
            self._records = NeighbourSocket(netns=self.netns)
        return self._ipr, self._records

    def observe(self) -> KernelState:
        ipr, records = self._sockets()
        return observe(ipr, records)

    def plan(self, desired: HostState) -> Plan:
        """What reconcile would do now: observe and diff, no writes."""
        return diff(desired_kernel_state(desired), self.observe())

    def reconcile(self, desired: HostState) -> ReconcileResult:
        started = time.monotonic()
        want = desired_kernel_state(desired)
        try:
            plan = diff(want, self.observe())
        except OSError as exc:
            # The namespace or the socket itself failed: nothing was written.
            self.close()
            error = ObjectError("host", self.netns or "", exc.errno, f"reading the kernel back: {exc}")
            return ReconcileResult(desired.generation, 0, 0, [error],
                                   time.monotonic() - started, want.counts())
        ipr, records = self._sockets()
        applied, errors = Applier(ipr, records, self.netns).apply(plan) if plan.ops else (0, [])
        result = ReconcileResult(
            generation=desired.generation, planned=len(plan), applied=applied, errors=errors,
            duration_s=time.monotonic() - started, objects_by_kind=want.counts(), plan=plan,
        )
        if plan.ops:
            log.info("reconciled generation %d: %d planned, %d applied, %d errors in %.3f s",
                     result.generation, result.planned, result.applied, len(errors), result.duration_s)
        return result

    def tunnel_stats(self) -> list[TunnelStats]:
        ipr, _ = self._sockets()
        return read_tunnel_stats(ipr)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._records is not None:
            self._records.close()
            self._records = None

    def __enter__(self) -> Reconciler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
