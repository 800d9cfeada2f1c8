"""hnvctl's commands over the controller's objects: one function per verb.

`cmd_<verb>(ctx, args) -> exit code`: read the parsed flags, make the request through
`controller.client`, print through `ctx.out` (`controller.hnvctl.output`). A refusal
raises (UsageError, or the client's ApiRefused/ControllerUnavailable) and `cli.main`
turns it into one line on stderr and the exit code. The apply command is
`controller.hnvctl.apply`'s.

Owns what each command asks and says; parsing is `cli`'s, the look `output`'s.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from agent.state import VSID_MAX, VSID_MIN
from agent.text import describe_validation_error
from controller.client import ControllerClient, ControllerUnavailable, parse_answer
from controller.fabric_document import VirtualSwitchDoc, label
from controller.hnvctl.flags import (
    EXIT_OK,
    UsageError,
    flag_of,
    flag_problem,
    flags_given,
    object_fields,
    validate_flags,
)
from controller.hnvctl.output import COLUMNS, HOSTS_COLUMNS, IP_COLUMNS, LOOKUP_COLUMNS, Output
from controller.models import SPEC_OF, STORED_OF, Kind, key_of


def _with_keys(kind: Kind, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row its key (the controller sends one; older ones may not)."""
    for row in rows:
        row.setdefault("key", key_of(kind, parse_answer(STORED_OF[kind], row)))
    return rows


@dataclass
class Context:
    client_factory: Callable[[], ControllerClient]
    out: Output
    _client: ControllerClient | None = None

    @property
    def client(self) -> ControllerClient:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def cmd_create(ctx: Context, args: argparse.Namespace) -> int:
    kind: Kind = args.kind
    spec = validate_flags(kind, {"name": args.name, **flags_given(args, kind)})
    created = ctx.client.create(kind, spec)
    if ctx.out.fmt == "json":
        ctx.out.emit(created)
        return EXIT_OK
    key = key_of(kind, spec)
    message = f"created {label(kind, key)}"
    if kind is Kind.vm:
        placed = "placed on" if spec.host is None else "on"
        message += f" {placed} {created.get('host')} (CA {created.get('ca')}, MAC {created.get('mac')})"
        if created.get("tap_device"):
            message += f", tap {created['tap_device']}"
    elif kind is Kind.vm_subnet and created.get("vsid") is not None:
        message += f" (VSID {created['vsid']})"
    ctx.out.say(message)
    return EXIT_OK


