"""The service layer: every fabric operation, validated, allocated and compiled as one.

An operation runs under one write lock (writes are serialised; the API's worker threads
queue here) in four steps, and any refusal leaves nothing changed:

1. *build*: check the request against the fabric and put every change - objects,
   VSIDs, MACs, leases - into a `Tx` (refusals raise `Invalid` 422, `NotFound` 404,
   `Conflict` 409, naming the object, the field and the reason);
2. *trial*: apply the Tx to the in-memory inventory and compile every affected host;
   a HostState that agent.state refuses undoes the Tx and refuses the request, so the
   controller never publishes a state an agent would reject;
3. *commit*: write the Tx to the store in one BEGIN IMMEDIATE transaction (the store's
   primary keys refuse any value taken twice; a failure undoes the Tx in memory too);
4. *publish*: for each affected host whose content digest changed, bump its
   generation, persist it, and wake that host's watchers.

Affected hosts are narrow for VM operations (the hosts of the VM network, before and
after, plus source and destination) and all hosts for fabric-wide objects (switches,
sites, profiles: rare and cheap). Generations only move when content changes, so a
wide recompile bumps only hosts that really differ.

This module owns the rules across objects; storage is `controller.store`, choices are
`controller.allocate`/`controller.placement`, host states `controller.compiler`.
"""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from agent.logfmt import quote as logfmt_quote
from agent.state import HostState, LookupRecord, describe_validation_error
from controller.allocate import (
    allocate_address,
    allocate_mac,
    allocate_routing_domain_id,
    allocate_vsid,
    mac_text,
)
from controller.compiler import Compiler, Serialised
from controller.operations import (
    Create,
    Delete,
    Migrate,
    Operation,
    Patch,
    RemoveVirtualSwitch,
    SetVirtualSwitch,
)
from controller.operations import describe as describe_operation
from controller.inventory import (
    SPACE_MAC,
    SPACE_ROUTING_DOMAIN,
    SPACE_VSID,
    VIRTUAL_SWITCH,
    Inventory,
    TakenView,
    Tx,
)
from controller.models import (
    ROOT_HOST_GROUP,
    SPEC_OF,
    STORED_OF,
    Conflict,
    FabricError,
    Host,
    HostGroup,
    Invalid,
    IpPool,
    Isolation,
    Kind,
    Lease,
    LeaseKind,
    NotFound,
    VirtualSwitch,
    VirtualSwitchSpec,
    Vm,
    VmNetwork,
    VmSubnet,
    first_host_address,
    last_host_address,
)
from controller.placement import place, transport_of, why_not
from controller.store import HostRow, Store

ALL = None  # scope: every host
log = logging.getLogger("openhnv.controller.fabric")


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


class Unavailable(FabricError):
    """The object exists but cannot be served now (its stored state does not compile): 503."""

    status = 503


class HostView(Host):
    """A host as GET /v1/hosts shows it: the object plus its sync status."""

    sync: str = "Pending"
    reason: str = ""
    desired_generation: int = 0
    applied_generation: int | None = None
    virtual_switch: VirtualSwitch | None = None


class _DryRunDone(Exception):
    """Raised inside the engine after a dry run's trial compile, so the undo path runs."""


@dataclass
class _Scope:
    networks: set[str] | None = field(default_factory=set)  # None: every host, all caches
    hosts: set[str] = field(default_factory=set)


