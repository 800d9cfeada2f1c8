"""hnvctl's object flags, derived from the document models, and its usage refusals.

Each field of an object's document model (`controller.fabric_document`) is a flag:
`--vm-network`, a list field in the singular and repeated (`--nic eth0 --nic eth1`), a
boolean as `--x/--no-x`. The flags given are validated with the same model the
controller validates with, so a mistake is named by its flag before any request
(`VM V: --mac: MAC address 01:00:5e:00:00:01 is multicast`); rules across objects are
the controller's alone.

Owns flag names, help texts and `UsageError` (one line, exit 2); no HTTP, no printing.
"""

from __future__ import annotations

import argparse
import re
import typing
from enum import Enum
from typing import Any

from pydantic import BaseModel

from controller.fabric_document import DOCUMENT_MODEL, DocumentError, validate_object
from controller.models import Kind

EXIT_OK, EXIT_UNAVAILABLE, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """A command line that cannot run: one line, exit 2."""


# A list field takes its flag in the singular, repeated: --nic eth0 --nic eth1.
SINGULAR = {
    "nics": "nic",
    "host_groups": "host-group",
    "subnet_vlans": "subnet-vlan",
    "network_sites": "network-site",
    "uplink_port_profiles": "uplink-port-profile",
    "dns_servers": "dns-server",
    "reserved": "reserved",
    "hosts": "host",
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
    "hosts": "a gateway host (role gateway); repeat, the active one first",
    "active": "the gateway host holding the external addresses; default the first --host",
    "external_ip_pool": "a pool name of the front-end site; on a NAT connection default the gateway service's",
    "external_address": "default: the pool's next free address",
    "back_end_ca": "default: the next free address of the VM subnet's pool",
    "next_hop": "a customer address inside one of the VM network's subnets",
    "internal_port": "default: the external port",
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
        given["subnet_vlans"] = [subnet_vlan(text) for text in given["subnet_vlans"]]
    return given


def subnet_vlan(text: str) -> dict[str, Any]:
    """'10.80.2.0/24:802' -> {'subnet': '10.80.2.0/24', 'vlan': 802}; no ':' is VLAN 0."""
    subnet, sep, vlan = text.rpartition(":")
    if not sep or "/" not in subnet:  # no VLAN part (an IPv6 prefix has ':' too, before its '/')
        return {"subnet": text, "vlan": 0}
    if not vlan.isdigit():
        raise UsageError(f"--subnet-vlan: {text!r}: VLAN {vlan!r} is not a number (use SUBNET:VLAN)")
    return {"subnet": subnet, "vlan": int(vlan)}


def flag_problem(problem: str) -> str:
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
    except DocumentError as exc:
        raise UsageError(f"{kind.label} {data.get('name', '')}: {flag_problem(exc.lines[0])}") from None
