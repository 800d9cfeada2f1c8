"""The transaction engine: every fabric operation, validated, allocated and compiled as one.

An operation runs under one write lock (writes are serialised; the API's worker threads
queue here) inside one store write session (`controller.store`: on PostgreSQL a
transaction holding the advisory lock every replica takes, so writes are serialised
across replicas too), in five steps, and any refusal leaves nothing changed:

0. *catch up*: apply what other replicas committed since this one's last revision
   (`_apply_revisions`; nothing on SQLite, where this process is the only writer);
1. *build*: check the request against the fabric and put every change - objects,
   VSIDs, MACs, leases - into a `Tx` (refusals raise `Invalid` 422, `NotFound` 404,
   `Conflict` 409, naming the object, the field and the reason). The builder comes
   from `RULES`, the explicit registry of kind -> create/delete rules;
2. *trial*: apply the Tx to the writer's working inventory and compile every affected
   host; a HostState that agent.state refuses undoes the Tx and refuses the request, so
   the controller never publishes a state an agent would reject;
3. *commit*: write the Tx, with the host generations it bumps, to the store in one
   transaction, appended to the revision log on a shared store (the store's primary
   keys refuse any value taken twice, 409; a busy or unreachable database is
   `Unavailable` 503; any failure undoes the Tx in memory too);
4. *publish*: replace the inventory's committed view (what every reader sees), serve
   the new generations and wake the watchers of the hosts whose content changed.

Readers (`get`, `list`, `leases`, the views) never take the lock and never see a step
before 4: they read `inventory.committed`, immutable and replaced only after a commit.

On a shared store a follower thread (`_follow`) wakes on the log's NOTIFY, or every
`FOLLOW_INTERVAL_S` seconds whatever happens (the log is the truth, a notification only
a wake-up), applies other replicas' revisions the same way (publishing their hosts'
new states to this replica's watchers with the generation and digest they committed),
and reads agents' statuses reported through other replicas. While the database is
unreachable it retries each interval and the fabric keeps serving what was committed.

A migration's later stages are writes like any other, made by the stepper thread of
`controller.fabric.migrations` (started last in `__init__`, stopped by `close`).

Affected hosts are narrow for VM operations (the hosts of the VM network, including the
sources of its migrations in progress, and the gateway hosts serving it, before and
after, plus source and destination) and all hosts for fabric-wide objects (switches,
sites, profiles: rare and cheap). Generations only move when content changes, so a
wide recompile bumps only hosts that really differ.

This module owns the order of those steps; the rules are `controller.fabric.hosts`,
`.networks`, `.tenants`, `.gateways` and `.patch`, the host-facing reads `controller.fabric.views`;
storage is `controller.store`, choices `controller.allocate`/`controller.placement`,
host states `controller.compiler`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from agent.state import HostState, describe_validation_error
from controller.compiler import Compiler, Serialised
from controller.fabric.common import (
    ALL,
    Builders,
    KindRules,
    _busy,
    _quoted,
    _Scope,
    _text,
    _uuid_of,
    log,
)
from controller.fabric.gateways import GatewayRules
from controller.fabric.hosts import HostRules
from controller.fabric.migrations import MIGRATION_BOUND_S, STEP_INTERVAL_S, MigrationStages
from controller.fabric.networks import NetworkRules
from controller.fabric.patch import PatchRules
from controller.fabric.tenants import TenantRules
from controller.fabric.views import HostEntry, SyncStatus
from controller.gateways import gateway_hosts_of_network
from controller.inventory import VIRTUAL_SWITCH, Inventory, Tx
from controller.models import (
    ROOT_HOST_GROUP,
    STORED_OF,
    Conflict,
    FabricError,
    GatewayService,
    HostGroup,
    Invalid,
    Kind,
    Lease,
    NotFound,
    VirtualSwitch,
    VirtualSwitchSpec,
    Vm,
)
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
from controller.store import HostRow, Revision, Store, StoreBusy, StoreConflict

# kind -> how it is created and deleted (PATCH is one rule for every kind: `PatchRules`).
RULES: dict[Kind, KindRules] = {
    Kind.host_group: KindRules(HostRules._create_host_group, HostRules._delete_host_group),
    Kind.cluster: KindRules(HostRules._create_cluster, HostRules._delete_cluster),
    Kind.host: KindRules(HostRules._create_host, HostRules._delete_host),
    Kind.logical_network: KindRules(NetworkRules._create_logical_network, NetworkRules._delete_logical_network),
    Kind.network_site: KindRules(NetworkRules._create_network_site, NetworkRules._delete_network_site),
    Kind.ip_pool: KindRules(NetworkRules._create_ip_pool, NetworkRules._delete_ip_pool),
    Kind.uplink_port_profile: KindRules(NetworkRules._create_uplink_port_profile,
                                        NetworkRules._delete_uplink_port_profile),
    Kind.logical_switch: KindRules(NetworkRules._create_logical_switch, NetworkRules._delete_logical_switch),
    Kind.vm_network: KindRules(TenantRules._create_vm_network, TenantRules._delete_vm_network),
    Kind.vm_subnet: KindRules(TenantRules._create_vm_subnet, TenantRules._delete_vm_subnet),
    Kind.vm: KindRules(TenantRules._create_vm, TenantRules._delete_vm),
    Kind.gateway_service: KindRules(GatewayRules._create_gateway_service, GatewayRules._delete_gateway_service),
    Kind.gateway: KindRules(GatewayRules._create_gateway, GatewayRules._delete_gateway),
    Kind.nat_connection: KindRules(GatewayRules._create_nat_connection, GatewayRules._delete_nat_connection),
    Kind.nat_rule: KindRules(GatewayRules._create_nat_rule, GatewayRules._delete_nat_rule),
    Kind.customer_route: KindRules(GatewayRules._create_customer_route, GatewayRules._delete_customer_route),
}


FOLLOW_INTERVAL_S = 1.0  # a replica polls the revision log at least this often (NOTIFY wakes it sooner)


class _DryRunDone(Exception):
    """Raised inside the engine after a dry run's trial compile, so the undo path runs."""


