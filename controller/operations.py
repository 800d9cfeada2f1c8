"""Fabric operations as data: what one transaction of `Fabric.transact` is made of.

The REST routes, the server-side fabric apply and the tests all describe a change as a
list of these; `Fabric.transact(operations, dry_run=...)` runs the list as ONE
transaction (all or nothing) and answers one result per operation. A dry run builds and
trial-compiles exactly what a real run would, then undoes it: nothing is committed or
published.

This module owns the shapes only; the rules are `controller.fabric`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from pydantic import BaseModel

from controller.models import Kind, VirtualSwitchSpec


@dataclass(frozen=True)
class Create:
    kind: Kind
    spec: BaseModel


@dataclass(frozen=True)
class Patch:
    kind: Kind
    key: str
    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Delete:
    kind: Kind
    key: str


@dataclass(frozen=True)
class SetVirtualSwitch:
    host: str
    spec: VirtualSwitchSpec


@dataclass(frozen=True)
class RemoveVirtualSwitch:
    host: str


@dataclass(frozen=True)
class Migrate:
    vm: str
    host: str


Operation = Union[Create, Patch, Delete, SetVirtualSwitch, RemoveVirtualSwitch, Migrate]


def describe(operation: Operation) -> str:
    """'create vms TenantVM01', 'migrate vms TenantVM01 to CON-HyperV7': for logs and errors."""
    match operation:
        case Create(kind, spec):
            return f"create {kind.value} {getattr(spec, 'name', '')}".rstrip()
        case Patch(kind, key):
            return f"patch {kind.value} {key}"
        case Delete(kind, key):
            return f"delete {kind.value} {key}"
        case SetVirtualSwitch(host):
            return f"set virtual-switch {host}"
        case RemoveVirtualSwitch(host):
            return f"delete virtual-switch {host}"
        case Migrate(vm, host):
            return f"migrate vms {vm} to {host}"
    raise TypeError(f"not a fabric operation: {operation!r}")
