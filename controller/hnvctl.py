"""hnvctl: the command line over the controller's REST API (what the VMM cmdlets are).

    hnvctl <object> create|list|show|set|delete ...   one verb group per fabric object
    hnvctl host set-switch HOST --logical-switch X --nic eth0 --nic eth1 \\
        --management-vm-network Management             New-SCVirtualNetwork
    hnvctl vm create|migrate|delete ...                New-/Move-/Remove-SCVirtualMachine
    hnvctl ip list [--pool P] [--kind CA|PA] [--host H] Get-SCIPAddress
    hnvctl lookup-records --host H                      Get-NetVirtualizationLookupRecord
    hnvctl hosts [--wait S]                             hosts and their sync status
    hnvctl host state HOST                              the HostState compiled for HOST
    hnvctl apply -f fabric.yaml [--dry-run] [--prune]   the whole fabric, declaratively

Output is a table (Format-Table style) or, with `-o json`, JSON for scripts. Exit codes:
0 done; 2 bad input (an argument, a document, or a 4xx from the controller), with one
line on stderr naming the object, the field and the reason, and nothing changed; 1 the
controller could not be reached or failed (5xx).

This module owns the command line: parsing, formatting, and running a fabric plan
(`apply_fabric`, also for in-process use by the lab). The document's rules are
`controller.fabric_yaml`'s; HTTP is `controller.client`'s. It prints; nothing else here
does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, TextIO

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel, to_pascal

from agent.state import VSID_MAX, VSID_MIN
from controller.client import (
    DEFAULT_CONTROLLER,
    ApiRefused,
    ControllerClient,
    ControllerError,
    ControllerUnavailable,
    parse_answer,
    read_ca_file,
    read_token,
)
from controller.fabric_yaml import (
    DOCUMENT_MODEL,
    Change,
    FabricDocument,
    FabricError,
    VirtualSwitchDoc,
    check_references,
    describe_validation_error,
    label,
    load_fabric,
    plan_changes,
    validate_object,
)
from controller.models import SPEC_OF, STORED_OF, Kind, key_of

EXIT_OK, EXIT_UNAVAILABLE, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """A command line that cannot run: one line, exit 2."""


# --- output ------------------------------------------------------------------------------


def format_value(value: Any, nested: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, dict):
        if set(value) == {"subnet", "vlan"}:
            return f"{value['subnet']}:{value['vlan']}"
        text = ", ".join(f"{to_pascal(k)}={format_value(v, True)}" for k, v in value.items() if v not in (None, ""))
        return "{" + text + "}" if nested else text
    if isinstance(value, (list, tuple)):
        text = ", ".join(format_value(v, True) for v in value)
        return "[" + text + "]" if nested else text
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Aligned columns under a header and a dashes line, as PowerShell's Format-Table."""
    cells = [[format_value(_field(row, field)) for field, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return " ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    out = [line(headers), line(["-" * len(h) for h in headers])]
    out += [line(values) for values in cells]
    return "\n".join(out)


def _field(row: dict[str, Any], path: str) -> Any:
    """row['virtual_switch']['logical_switch'] for 'virtual_switch.logical_switch'."""
    value: Any = row
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_list(obj: dict[str, Any]) -> str:
    """Name : value lines, as PowerShell's Format-List."""
    width = max((len(to_pascal(k)) for k in obj), default=0)
    return "\n".join(f"{to_pascal(k).ljust(width)} : {format_value(v)}" for k, v in obj.items())


# Table columns per kind: (JSON field, header).
COLUMNS: dict[Kind, list[tuple[str, str]]] = {
    Kind.host_group: [("name", "Name"), ("parent", "ParentHostGroup"), ("description", "Description")],
    Kind.cluster: [("name", "Name"), ("host_group", "HostGroup")],
    Kind.host: [
        ("name", "Name"),
        ("cluster", "Cluster"),
        ("host_group", "HostGroup"),
        ("management_address", "ManagementAddress"),
        ("nics", "NICs"),
        ("virtual_switch.logical_switch", "LogicalSwitch"),
    ],
    Kind.logical_network: [
        ("name", "Name"),
        ("network_virtualization", "NetworkVirtualization"),
        ("encapsulation", "Encapsulation"),
        ("mtu", "MTU"),
    ],
    Kind.network_site: [
        ("name", "Name"),
        ("logical_network", "LogicalNetwork"),
        ("host_groups", "HostGroups"),
        ("subnet_vlans", "SubnetVLans"),
    ],
    Kind.ip_pool: [
        ("key", "Pool"),
        ("subnet", "Subnet"),
        ("range_start", "IPAddressRangeStart"),
        ("range_end", "IPAddressRangeEnd"),
        ("gateway", "Gateway"),
    ],
    Kind.uplink_port_profile: [
        ("name", "Name"),
        ("network_sites", "NetworkSites"),
        ("network_virtualization", "NetworkVirtualization"),
        ("team_mode", "TeamMode"),
        ("load_balancing", "LoadBalancing"),
    ],
    Kind.logical_switch: [("name", "Name"), ("uplink_mode", "UplinkMode"), ("uplink_port_profiles", "UplinkPortProfiles")],
    Kind.vm_network: [
        ("name", "Name"),
        ("logical_network", "LogicalNetwork"),
        ("isolation", "IsolationType"),
        ("ca_family", "CAFamily"),
    ],
    Kind.vm_subnet: [
        ("key", "VMSubnet"),
        ("prefix", "Subnet"),
        ("vsid", "VSID"),
        ("vlan", "VLan"),
        ("gateway_mac", "GatewayMAC"),
    ],
    Kind.vm: [
        ("name", "Name"),
        ("vm_network", "VMNetwork"),
        ("vm_subnet", "VMSubnet"),
        ("host", "VMHost"),
        ("ca", "IPv4Address"),
        ("mac", "MACAddress"),
    ],
}
IP_COLUMNS = [
    ("address", "Address"),
    ("pool", "Pool"),
    ("kind", "Kind"),
    ("holder", "HeldBy"),
    ("description", "Description"),
]
LOOKUP_COLUMNS = [
    ("ca", "CustomerAddress"),
    ("vsid", "VirtualSubnetID"),
    ("mac", "MACAddress"),
    ("pa", "ProviderAddress"),
    ("type", "Type"),
    ("vm_name", "VMName"),
]
HOSTS_COLUMNS = [
    ("name", "Name"),
    ("cluster", "Cluster"),
    ("sync", "Sync"),
    ("desired_generation", "Desired"),
    ("applied_generation", "Applied"),
    ("reason", "Reason"),
]


@dataclass
class Output:
    """Where and how a command prints."""

    fmt: str
    stdout: TextIO

    def emit(self, data: Any, columns: list[tuple[str, str]] | None = None, text: str | None = None) -> None:
        if self.fmt == "json":
            print(json.dumps(data, indent=2, default=str), file=self.stdout)
        elif columns is not None:
            print(format_table(data, columns), file=self.stdout)
        elif text is not None:
            print(text, file=self.stdout)
        else:
            print(format_list(data), file=self.stdout)

    def say(self, text: str) -> None:
        """A human message: in JSON mode it stays off stdout so stdout stays JSON."""
        if self.fmt != "json":
            print(text, file=self.stdout)


def _with_keys(kind: Kind, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row its key (the controller sends one; older ones may not)."""
    for row in rows:
        row.setdefault("key", key_of(kind, parse_answer(STORED_OF[kind], row)))
    return rows


# --- object flags, derived from the document models ----------------------------------------

# A list field takes its flag in the singular, repeated: --nic eth0 --nic eth1.
SINGULAR = {
    "nics": "nic",
    "host_groups": "host-group",
    "subnet_vlans": "subnet-vlan",
    "network_sites": "network-site",
    "uplink_port_profiles": "uplink-port-profile",
    "dns_servers": "dns-server",
    "reserved": "reserved",
}
_NOT_FLAGS = {"name", "virtual_switch"}


def _is_list(annotation: Any) -> bool:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) in (tuple, list):
            return True
    return False


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def object_fields(kind: Kind) -> dict[str, Any]:
    """The fields a user sets on an object of this kind, with their annotations."""
    model = DOCUMENT_MODEL[kind]
    return {name: info.annotation for name, info in model.model_fields.items() if name not in _NOT_FLAGS}


def flag_of(field: str) -> str:
    return "--" + SINGULAR.get(field, field.replace("_", "-"))


# What a value looks like, where the field's type does not say it.
VALUE_HINTS = {
    "subnet_vlans": "SUBNET[:VLAN], e.g. 10.80.2.0/24:802 (VLAN 0, untagged, if left out)",
    "management_address": "ADDRESS/PREFIX, e.g. 10.0.0.16/24",
    "prefix": "e.g. 192.168.0.0/24",
    "mac": "e.g. 00:1d:d8:b7:1c:00; default: the next of the MAC pool",
    "ca": "default: the next free address of the VM subnet's pool",
    "parent": "default All Hosts",
}
VM_HINTS = {
    "host": "default: placement picks a host that can carry the VM network",
    "host_group": "placement only among this group's hosts",
    "vm_subnet": "default: the VM network's only VM subnet",
}


def _choices(annotation: Any) -> list[str]:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, Enum):
            return [member.value for member in arg]
    return []


def _flag_help(kind: Kind, name: str, annotation: Any) -> str:
    info = DOCUMENT_MODEL[kind].model_fields[name]
    parts = [(VM_HINTS if kind is Kind.vm else {}).get(name) or VALUE_HINTS.get(name, "")]
    choices = _choices(annotation)
    if choices:
        parts.append("one of " + ", ".join(choices))
    if _is_list(annotation):
        parts.append("repeat for several")
    if info.is_required():
        parts.append("required on create")
    elif info.default not in (None, "", ()) and not _is_bool(annotation):
        parts.append(f"default {getattr(info.default, 'value', info.default)}")
    elif _is_bool(annotation):
        parts.append(f"default {'on' if info.default else 'off'}")
    return "; ".join(part for part in parts if part)


def add_object_flags(parser: argparse.ArgumentParser, kind: Kind) -> None:
    for name, annotation in object_fields(kind).items():
        flag, help_text = flag_of(name), _flag_help(kind, name, annotation)
        metavar = flag.removeprefix("--").upper().replace("-", "_")
        if _is_bool(annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif _is_list(annotation):
            parser.add_argument(flag, dest=name, action="append", default=None, metavar=metavar, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


def flags_given(args: argparse.Namespace, kind: Kind) -> dict[str, Any]:
    given = {name: getattr(args, name) for name in object_fields(kind) if getattr(args, name, None) is not None}
    if "subnet_vlans" in given:
        given["subnet_vlans"] = [_subnet_vlan(text) for text in given["subnet_vlans"]]
    return given


def _subnet_vlan(text: str) -> dict[str, Any]:
    """'10.80.2.0/24:802' -> {'subnet': '10.80.2.0/24', 'vlan': 802}; no ':' is VLAN 0."""
    subnet, sep, vlan = text.rpartition(":")
    if not sep or "/" not in subnet:  # no VLAN part (an IPv6 prefix has ':' too, before its '/')
        return {"subnet": text, "vlan": 0}
    if not vlan.isdigit():
        raise UsageError(f"--subnet-vlan: {text!r}: VLAN {vlan!r} is not a number (use SUBNET:VLAN)")
    return {"subnet": subnet, "vlan": int(vlan)}


def _flag_problem(problem: str) -> str:
    """'rangeEnd: 10.0.0.1 comes before ...' -> '--range-end: 10.0.0.1 comes before ...'."""
    head, sep, rest = problem.partition(": ")
    if not sep:
        return problem
    match = re.match(r"^([A-Za-z_]+)(?:\[(\d+)\])?(?:\.(.+))?$", head)
    if match is None:
        return problem
    field, index, tail = match.groups()
    snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), field)
    if snake not in object_fields_any():
        return problem
    flag = flag_of(snake) + (f" #{int(index) + 1}" if index is not None else "")  # which repetition
    return f"{flag} ({tail}): {rest}" if tail else f"{flag}: {rest}"


def object_fields_any() -> set[str]:
    return {name for kind in Kind for name in object_fields(kind)}


def validate_flags(kind: Kind, data: dict[str, Any]) -> BaseModel:
    try:
        return validate_object(kind, data)
    except FabricError as exc:
        raise UsageError(f"{kind.label} {data.get('name', '')}: {_flag_problem(exc.problems[0])}") from None


# --- commands --------------------------------------------------------------------------------


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
    elif kind is Kind.vm_subnet and created.get("vsid") is not None:
        message += f" (VSID {created['vsid']})"
    ctx.out.say(message)
    return EXIT_OK


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    kind: Kind = args.kind
    filters = dict(args.filter or [])
    ctx.out.emit(_with_keys(kind, ctx.client.list_json(kind, **filters)), COLUMNS[kind])
    return EXIT_OK


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    kind: Kind = args.kind
    ctx.out.emit(ctx.client.get_json(kind, args.name))
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
        raise UsageError(f"host {args.host}: virtual switch: {_flag_problem(describe_validation_error(exc)[0])}") from None
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
        ctx.out.say(f"VM {vm.name} now on {vm.host} (CA {vm.ca}, MAC {vm.mac})")
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
    print(json.dumps(state.model_dump(mode="json"), indent=2), file=ctx.out.stdout)
    return EXIT_OK


def _vsid(text: str) -> int:
    if not text.isdigit() or not VSID_MIN <= int(text) <= VSID_MAX:
        raise argparse.ArgumentTypeError(
            f"VSID {text!r} is not a number in {VSID_MIN}..{VSID_MAX} (RFC 7637 reserves 0..0xFFF and 0xFFFFFF)"
        )
    return int(text)


# --- apply ---------------------------------------------------------------------------------


def read_live(client: ControllerClient, document: FabricDocument) -> dict[Kind, dict[str, dict[str, Any]]]:
    """Every live object by kind and key; hosts the document gives a switch carry theirs."""
    live = {kind: {row["key"]: row for row in _with_keys(kind, rows)} for kind, rows in client.live_fabric()}
    for item in document.of_kind(Kind.host):
        host = live[Kind.host].get(item.key)
        # GET /v1/hosts carries each host's switch; ask separately only if it did not.
        if host is not None and item.spec.virtual_switch is not None and "virtual_switch" not in host:
            switch = client.virtual_switch(item.key)
            host["virtual_switch"] = switch.model_dump(mode="json") if switch else None
    return live


def _live_models(live: dict[Kind, dict[str, dict[str, Any]]]) -> dict[Kind, dict[str, BaseModel]]:
    return {kind: {key: parse_answer(STORED_OF[kind], obj) for key, obj in objs.items()} for kind, objs in live.items()}


def check_plan(document: FabricDocument, changes: list[Change]) -> None:
    """Refuse, before any write, an update of a field the controller never changes.

    A VM's host is the exception: `apply` migrates the VM (Move-SCVirtualMachine).
    """
    paths = {(item.kind, item.key): item.where for item in document.objects}
    for change in changes:
        if change.action != "update":
            continue
        allowed = set(SPEC_OF[change.kind].patchable) | {"virtual_switch"}
        if change.kind is Kind.vm:
            allowed.add("host")
        fixed = [name for name in change.fields if name not in allowed]
        if fixed:
            name = fixed[0]
            raise FabricError(
                [
                    f"{paths.get((change.kind, change.key), '')}.{to_camel(name)}: {label(change.kind, change.key)} "
                    f"has {to_camel(name)} {format_value(change.before.get(name))!s} on the controller and it cannot "
                    f"change after create (delete the object first, or state "
                    f"{format_value(change.before.get(name))})"
                ]
            )


def run_change(client: ControllerClient, change: Change) -> None:
    """One write of the plan."""
    kind, key = change.kind, change.key
    if change.action == "delete":
        client.delete(kind, key)
        return
    spec = change.spec
    if change.action == "create":
        body = spec.api_body() if kind is Kind.host else spec.model_dump(mode="json", exclude_unset=True)
        client.create(kind, body)
        if kind is Kind.host and spec.virtual_switch is not None:
            client.set_virtual_switch(key, spec.virtual_switch.model_dump(mode="json", exclude_unset=True))
        return
    patch = {name: change.after[name] for name in change.fields if name not in ("virtual_switch", "host")}
    if kind is Kind.vm and "host" in change.fields:
        client.migrate_vm(key, change.after["host"])
    if patch:
        client.update(kind, key, patch)
    if "virtual_switch" in change.fields:
        client.set_virtual_switch(key, spec.virtual_switch.model_dump(mode="json", exclude_unset=True))


def load_documents(paths: list[str]) -> FabricDocument:
    """Read and validate every file ('-' is stdin); all their problems at once."""
    document = FabricDocument()
    problems: list[str] = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
        try:
            document.extend(load_fabric(text, "stdin" if path == "-" else path))
        except FabricError as exc:
            problems += exc.problems
    if problems:
        raise FabricError(problems)
    return document


def apply_fabric(
    client: ControllerClient,
    document: FabricDocument,
    *,
    prune: bool = False,
    dry_run: bool = False,
    progress: Callable[[Change], None] | None = None,
) -> list[Change]:
    """Make the controller hold the document; the changes made (or, dry, to make).

    Everything that can be checked without writing is checked first (FabricError, and
    nothing is written). A refusal midway raises ApiRefused (or ControllerUnavailable)
    whose message says what was done and what not. `progress` hears each change done.
    For the lab and the benchmarks as much as for `hnvctl apply`.
    """
    live = read_live(client, document)
    problems = check_references(document, _live_models(live))
    if problems:
        raise FabricError(problems)
    changes = plan_changes(document, live, prune=prune)
    check_plan(document, changes)
    if dry_run:
        return changes
    for done, change in enumerate(changes):
        try:
            run_change(client, change)
        except ControllerError as exc:
            what = exc.one_line() if isinstance(exc, ApiRefused) else str(exc)
            verb = {"create": "creating", "update": "updating", "delete": "deleting"}[change.action]
            last = f"; last done: {changes[done - 1].describe()}" if done else ""
            message = (
                f"{', '.join(document.sources)}: stopped at {verb} {label(change.kind, change.key)}: {what}; "
                f"{done} of {len(changes)} changes done{last}; {len(changes) - done} not done"
            )
            if isinstance(exc, ApiRefused):
                raise ApiRefused(exc.status, message) from None
            raise ControllerUnavailable(message) from None
        if progress is not None:
            progress(change)
    return changes


def cmd_apply(ctx: Context, args: argparse.Namespace) -> int:
    document = load_documents(args.file)
    source = ", ".join(document.sources)
    changes = apply_fabric(
        ctx.client,
        document,
        prune=args.prune,
        dry_run=args.dry_run,
        progress=lambda change: ctx.out.say(change.describe()),
    )
    if not changes:
        ctx.out.say(f"no changes: the fabric already matches {source}")
    elif args.dry_run:
        for change in changes:
            ctx.out.say(change.describe())
        creates, updates, deletes = (sum(c.action == a for c in changes) for a in ("create", "update", "delete"))
        ctx.out.say(f"dry run: {creates} to create, {updates} to update, {deletes} to delete; nothing changed")
    else:
        ctx.out.say(f"applied {len(changes)} changes from {source}")
    if ctx.out.fmt == "json":
        report = [
            {"action": c.action, "kind": c.kind.value, "key": c.key, "fields": [to_camel(f) for f in c.fields]}
            for c in changes
        ]
        ctx.out.emit({"dry_run": args.dry_run, "changes": report})
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog.removeprefix('hnvctl').strip() or 'hnvctl'}: {message}")


def _globals() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subcommand's copy of these flags from overwriting the top level's.
    common = _Parser(add_help=False)
    common.add_argument("--controller", default=argparse.SUPPRESS, help=f"controller URL (env HNV_CONTROLLER, default {DEFAULT_CONTROLLER})")
    common.add_argument("--token-file", default=argparse.SUPPRESS, help="file holding the bearer token (env HNV_TOKEN_FILE, or the token in HNV_TOKEN)")
    common.add_argument("--ca-file", default=argparse.SUPPRESS, help="CA certificate that signed the controller's (its tls/ca.crt; env HNV_CA_FILE)")
    common.add_argument("-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS, help="table (default) or json")
    return common


def plural(kind: Kind) -> str:
    return kind.label + ("es" if kind.label.endswith("ch") else "s")


KIND_COMMANDS = {kind.name.replace("_", "-"): kind for kind in Kind}


def build_parser() -> argparse.ArgumentParser:
    common = _globals()
    parser = _Parser(prog="hnvctl", description=__doc__.split("\n\n")[0], parents=[common])
    groups = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups.required = True
    for command, kind in KIND_COMMANDS.items():
        group = groups.add_parser(command, help=f"{plural(kind)}: create, list, show, set, delete", parents=[common])
        verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
        verbs.required = True
        create = verbs.add_parser("create", help=f"create a {kind.label}", parents=[common])
        create.add_argument("name")
        add_object_flags(create, kind)
        create.set_defaults(run=cmd_create, kind=kind)
        listing = verbs.add_parser("list", help=f"list {plural(kind)}", parents=[common])
        listing.add_argument("--filter", action="append", type=_filter, metavar="FIELD=VALUE", help="only objects whose field equals the value")
        listing.set_defaults(run=cmd_list, kind=kind)
        show = verbs.add_parser("show", help=f"show one {kind.label}", parents=[common])
        show.add_argument("name", help="name (VM subnet: VMNETWORK/NAME; IP pool: SITE/NAME or VMNETWORK/SUBNET/NAME)")
        show.set_defaults(run=cmd_show, kind=kind)
        change = verbs.add_parser("set", help=f"change a {kind.label}", parents=[common])
        change.add_argument("name")
        add_object_flags(change, kind)
        change.set_defaults(run=cmd_set, kind=kind)
        delete = verbs.add_parser("delete", help=f"delete a {kind.label} (refused while in use)", parents=[common])
        delete.add_argument("name")
        delete.set_defaults(run=cmd_delete, kind=kind)
        if kind is Kind.host:
            switch = verbs.add_parser("set-switch", help="give the host a virtual switch (New-SCVirtualNetwork)", parents=[common])
            switch.add_argument("host")
            switch.add_argument("--logical-switch", required=True)
            switch.add_argument("--nic", action="append", help="a NIC of the team (repeat; default: all the host's NICs)")
            switch.add_argument("--uplink-port-profile", help="default: the logical switch's first")
            switch.add_argument("--management-vm-network", help="create the management adapter on this VM network")
            switch.add_argument("--management-adapter-name", default="Management")
            switch.set_defaults(run=cmd_set_switch)
            state = verbs.add_parser("state", help="the host state compiled for the host's agent (JSON)", parents=[common])
            state.add_argument("host")
            state.set_defaults(run=cmd_host_state)
            remove = verbs.add_parser("remove-switch", help="remove the host's virtual switch", parents=[common])
            remove.add_argument("host")
            remove.set_defaults(run=cmd_remove_switch)
        if kind is Kind.vm:
            migrate = verbs.add_parser("migrate", help="move a VM to another host (lookup records follow)", parents=[common])
            migrate.add_argument("name")
            migrate.add_argument("--host", required=True)
            migrate.set_defaults(run=cmd_migrate)
    ip = groups.add_parser("ip", help="IP address leases (Get-SCIPAddress)", parents=[common])
    ip_verbs = ip.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    ip_verbs.required = True
    ip_list = ip_verbs.add_parser("list", help="every lease and what holds it", parents=[common])
    ip_list.add_argument("--pool", help="pool key, e.g. Virtualization/Default")
    ip_list.add_argument("--kind", choices=("CA", "PA", "Management"))
    ip_list.add_argument("--host")
    ip_list.add_argument("--vm-network")
    ip_list.set_defaults(run=cmd_ip_list)
    lookup = groups.add_parser("lookup-records", help="a host's lookup records (Get-NetVirtualizationLookupRecord)", parents=[common])
    lookup.add_argument("--host", required=True)
    lookup.add_argument("--vsid", type=_vsid, help="only this VirtualSubnetID")
    lookup.set_defaults(run=cmd_lookup_records)
    hosts = groups.add_parser("hosts", help="hosts and their sync status", parents=[common])
    hosts.add_argument("--wait", type=_seconds, metavar="SECONDS", help="wait until the hosts are InSync (exit 1 if not in time)")
    hosts.add_argument("--host", action="append", help="with --wait: only these hosts (repeat)")
    hosts.set_defaults(run=cmd_hosts)
    apply = groups.add_parser("apply", help="make the fabric hold a document (idempotent)", parents=[common])
    apply.add_argument("-f", "--file", action="append", required=True, help="fabric YAML ('-' for stdin; repeat for several)")
    apply.add_argument("--dry-run", action="store_true", help="print the changes, change nothing")
    apply.add_argument("--prune", action="store_true", help="also delete live objects the documents do not state")
    apply.set_defaults(run=cmd_apply)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..86400 seconds")
    return value


def _filter(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE")
    return name.replace("-", "_"), value


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
         environ: dict[str, str] | None = None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    environ = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"hnvctl: {_strip_prog(str(exc))}", file=stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    url = getattr(args, "controller", None) or environ.get("HNV_CONTROLLER") or DEFAULT_CONTROLLER
    out = Output(getattr(args, "output", None) or "table", stdout)
    try:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--controller: {url!r} is not an http:// or https:// URL")
        token = read_token(getattr(args, "token_file", None), environ)
        ca_file = read_ca_file(getattr(args, "ca_file", None), environ)
        if ca_file and not os.path.isfile(ca_file):
            raise UsageError(f"--ca-file: {ca_file}: no such file")
    except (UsageError, ControllerError) as exc:
        print(f"hnvctl: {exc}", file=stderr)
        return EXIT_BAD_INPUT

    def connect() -> ControllerClient:
        return ControllerClient(url, token, ca_file=ca_file)

    ctx = Context(connect, out)
    try:
        return args.run(ctx, args)
    except (UsageError, FabricError) as exc:
        print(f"hnvctl: {_strip_prog(str(exc))}", file=stderr)
        return EXIT_BAD_INPUT
    except ApiRefused as exc:
        hint = ""
        if exc.status == 401 and not token:
            hint = " (hnvctl sent none: give --token-file, or set HNV_TOKEN_FILE or HNV_TOKEN)"
        print(f"hnvctl: {exc.one_line()}{hint}", file=stderr)
        return EXIT_BAD_INPUT
    except ControllerError as exc:
        print(f"hnvctl: {exc}", file=stderr)
        return EXIT_UNAVAILABLE
    except BrokenPipeError:
        # `hnvctl ip list | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and end quietly.
        if stdout is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        ctx.close()


def _strip_prog(message: str) -> str:
    return message.removeprefix("hnvctl: ").replace("\n", " ")


if __name__ == "__main__":
    raise SystemExit(main())
