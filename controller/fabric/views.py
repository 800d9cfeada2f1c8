"""The sync/status view: what hosts were given, what they applied, and how that reads.

`HostEntry` is one host's published generation, already serialised (what watchers and
GET /state serve); `SyncView` says whether a host is InSync, Pending or in Error and
why; `HostView` is a host as GET /v1/hosts shows it. `SyncStatus` is the `Fabric` mixin
that answers these reads and records agents' status reports.

Reads here take no lock: entries, applied generations and statuses only change after a
commit (`controller.fabric.engine`), each by one assignment. Must not build or commit
fabric changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agent.state import HostState, LookupRecord
from controller.fabric.common import Unavailable, _busy, _skipped, log
from controller.inventory import SPACE_VSID
from controller.models import Host, Invalid, Kind, NotFound, VirtualSwitch
from controller.store import StoreBusy


@dataclass
class HostEntry:
    """What a host's watchers and GET /state read: one generation, already serialised."""

    generation: int
    digest: str
    state: HostState
    pieces: tuple[bytes, ...]  # the JSON document in pieces; record fragments shared between hosts
    bumped_at: float  # time.monotonic() of the bump, for push latency

    @property
    def state_json(self) -> bytes:
        return b"".join(self.pieces)


@dataclass
class SyncView:
    host: str
    sync: str  # InSync | Pending | Error
    reason: str
    desired_generation: int
    applied_generation: int | None


class HostView(Host):
    """A host as GET /v1/hosts shows it: the object plus its sync status."""

    sync: str = "Pending"
    reason: str = ""
    desired_generation: int = 0
    applied_generation: int | None = None
    virtual_switch: VirtualSwitch | None = None


class SyncStatus:
    """`Fabric`'s host-facing reads and the agents' status reports."""

    def view(self, kind: Kind, obj: Any) -> Any:
        if kind is not Kind.host:
            return obj
        sync = self.sync_of(obj.name)
        return HostView(
            **obj.model_dump(exclude={"key"}),
            sync=sync.sync,
            reason=sync.reason,
            desired_generation=sync.desired_generation,
            applied_generation=sync.applied_generation,
            virtual_switch=self.inventory.committed.switches.get(obj.name),
        )

    def host_entry(self, host: str) -> HostEntry:
        entry = self.entries.get(host)
        if entry is None:
            if host in self.unpublishable:
                raise Unavailable(f"host {host} has no valid state to publish", "host", self.unpublishable[host])
            raise NotFound(f"host {host} does not exist", "host", f"no host is called {host}")
        return entry

    def host_entry_or_none(self, host: str) -> HostEntry | None:
        return self.entries.get(host)

    def lookup_records(self, host: str) -> tuple[LookupRecord, ...]:
        return self.host_entry(host).state.records

    def sync_of(self, host: str) -> SyncView:
        if host in self.unpublishable and host not in self.entries:
            generation = self._last_generation.get(host, 0)
            return SyncView(host, "Error", f"the controller cannot compile a valid state: {self.unpublishable[host]}",
                            generation, self.applied.get(host))
        entry = self.host_entry(host)
        applied = self.applied.get(host)
        status = self.statuses.get(host) or {}
        errors = status.get("errors") or []
        if applied is None:
            return SyncView(host, "Pending", f"host {host} has not reported; desired generation "
                            f"{entry.generation}", entry.generation, None)
        if errors:
            first = errors[0]
            return SyncView(host, "Error", f"{first.get('object')}: {first.get('message')}",
                            entry.generation, applied)
        if applied < entry.generation:
            return SyncView(host, "Pending", f"applied generation {applied}, desired generation "
                            f"{entry.generation}", entry.generation, applied)
        return SyncView(host, "InSync", f"applied generation {applied}", entry.generation, applied)

    def metrics_snapshot(self) -> dict[str, Any]:
        with self._lock:
            hosts: dict[str, int] = {}
            for name in [*self.entries, *self.unpublishable]:
                sync = self.sync_of(name).sync
                hosts[sync] = hosts.get(sync, 0) + 1
            committed = self.inventory.committed
            pools = {}
            for pool in committed.all(Kind.ip_pool):
                used = len(committed.leases.get(pool.key, ()))
                pools[pool.key] = (used, max(0, pool.size - used - len(_skipped(pool))))
            return {
                "hosts": hosts,
                "pools": pools,
                "vsids": committed.allocation_counts.get(SPACE_VSID, 0),
                "vms": len(committed.objects[Kind.vm]),
                # gateway service -> (its hosts in order, the active one)
                "gateways": {s.name: (s.hosts, s.active) for s in committed.all(Kind.gateway_service)},
            }

    def report_status(self, host: str, generation: int, errors: list[dict], agent: str) -> SyncView:
        with self._lock:
            entry = self.host_entry(host)
            if generation > entry.generation:
                raise Invalid(
                    f"host {host} reports generation {generation}, beyond the desired generation "
                    f"{entry.generation}",
                    "generation",
                    f"the controller never published generation {generation} for host {host}",
                )
            status = {"errors": errors, "agent": agent, "time": time.time()}
            try:
                self.store.save_status(host, generation, status)
            except StoreBusy as exc:
                raise _busy(f"status of host {host}", exc) from None
            self.applied[host] = generation
            self.statuses[host] = status
            view = self.sync_of(host)
            log.info("event=host_status host=%s applied=%d desired=%d errors=%d sync=%s", host, generation,
                     entry.generation, len(errors), view.sync)
            return view
