"""Reconcile: observe the kernel, plan against a HostState, apply; one namespace.

Owns the glue and the per-namespace sockets: one pyroute2 IPRoute and one netlink_batch
NeighbourSocket, opened on first use and reused for every reconcile (opening one per
call costs ~10 ms and, in a loop, file descriptors). The daemon (agent.daemon) calls
`reconcile` on every new generation and periodically to repair drift; `hnv-agent apply`
calls it once. `reconcile` and `plan` are for one thread (the daemon's loop);
`tunnel_stats` may be called from any thread (a /metrics scrape): it reads on a raw
socket of its own and never waits for a reconcile.

    rec = Reconciler(netns="hnv-host1")
    result = rec.reconcile(state)        # ReconcileResult; never raises for a netlink failure
    rec.plan(state).describe()           # what would change, without writing
    rec.plug_taps(state, {"hnvn1a2b3c4d5e"})  # a VM's tap that just appeared, and nothing else
    rec.tunnel_stats(timeout=1.0)        # per-tunnel counters, from any thread
    rec.close()

Netlink failures are reconcile errors, never crashes: an OSError, a pyroute2
``NetlinkError`` (not an OSError) or a dump the kernel interrupted because the table
changed under it (``NetlinkDumpInterrupted``) while reading the kernel back or while
applying becomes an ``ObjectError`` of kind ``host`` in the result; the sockets are then
closed, so the next reconcile starts on fresh ones. An interrupted read is first taken
again, up to ``DUMP_ATTEMPTS`` times, as ``ip`` does.

A real VM's tap (agent.plan, `Plan.taps`) that is absent is reported in the result's
``taps`` as waiting, not as an error; one that is there but refused (not the VM's MAC)
is both in ``taps`` and an ``ObjectError`` of kind ``tap`` naming the device and the
expected and seen MAC. ``plug_taps`` plugs taps that just appeared reading and writing
only them and their bridges (agent.plan.tap_plan), so that a VM's start does not wait
for a whole host's reconcile; the daemon runs a full one right after. The desired kernel
state is computed once per HostState object and reused.

After the kernel, it reconciles the host's DHCP servers (agent.dhcp: one dnsmasq per
VSID bridge with local VMs, files under ``run_dir``); their operations join the plan as
kind ``dhcp`` and their failures the errors as kind ``dhcp``.

It may not talk netlink itself (agent.observe reads, agent.apply writes), nor nft
(agent.nat), nor decide what the kernel should hold (agent.plan).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyroute2.config
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from agent import naming, nat
from agent.apply import Applier, ObjectError
from agent.dhcp import DhcpManager, run_dir_for
from agent.flowmode import FlowDatapath
from agent.guest import GuestDhcp
from agent.kernel_model import KernelState
from agent.netlink_batch import NeighbourSocket
from agent.observe import observe, observe_links, read_tunnel_stats
from agent.plan import REFUSED, Plan, TapPort, desired_kernel_state, diff, tap_plan
from agent.state import HostState
from agent.tunnels import TunnelStats

__all__ = ["ObjectError", "ReconcileResult", "Reconciler", "Plan", "TapPort", "TunnelStats"]

log = logging.getLogger("openhnv.agent.reconcile")
NETNS_HELPER_TIMEOUT_S = 30
STATS_RECEIVE_BUFFER = 1 << 20  # a link dump's replies, not a batch's acks
DUMP_ATTEMPTS = 3  # reads of the kernel before an ever-changing table is a reconcile error
# What a failing namespace or socket raises; pyroute2's NetlinkError is not an OSError.
NETLINK_FAILURES = (OSError, NetlinkError)
GATEWAY_ROLES = (naming.FRONTEND, naming.LEG, naming.BACKEND)


@dataclass
class ReconcileResult:
    generation: int
    planned: int  # operations in the plan
    applied: int  # operations the kernel accepted
    errors: list[ObjectError] = field(default_factory=list)
    duration_s: float = 0.0
    objects_by_kind: dict[str, int] = field(default_factory=dict)  # desired objects
    plan: Plan | None = field(default=None, repr=False)
    taps: tuple[TapPort, ...] = ()  # the real VMs' taps: plugged, waiting or refused (agent.plan)

    @property
    def ok(self) -> bool:
        return not self.errors


class Reconciler:
    """Observe + plan + apply for one network namespace (None: the agent's own)."""

    def __init__(self, netns: str | None = None, run_dir: Path | None = None, *, vm_dhcp: bool = False):
        self.netns = netns
        # The DHCP servers (agent.dhcp) keep their files here; one directory per namespace.
        self.dhcp = DhcpManager(netns, run_dir or run_dir_for(netns))
        # Lab VMs of IPv4 VM subnets ask DHCP for their address (hnv-agent run --vm-dhcp).
        self.vm_dhcp = vm_dhcp
        self.guests = GuestDhcp(self.dhcp.run_dir / "guests")
        self._ipr: IPRoute | None = None
        self._records: NeighbourSocket | None = None
        self.flow = FlowDatapath(netns)
        # Tunnel counters for /metrics: a raw socket of their own and a lock of their own
        # (a scrape never waits for a reconcile; two scrapes take turns).
        self._stats_socket: NeighbourSocket | None = None
        self._stats_lock = threading.Lock()
        self._desired: tuple[HostState, KernelState] | None = None  # the last state and its kernel terms

    def desired(self, state: HostState) -> KernelState:
        """`state` in kernel terms, computed once per HostState object (the daemon holds one
        object per generation and reconciles it again and again). Plans never change it."""
        if self._desired is None or self._desired[0] is not state:
            self._desired = (state, desired_kernel_state(state, vm_dhcp=self.vm_dhcp))
        return self._desired[1]

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
        """One consistent read of the kernel; an interrupted dump is taken again."""
        for attempt in range(1, DUMP_ATTEMPTS + 1):
            ipr, records = self._sockets()
            try:
                have = observe(ipr, records, self.flow)
            except NetlinkDumpInterrupted:
                if attempt == DUMP_ATTEMPTS:
                    raise
                log.info("reading the kernel back: a dump was interrupted (attempt %d of %d)",
                         attempt, DUMP_ATTEMPTS)
                continue
            # The nftables table is read (one nft process) only where it can be: on a
            # host holding gateway devices. It is replaced before and deleted with them
            # in one plan (agent.plan), so a host without them holds no table of ours.
            if any(l.owned and l.role in GATEWAY_ROLES for l in have.links.values()):
                have.nat = nat.observe_table(self.netns)
            return have
        raise AssertionError("unreachable")

    def plan(self, desired: HostState) -> Plan:
        """What reconcile would do now: observe and diff, no writes."""
        plan = diff(desired_kernel_state(desired, vm_dhcp=self.vm_dhcp), self.observe())
        return replace(plan, ops=plan.ops + tuple(self.dhcp.plan(desired)))

    def plug_taps(self, desired: HostState, devices: set[str]) -> ReconcileResult:
        """Plug the VM taps `devices` (absent or refused ones are only reported) reading
        and writing nothing but them and their bridges: no dump of the host, no DHCP."""
        started = time.monotonic()
        want = self.desired(desired)
        try:
            ipr, records = self._sockets()
            names = {name for name in devices if name in want.links}
            bridges = {want.links[name].master for name in names} - {None}
            have = observe_links(ipr, names | bridges)
            plan = tap_plan(want, have, names)
            applier = Applier(ipr, records, self.netns, host=desired.host)
            applied, errors = applier.apply(plan, {l.name: l.index for l in have.links.values()}) \
                if plan.ops else (0, [])
        except NETLINK_FAILURES as exc:
            return self._failed(desired, want, started, "plugging taps", exc)
        refused = [ObjectError("tap", tap.device, None, tap.describe()) for tap in plan.taps if tap.state == REFUSED]
        return ReconcileResult(desired.generation, len(plan), applied, [*errors, *refused],
                               time.monotonic() - started, {}, plan, plan.taps)

    def reconcile(self, desired: HostState) -> ReconcileResult:
        started = time.monotonic()
        want = self.desired(desired)
        try:
            plan = diff(want, self.observe())
        except NETLINK_FAILURES as exc:
            # The namespace or the socket itself failed: nothing was written.
            return self._failed(desired, want, started, "reading the kernel back", exc)
        try:
            ipr, records = self._sockets()
            applier = Applier(ipr, records, self.netns, host=desired.host)
            applied, errors = applier.apply(plan) if plan.ops else (0, [])
        except NETLINK_FAILURES as exc:
            # Per-object refusals are ObjectErrors inside apply; this is the socket or the
            # namespace itself (its first dump of links, a batch send that broke off).
            return self._failed(desired, want, started, "applying the plan", exc, plan)
        # Why after the kernel: a DHCP server binds to its bridge, which must exist, be up
        # and hold the gateway address first.
        dhcp_ops = self.dhcp.plan(desired)
        dhcp_applied, dhcp_errors = self.dhcp.apply(dhcp_ops)
        applied += dhcp_applied
        # ... and a guest's DHCP client needs that server (it retries a while if it was
        # not started: an error above is reported, the client's failure logged).
        self.guests.reap()
        for vm, namespace, nic in applier.dhcp_guests:
            self.guests.start(vm, namespace, nic)
        # A tap that is there but not the VM's is the operator's to fix: an error of kind
        # tap (the status shows it), naming the device and both MACs. An absent one is not.
        refused = [ObjectError("tap", tap.device, None, tap.describe()) for tap in plan.taps if tap.state == REFUSED]
        errors = [*errors, *dhcp_errors, *refused]
        plan = replace(plan, ops=plan.ops + tuple(dhcp_ops))
        result = ReconcileResult(
            generation=desired.generation, planned=len(plan), applied=applied, errors=errors,
            duration_s=time.monotonic() - started, objects_by_kind=want.counts(), plan=plan,
            taps=plan.taps,
        )
        if plan.ops:
            log.info("reconciled generation %d: %d planned, %d applied, %d errors in %.3f s",
                     result.generation, result.planned, result.applied, len(errors), result.duration_s)
        return result

    def _failed(self, desired: HostState, want: KernelState, started: float, doing: str,
                exc: Exception, plan: Plan | None = None) -> ReconcileResult:
        """A reconcile the socket or namespace failed: one host-level error, fresh sockets next."""
        self.close()
        code = getattr(exc, "errno", None) if isinstance(exc, OSError) else getattr(exc, "code", None)
        what = "the kernel kept changing the table during the dump" if isinstance(exc, NetlinkDumpInterrupted) \
            else f"{type(exc).__name__}: {exc}"
        error = ObjectError("host", self.netns or "", code if isinstance(code, int) and code > 0 else None,
                            f"{doing}: {what}")
        log.warning("reconcile of generation %d failed %s: %s", desired.generation, doing, what)
        return ReconcileResult(desired.generation, len(plan) if plan else 0, 0, [error],
                               time.monotonic() - started, want.counts(), plan)

    def tunnel_stats(self, timeout: float | None = None) -> list[TunnelStats]:
        """Counters of every owned tunnel, read now; from any thread, beside a reconcile.

        Why not on the reconciler's IPRoute: pyroute2 (0.9) keeps a socket's transport
        per calling thread, and the /metrics server serves each scrape on a new thread, so
        each scrape opened a netlink socket that was never closed (a 15 s scrape interval
        exhausts a service's 1,024 descriptors in four hours); and the lock that shared
        it queued scrapes behind reconciles. Raises TimeoutError when another read has
        held the stats socket for `timeout` seconds, OSError when the read fails (the
        next one opens a fresh socket).
        """
        if not self._stats_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"another read of the tunnel counters took over {timeout:g}s")
        try:
            if self._stats_socket is None:
                self._stats_socket = NeighbourSocket(self.netns, receive_buffer=STATS_RECEIVE_BUFFER)
            try:
                return read_tunnel_stats(self._stats_socket)
            except NETLINK_FAILURES:
                self._stats_socket.close()
                self._stats_socket = None
                raise
        finally:
            self._stats_lock.release()

    def close(self) -> None:
        if self._stats_lock.acquire(timeout=2):  # a read stuck in the kernel keeps its socket
            try:
                if self._stats_socket is not None:
                    self._stats_socket.close()
                    self._stats_socket = None
            finally:
                self._stats_lock.release()
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