class Fabric:
    def __init__(self, store: Store):
        self.store = store
        self.inventory = Inventory()
        self.compiler = Compiler(self.inventory)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[list[str]], None]] = []
        self.entries: dict[str, HostEntry] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.applied: dict[str, int | None] = {}
        self.unpublishable: dict[str, str] = {}  # host -> why its stored fabric does not compile
        self._last_generation: dict[str, int] = {}  # ... and the generation it last published
        snapshot = store.load()
        self.inventory.load(snapshot)
        if self.inventory.get(Kind.host_group, ROOT_HOST_GROUP) is None:
            tx = Tx()
            root = HostGroup(name=ROOT_HOST_GROUP, parent=None, uuid=str(uuidlib.uuid4()))
            tx.put(Kind.host_group, ROOT_HOST_GROUP, root)
            store.commit(tx.changeset(_uuid_of))
            self.inventory.apply(tx)
        # Recompile every host; a generation moves only if the content differs from what
        # was last published (the controller's code may have changed across the restart).
        rows = []
        for name in self.inventory.objects[Kind.host]:
            row = snapshot.hosts.get(name)
            try:
                state = self.compiler.compile(name)
            except (ValidationError, ValueError) as exc:
                # Only a change of the rules between versions can get here (every write
                # was trial-compiled). Publish nothing for this host - an agent must not
                # be handed a state it refuses, nor an empty one - and serve the others.
                problems = describe_validation_error(exc) if isinstance(exc, ValidationError) else [str(exc)]
                self.unpublishable[name] = problems[0]
                self._last_generation[name] = row.generation if row is not None else 0
                log.error("event=host_state_invalid host=%s reason=%s", name, _quoted(problems[0]))
                continue
            digest, body = self.compiler.serialise(state)
            generation = row.generation if row is not None else 0
            if row is None or row.digest != digest:
                generation += 1
                rows.append(HostRow(name, generation, digest, row.applied_generation if row else None,
                                    row.status if row else None))
            self._set_entry(name, state, generation, digest, body)
            if row is not None:
                self.applied[name] = row.applied_generation
                self.statuses[name] = row.status or {}
        store.save_host_rows(rows)

    @classmethod
    def open(cls, state_dir: str | Path, synchronous: str = "FULL") -> Fabric:
        return cls(Store(Path(state_dir) / "controller.db", synchronous=synchronous))

    def add_listener(self, listener: Callable[[list[str]], None]) -> None:
        """`listener(hosts)` is called (from a worker thread) after their generations moved."""
        self._listeners.append(listener)

    # --- reads ------------------------------------------------------------------------------

    def get(self, kind: Kind, key: str) -> Any:
        obj = self.inventory.get(kind, key)
        if obj is None:
            raise NotFound(f"{kind.label} {key} does not exist", "name", f"no {kind.label} is called {key}")
        return obj

    def list(self, kind: Kind, filters: dict[str, str] | None = None) -> list[Any]:
        model = STORED_OF[kind]
        filters = dict(filters or {})
        for name in filters:
            if name not in model.model_fields and name != "key":
                raise Invalid(f"cannot filter {kind.label}s on {name}", name, f"{kind.label}s have no field {name}")
        with self._lock:
            objects = self.inventory.all(kind)
        if filters:
            objects = [
                obj for obj in objects
                if all(_text(getattr(obj, name)) == value for name, value in filters.items())
            ]
        return sorted(objects, key=lambda obj: obj.key)

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
            virtual_switch=self.inventory.switches.get(obj.name),
        )

    def get_virtual_switch(self, host: str) -> VirtualSwitch:
        self.get(Kind.host, host)
        switch = self.inventory.switches.get(host)
        if switch is None:
            raise NotFound(f"host {host} has no virtual switch", "host", "no virtual switch was set on it")
        return switch

    def leases(self, pool=None, kind=None, host=None, vm_network=None) -> list[Lease]:
        with self._lock:
            pools = [pool] if pool is not None else sorted(self.inventory.leases)
            found = []
            for name in pools:
                for lease in self.inventory.leases.get(name, {}).values():
                    if kind is not None and lease.kind != kind:
                        continue
                    if host is not None and lease.host != host:
                        continue
                    if vm_network is not None and lease.vm_network != vm_network:
                        continue
                    found.append(lease)
        return sorted(found, key=lambda lease: (lease.pool, int(lease.address)))

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
            pools = {}
            for pool in self.inventory.all(Kind.ip_pool):
                used = len(self.inventory.leases.get(pool.key, ()))
                pools[pool.key] = (used, max(0, pool.size - used - len(_skipped(pool))))
            return {
                "hosts": hosts,
                "pools": pools,
                "vsids": len(self.inventory.taken(SPACE_VSID)),
                "vms": len(self.inventory.objects[Kind.vm]),
            }

    # --- agent status ------------------------------------------------------------------------

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
            self.store.save_host_rows([HostRow(host, entry.generation, entry.digest, generation, status)])
            self.applied[host] = generation
            self.statuses[host] = status
            view = self.sync_of(host)
            log.info("event=host_status host=%s applied=%d desired=%d errors=%d sync=%s", host, generation,
                     entry.generation, len(errors), view.sync)
            return view

    # --- writes -------------------------------------------------------------------------------

    def create(self, kind: Kind, spec: BaseModel) -> Any:
        builder = getattr(self, f"_create_{kind.name}")
        return self._run(lambda tx: builder(tx, spec), f"create {kind.value} {getattr(spec, 'name', '')}")

    def patch(self, kind: Kind, key: str, changes: dict[str, Any]) -> Any:
        return self._run(lambda tx: self._patch(tx, kind, key, changes), f"patch {kind.value} {key}")

    def delete(self, kind: Kind, key: str) -> None:
        builder = getattr(self, f"_delete_{kind.name}")
        self._run(lambda tx: builder(tx, self.get(kind, key)), f"delete {kind.value} {key}")

    def set_virtual_switch(self, host: str, spec: VirtualSwitchSpec) -> VirtualSwitch:
        return self._run(lambda tx: self._set_virtual_switch(tx, host, spec), f"set virtual-switch {host}")

    def delete_virtual_switch(self, host: str) -> None:
        self._run(lambda tx: self._delete_virtual_switch(tx, host), f"delete virtual-switch {host}")

    def create_many(self, kind: Kind, specs: list[BaseModel]) -> list[Any]:
        """Create several objects of one kind as one transaction: all or none."""
        builder = getattr(self, f"_create_{kind.name}")

        def build(tx: Tx, index: int, spec: BaseModel) -> tuple[Any, _Scope]:
            try:
                return builder(tx, spec)
            except FabricError as exc:
                field = f"items[{index}].{exc.field}" if exc.field else f"items[{index}]"
                raise type(exc)(f"items[{index}] ({getattr(spec, 'name', '?')}): {exc.error}", field,
                                exc.reason) from None

        return self._run_many([lambda tx, i=i, spec=spec: build(tx, i, spec) for i, spec in enumerate(specs)],
                              f"create {kind.value} batch of {len(specs)}")

    def migrate(self, vm_name: str, destination: str) -> Vm:
        return self._run(lambda tx: self._migrate(tx, vm_name, destination), f"migrate vms {vm_name} to {destination}")

    def transact(self, operations: list[Operation], dry_run: bool = False) -> list[Any]:
        """Run mixed operations as ONE transaction: all or nothing, one result each.

        Each operation sees the ones before it (a VM created after its subnet). A refusal
        names the operation's index: `operations[3] (create vms TenantVM04): ...`. With
        `dry_run` the whole list is built and trial-compiled exactly as a real run, then
        undone: nothing is committed or published.
        """

        def build(tx: Tx, index: int, operation: Operation) -> tuple[Any, _Scope]:
            try:
                return self._builder_of(operation)(tx)
            except FabricError as exc:
                field = f"operations[{index}].{exc.field}" if exc.field else f"operations[{index}]"
                raise type(exc)(f"operations[{index}] ({describe_operation(operation)}): {exc.error}", field,
                                exc.reason) from None

        return self._run_many([lambda tx, i=i, op=op: build(tx, i, op) for i, op in enumerate(operations)],
                              f"transaction of {len(operations)}", dry_run=dry_run)

    def _builder_of(self, operation: Operation) -> Callable[[Tx], tuple[Any, _Scope]]:
        match operation:
            case Create(kind, spec):
                return lambda tx: getattr(self, f"_create_{kind.name}")(tx, spec)
            case Patch(kind, key, changes):
                return lambda tx: self._patch(tx, kind, key, changes)
            case Delete(kind, key):
                return lambda tx: getattr(self, f"_delete_{kind.name}")(tx, self.get(kind, key))
            case SetVirtualSwitch(host, spec):
                return lambda tx: self._set_virtual_switch(tx, host, spec)
            case RemoveVirtualSwitch(host):
                return lambda tx: self._delete_virtual_switch(tx, host)
            case Migrate(vm, host):
                return lambda tx: self._migrate(tx, vm, host)
        raise TypeError(f"not a fabric operation: {operation!r}")

    # --- the transaction engine ----------------------------------------------------------------

    def _run(self, build: Callable[[Tx], tuple[Any, _Scope]], operation: str) -> Any:
        return self._run_many([build], operation)[0]

    def _run_many(self, builds: list[Callable[[Tx], tuple[Any, _Scope]]], operation: str,
                  dry_run: bool = False) -> list[Any]:
        """Build, trial-compile, commit and publish operations as one transaction.

        Each operation is applied to the inventory as soon as it is built, so the next
        one sees it (placement counts, the PA it took); any refusal undoes all of them in
        reverse order. One compile and one commit serve the whole batch.
        """
        with self._lock:
            started = time.perf_counter()
            merged, undos, results = Tx(), [], []
            networks: set[str] | None = set()
            hosts_before: set[str] = set()
            hosts_named: set[str] = set()
            try:
                for build in builds:
                    tx = Tx()
                    result, scope = build(tx)
                    results.append(result)
                    if scope.networks is ALL or networks is ALL:
                        networks = ALL
                    else:
                        networks |= scope.networks
                    hosts_named |= scope.hosts
                    hosts_before |= self._affected_hosts(scope)
                    undos.append(self._undo_of(tx))
                    self.inventory.apply(tx)
                    merged.merge(tx)
                scope = _Scope(networks=networks, hosts=hosts_named)
                self.compiler.invalidate(networks)
                existing = set(self.inventory.objects[Kind.host])
                hosts = (hosts_before | self._affected_hosts(scope)) & existing
                try:
                    states = {name: self.compiler.compile(name) for name in sorted(hosts)}
                except (ValidationError, ValueError) as exc:
                    problems = describe_validation_error(exc) if isinstance(exc, ValidationError) else [str(exc)]
                    raise Invalid(
                        f"the change would give a host a state its agent refuses: {problems[0]}",
                        None,
                        problems[0],
                    ) from None
                if dry_run:
                    raise _DryRunDone
                try:
                    self.store.commit(merged.changeset(_uuid_of))
                except sqlite3.IntegrityError as exc:
                    raise Conflict("the store refused the change", None, str(exc)) from None
            except BaseException as exc:
                for undo in reversed(undos):
                    self.inventory.apply(undo)
                self.compiler.invalidate(ALL if networks is ALL else networks)
                if isinstance(exc, _DryRunDone):
                    return results
                if isinstance(exc, FabricError):
                    log.info("event=fabric_refused op=%s status=%d field=%s reason=%s", _quoted(operation),
                             exc.status, exc.field, _quoted(exc.reason))
                raise
            bumped = self._publish(states, hosts_before - existing)
            log.info("event=fabric_write op=%s compiled=%d bumped=%d duration_ms=%.1f", _quoted(operation),
                     len(states), len(bumped), (time.perf_counter() - started) * 1000)
            return results

    def _affected_hosts(self, scope: _Scope) -> set[str]:
        if scope.networks is ALL:
            return set(self.inventory.objects[Kind.host])
        hosts = set(scope.hosts)
        for network in scope.networks:
            hosts |= self.inventory.hosts_of_network(network)
        return hosts

    def _undo_of(self, tx: Tx) -> Tx:
        inv = self.inventory
        undo = Tx()
        for (kind, key) in tx.objects:
            if kind == VIRTUAL_SWITCH:
                old = inv.switches.get(key)
            else:
                old = inv.get(Kind(kind), key)
            undo.objects[(kind, key)] = old
        for (space, value) in tx.allocations:
            undo.allocations[(space, value)] = inv.allocations[space].get(value)
        for (pool, address) in tx.leases:
            undo.leases[(pool, address)] = inv.leases[pool].get(address)
        return undo

    def _publish(self, states: dict[str, HostState], deleted: set[str]) -> list[str]:
        """Bump and persist the generations of hosts whose content changed, then wake them.

        Why this order: generations are written before any watcher or GET can see them,
        so an agent never holds a generation the database does not (a controller that
        dies in between restarts, finds the digests differ and bumps again - to the same
        content, since the fabric change was committed first).
        """
        rows, changed = [], []
        for name, state in states.items():
            digest, body = self.compiler.serialise(state)
            entry = self.entries.get(name)
            if entry is not None and entry.digest == digest:
                continue
            # Generations only grow, also for a host that had none to publish for a while.
            generation = (entry.generation if entry is not None else self._last_generation.pop(name, 0)) + 1
            rows.append(HostRow(name, generation, digest, self.applied.get(name), self.statuses.get(name)))
            changed.append((name, state, generation, digest, body))
        self.store.save_host_rows(rows, sorted(deleted))
        bumped = []
        for name in states:
            self.unpublishable.pop(name, None)
        for name, state, generation, digest, body in changed:
            self._set_entry(name, state, generation, digest, body)
            bumped.append(name)
        for name in deleted:
            self.entries.pop(name, None)
            self.applied.pop(name, None)
            self.statuses.pop(name, None)
            bumped.append(name)
        if bumped:
            for listener in self._listeners:
                listener(bumped)
        return bumped

    def _set_entry(self, name: str, state: HostState, generation: int, digest: str, body: Serialised) -> None:
        state = state.model_copy(update={"generation": generation})
        self.entries[name] = HostEntry(generation, digest, state, tuple(body.pieces(generation)), time.monotonic())

    # --- helpers for builders ------------------------------------------------------------------

    def _require(self, kind: Kind, key: str | None, field: str, owner: str) -> Any:
        obj = self.inventory.get(kind, key) if key is not None else None
        if obj is None:
            raise NotFound(f"{owner}: {kind.label} {key} does not exist", field, f"no {kind.label} is called {key}")
        return obj

    def _refuse_existing(self, kind: Kind, key: str) -> None:
        if self.inventory.get(kind, key) is not None:
            raise Conflict(f"{kind.label} {key} already exists", "name", f"{kind.label} names are unique")

    def _new(self, kind: Kind, tx: Tx, spec: BaseModel, **decided: Any) -> Any:
        data = spec.model_dump()
        data.update(decided)
        obj = STORED_OF[kind](uuid=str(uuidlib.uuid4()), **data)
        self._refuse_existing(kind, obj.key)
        tx.put(kind, obj.key, obj)
        return obj

    def _taken(self, tx: Tx, space: str) -> TakenView:
        return TakenView(self.inventory.allocated_ints[space], tx.pending_ints(space))

    def _new_mac(self, tx: Tx, holder: str) -> str:
        hint = self.inventory.mac_hint
        value = allocate_mac(self._taken(tx, SPACE_MAC), hint if hint is not None else 0)
        self.inventory.mac_hint = value + 1
        mac = mac_text(value)
        tx.take(SPACE_MAC, mac, holder)
        return mac

    def _take_mac(self, tx: Tx, mac: str, holder: str, field: str = "mac") -> None:
        owner = self.inventory.taken(SPACE_MAC).get(mac) or tx.allocations.get((SPACE_MAC, mac))
        if owner:
            raise Conflict(f"MAC {mac} is already in use by {owner}", field, f"MAC {mac} is held by {owner}")
        tx.take(SPACE_MAC, mac, holder)

    def _lease_from(self, tx: Tx, pool: IpPool, kind: LeaseKind, holder_kind: str, holder: str,
                    host: str | None, vm_network: str | None, description: str, address=None) -> Lease:
        taken = TakenView(self.inventory.pool_taken[pool.key], tx.pending_addresses(pool.key))
        if address is None:
            address = allocate_address(pool.key, pool.range_start, pool.range_end, taken, _skipped(pool),
                                       self.inventory.pool_hint.get(pool.key))
            self.inventory.pool_hint[pool.key] = int(address) + 1
        elif int(address) in taken:
            holder_of = self.inventory.leases[pool.key].get(str(address))
            raise Conflict(
                f"address {address} of IP pool {pool.key} is already leased",
                "ca",
                f"held by {holder_of.holder if holder_of else 'another object'}",
            )
        lease = Lease(address=address, pool=pool.key, kind=kind, holder_kind=holder_kind, holder=holder,
                      host=host, vm_network=vm_network, description=description)
        tx.lease(lease)
        return lease

    # --- host groups, clusters, hosts -----------------------------------------------------------

    def _create_host_group(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        if spec.parent is None:
            raise Invalid(f"host group {spec.name} needs a parent", "parent", f"only {ROOT_HOST_GROUP} has no parent")
        self._require(Kind.host_group, spec.parent, "parent", f"host group {spec.name}")
        return self._new(Kind.host_group, tx, spec), _Scope()

    def _delete_host_group(self, tx: Tx, group) -> tuple[None, _Scope]:
        if group.name == ROOT_HOST_GROUP:
            raise Conflict(f"host group {ROOT_HOST_GROUP} cannot be deleted", "name", "it is the root of all host groups")
        users = (
            [f"host group {g.name}" for g in self.inventory.all(Kind.host_group) if g.parent == group.name]
            + [f"cluster {c.name}" for c in self.inventory.all(Kind.cluster) if c.host_group == group.name]
            + [f"host {h.name}" for h in self.inventory.all(Kind.host) if h.host_group == group.name]
            + [f"network site {s.name}" for s in self.inventory.all(Kind.network_site) if group.name in s.host_groups]
        )
        _refuse_in_use(Kind.host_group, group.name, users)
        tx.delete(Kind.host_group, group.name)
        return None, _Scope(networks=ALL)

    def _create_cluster(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        self._require(Kind.host_group, spec.host_group, "host_group", f"cluster {spec.name}")
        return self._new(Kind.cluster, tx, spec), _Scope()

    def _delete_cluster(self, tx: Tx, cluster) -> tuple[None, _Scope]:
        users = [f"host {h.name}" for h in self.inventory.all(Kind.host) if h.cluster == cluster.name]
        _refuse_in_use(Kind.cluster, cluster.name, users)
        tx.delete(Kind.cluster, cluster.name)
        return None, _Scope()

    def _create_host(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        group = spec.host_group
        if spec.cluster is not None:
            cluster = self._require(Kind.cluster, spec.cluster, "cluster", f"host {spec.name}")
            if group is not None and group != cluster.host_group:
                raise Invalid(
                    f"host {spec.name}: host group {group} is not the host group of cluster {cluster.name}",
                    "host_group",
                    f"cluster {cluster.name} is in host group {cluster.host_group}",
                )
            group = cluster.host_group
        group = group or ROOT_HOST_GROUP
        self._require(Kind.host_group, group, "host_group", f"host {spec.name}")
        host = self._new(Kind.host, tx, spec, host_group=group)
        return host, _Scope(hosts={host.name})

    def _delete_host(self, tx: Tx, host) -> tuple[None, _Scope]:
        vms = sorted(self.inventory.vms_by_host.get(host.name, ()))
        _refuse_in_use(Kind.host, host.name, [f"VM {name}" for name in vms])
        if host.name in self.inventory.switches:
            self._delete_virtual_switch(tx, host.name)
        tx.delete(Kind.host, host.name)
        return None, _Scope(hosts={host.name})

    def _set_virtual_switch(self, tx: Tx, host_name: str, spec: VirtualSwitchSpec) -> tuple[Any, _Scope]:
        host = self._require(Kind.host, host_name, "host", "virtual switch")
        switch = self._require(Kind.logical_switch, spec.logical_switch, "logical_switch",
                               f"virtual switch of host {host_name}")
        nics = spec.nics if spec.nics is not None else host.nics
        for i, nic in enumerate(nics):
            if nic not in host.nics:
                raise Invalid(
                    f"virtual switch of host {host_name}: NIC {nic} is not a NIC of the host",
                    f"nics[{i}]",
                    f"host {host_name} has NICs {', '.join(host.nics)}",
                )
        if not nics:
            raise Invalid(f"virtual switch of host {host_name} has no NIC", "nics", "a switch needs an uplink")
        if len(set(nics)) != len(nics):
            raise Invalid(f"virtual switch of host {host_name}: a NIC is listed twice", "nics", "NICs are unique")
        profile = spec.uplink_port_profile or switch.uplink_port_profiles[0]
        if profile not in switch.uplink_port_profiles:
            raise Invalid(
                f"virtual switch of host {host_name}: uplink port profile {profile} is not in logical switch "
                f"{switch.name}",
                "uplink_port_profile",
                f"logical switch {switch.name} has {', '.join(switch.uplink_port_profiles)}",
            )
        if switch.uplink_mode.value == "NoTeam" and len(nics) != 1:
            raise Invalid(
                f"virtual switch of host {host_name}: logical switch {switch.name} is NoTeam",
                "nics",
                f"a NoTeam switch takes exactly one NIC, got {len(nics)}",
            )
        if spec.management_adapter is not None:
            self._require(Kind.vm_network, spec.management_adapter.vm_network, "management_adapter.vm_network",
                          f"virtual switch of host {host_name}")
        result = VirtualSwitch(host=host_name, logical_switch=switch.name, nics=tuple(nics),
                               uplink_port_profile=profile, management_adapter=spec.management_adapter)
        # The management address becomes a lease when a pool of the management VM network's
        # logical network covers it (Get-SCIPAddress lists it as the host's).
        self._release_held(tx, "host", host_name, LeaseKind.Management)
        if spec.management_adapter is not None and host.management_address is not None:
            self._lease_management(tx, host, spec.management_adapter.vm_network)
        tx.put(VIRTUAL_SWITCH, host_name, result)
        # Every VM already on the host must still be reachable through the new switch.
        old = self.inventory.switches.get(host_name)
        self.inventory.switches[host_name] = result
        try:
            for vm_name in sorted(self.inventory.vms_by_host.get(host_name, ())):
                vm = self.inventory.get(Kind.vm, vm_name)
                network = self.inventory.get(Kind.vm_network, vm.vm_network)
                subnet = self.inventory.get(Kind.vm_subnet, f"{vm.vm_network}/{vm.vm_subnet}")
                reason = why_not(self.inventory, host, network, subnet)
                if reason is not None:
                    raise Conflict(
                        f"virtual switch of host {host_name}: VM {vm_name} would lose VM network {network.name}",
                        "logical_switch",
                        reason,
                    )
        finally:
            if old is None:
                self.inventory.switches.pop(host_name, None)
            else:
                self.inventory.switches[host_name] = old
        return result, _Scope(hosts={host_name})

    def _lease_management(self, tx: Tx, host: Host, vm_network_name: str) -> None:
        network = self.inventory.get(Kind.vm_network, vm_network_name)
        address = host.management_address.ip
        for site in self.inventory.all(Kind.network_site):
            if site.logical_network != network.logical_network:
                continue
            for pool_key in self.inventory.pools_by_owner.get(site.name, ()):
                pool = self.inventory.get(Kind.ip_pool, pool_key)
                if pool.range_start.version != address.version:
                    continue
                if not int(pool.range_start) <= int(address) <= int(pool.range_end):
                    continue
                current = self.inventory.leases[pool.key].get(str(address))
                if current is None:
                    self._lease_from(tx, pool, LeaseKind.Management, "host", host.name, host.name,
                                     vm_network_name, f"Management of {host.name}", address=address)
                elif current.holder == host.name and current.kind is LeaseKind.Management:
                    tx.lease(current)  # keep it (the release above is overridden)
                else:
                    raise Conflict(
                        f"management address {address} of host {host.name} is leased by {current.holder}",
                        "management_address",
                        f"IP pool {pool.key} already gave it to {current.holder}",
                    )
                return

    def _release_held(self, tx: Tx, holder_kind: str, holder: str, kind: LeaseKind | None = None) -> None:
        for lease in list(self.inventory.leases_by_holder.get(f"{holder_kind}:{holder}", ())):
            if kind is None or lease.kind == kind:
                tx.release(lease)

    def _delete_virtual_switch(self, tx: Tx, host_name: str) -> tuple[None, _Scope]:
        self.get_virtual_switch(host_name)
        vms = sorted(self.inventory.vms_by_host.get(host_name, ()))
        if vms:
            raise Conflict(
                f"the virtual switch of host {host_name} is in use",
                "host",
                f"VMs {', '.join(vms[:5])} are connected to it",
            )
        self._release_held(tx, "host", host_name, LeaseKind.Management)
        tx.delete(VIRTUAL_SWITCH, host_name)
        return None, _Scope(hosts={host_name})

    # --- logical networks, sites, pools, profiles, switches --------------------------------------

    def _create_logical_network(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        return self._new(Kind.logical_network, tx, spec), _Scope()

    def _delete_logical_network(self, tx: Tx, network) -> tuple[None, _Scope]:
        users = [f"network site {s.name}" for s in self.inventory.all(Kind.network_site)
                 if s.logical_network == network.name]
        users += [f"VM network {n.name}" for n in self.inventory.all(Kind.vm_network)
                  if n.logical_network == network.name]
        _refuse_in_use(Kind.logical_network, network.name, users)
        tx.delete(Kind.logical_network, network.name)
        return None, _Scope()

    def _create_network_site(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        self._require(Kind.logical_network, spec.logical_network, "logical_network", f"network site {spec.name}")
        for i, group in enumerate(spec.host_groups):
            self._require(Kind.host_group, group, f"host_groups[{i}]", f"network site {spec.name}")
        return self._new(Kind.network_site, tx, spec), _Scope(networks=ALL)

    def _delete_network_site(self, tx: Tx, site) -> tuple[None, _Scope]:
        users = [f"IP pool {key}" for key in self.inventory.pools_by_owner.get(site.name, ())]
        users += [f"uplink port profile {p.name}" for p in self.inventory.all(Kind.uplink_port_profile)
                  if site.name in p.network_sites]
        _refuse_in_use(Kind.network_site, site.name, users)
        tx.delete(Kind.network_site, site.name)
        return None, _Scope(networks=ALL)

    def _create_ip_pool(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"IP pool {spec.name}"
        if spec.network_site is not None:
            site = self._require(Kind.network_site, spec.network_site, "network_site", what)
            subnets = [pair.subnet for pair in site.subnet_vlans]
            if spec.subnet is None:
                if len(subnets) != 1:
                    raise Invalid(f"{what}: network site {site.name} has {len(subnets)} subnets", "subnet",
                                  "name the subnet of the site this pool serves")
                subnet = subnets[0]
            elif spec.subnet not in subnets:
                raise Invalid(f"{what}: subnet {spec.subnet} is not a subnet of network site {site.name}", "subnet",
                              f"network site {site.name} has {', '.join(map(str, subnets))}")
            else:
                subnet = spec.subnet
            gateway = spec.gateway
            scope: _Scope = _Scope(networks=ALL)
            siblings = [self.inventory.get(Kind.ip_pool, key)
                        for s in self.inventory.all(Kind.network_site) if s.logical_network == site.logical_network
                        for key in self.inventory.pools_by_owner.get(s.name, ())]
        else:
            network = self._require(Kind.vm_network, spec.vm_network, "vm_network", what)
            subnet_name = spec.vm_subnet or self._only_subnet(network, what)
            vm_subnet = self._require(Kind.vm_subnet, f"{network.name}/{subnet_name}", "vm_subnet", what)
            if spec.subnet is not None and spec.subnet != vm_subnet.prefix:
                raise Invalid(f"{what}: subnet {spec.subnet} is not the prefix of VM subnet {vm_subnet.key}",
                              "subnet", f"VM subnet {vm_subnet.key} is {vm_subnet.prefix}")
            subnet = vm_subnet.prefix
            gateway = spec.gateway if spec.gateway is not None else first_host_address(subnet)
            scope = _Scope(networks={network.name})
            siblings = [self.inventory.get(Kind.ip_pool, key)
                        for key in self.inventory.pools_by_owner.get(vm_subnet.key, ())]
            spec = spec.model_copy(update={"vm_subnet": subnet_name})
        for name in ("range_start", "range_end", "gateway"):
            value = getattr(spec, name)
            if value is not None and value not in subnet:
                raise Invalid(f"{what}: {name} {value} is outside the subnet {subnet}", name,
                              f"{value} is not in {subnet}")
        for i, value in enumerate(spec.reserved):
            if value not in subnet:
                raise Invalid(f"{what}: reserved address {value} is outside {subnet}", f"reserved[{i}]",
                              f"{value} is not in {subnet}")
        start = spec.range_start
        if start is None:
            start = first_host_address(subnet)
            if gateway is not None and start == gateway:
                start += 1
        end = spec.range_end if spec.range_end is not None else last_host_address(subnet)
        if int(start) > int(end):
            raise Invalid(f"{what}: the range {start} - {end} is empty", "range_end", f"{end} is before {start}")
        for other in siblings:
            if other.subnet == subnet and int(other.range_start) <= int(end) and int(start) <= int(other.range_end):
                raise Conflict(
                    f"{what}: range {start} - {end} overlaps IP pool {other.key} ({other.range_start} - "
                    f"{other.range_end})",
                    "range_start",
                    "two pools of one subnet would hand out the same address",
                )
        pool = self._new(Kind.ip_pool, tx, spec, subnet=subnet, range_start=start, range_end=end, gateway=gateway)
        return pool, scope

    def _delete_ip_pool(self, tx: Tx, pool) -> tuple[None, _Scope]:
        leases = sorted(self.inventory.leases.get(pool.key, {}).values(), key=lambda lease: int(lease.address))
        _refuse_in_use(Kind.ip_pool, pool.key, [f"{lease.address} ({lease.description or lease.holder})"
                                                for lease in leases], noun="leases")
        tx.delete(Kind.ip_pool, pool.key)
        return None, _Scope(networks=ALL)

    def _create_uplink_port_profile(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        for i, site in enumerate(spec.network_sites):
            self._require(Kind.network_site, site, f"network_sites[{i}]", f"uplink port profile {spec.name}")
        return self._new(Kind.uplink_port_profile, tx, spec), _Scope()

    def _delete_uplink_port_profile(self, tx: Tx, profile) -> tuple[None, _Scope]:
        users = [f"logical switch {s.name}" for s in self.inventory.all(Kind.logical_switch)
                 if profile.name in s.uplink_port_profiles]
        _refuse_in_use(Kind.uplink_port_profile, profile.name, users)
        tx.delete(Kind.uplink_port_profile, profile.name)
        return None, _Scope()

    def _create_logical_switch(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        for i, profile in enumerate(spec.uplink_port_profiles):
            self._require(Kind.uplink_port_profile, profile, f"uplink_port_profiles[{i}]",
                          f"logical switch {spec.name}")
        return self._new(Kind.logical_switch, tx, spec), _Scope()

    def _delete_logical_switch(self, tx: Tx, switch) -> tuple[None, _Scope]:
        users = [f"host {host}" for host, vs in sorted(self.inventory.switches.items())
                 if vs.logical_switch == switch.name]
        _refuse_in_use(Kind.logical_switch, switch.name, users)
        tx.delete(Kind.logical_switch, switch.name)
        return None, _Scope()

    # --- VM networks, VM subnets --------------------------------------------------------------------

    def _create_vm_network(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"VM network {spec.name}"
        logical = self._require(Kind.logical_network, spec.logical_network, "logical_network", what)
        decided: dict[str, Any] = {}
        if spec.isolation is Isolation.WindowsNetworkVirtualization:
            if not logical.network_virtualization:
                raise Invalid(
                    f"{what}: logical network {logical.name} does not allow network virtualisation",
                    "isolation",
                    f"create it with network_virtualization true, or choose isolation VLAN or NoIsolation",
                )
            decided["routing_domain_id"] = allocate_routing_domain_id(self._taken(tx, SPACE_ROUTING_DOMAIN))
        network = self._new(Kind.vm_network, tx, spec, **decided)
        if network.routing_domain_id is not None:
            tx.take(SPACE_ROUTING_DOMAIN, str(network.routing_domain_id), f"vm-network:{network.name}")
        return network, _Scope()

    def _delete_vm_network(self, tx: Tx, network) -> tuple[None, _Scope]:
        users = [f"VM {name}" for name in sorted(self.inventory.vms_by_network.get(network.name, ()))]
        users += [f"VM subnet {key}" for key in self.inventory.subnets_by_network.get(network.name, ())]
        users += [f"the management adapter of host {host}" for host, vs in sorted(self.inventory.switches.items())
                  if vs.management_adapter is not None and vs.management_adapter.vm_network == network.name]
        _refuse_in_use(Kind.vm_network, network.name, users)
        tx.delete(Kind.vm_network, network.name)
        if network.routing_domain_id is not None:
            tx.free(SPACE_ROUTING_DOMAIN, str(network.routing_domain_id))
        return None, _Scope()

    def _only_subnet(self, network: VmNetwork, what: str) -> str:
        keys = self.inventory.subnets_by_network.get(network.name, [])
        if len(keys) != 1:
            raise Invalid(f"{what}: VM network {network.name} has {len(keys)} VM subnets", "vm_subnet",
                          "name the VM subnet")
        return keys[0].split("/", 1)[1]

    def _create_vm_subnet(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"VM subnet {spec.vm_network}/{spec.name}"
        network = self._require(Kind.vm_network, spec.vm_network, "vm_network", what)
        decided: dict[str, Any] = {}
        if network.isolation is Isolation.NoIsolation:
            raise Invalid(f"{what}: VM network {network.name} has no isolation", "vm_network",
                          "VM subnets belong to network-virtualised or VLAN VM networks")
        if network.isolation is Isolation.WindowsNetworkVirtualization:
            if spec.vlan is not None:
                raise Invalid(f"{what}: a network-virtualised VM subnet has no VLAN", "vlan",
                              "its traffic is carried in NVGRE on the transport VLAN")
            if spec.prefix.version != network.ca_family.version:
                raise Invalid(f"{what}: {spec.prefix} is not {network.ca_family.value}", "prefix",
                              f"VM network {network.name} has ca_family {network.ca_family.value}; "
                              "network virtualisation is never dual-stack")
            for key in self.inventory.subnets_by_network.get(network.name, ()):
                other = self.inventory.get(Kind.vm_subnet, key)
                if other.prefix.overlaps(spec.prefix):
                    raise Conflict(f"{what}: {spec.prefix} overlaps VM subnet {key} ({other.prefix})", "prefix",
                                   "VM subnets of one VM network share a routing domain")
            vsid = allocate_vsid(self._taken(tx, SPACE_VSID))
            decided["vsid"] = vsid
            decided["gateway_mac"] = self._new_mac(tx, f"gateway:{network.name}/{spec.name}")
        else:
            if spec.vlan is None:
                raise Invalid(f"{what}: a VLAN VM subnet names its VLAN", "vlan",
                              f"VM network {network.name} is isolated by VLAN")
            pairs = [(site.name, pair) for site in self.inventory.all(Kind.network_site)
                     if site.logical_network == network.logical_network for pair in site.subnet_vlans]
            if not any(pair.vlan == spec.vlan and pair.subnet == spec.prefix for _, pair in pairs):
                offered = ", ".join(f"{pair.subnet} VLAN {pair.vlan} ({site})" for site, pair in pairs) or "none"
                raise Invalid(
                    f"{what}: {spec.prefix} on VLAN {spec.vlan} is not a subnet/VLAN of logical network "
                    f"{network.logical_network}",
                    "vlan",
                    f"the sites of logical network {network.logical_network} offer: {offered}",
                )
        subnet = self._new(Kind.vm_subnet, tx, spec, **decided)
        if subnet.vsid is not None:
            tx.take(SPACE_VSID, str(subnet.vsid), f"vm-subnet:{subnet.key}")
        return subnet, _Scope(networks={network.name})

    def _delete_vm_subnet(self, tx: Tx, subnet) -> tuple[None, _Scope]:
        users = [f"VM {vm.name}" for vm in self.inventory.vms_of_network(subnet.vm_network)
                 if vm.vm_subnet == subnet.name]
        users += [f"IP pool {key}" for key in self.inventory.pools_by_owner.get(subnet.key, ())]
        _refuse_in_use(Kind.vm_subnet, subnet.key, users)
        tx.delete(Kind.vm_subnet, subnet.key)
        if subnet.vsid is not None:
            tx.free(SPACE_VSID, str(subnet.vsid))
        if subnet.gateway_mac is not None:
            tx.free(SPACE_MAC, subnet.gateway_mac)
        return None, _Scope(networks={subnet.vm_network})

    # --- VMs ---------------------------------------------------------------------------------------

    def _create_vm(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"VM {spec.name}"
        self._refuse_existing(Kind.vm, spec.name)
        network = self._require(Kind.vm_network, spec.vm_network, "vm_network", what)
        if network.isolation is Isolation.NoIsolation:
            raise Invalid(f"{what}: VM network {network.name} has no isolation", "vm_network",
                          "VMs join network-virtualised or VLAN VM networks")
        subnet_name = spec.vm_subnet or self._only_subnet(network, what)
        subnet = self._require(Kind.vm_subnet, f"{network.name}/{subnet_name}", "vm_subnet", what)
        if spec.host_group is not None:
            self._require(Kind.host_group, spec.host_group, "host_group", what)
        if spec.host is not None:
            host = self._require(Kind.host, spec.host, "host", what)
            reason = why_not(self.inventory, host, network, subnet)
            if reason is not None:
                raise Conflict(f"{what}: host {host.name} cannot carry VM network {network.name}", "host", reason)
        else:
            host = place(self.inventory, network, subnet, spec.host_group)
        if spec.mac is not None:
            self._take_mac(tx, spec.mac, f"vm:{spec.name}")
            mac = spec.mac
        else:
            mac = self._new_mac(tx, f"vm:{spec.name}")
        ca = self._lease_ca(tx, spec.name, spec.ca, network, subnet, host.name)
        if network.isolation is Isolation.WindowsNetworkVirtualization:
            self._ensure_pa(tx, host, network)
        vm = self._new(Kind.vm, tx, spec, vm_subnet=subnet.name, host=host.name, mac=mac, ca=ca)
        return vm, _Scope(networks={network.name}, hosts={host.name})

    def _lease_ca(self, tx: Tx, vm_name: str, wanted, network: VmNetwork, subnet: VmSubnet, host: str):
        pools = [self.inventory.get(Kind.ip_pool, key) for key in self.inventory.pools_by_owner.get(subnet.key, ())]
        description = f"CA of {vm_name} in {network.name}"
        if wanted is not None:
            if wanted not in subnet.prefix:
                raise Invalid(f"VM {vm_name}: CA {wanted} is outside VM subnet {subnet.key} ({subnet.prefix})", "ca",
                              f"{wanted} is not in {subnet.prefix}")
            for other in self.inventory.vms_of_network(network.name):
                if other.ca == wanted and other.vm_subnet == subnet.name:
                    raise Conflict(f"VM {vm_name}: CA {wanted} is already used by VM {other.name}", "ca",
                                   f"CAs are unique within VM subnet {subnet.key}")
            for pool in pools:
                if int(pool.range_start) <= int(wanted) <= int(pool.range_end):
                    self._lease_from(tx, pool, LeaseKind.CA, "vm", vm_name, host, network.name, description,
                                     address=wanted)
                    break
            return wanted
        if not pools:
            if network.isolation is Isolation.VLAN:
                return None
            raise Conflict(f"VM {vm_name}: VM subnet {subnet.key} has no IP pool", "ca",
                           "create an IP pool on the VM subnet or give the VM a CA")
        exhausted = []
        for pool in pools:
            try:
                return self._lease_from(tx, pool, LeaseKind.CA, "vm", vm_name, host, network.name,
                                        description).address
            except Conflict as exc:
                exhausted.append(f"{exc.error} ({exc.reason})")
        raise Conflict(f"VM {vm_name}: no free CA in VM subnet {subnet.key}", "ca", "; ".join(exhausted))

    def _ensure_pa(self, tx: Tx, host: Host, network: VmNetwork) -> None:
        """One PA per (host, VM network): taken with the host's first VM of that network."""
        if (host.name, network.name) in self.inventory.pa_leases:
            return
        transport = transport_of(self.inventory, host)
        pools = [self.inventory.get(Kind.ip_pool, key) for key in self.inventory.pools_by_owner.get(transport.site.name, ())]
        pools = [pool for pool in pools if pool.subnet == transport.subnet_vlan.subnet]
        if not pools:
            raise Conflict(
                f"host {host.name} has no provider address for VM network {network.name}",
                "host",
                f"the transport site {transport.site.name} ({transport.subnet_vlan.subnet}) has no IP pool for PAs",
            )
        description = f"PA of {host.name} for {network.name}"
        exhausted = []
        for pool in pools:
            try:
                self._lease_from(tx, pool, LeaseKind.PA, "host", host.name, host.name, network.name, description)
                return
            except Conflict as exc:
                exhausted.append(f"{exc.error} ({exc.reason})")
        raise Conflict(f"host {host.name} has no provider address for VM network {network.name}", "host",
                       "; ".join(exhausted))

    def _release_pa_if_last(self, tx: Tx, host: str, network: str) -> None:
        if self.inventory.network_hosts.get(network, {}).get(host, 0) <= 1:
            lease = self.inventory.pa_leases.get((host, network))
            if lease is not None:
                tx.release(lease)

    def _delete_vm(self, tx: Tx, vm) -> tuple[None, _Scope]:
        tx.delete(Kind.vm, vm.name)
        tx.free(SPACE_MAC, vm.mac)
        self._release_held(tx, "vm", vm.name)
        self._release_pa_if_last(tx, vm.host, vm.vm_network)
        return None, _Scope(networks={vm.vm_network}, hosts={vm.host})

    def _migrate(self, tx: Tx, vm_name: str, destination: str) -> tuple[Any, _Scope]:
        vm = self.get(Kind.vm, vm_name)
        host = self._require(Kind.host, destination, "host", f"migration of VM {vm_name}")
        if host.name == vm.host:
            return vm, _Scope()
        network = self.inventory.get(Kind.vm_network, vm.vm_network)
        subnet = self.inventory.get(Kind.vm_subnet, f"{vm.vm_network}/{vm.vm_subnet}")
        reason = why_not(self.inventory, host, network, subnet)
        if reason is not None:
            raise Conflict(f"VM {vm_name} cannot migrate to host {host.name}", "host", reason)
        # Release the source PA first, so that if the destination takes a new one the
        # pool's accounting sees both (they are different (host, network) keys anyway).
        self._release_pa_if_last(tx, vm.host, network.name)
        if network.isolation is Isolation.WindowsNetworkVirtualization:
            self._ensure_pa(tx, host, network)
        for lease in self.inventory.leases_by_holder.get(f"vm:{vm.name}", ()):
            tx.lease(lease.model_copy(update={"host": host.name}))
        moved = vm.model_copy(update={"host": host.name})
        tx.put(Kind.vm, vm.name, moved)
        return moved, _Scope(networks={network.name}, hosts={vm.host, host.name})

    # --- PATCH ---------------------------------------------------------------------------------------

    def _patch(self, tx: Tx, kind: Kind, key: str, changes: dict[str, Any]) -> tuple[Any, _Scope]:
        current = self.get(kind, key)
        spec_model = SPEC_OF[kind]
        if not isinstance(changes, dict):
            raise Invalid(f"{kind.label} {key}: a PATCH body is a JSON object", None, "send the fields to change")
        for name, value in changes.items():
            if name not in spec_model.model_fields:
                raise Invalid(f"{kind.label} {key}: unknown field {name}", name, f"{kind.label}s have no field {name}")
        spec_data = {name: getattr(current, name) for name in spec_model.model_fields}
        try:
            merged = spec_model.model_validate({**_plain(spec_data), **changes})
        except ValidationError as exc:
            problem = describe_validation_error(exc)[0]
            field, _, reason = problem.partition(": ")
            raise Invalid(f"{kind.label} {key}: {problem}", field or None, reason or problem) from None
        for name in spec_model.model_fields:
            if getattr(merged, name) != getattr(current, name) and name not in spec_model.patchable:
                raise Invalid(
                    f"{kind.label} {key}: {name} cannot be changed",
                    name,
                    f"only {', '.join(sorted(spec_model.patchable))} can change; delete and recreate "
                    f"the {kind.label} to change {name}",
                )
        if kind is Kind.host and merged.nics != current.nics:
            switch = self.inventory.switches.get(key)
            missing = [nic for nic in (switch.nics if switch else ()) if nic not in merged.nics]
            if missing:
                raise Conflict(f"host {key}: NIC {missing[0]} is used by its virtual switch", "nics",
                               "remove it from the virtual switch first")
        if kind is Kind.network_site:
            for i, group in enumerate(merged.host_groups):
                self._require(Kind.host_group, group, f"host_groups[{i}]", f"network site {key}")
        if kind is Kind.uplink_port_profile:
            for i, site in enumerate(merged.network_sites):
                self._require(Kind.network_site, site, f"network_sites[{i}]", f"uplink port profile {key}")
        updated = current.model_copy(update={name: getattr(merged, name) for name in spec_model.patchable})
        updated = type(current).model_validate(updated.model_dump(exclude={"key"}))
        tx.put(kind, key, updated)
        switch = self.inventory.switches.get(key) if kind is Kind.host else None
        if switch is not None and updated.management_address != current.management_address:
            # The management lease follows the address.
            self._release_held(tx, "host", key, LeaseKind.Management)
            if switch.management_adapter is not None and updated.management_address is not None:
                self._lease_management(tx, updated, switch.management_adapter.vm_network)
        if kind in (Kind.network_site, Kind.uplink_port_profile):
            self._check_vms_still_placed(updated, kind)
        return updated, _Scope(networks=ALL)

    def _check_vms_still_placed(self, updated: Any, kind: Kind) -> None:
        """After a site or profile change, every VM's host must still reach its VM network."""
        previous = self.inventory.objects[kind][updated.key]
        self.inventory.objects[kind][updated.key] = updated
        try:
            for vm in self.inventory.all(Kind.vm):
                host = self.inventory.get(Kind.host, vm.host)
                network = self.inventory.get(Kind.vm_network, vm.vm_network)
                subnet = self.inventory.get(Kind.vm_subnet, f"{vm.vm_network}/{vm.vm_subnet}")
                reason = why_not(self.inventory, host, network, subnet)
                if reason is not None:
                    raise Conflict(f"{kind.label} {updated.key}: VM {vm.name} would lose VM network {network.name}",
                                   None, reason)
        finally:
            self.inventory.objects[kind][updated.key] = previous


def _refuse_in_use(kind: Kind, key: str, users: list[str], noun: str = "users") -> None:
    if users:
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise Conflict(f"{kind.label} {key} is in use", "name", f"still used by {shown}" if noun == "users"
                       else f"it still has {len(users)} {noun}: {shown}")


def _skipped(pool: IpPool) -> set:
    skip = set(pool.reserved)
    if pool.gateway is not None:
        skip.add(pool.gateway)
    return {a for a in skip if int(pool.range_start) <= int(a) <= int(pool.range_end)}


def _text(value: Any) -> str:
    if hasattr(value, "value"):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Model values back to JSON-like input (for re-validation after a merge)."""
    out = {}
    for name, value in data.items():
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
                              ipaddress.IPv6Network, ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(v) if not isinstance(v, (BaseModel, int, str)) else v for v in value]
        out[name] = value
    return out


def _quoted(text: object) -> str:
    """A log value (agent.logfmt): quoted and escaped, so a line stays one event of key=value pairs."""
    return logfmt_quote(text)


def _uuid_of(kind: str, key: str, obj: Any) -> str:
    if kind == VIRTUAL_SWITCH:
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"openhnv:virtual-switch:{key}"))
    return obj.uuid
