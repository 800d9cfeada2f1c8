"""The fabric in memory, with the indexes the compiler and placement need.

The store is the record; this is the controller's working copy, loaded once at start-up.
It has two faces:

- the *working* state (`objects`, `switches`, `leases` and every index): the writer's.
  Only the fabric's engine touches it, under its write lock: it applies each operation's
  `Tx` here as soon as the operation is built (so the next operation of a transaction
  sees it), trial-compiles from it, and undoes the Txs if the trial or the store commit
  fails. It may therefore hold state that is never committed, and nothing but the
  writer may read it;
- the *committed* view (`committed`, a `Committed`): what every reader gets. It is made
  of immutable maps (`immutables.Map`, a hash array mapped trie), replaced as a whole by
  `publish(tx)` only after the store committed that Tx, in one attribute assignment. A
  reader takes `inventory.committed` once and reads a consistent, committed fabric from
  it without any lock, while the writer goes on.

Why persistent maps and not a copy per write: the fabric holds 50,000 VMs and as many
leases at bench scale; copying a dict of either per write costs milliseconds, a
persistent map's update touches a few trie nodes (microseconds) and shares the rest
with the previous version. Measured with `python -m bench convergence --quick` (100
hosts, 5,000 VMs), before and after, back to back on one machine: controller CPU per
migration 11.0 ms both, start-up 0.62 s and 0.55 s CPU, memory 104 and 105 MiB; listing
20,000 VMs costs 10 ms CPU (15 ms before: see `Committed.sorted`).

Indexes are kept per VM network and per host so that a migration touches the VMs of one
VM network, never every VM of the fabric.

`Tx` is one operation's pending change: objects put or deleted, allocations and leases
taken or released. It answers "is this value taken?" for the inventory *and* itself,
so one operation can allocate twice from one space without colliding with itself.

This module owns the in-memory shapes; it must not touch the store or decide fabric
rules (that is `controller.fabric`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import immutables

from controller.models import STORED_CONTEXT, STORED_OF, Kind, Lease, LeaseKind, VirtualSwitch, computed_fields
from controller.store import ChangeSet, Snapshot

VIRTUAL_SWITCH = "virtual-switch"  # the store kind of a host's virtual switch (keyed by host)

SPACE_VSID = "vsid"
SPACE_MAC = "mac"
SPACE_ROUTING_DOMAIN = "routing_domain"


def allocation_int(space: str, value: str) -> int:
    """An allocation's value as the integer the allocators compare ('00:1d:..' -> int)."""
    return int(value.replace(":", ""), 16) if space == SPACE_MAC else int(value)


class TakenView:
    """`in` over a large set of taken values and a Tx's few pending ones, without copying."""

    def __init__(self, taken: set[int], pending: set[int]):
        self.taken, self.pending = taken, pending

    def __contains__(self, value: object) -> bool:
        return value in self.taken or value in self.pending

    def __len__(self) -> int:
        return len(self.taken) + len(self.pending)


@dataclass
class Tx:
    objects: dict[tuple[str, str], Any] = field(default_factory=dict)  # None = delete
    allocations: dict[tuple[str, str], str | None] = field(default_factory=dict)  # None = free
    leases: dict[tuple[str, str], Lease | None] = field(default_factory=dict)  # None = release
    retaken: set[tuple[str, str]] = field(default_factory=set)

    def put(self, kind: str, key: str, obj: Any) -> None:
        self.objects[(str(kind), key)] = obj

    def delete(self, kind: str, key: str) -> None:
        self.objects[(str(kind), key)] = None

    def take(self, space: str, value: str, holder: str) -> None:
        self.allocations[(space, value)] = holder

    def free(self, space: str, value: str) -> None:
        self.allocations[(space, value)] = None

    def lease(self, lease: Lease) -> None:
        self.leases[(lease.pool, str(lease.address))] = lease

    def release(self, lease: Lease) -> None:
        self.leases[(lease.pool, str(lease.address))] = None

    def merge(self, later: Tx) -> None:
        """Fold a later Tx into this one: per key, the later value wins."""
        self.objects.update(later.objects)
        for key, holder in later.allocations.items():
            # Freed earlier in this Tx, taken again later: the store must delete the old
            # row before inserting the new one (allocations are plain INSERTs).
            if holder is not None and key in self.allocations and self.allocations[key] is None:
                self.retaken.add(key)
            self.allocations[key] = holder
        self.leases.update(later.leases)

    def pending_ints(self, space: str) -> set[int]:
        return {allocation_int(s, value) for (s, value), holder in self.allocations.items() if s == space and holder}

    def pending_addresses(self, pool: str) -> set[int]:
        return {int(lease.address) for (p, _), lease in self.leases.items() if p == pool and lease is not None}

    def changeset(self, uuid_of) -> ChangeSet:
        changes = ChangeSet()
        for (kind, key), obj in self.objects.items():
            if obj is None:
                changes.delete_objects.add((kind, key))
            else:
                doc = obj.model_dump_json(exclude=computed_fields(obj))
                changes.put_objects[(kind, key)] = (uuid_of(kind, key, obj), doc)
        for (space, value), holder in self.allocations.items():
            if holder is None:
                changes.delete_allocations.add((space, value))
            else:
                changes.put_allocations[(space, value)] = holder
                if (space, value) in self.retaken:
                    changes.delete_allocations.add((space, value))
        for (pool, address), lease in self.leases.items():
            if lease is None:
                changes.delete_leases.add((pool, address))
            else:
                changes.put_leases[(pool, address)] = lease.model_dump_json()
        return changes