class _NotDue(Exception):
    """Raised inside `move_gateway_role`'s build when the move is no longer due: nothing
    is committed."""


class Fabric(MigrationStages, SyncStatus, HostRules, NetworkRules, TenantRules, GatewayRules, PatchRules, Builders):
    """The fabric: committed reads for anyone, serialised writes through the engine.

    The rule mixins hold the builders (`RULES` names them per kind); this class holds the
    state (inventory, compiler, published entries) and the order of a write's steps.
    `MigrationStages` comes first: its `report_status` wakes the migration stepper after
    `SyncStatus`'s.
    """

    def __init__(self, store: Store, follow_interval: float = FOLLOW_INTERVAL_S,
                 migration_bound: float = MIGRATION_BOUND_S, migration_step_interval: float = STEP_INTERVAL_S):
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
        self._status_text: dict[str, str | None] = {}  # host -> its status row as last read (follower)
        snapshot = store.load()
        # The last revision of the shared log this replica's fabric includes.
        self.revision = snapshot.revision
        # Every state served carries it: agents compare generations only within one fabric.
        self.fabric_id = snapshot.fabric_id
        self.inventory.load(snapshot)
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
                rows.append(HostRow(name, generation, digest))
            self._set_entry(name, state, generation, digest, body)
            if row is not None:
                self.applied[name] = row.applied_generation
                self.statuses[name] = row.status or {}
        self._commit_at_start(rows)
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        if store.shared:
            self._follower = threading.Thread(target=self._follow, args=(follow_interval,),
                                              name="revision-follower", daemon=True)
            self._follower.start()
        # Last: the stepper writes through the engine, which needs everything above.
        self._start_migration_stepper(migration_bound, migration_step_interval)

    def _commit_at_start(self, rows: list[HostRow]) -> None:
        """The root host group of a new fabric, and the generations a new code version
        bumps, committed as one write (under the shared lock: two replicas starting at
        once on a new database create one root, and bump a host once)."""
        root_missing = self.inventory.get(Kind.host_group, ROOT_HOST_GROUP) is None
        if not root_missing and not rows:
            return
        with self._lock, self.store.write_session() as session:
            caught_up = self._apply_revisions(session.revisions_since(self.revision))
            tx = Tx()
            if self.inventory.get(Kind.host_group, ROOT_HOST_GROUP) is None:
                root = HostGroup(name=ROOT_HOST_GROUP, parent=None, uuid=str(uuidlib.uuid4()))
                tx.put(Kind.host_group, ROOT_HOST_GROUP, root)
            changes = tx.changeset(_uuid_of)
            changes.put_hosts = [row for row in rows if row.host not in caught_up]
            revision = session.commit(changes)
        self.inventory.apply(tx)
        self.inventory.publish(tx)
        if revision is not None:
            self.revision = revision

    def close(self) -> None:
        """Stop following the shared revision log and stepping migrations (the store is the
        caller's to close)."""
        self._stop.set()
        self.wake_migration_stepper()
        if self._follower is not None:
            self._follower.join(timeout=10)
        self._stepper.join(timeout=10)

    @classmethod
    def open(cls, state_dir: str | Path, synchronous: str = "FULL", busy_timeout: float = 5.0,
             **options: Any) -> Fabric:
        """The fabric of a state directory's SQLite store; `options` go to `Fabric`."""
        return cls(Store(Path(state_dir) / "controller.db", synchronous=synchronous, busy_timeout=busy_timeout),
                   **options)

    def add_listener(self, listener: Callable[[list[str]], None]) -> None:
        """`listener(hosts)` is called (from a worker thread) after their generations moved."""
        self._listeners.append(listener)

    # --- reads ------------------------------------------------------------------------------
    # Every read takes `self.inventory.committed` once: the fabric as last committed,
    # immutable, so no lock and no uncommitted state (see controller.inventory).

    def get(self, kind: Kind, key: str) -> Any:
        obj = self.inventory.committed.get(kind, key)
        if obj is None:
            raise NotFound(f"{kind.label} {key} does not exist", "name", f"no {kind.label} is called {key}")
        return obj

    def list(self, kind: Kind, filters: dict[str, str] | None = None) -> list[Any]:
        model = STORED_OF[kind]
        filters = dict(filters or {})
        for name in filters:
            if name not in model.model_fields and name != "key":
                raise Invalid(f"cannot filter {kind.label}s on {name}", name, f"{kind.label}s have no field {name}")
        objects = self.inventory.committed.sorted(kind)
        if filters:
            objects = [
                obj for obj in objects
                if all(_text(getattr(obj, name)) == value for name, value in filters.items())
            ]
        return objects

    def get_virtual_switch(self, host: str) -> VirtualSwitch:
        return self._switch_of(self.inventory.committed, host)

    def _switch_of(self, fabric: Any, host: str) -> VirtualSwitch:
        if fabric.get(Kind.host, host) is None:
            raise NotFound(f"host {host} does not exist", "name", f"no host is called {host}")
        switch = fabric.switches.get(host)
        if switch is None:
            raise NotFound(f"host {host} has no virtual switch", "host", "no virtual switch was set on it")
        return switch

    def leases(self, pool=None, kind=None, host=None, vm_network=None) -> list[Lease]:
        committed = self.inventory.committed.leases
        pools = [pool] if pool is not None else sorted(committed)
        found = []
        for name in pools:
            for lease in committed.get(name, {}).values():
                if kind is not None and lease.kind != kind:
                    continue
                if host is not None and lease.host != host:
                    continue
                if vm_network is not None and lease.vm_network != vm_network:
                    continue
                found.append(lease)
        return sorted(found, key=lambda lease: (lease.pool, int(lease.address)))

    # --- writes -------------------------------------------------------------------------------

    def create(self, kind: Kind, spec: BaseModel) -> Any:
        create = RULES[kind].create
        return self._run(lambda tx: create(self, tx, spec), f"create {kind.value} {getattr(spec, 'name', '')}")

    def patch(self, kind: Kind, key: str, changes: dict[str, Any]) -> Any:
        return self._run(lambda tx: self._patch(tx, kind, key, changes), f"patch {kind.value} {key}")

    def delete(self, kind: Kind, key: str) -> None:
        delete = RULES[kind].delete
        self._run(lambda tx: delete(self, tx, self._existing(kind, key)), f"delete {kind.value} {key}")

    def set_virtual_switch(self, host: str, spec: VirtualSwitchSpec) -> VirtualSwitch:
        return self._run(lambda tx: self._set_virtual_switch(tx, host, spec), f"set virtual-switch {host}")

    def delete_virtual_switch(self, host: str) -> None:
        self._run(lambda tx: self._delete_virtual_switch(tx, host), f"delete virtual-switch {host}")

    def create_many(self, kind: Kind, specs: list[BaseModel]) -> list[Any]:
        """Create several objects of one kind as one transaction: all or none."""
        create = RULES[kind].create

        def build(tx: Tx, index: int, spec: BaseModel) -> tuple[Any, _Scope]:
            try:
                return create(self, tx, spec)
            except FabricError as exc:
                field = f"items[{index}].{exc.field}" if exc.field else f"items[{index}]"
                raise type(exc)(f"items[{index}] ({getattr(spec, 'name', '?')}): {exc.error}", field,
                                exc.reason) from None

        return self._run_many([lambda tx, i=i, spec=spec: build(tx, i, spec) for i, spec in enumerate(specs)],
                              f"create {kind.value} batch of {len(specs)}")

    def migrate(self, vm_name: str, destination: str) -> Vm:
        moved = self._run(lambda tx: self._migrate(tx, vm_name, destination), f"migrate vms {vm_name} to {destination}")
        self.wake_migration_stepper()
        return moved

    def move_gateway_role(self, service: str,
                          decide: Callable[[GatewayService], tuple[str, str] | None]) -> GatewayService | None:
        """Move a gateway service's `active` host where `decide(service)` says, with the
        reason it gives, as the same transaction as a PATCH of `active` (records and
        `gateway.active` flip together, every replica publishes the same generations).

        `decide` is asked inside the write session, after this replica caught up with
        the others: on a shared store, under the lock every replica takes. So when two
        replicas decide at once, the second sees the first's move and `decide` answers
        None: the role moves exactly once. None also when nothing is due any more.
        """

        def build(tx: Tx) -> tuple[Any, _Scope]:
            current = self.inventory.get(Kind.gateway_service, service)
            decision = decide(current) if current is not None else None
            if decision is None:
                raise _NotDue
            host, why = decision
            return self._patch(tx, Kind.gateway_service, service, {"active": host}, why=why)

        try:
            return self._run(build, f"move gateway-service {service} active")
        except _NotDue:
            return None

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

        results = self._run_many([lambda tx, i=i, op=op: build(tx, i, op) for i, op in enumerate(operations)],
                                 f"transaction of {len(operations)}", dry_run=dry_run)
        self.wake_migration_stepper()  # it may have migrated VMs
        return results

    def _builder_of(self, operation: Operation) -> Callable[[Tx], tuple[Any, _Scope]]:
        match operation:
            case Create(kind, spec):
                return lambda tx: RULES[kind].create(self, tx, spec)
            case Patch(kind, key, changes):
                return lambda tx: self._patch(tx, kind, key, changes)
            case Delete(kind, key):
                return lambda tx: RULES[kind].delete(self, tx, self._existing(kind, key))
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

        Each operation is applied to the working inventory as soon as it is built, so the
        next one sees it (placement counts, the PA it took); any refusal undoes all of
        them in reverse order. One compile and one commit serve the whole batch.

        Why this order: readers only ever see `inventory.committed`, which `publish`
        replaces after the store commit succeeded; host entries (what watchers and GET
        /state serve) change after that too. So a refused, failed or dry-run transaction
        is never seen by anyone, and the compiler's caches, filled from the working
        state during the trial, are invalidated again by the undo before any other
        compile can use them.
        """
        with self._lock:
            started = time.perf_counter()
            merged, undos, results = Tx(), [], []
            networks: set[str] | None = set()
            hosts_before: set[str] = set()
            hosts_named: set[str] = set()
            try:
                # Why the session first: on a shared store it takes the fabric's lock for
                # every replica, and what others committed before it must be in memory
                # before anything is built on it (allocations stay exactly-once).
                with self.store.write_session() as session:
                    self._apply_revisions(session.revisions_since(self.revision))
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
                    deleted = sorted(hosts_before - existing)
                    changes = merged.changeset(_uuid_of)
                    # The generations this change bumps are committed with it: a controller
                    # that dies right after the commit restarts with both or neither.
                    changes.put_hosts, bumps = self._bumps(states)
                    changes.delete_hosts = deleted
                    revision = session.commit(changes)
            except (sqlite3.IntegrityError, StoreConflict) as exc:
                self._undo(undos, networks)
                raise Conflict("the store refused the change", None, str(exc)) from None
            except StoreBusy as exc:
                self._undo(undos, networks)
                raise _busy(operation, exc) from None
            except BaseException as exc:
                self._undo(undos, networks)
                if isinstance(exc, _DryRunDone):
                    return results
                if isinstance(exc, FabricError):
                    log.info("event=fabric_refused op=%s status=%d field=%s reason=%s", _quoted(operation),
                             exc.status, exc.field, _quoted(exc.reason))
                raise
            if revision is not None:
                self.revision = revision
            bumped = self._publish(merged, states, bumps, deleted)
            log.info("event=fabric_write op=%s compiled=%d bumped=%d duration_ms=%.1f", _quoted(operation),
                     len(states), len(bumped), (time.perf_counter() - started) * 1000)
            return results

    def _undo(self, undos: list[Tx], networks: Any) -> None:
        for undo in reversed(undos):
            self.inventory.apply(undo)
        self.compiler.invalidate(ALL if networks is ALL else networks)

    # --- following the other replicas (shared store) ---------------------------------------------

    def _apply_revisions(self, revisions: list[Revision]) -> set[str]:
        """Make other replicas' committed changes true here, and serve their hosts' new
        states with the generation and digest they committed (read, never recomputed to
        another number). Called under the write lock; returns the hosts it published.

        Why this order: the inventory first (the compile reads it), then each bumped
        host compiled once for the whole batch, then `_publish` (committed view, entries,
        watchers), as for a write of our own.
        """
        if not revisions:
            return set()
        if revisions[0].revision != self.revision + 1:
            # The revisions in between were pruned from the log: reload everything.
            return self._reload(f"revisions {self.revision + 1}..{revisions[0].revision - 1} are no longer in "
                                "the log")
        merged = Tx()
        latest: dict[str, Any] = {}  # host -> its last row in the batch
        deleted: set[str] = set()
        networks: set[str] | None = set()
        for revision in revisions:
            tx = self.inventory.tx_of(revision.changes)
            touched = self._networks_of(tx)
            networks = ALL if touched is ALL or networks is ALL else networks | touched
            self.inventory.apply(tx)
            merged.objects.update(tx.objects)
            merged.leases.update(tx.leases)
            for row in revision.changes.put_hosts:
                latest[row.host] = row
                deleted.discard(row.host)
            for host in revision.changes.delete_hosts:
                latest.pop(host, None)
                deleted.add(host)
        self.compiler.invalidate(networks)
        states, changed = {}, []
        for host, row in sorted(latest.items()):
            if host not in self.inventory.objects[Kind.host]:
                continue
            try:
                state = self.compiler.compile(host)
            except (ValidationError, ValueError) as exc:
                problems = describe_validation_error(exc) if isinstance(exc, ValidationError) else [str(exc)]
                self.unpublishable[host] = problems[0]
                self._last_generation[host] = row.generation
                log.error("event=host_state_invalid host=%s reason=%s", host, _quoted(problems[0]))
                continue
            digest, body = self.compiler.serialise(state)
            if digest != row.digest:
                # Another code version committed it: serve its number, say so.
                log.warning("event=replica_digest_differs host=%s generation=%d committed=%s here=%s",
                            host, row.generation, row.digest, digest)
            states[host] = state
            changed.append((host, state, row.generation, row.digest, body))
        self.revision = revisions[-1].revision
        self._publish(merged, states, changed, sorted(deleted))
        log.info("event=replica_caught_up revision=%d revisions=%d hosts=%d", self.revision, len(revisions),
                 len(changed))
        return set(latest) | deleted

    def _reload(self, why: str) -> set[str]:
        """Replace the in-memory fabric with the store's, serving each host the generation
        and digest the store holds; wakes every watcher (one whose generation did not move
        sends nothing). Under the write lock; the hosts published or removed."""
        log.warning("event=replica_reload revision=%d reason=%s", self.revision, _quoted(why))
        snapshot = self.store.load()
        inventory = Inventory()
        inventory.load(snapshot)
        compiler = Compiler(inventory)
        entries: dict[str, HostEntry] = {}
        for name in inventory.objects[Kind.host]:
            row = snapshot.hosts.get(name)
            try:
                state = compiler.compile(name)
            except (ValidationError, ValueError) as exc:
                problems = describe_validation_error(exc) if isinstance(exc, ValidationError) else [str(exc)]
                self.unpublishable[name] = problems[0]
                continue
            digest, body = compiler.serialise(state)
            generation = row.generation if row is not None else 0
            entries[name] = self._entry(state, generation, row.digest if row else digest, body)
        # Why this order: the new committed view and entries replace the old ones in two
        # assignments, then statuses, then the watchers are woken.
        gone = set(self.entries) - set(entries)
        self.inventory, self.compiler = inventory, compiler
        self.entries = entries
        for name in gone:
            self.applied.pop(name, None)
            self.statuses.pop(name, None)
        for name, row in snapshot.hosts.items():
            self.applied[name] = row.applied_generation
            self.statuses[name] = row.status or {}
        self.revision = snapshot.revision
        hosts = sorted(set(entries) | gone)
        for listener in self._listeners:
            listener(hosts)
        return set(hosts)

    def _networks_of(self, tx: Tx) -> set[str] | None:
        """The VM networks whose compiled records a replayed Tx may change, before it is
        applied (old and new objects both count); ALL for anything wider, as the rules'
        own scopes say (sites, switches, profiles, hosts: rare and cheap)."""
        inventory = self.inventory
        networks: set[str] = set()
        for (kind, key), obj in tx.objects.items():
            if kind == Kind.vm_network.value:
                networks.add(key)
                continue
            if kind not in (Kind.vm.value, Kind.vm_subnet.value, Kind.ip_pool.value):
                return ALL
            for version in (obj, inventory.get(Kind(kind), key)):
                if version is None:
                    continue
                network = getattr(version, "vm_network", None)
                if network is None:
                    return ALL  # an IP pool of a network site
                networks.add(network)
        for (pool, address), lease in tx.leases.items():
            for version in (lease, inventory.leases.get(pool, {}).get(address)):
                if version is not None:
                    if version.vm_network is None:
                        return ALL
                    networks.add(version.vm_network)
        return networks

    def catch_up(self) -> int:
        """Apply every revision other replicas committed since ours; the revision now."""
        with self._lock:
            self._apply_revisions(self.store.revisions_since(self.revision))
            return self.revision

    def refresh_statuses(self) -> None:
        """Agents' reports made through other replicas (the store's rows are the truth)."""
        rows = self.store.host_statuses()
        with self._lock:
            for host, (applied, text) in rows.items():
                if self._status_text.get(host, "") == text or host not in self.entries:
                    continue
                self._status_text[host] = text
                self.applied[host] = applied
                self.statuses[host] = json.loads(text) if text else {}

    def _follow(self, interval: float) -> None:
        """The follower: wake on a NOTIFY or every `interval` s, catch up, read statuses.

        The log is the truth: a lost notification costs one interval. Any store error
        (the database down) is logged once per outage and retried each interval; the
        in-memory fabric keeps serving what was last committed meanwhile.
        """
        failing = False
        polled = 0.0
        while not self._stop.is_set():
            try:
                # Waits of at most a second, so `close` never waits longer than that.
                woken = self.store.wait_for_change(min(interval, 1.0))
                if not woken and time.monotonic() - polled < interval:
                    continue
                polled = time.monotonic()
                self.catch_up()
                self.refresh_statuses()
                if failing:
                    log.info("event=follower_resumed revision=%d", self.revision)
                failing = False
            except StoreBusy as exc:
                if not failing:
                    log.warning("event=follower_waiting reason=%s", _quoted(str(exc)))
                failing = True
                self._stop.wait(interval)
            except Exception as exc:  # noqa: BLE001 - the follower must outlive any one failure
                log.exception("event=follower_error reason=%s", _quoted(f"{type(exc).__name__}: {exc}"))
                self._stop.wait(interval)

    def _affected_hosts(self, scope: _Scope) -> set[str]:
        if scope.networks is ALL:
            return set(self.inventory.objects[Kind.host])
        hosts = set(scope.hosts)
        for network in scope.networks:
            hosts |= self.inventory.hosts_of_network(network)
            # The gateway hosts serving it hold its routing domain and records too.
            hosts |= gateway_hosts_of_network(self.inventory, network)
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

    def _bumps(self, states: dict[str, HostState]) -> tuple[list[HostRow], list[tuple]]:
        """The host rows to commit for hosts whose content changed, and their new entries."""
        rows, changed = [], []
        for name, state in states.items():
            digest, body = self.compiler.serialise(state)
            entry = self.entries.get(name)
            if entry is not None and entry.digest == digest:
                continue
            # Generations only grow, also for a host that had none to publish for a while.
            generation = (entry.generation if entry is not None else self._last_generation.get(name, 0)) + 1
            rows.append(HostRow(name, generation, digest, self.applied.get(name), self.statuses.get(name)))
            changed.append((name, state, generation, digest, body))
        return rows, changed

    def _publish(self, merged: Tx, states: dict[str, HostState], changed: list[tuple],
                 deleted: list[str]) -> list[str]:
        """Make a committed transaction visible: the committed view, the hosts' new
        generations, then wake their watchers.

        Why this order: the generations were committed with the change (`_bumps`), so an
        agent never holds a generation the database does not. New entries are served
        before the committed view lists a new host, and a deleted host leaves the view
        before its entry goes, so a reader listing hosts always finds each one's entry.
        """
        bumped = []
        for name in states:
            self.unpublishable.pop(name, None)
        for name, state, generation, digest, body in changed:
            self._last_generation.pop(name, None)
            self._set_entry(name, state, generation, digest, body)
            bumped.append(name)
        self.inventory.publish(merged)
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
        self.entries[name] = self._entry(state, generation, digest, body)

    def _entry(self, state: HostState, generation: int, digest: str, body: Serialised) -> HostEntry:
        """What watchers are served: the compiled state stamped with its generation and
        this fabric's id (neither is part of the digest)."""
        state = state.model_copy(update={"generation": generation, "fabric": self.fabric_id})
        return HostEntry(generation, digest, state, tuple(body.pieces(generation, self.fabric_id)), time.monotonic())
