"""What every part of the fabric shares: scopes, refusals' helpers, the builders' toolkit.

`Builders` is the base of the rule mixins (`controller.fabric.hosts`, `.networks`,
`.tenants`, `.patch`), whose builders check a request against the working inventory and
put its changes into a `Tx`, never committing (that is the engine, which finds them in
its `RULES` table). Builders gives them lookups in the *working* inventory (never the
committed view: an operation must see the ones before it in its transaction) and the
allocation helpers every rule uses (objects, MACs, leases). `KindRules` is one row of the engine's registry
(kind -> create and delete builders).

Owns no state; must not touch the store (that is the engine, `controller.fabric.engine`).
"""

from __future__ import annotations

from agent.logfmt import quote

import ipaddress
import logging
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from controller.allocate import allocate_address, allocate_mac, mac_text
from controller.inventory import SPACE_MAC, VIRTUAL_SWITCH, Inventory, TakenView, Tx
from controller.models import STORED_OF, Conflict, FabricError, IpPool, Kind, Lease, LeaseKind, NotFound
from controller.store import StoreBusy, StoreUnavailable

ALL = None  # scope: every host
log = logging.getLogger("openhnv.controller.fabric")


@dataclass
class _Scope:
    networks: set[str] | None = field(default_factory=set)  # None: every host, all caches
    hosts: set[str] = field(default_factory=set)


# A builder: (transaction, input) -> (result, scope of hosts whose state it may change).
Builder = Callable[..., tuple[Any, _Scope]]


@dataclass(frozen=True)
class KindRules:
    """How one kind is created and deleted: `create(fabric, tx, spec)`, `delete(fabric, tx, obj)`."""

    create: Builder
    delete: Builder


class Unavailable(FabricError):
    """Cannot be served now, try again later: 503 (with Retry-After when `retry_after`).

    The object's stored state does not compile, or the database was busy (another
    process held its write lock past the busy timeout; nothing was changed)."""

    status = 503

    def __init__(self, error: str, field: str | None = None, reason: str | None = None,
                 retry_after: int | None = None):
        super().__init__(error, field, reason)
        self.retry_after = retry_after


RETRY_AFTER_BUSY_S = 1  # what a 503 for a busy database asks the client to wait


def _busy(what: str, exc: StoreBusy) -> Unavailable:
    if isinstance(exc, StoreUnavailable):
        return Unavailable(f"{what}: the controller's database is unreachable; nothing was changed", None,
                           str(exc), retry_after=RETRY_AFTER_BUSY_S)
    return Unavailable(f"{what}: the controller's database is busy; nothing was changed", None,
                       f"another process holds the database's write lock ({exc})",
                       retry_after=RETRY_AFTER_BUSY_S)


class Builders:
    """The toolkit of every rule mixin; `Fabric` provides `inventory`."""

    inventory: Inventory

    def _existing(self, kind: Kind, key: str) -> Any:
        obj = self.inventory.get(kind, key)
        if obj is None:
            raise NotFound(f"{kind.label} {key} does not exist", "name", f"no {kind.label} is called {key}")
        return obj

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
                    host: str | None, vm_network: str | None, description: str, address=None,
                    also_skip=(), field: str = "ca") -> Lease:
        taken = TakenView(self.inventory.pool_taken[pool.key], tx.pending_addresses(pool.key))
        if address is None:
            address = allocate_address(pool.key, pool.range_start, pool.range_end, taken,
                                       _skipped(pool) | set(also_skip), self.inventory.pool_hint.get(pool.key))
            self.inventory.pool_hint[pool.key] = int(address) + 1
        elif int(address) in taken:
            holder_of = self.inventory.leases[pool.key].get(str(address))
            raise Conflict(
                f"address {address} of IP pool {pool.key} is already leased",
                field,
                f"held by {holder_of.holder if holder_of else 'another object'}",
            )
        lease = Lease(address=address, pool=pool.key, kind=kind, holder_kind=holder_kind, holder=holder,
                      host=host, vm_network=vm_network, description=description)
        tx.lease(lease)
        return lease

    def _release_held(self, tx: Tx, holder_kind: str, holder: str, kind: LeaseKind | None = None) -> None:
        for lease in list(self.inventory.leases_by_holder.get(f"{holder_kind}:{holder}", ())):
            if kind is None or lease.kind == kind:
                tx.release(lease)


def _refuse_in_use(kind: Kind, key: str, users: list[str], noun: str = "users") -> None:
    if users:
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise Conflict(f"{kind.label} {key} is in use", "name", f"still used by {shown}" if noun == "users"
                       else f"it still has {len(users)} {noun}: {shown}")


def _skipped(pool: IpPool) -> set:
    """Addresses of the pool's range it never hands out: reserved, its gateway, and the
    network and (IPv4) broadcast addresses of its subnet."""
    skip = set(pool.reserved)
    if pool.gateway is not None:
        skip.add(pool.gateway)
    if pool.subnet.num_addresses > 2:
        skip.add(pool.subnet.network_address)
        if pool.subnet.version == 4:
            skip.add(pool.subnet.broadcast_address)
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
    """A logfmt value (agent.logfmt's one quoting), so a line stays one event of key=value
    pairs whatever a request's names and reasons hold."""
    return quote(text)


def _uuid_of(kind: str, key: str, obj: Any) -> str:
    if kind == VIRTUAL_SWITCH:
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"openhnv:virtual-switch:{key}"))
    return obj.uuid