@dataclass(frozen=True)
class Committed:
    """The fabric as of the last store commit; immutable, so readers need no lock."""

    objects: dict[Kind, immutables.Map]  # kind -> key -> object (the dict is never changed)
    switches: immutables.Map  # host -> its VirtualSwitch
    leases: immutables.Map  # pool key -> immutables.Map(address text -> Lease)
    allocation_counts: dict[str, int]  # space -> values taken

    def get(self, kind: Kind, key: str) -> Any | None:
        return self.objects[kind].get(key)

    def all(self, kind: Kind) -> list[Any]:
        return list(self.objects[kind].values())

    def sorted(self, kind: Kind) -> list[Any]:
        """Every object of a kind in key order. The keys alone are sorted (plain strings)
        and looked up: a trie iterates in hash order, and sorting (key, object) pairs or
        by `obj.key` (a computed property) costs two to three times as much at 20,000 VMs."""
        objects = self.objects[kind]
        return [objects[key] for key in sorted(objects.keys())]


EMPTY = immutables.Map()


class Inventory:
    def __init__(self) -> None:
        self.objects: dict[Kind, dict[str, Any]] = {kind: {} for kind in Kind}
        self.switches: dict[str, VirtualSwitch] = {}
        self.allocations: dict[str, dict[str, str]] = defaultdict(dict)
        self.allocated_ints: dict[str, set[int]] = defaultdict(set)  # the same, as integers
        self.leases: dict[str, dict[str, Lease]] = defaultdict(dict)  # pool -> address -> lease
        self.pool_taken: dict[str, set[int]] = defaultdict(set)
        self.pool_hint: dict[str, int] = {}
        self.mac_hint: int | None = None
        # indexes
        self.vms_by_network: dict[str, set[str]] = defaultdict(set)
        self.vms_by_host: dict[str, set[str]] = defaultdict(set)
        self.network_hosts: dict[str, Counter[str]] = defaultdict(Counter)
        self.subnets_by_network: dict[str, list[str]] = defaultdict(list)
        self.pools_by_owner: dict[str, list[str]] = defaultdict(list)  # site name / VM subnet key
        self.pa_leases: dict[tuple[str, str], Lease] = {}  # (host, VM network) -> PA lease
        self.leases_by_holder: dict[str, list[Lease]] = defaultdict(list)  # 'vm:X' / 'host:Y'
        # VM network -> its VMs with a migration in progress (controller.fabric.migrations)
        self.migrating: dict[str, set[str]] = {}
        self.committed = Committed({kind: EMPTY for kind in Kind}, EMPTY, EMPTY, {})

    # --- reads ----------------------------------------------------------------------------

    def get(self, kind: Kind, key: str) -> Any | None:
        return self.objects[kind].get(key)

    def all(self, kind: Kind) -> list[Any]:
        return list(self.objects[kind].values())

    def taken(self, space: str) -> dict[str, str]:
        return self.allocations[space]

    def vms_of_network(self, network: str) -> Iterator[Any]:
        vms = self.objects[Kind.vm]
        for name in sorted(self.vms_by_network.get(network, ())):
            yield vms[name]

    def hosts_of_network(self, network: str) -> set[str]:
        """Hosts holding the VM network: those with a VM of it, and the sources of its
        migrations in progress (they keep forwarding to the VM's new host)."""
        hosts = {host for host, count in self.network_hosts.get(network, {}).items() if count > 0}
        return hosts | self.migration_sources(network)

    def migrations_of_network(self, network: str) -> list[Any]:
        """The VM network's VMs with a migration in progress, by name."""
        vms = self.objects[Kind.vm]
        return [vms[name] for name in sorted(self.migrating.get(network, ()))]

    def migration_sources(self, network: str) -> set[str]:
        return {vm.migration.source for vm in self.migrations_of_network(network)}

    def migrations_from(self, host: str) -> list[Any]:
        """The VMs whose migration in progress left `host` (few: a scan of those in progress)."""
        return [vm for network in sorted(self.migrating) for vm in self.migrations_of_network(network)
                if vm.migration.source == host]

    def networks_migrating_from(self, host: str) -> set[str]:
        """VM networks a migration in progress left `host` in."""
        return {vm.vm_network for vm in self.migrations_from(host)}

    def holds_network(self, host: str, network: str, leaving_vms: int = 0, leaving_migrations: int = 0) -> bool:
        """Does the host hold the VM network (a VM of it there, or a migration from there),
        not counting `leaving_vms` of its VMs and `leaving_migrations` of its migrations?"""
        vms = self.network_hosts.get(network, {}).get(host, 0) - leaving_vms
        migrations = sum(1 for vm in self.migrations_of_network(network) if vm.migration.source == host)
        return vms > 0 or migrations - leaving_migrations > 0

    # --- the committed view ---------------------------------------------------------------

    def publish(self, tx: Tx) -> None:
        """Make what `tx` touched visible to readers, after the store committed it.

        Each touched key takes its value from the working state (which holds the Tx
        applied), so the committed view equals the working state on every committed key;
        untouched keys keep sharing the previous version's trie nodes.
        """
        base = self.committed
        objects = dict(base.objects)
        changing: dict[Kind, Any] = {}
        switches = base.switches.mutate()
        for kind, key in tx.objects:
            if kind == VIRTUAL_SWITCH:
                _set_or_drop(switches, key, self.switches.get(key))
                continue
            kind = Kind(kind)
            if kind not in changing:
                changing[kind] = objects[kind].mutate()
            _set_or_drop(changing[kind], key, self.objects[kind].get(key))
        for kind, mutation in changing.items():
            objects[kind] = mutation.finish()
        pools: dict[str, Any] = {}
        for pool, address in tx.leases:
            if pool not in pools:
                pools[pool] = base.leases.get(pool, EMPTY).mutate()
            _set_or_drop(pools[pool], address, self.leases[pool].get(address))
        leases = base.leases.mutate()
        for pool, mutation in pools.items():
            _set_or_drop(leases, pool, mutation.finish() or None)
        counts = {space: len(values) for space, values in self.allocations.items()}
        self.committed = Committed(objects, switches.finish(), leases.finish(), counts)

    def publish_all(self) -> None:
        """The committed view rebuilt from the whole working state (at start-up)."""
        self.committed = Committed(
            {kind: immutables.Map(self.objects[kind]) for kind in Kind},
            immutables.Map(self.switches),
            immutables.Map({pool: immutables.Map(held) for pool, held in self.leases.items() if held}),
            {space: len(values) for space, values in self.allocations.items()},
        )

    # --- writes ---------------------------------------------------------------------------

    def apply(self, tx: Tx) -> None:
        """Make a committed Tx true in memory (deletes before puts, like the store)."""
        for (kind, key), obj in tx.objects.items():
            if obj is None:
                self._remove_object(kind, key)
        for (kind, key), obj in tx.objects.items():
            if obj is not None:
                self._put_object(kind, key, obj)
        for (space, value), holder in tx.allocations.items():
            if holder is None:
                if self.allocations[space].pop(value, None) is not None:
                    self.allocated_ints[space].discard(allocation_int(space, value))
        for (space, value), holder in tx.allocations.items():
            if holder is not None:
                self.allocations[space][value] = holder
                self.allocated_ints[space].add(allocation_int(space, value))
        for (pool, address), lease in tx.leases.items():
            if lease is None:
                self._remove_lease(pool, address)
        for (pool, address), lease in tx.leases.items():
            if lease is not None:
                self._put_lease(lease)

    def load(self, snapshot: Snapshot) -> None:
        tx = Tx()
        for kind, key, _uuid, doc in snapshot.objects:
            tx.put(kind, key, _stored_object(kind, doc))
        for space, value, holder in snapshot.allocations:
            tx.take(space, value, holder)
        for _pool, _address, doc in snapshot.leases:
            tx.lease(Lease.model_validate_json(doc))
        self.apply(tx)
        self.publish_all()

    @staticmethod
    def tx_of(changes: ChangeSet) -> Tx:
        """The Tx of a change set another controller replica committed (read back from
        the revision log), to `apply` and `publish` here. Deletes go in first, so a key
        deleted and put again in one change set ends put."""
        tx = Tx()
        for kind, key in changes.delete_objects:
            tx.delete(kind, key)
        for (kind, key), (_uuid, doc) in changes.put_objects.items():
            tx.put(kind, key, _stored_object(kind, doc))
        for space, value in changes.delete_allocations:
            tx.free(space, value)
        for (space, value), holder in changes.put_allocations.items():
            tx.take(space, value, holder)
        for pool, address in changes.delete_leases:
            tx.leases[(pool, address)] = None
        for (pool, address), doc in changes.put_leases.items():
            tx.leases[(pool, address)] = Lease.model_validate_json(doc)
        return tx

    def _put_object(self, kind: str, key: str, obj: Any) -> None:
        if kind == VIRTUAL_SWITCH:
            self.switches[key] = obj
            return
        kind = Kind(kind)
        self._remove_object(kind, key)
        self.objects[kind][key] = obj
        if kind is Kind.vm:
            self.vms_by_network[obj.vm_network].add(key)
            self.vms_by_host[obj.host].add(key)
            self.network_hosts[obj.vm_network][obj.host] += 1
            if obj.migration is not None:
                self.migrating.setdefault(obj.vm_network, set()).add(key)
        elif kind is Kind.vm_subnet:
            self.subnets_by_network[obj.vm_network].append(key)
        elif kind is Kind.ip_pool:
            owner = obj.network_site if obj.network_site is not None else f"{obj.vm_network}/{obj.vm_subnet}"
            self.pools_by_owner[owner].append(key)

    def _remove_object(self, kind: str, key: str) -> None:
        if kind == VIRTUAL_SWITCH:
            self.switches.pop(key, None)
            return
        kind = Kind(kind)
        old = self.objects[kind].pop(key, None)
        if old is None:
            return
        if kind is Kind.vm:
            self.vms_by_network[old.vm_network].discard(key)
            self.vms_by_host[old.host].discard(key)
            counter = self.network_hosts[old.vm_network]
            counter[old.host] -= 1
            if counter[old.host] <= 0:
                del counter[old.host]
            migrating = self.migrating.get(old.vm_network)
            if migrating is not None:
                migrating.discard(key)
                if not migrating:
                    del self.migrating[old.vm_network]
        elif kind is Kind.vm_subnet:
            self.subnets_by_network[old.vm_network].remove(key)
        elif kind is Kind.ip_pool:
            owner = old.network_site if old.network_site is not None else f"{old.vm_network}/{old.vm_subnet}"
            self.pools_by_owner[owner].remove(key)

    def _put_lease(self, lease: Lease) -> None:
        address = str(lease.address)
        self._remove_lease(lease.pool, address)
        self.leases[lease.pool][address] = lease
        self.pool_taken[lease.pool].add(int(lease.address))
        self.leases_by_holder[f"{lease.holder_kind}:{lease.holder}"].append(lease)
        if lease.kind is LeaseKind.PA and lease.host and lease.vm_network:
            self.pa_leases[(lease.host, lease.vm_network)] = lease

    def _remove_lease(self, pool: str, address: str) -> None:
        old = self.leases[pool].pop(address, None)
        if old is None:
            return
        self.pool_taken[pool].discard(int(old.address))
        held = self.leases_by_holder[f"{old.holder_kind}:{old.holder}"]
        held[:] = [lease for lease in held if not (lease.pool == pool and str(lease.address) == address)]
        if old.kind is LeaseKind.PA and self.pa_leases.get((old.host, old.vm_network)) == old:
            del self.pa_leases[(old.host, old.vm_network)]


def _stored_object(kind: str, doc: str) -> Any:
    # STORED_CONTEXT: what was valid when it was stored still loads (see models).
    if kind == VIRTUAL_SWITCH:
        return VirtualSwitch.model_validate_json(doc, context=STORED_CONTEXT)
    return STORED_OF[Kind(kind)].model_validate_json(doc, context=STORED_CONTEXT)


def _set_or_drop(mutation: Any, key: str, value: Any) -> None:
    if value is None:
        mutation.pop(key, None)
    else:
        mutation[key] = value