def with_active_host(ctx: Context, kind: Kind, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A gateway's rows with where its traffic goes now: its service's active host, and
    when and why that last moved (a failover or an operator), as the service records it."""
    if kind is not Kind.gateway or not rows:
        return rows
    services = {service["name"]: service for service in ctx.client.list_json(Kind.gateway_service)}
    for row in rows:
        service = services.get(row.get("gateway_service"), {})
        row["active_host"] = service.get("active")
        row["active_since"] = service.get("active_since")
        row["active_reason"] = service.get("active_reason")
    return rows


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    kind: Kind = args.kind
    filters = dict(args.filter or [])
    rows = with_active_host(ctx, kind, _with_keys(kind, ctx.client.list_json(kind, **filters)))
    ctx.out.emit(rows, COLUMNS[kind])
    return EXIT_OK


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    kind: Kind = args.kind
    ctx.out.emit(with_active_host(ctx, kind, [ctx.client.get_json(kind, args.name)])[0])
    return EXIT_OK


def cmd_set(ctx: Context, args: argparse.Namespace) -> int:
    kind: Kind = args.kind
    changes = flags_given(args, kind)
    if not changes:
        raise UsageError(f"{kind.label} {args.name}: nothing to set (give at least one flag)")
    patchable = SPEC_OF[kind].patchable
    fixed = [name for name in changes if name not in patchable]
    if kind is Kind.vm and fixed == ["host"]:
        raise UsageError(f"VM {args.name}: --host: a VM changes host by migration: hnvctl vm migrate {args.name} --host HOST")
    if fixed:
        raise UsageError(
            f"{kind.label} {args.name}: {flag_of(fixed[0])}: {to_camel(fixed[0])} cannot change after "
            f"create (changeable: {', '.join(flag_of(n) for n in sorted(patchable))})"
        )
    current = ctx.client.get_json(kind, args.name)
    stated = {name: value for name, value in current.items() if name in object_fields(kind) or name == "name"}
    validate_flags(kind, {**stated, **changes})
    updated = ctx.client.update(kind, args.name, changes)
    if ctx.out.fmt == "json":
        ctx.out.emit(updated)
    else:
        ctx.out.say(f"changed {label(kind, args.name)}: {', '.join(to_camel(n) for n in changes)}")
    return EXIT_OK


def cmd_delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.client.delete(args.kind, args.name)
    ctx.out.say(f"deleted {label(args.kind, args.name)}")
    if ctx.out.fmt == "json":
        ctx.out.emit({"deleted": args.name, "kind": args.kind.value})
    return EXIT_OK


def cmd_set_switch(ctx: Context, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"logical_switch": args.logical_switch}
    if args.nic:
        body["nics"] = args.nic
    if args.uplink_port_profile:
        body["uplink_port_profile"] = args.uplink_port_profile
    if args.management_vm_network:
        body["management_adapter"] = {"name": args.management_adapter_name, "vm_network": args.management_vm_network}
    try:
        VirtualSwitchDoc.model_validate(body)  # the document's own checks
    except ValidationError as exc:
        raise UsageError(f"host {args.host}: virtual switch: {flag_problem(describe_validation_error(exc, camel=True)[0])}") from None
    switch = ctx.client.set_virtual_switch(args.host, body)
    if ctx.out.fmt == "json":
        ctx.out.emit(switch.model_dump(mode="json"))
    else:
        adapter = f", management adapter on {args.management_vm_network}" if args.management_vm_network else ""
        ctx.out.say(
            f"host {args.host}: virtual switch {switch.logical_switch} over {', '.join(switch.nics)} "
            f"(uplink port profile {switch.uplink_port_profile}{adapter})"
        )
    return EXIT_OK


def cmd_remove_switch(ctx: Context, args: argparse.Namespace) -> int:
    ctx.client.delete_virtual_switch(args.host)
    ctx.out.say(f"host {args.host}: virtual switch removed")
    return EXIT_OK


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> int:
    vm = ctx.client.migrate_vm(args.name, args.host)
    if ctx.out.fmt == "json":
        ctx.out.emit(vm.model_dump(mode="json"))
    else:
        staged = (f"; staged: {vm.migration.source} forwards to it until the other hosts follow"
                  if vm.migration is not None else "")
        ctx.out.say(f"VM {vm.name} now on {vm.host} (CA {vm.ca}, MAC {vm.mac}){staged}")
    return EXIT_OK


def cmd_ip_list(ctx: Context, args: argparse.Namespace) -> int:
    leases = ctx.client.ip_addresses(pool=args.pool, kind=args.kind, host=args.host, vm_network=args.vm_network)
    ctx.out.emit([lease.model_dump(mode="json") for lease in leases], IP_COLUMNS)
    return EXIT_OK


def cmd_lookup_records(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.client.lookup_records(args.host)
    if args.vsid is not None:
        records = [r for r in records if r.vsid == args.vsid]
    ctx.out.emit([record.model_dump(mode="json") for record in records], LOOKUP_COLUMNS)
    return EXIT_OK


def cmd_hosts(ctx: Context, args: argparse.Namespace) -> int:
    if args.wait is None:
        ctx.out.emit([host.model_dump(mode="json") for host in ctx.client.hosts()], HOSTS_COLUMNS)
        return EXIT_OK
    in_sync, rows = ctx.client.wait_in_sync(args.host, timeout=args.wait)
    ctx.out.emit([host.model_dump(mode="json") for host in rows], HOSTS_COLUMNS)
    if in_sync:
        return EXIT_OK
    behind = [f"{row.name} ({row.sync}: {row.reason})" for row in rows if row.sync != "InSync"]
    raise ControllerUnavailable(f"not in sync after {args.wait:g} s: {'; '.join(behind)}")


def cmd_host_state(ctx: Context, args: argparse.Namespace) -> int:
    """The HostState the controller compiled for a host: what its agent is told to hold."""
    state = ctx.client.host_state(args.host)
    ctx.out.json(state.model_dump(mode="json"))
    return EXIT_OK


def vsid_argument(text: str) -> int:
    if not text.isdigit() or not VSID_MIN <= int(text) <= VSID_MAX:
        raise argparse.ArgumentTypeError(
            f"VSID {text!r} is not a number in {VSID_MIN}..{VSID_MAX} (RFC 7637 reserves 0..0xFFF and 0xFFFFFF)"
        )
    return int(text)
