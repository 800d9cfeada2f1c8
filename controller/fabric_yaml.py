"""The declarative fabric document behind `hnvctl apply -f fabric.yaml`.

A fabric document is plain YAML a VMM administrator can read: top-level lists of host
groups, clusters, logical networks (with their sites and the sites' IP pools), uplink
port profiles, logical switches, VM networks (with their VM subnets and the subnets'
IP pools), hosts (with their virtual switch) and VMs. Keys are the controller's fields
in camelCase, close to the cmdlet parameters of the seed walkthrough
(`networkVirtualization` for -EnableNetworkVirtualization, `teamMode` for
-LBFOTeamMode, `managementAdapter.vmNetwork` for -ManagementAdapterVMNetwork).

The objects are the controller's own specs (`controller.models`), read with camelCase
aliases, so a document accepts exactly what the API accepts and no schema is written
twice. This module adds what a document needs on top:

- loading: YAML text -> `FabricDocument`; every problem as `source: path.field: reason`
  (`fabric.yaml: vmNetworks[2].subnets[0].prefix: 192.168.0.5/24 has host bits set`);
  duplicate YAML keys, unknown sections and unknown fields are refused;
- nesting: a site inside its logical network, a pool inside its site or VM subnet, a
  VM subnet inside its VM network, a virtual switch inside its host;
- reference checks over the document plus the live fabric, all before the first write;
- `plan_changes`: the ordered creates and updates (and, with prune, deletes) that make
  the live fabric hold the document.

It is pure: no HTTP (hnvctl reads the live fabric through `controller.client` and runs
the plan), no files but the text it is handed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from controller import models
from controller.models import ROOT_HOST_GROUP, Kind, key_of

_DOCUMENT_CONFIG = ConfigDict(
    extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
)


class FabricError(ValueError):
    """A fabric document (or a CLI argument) was refused.

    `problems` holds one 'path: reason' line each; str() is the first, made to stand on
    one line of stderr.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems or ["invalid fabric document"]
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(self.problems[0] + more)


# --- strict forms ---------------------------------------------------------------------
# pydantic parses '192.168.0.5/24' as a network by dropping the host bits and says
# only "not a valid network" for junk; a person wants to hear which of the two it was.


def strict_prefix(value: Any) -> str:
    text = str(value).strip()
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP prefix (like 192.168.0.0/24)") from None
    raise ValueError(f"{text} has host bits set (the prefix is {loose})")


class _Document(BaseModel):
    """camelCase keys, unknown keys refused, prefixes strict.

    Each document model is `(_Document, <the controller's spec>)`: pydantic merges the
    bases' configs, so the spec's fields and checks gain the camelCase aliases here.
    """

    model_config = _DOCUMENT_CONFIG
    _prefix_fields: ClassVar[tuple[str, ...]] = ("prefix", "subnet")

    @model_validator(mode="before")
    @classmethod
    def _strict_prefixes(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls._prefix_fields:
                if data.get(name) is not None:
                    try:
                        data = {**data, name: strict_prefix(data[name])}
                    except ValueError as exc:
                        raise ValueError(f"{name}: {exc}") from None
        return data


class HostGroupDoc(_Document, models.HostGroupSpec):
    @model_validator(mode="after")
    def _not_root(self) -> HostGroupDoc:
        if self.name == ROOT_HOST_GROUP:
            raise ValueError(f"name: {ROOT_HOST_GROUP} is the root host group; it always exists")
        if self.parent == self.name:
            raise ValueError(f"parent: host group {self.name} cannot be its own parent")
        return self


class ClusterDoc(_Document, models.ClusterSpec):
    pass


class LogicalNetworkDoc(_Document, models.LogicalNetworkSpec):
    pass


class SubnetVlanDoc(_Document, models.SubnetVlan):
    pass


class NetworkSiteDoc(_Document, models.NetworkSiteSpec):
    subnet_vlans: tuple[SubnetVlanDoc, ...]


class IpPoolDoc(_Document, models.IpPoolSpec):
    pass


class UplinkPortProfileDoc(_Document, models.UplinkPortProfileSpec):
    pass


class LogicalSwitchDoc(_Document, models.LogicalSwitchSpec):
    pass


class VmNetworkDoc(_Document, models.VmNetworkSpec):
    pass


class VmSubnetDoc(_Document, models.VmSubnetSpec):
    pass


class ManagementAdapterDoc(_Document, models.ManagementAdapter):
    pass


class VirtualSwitchDoc(_Document, models.VirtualSwitchSpec):
    management_adapter: ManagementAdapterDoc | None = None


class HostDoc(_Document, models.HostSpec):
    """A host and, nested, its virtual switch (New-SCVirtualNetwork)."""

    virtual_switch: VirtualSwitchDoc | None = None

    @model_validator(mode="after")
    def _switch_nics(self) -> HostDoc:
        if self.virtual_switch is not None and self.virtual_switch.nics is not None:
            for i, nic in enumerate(self.virtual_switch.nics):
                if nic not in self.nics:
                    raise ValueError(
                        f"virtualSwitch.nics[{i}]: {nic} is not a NIC of host {self.name} "
                        f"({', '.join(self.nics)})"
                    )
        return self

    def api_body(self) -> dict[str, Any]:
        """The host without its switch: the switch is its own resource on the API."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"virtual_switch"})


class VmDoc(_Document, models.VmSpec):
    pass

DOCUMENT_MODEL: dict[Kind, type[_Document]] = {
    Kind.host_group: HostGroupDoc,
    Kind.cluster: ClusterDoc,
    Kind.logical_network: LogicalNetworkDoc,
    Kind.network_site: NetworkSiteDoc,
    Kind.ip_pool: IpPoolDoc,
    Kind.uplink_port_profile: UplinkPortProfileDoc,
    Kind.logical_switch: LogicalSwitchDoc,
    Kind.vm_network: VmNetworkDoc,
    Kind.vm_subnet: VmSubnetDoc,
    Kind.host: HostDoc,
    Kind.vm: VmDoc,
}

# The fields that name another object, for the reference check. A VM subnet and a
# pool's VM subnet are keyed with their VM network, which the check handles itself.
REFERENCES: dict[Kind, dict[str, Kind]] = {
    Kind.host_group: {"parent": Kind.host_group},
    Kind.cluster: {"host_group": Kind.host_group},
    Kind.host: {"host_group": Kind.host_group, "cluster": Kind.cluster},
    Kind.network_site: {"logical_network": Kind.logical_network, "host_groups": Kind.host_group},
    Kind.ip_pool: {"network_site": Kind.network_site, "vm_network": Kind.vm_network},
    Kind.uplink_port_profile: {"network_sites": Kind.network_site},
    Kind.logical_switch: {"uplink_port_profiles": Kind.uplink_port_profile},
    Kind.vm_network: {"logical_network": Kind.logical_network},
    Kind.vm_subnet: {"vm_network": Kind.vm_network},
    Kind.vm: {"vm_network": Kind.vm_network, "host": Kind.host, "host_group": Kind.host_group},
}

# Creation order: every object after the objects it names; host groups are further
# sorted parents first. Deletion (prune) runs it backwards.
APPLY_ORDER: tuple[Kind, ...] = (
    Kind.host_group,
    Kind.cluster,
    Kind.logical_network,
    Kind.network_site,
    Kind.uplink_port_profile,
    Kind.logical_switch,
    Kind.vm_network,
    Kind.vm_subnet,
    Kind.ip_pool,
    Kind.host,
    Kind.vm,
)


def kind_of(model: BaseModel) -> Kind:
    return model.kind  # every spec carries its Kind as a ClassVar


def label(kind: Kind, key: str) -> str:
    """'VM subnet Fabrikam2/Default', 'IP pool Virtualization/Default'."""
    return f"{kind.label} {key}"


# --- the document ---------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """An object of the document and where the document states it."""

    spec: _Document
    path: str
    source: str = ""

    @property
    def where(self) -> str:
        """'fabric.yaml: vms[3]'."""
        return f"{self.source}: {self.path}" if self.source else self.path

    @property
    def kind(self) -> Kind:
        return kind_of(self.spec)

    @property
    def key(self) -> str:
        return key_of(self.kind, self.spec)


@dataclass
class FabricDocument:
    sources: list[str] = field(default_factory=list)
    objects: list[Located] = field(default_factory=list)

    def of_kind(self, kind: Kind) -> list[Located]:
        return [item for item in self.objects if item.kind is kind]

    def extend(self, other: FabricDocument) -> None:
        self.sources += other.sources
        self.objects += other.objects


# YAML section -> (kind, nested sections).
SECTIONS: dict[str, tuple[Kind, dict[str, Any]]] = {
    "hostGroups": (Kind.host_group, {}),
    "clusters": (Kind.cluster, {}),
    "logicalNetworks": (Kind.logical_network, {"sites": (Kind.network_site, {"ipPools": (Kind.ip_pool, {})})}),
    "uplinkPortProfiles": (Kind.uplink_port_profile, {}),
    "logicalSwitches": (Kind.logical_switch, {}),
    "vmNetworks": (Kind.vm_network, {"subnets": (Kind.vm_subnet, {"ipPools": (Kind.ip_pool, {})})}),
    "hosts": (Kind.host, {}),
    "vms": (Kind.vm, {}),
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # Only the mapping's own keys count: a key merged in (<<: *anchor) and stated again
    # is an override, as YAML means it.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


_FIELD_PREFIX = re.compile(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+(?:\[\d+\])?)*): ")


def _camel_path(path: str) -> str:
    return re.sub(r"[a-z]+(?:_[a-z]+)+", lambda m: to_camel(m.group(0)), path)


def describe_validation_error(exc: ValidationError, path: str = "") -> list[str]:
    """pydantic's errors -> 'path.field: reason' lines, with the document's camelCase keys."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = path
        for part in error["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        message = error["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        kind, given = error["type"], error.get("input")
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "is required"
        elif kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
            message = f"{given} is out of range: {message[0].lower()}{message[1:]}"
        elif kind not in ("value_error", "assertion_error") and given is not None and not isinstance(given, (dict, list)):
            message = f"{given!r}: {message}"
        # A model-level check starts its message with its own field path: nest it.
        match = _FIELD_PREFIX.match(message)
        if match:
            inner, message = _camel_path(match.group(1)), message[match.end() :]
            loc = f"{loc}.{inner}" if loc else inner
        lines.append(f"{loc}: {message}" if loc else message)
    return lines


def validate_object(kind: Kind, data: dict[str, Any], path: str = "") -> _Document:
    """Validate one object as the document (or a CLI command) states it."""
    try:
        return DOCUMENT_MODEL[kind].model_validate(data)
    except ValidationError as exc:
        raise FabricError(describe_validation_error(exc, path)) from None


def load_fabric(text: str, source: str = "fabric.yaml") -> FabricDocument:
    """Parse a document and validate each object; report every problem, not just one.

    References to other objects are checked later by `check_references`, against the
    document and the live fabric together (a tenants file names the live logical
    network Virtualization).
    """
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise FabricError([f"{source}: {_describe_yaml_error(exc)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FabricError([f"{source}: the document must be a mapping of sections ({', '.join(SECTIONS)})"])
    document = FabricDocument([source])
    problems: list[str] = []
    for key, value in raw.items():
        if isinstance(key, str) and key.startswith("x-"):
            continue  # an extension field: a place for YAML anchors (x-host: &host {...})
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section (expected one of: {', '.join(SECTIONS)})")
            continue
        kind, children = SECTIONS[key]
        _load_section(value, key, kind, children, {}, document, problems)
    problems += check_duplicates(document)
    if problems:
        raise FabricError([f"{source}: {problem}" for problem in problems])
    return document


def _load_section(
    items: Any,
    path: str,
    kind: Kind,
    children: dict[str, Any],
    inherited: dict[str, str],
    document: FabricDocument,
    problems: list[str],
) -> None:
    if items is None:
        return
    if not isinstance(items, list):
        problems.append(f"{path}: must be a list of {kind.label}s, got {type(items).__name__}")
        return
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be a mapping of fields, got {type(item).__name__}")
            continue
        own = {k: v for k, v in item.items() if k not in children}
        for name, value in inherited.items():
            if own.get(name) not in (None, value):
                problems.append(f"{where}.{name}: {own[name]!r} contradicts the enclosing {value!r}")
            own[name] = value
        try:
            spec = validate_object(kind, own, where)
        except FabricError as exc:
            problems.extend(exc.problems)
            continue
        document.objects.append(Located(spec, where, document.sources[0]))
        for child_key, (child_kind, grandchildren) in children.items():
            _load_section(
                item.get(child_key),
                f"{where}.{child_key}",
                child_kind,
                grandchildren,
                _inherited_by(spec, child_kind),
                document,
                problems,
            )


def _inherited_by(parent: _Document, child_kind: Kind) -> dict[str, str]:
    """The fields a nested object takes from the object it is nested in."""
    if child_kind is Kind.network_site:
        return {"logicalNetwork": parent.name}
    if child_kind is Kind.vm_subnet:
        return {"vmNetwork": parent.name}
    if isinstance(parent, NetworkSiteDoc):
        return {"networkSite": parent.name}
    if isinstance(parent, VmSubnetDoc):
        return {"vmNetwork": parent.vm_network, "vmSubnet": parent.name}
    return {}


# --- checks across objects -------------------------------------------------------------


def check_duplicates(document: FabricDocument) -> list[str]:
    stated: dict[tuple[Kind, str], str] = {}
    problems = []
    for item in document.objects:
        where = stated.setdefault((item.kind, item.key), item.path)
        if where != item.path:
            problems.append(f"{item.path}.name: {label(item.kind, item.key)} is already defined at {where}")
    return problems


def check_references(document: FabricDocument, live: dict[Kind, dict[str, BaseModel]]) -> list[str]:
    """References to objects neither in the document nor on the controller, and cycles.

    `live` maps each kind to the controller's objects by key. Returns 'path: reason'
    lines, each prefixed with nothing: the caller knows which file it read.
    """
    known: dict[Kind, dict[str, BaseModel]] = {kind: dict(live.get(kind, {})) for kind in Kind}
    known[Kind.host_group].setdefault(ROOT_HOST_GROUP, models.HostGroupSpec(name=ROOT_HOST_GROUP, parent=None))
    for item in document.objects:
        known[item.kind][item.key] = item.spec
    problems: list[str] = []
    for item in document.objects:
        spec = item.spec
        for name, target in REFERENCES.get(item.kind, {}).items():
            value = getattr(spec, name)
            for j, ref in enumerate(value if isinstance(value, tuple) else (value,)):
                if ref is not None and ref not in known[target]:
                    at = f"{to_camel(name)}[{j}]" if isinstance(value, tuple) else to_camel(name)
                    problems.append(f"{item.where}.{at}: {target.label} {ref} is not in the document nor on the controller")
        subnet = getattr(spec, "vm_subnet", None)
        if subnet is not None and f"{spec.vm_network}/{subnet}" not in known[Kind.vm_subnet]:
            problems.append(
                f"{item.where}.vmSubnet: VM subnet {subnet} of VM network {spec.vm_network} "
                "is not in the document nor on the controller"
            )
        if isinstance(spec, HostDoc) and spec.virtual_switch is not None:
            vswitch, at = spec.virtual_switch, f"{item.where}.virtualSwitch"
            if vswitch.logical_switch not in known[Kind.logical_switch]:
                problems.append(
                    f"{at}.logicalSwitch: logical switch {vswitch.logical_switch} "
                    "is not in the document nor on the controller"
                )
            adapter = vswitch.management_adapter
            if adapter is not None and adapter.vm_network not in known[Kind.vm_network]:
                problems.append(
                    f"{at}.managementAdapter.vmNetwork: VM network {adapter.vm_network} "
                    "is not in the document nor on the controller"
                )
        if isinstance(spec, IpPoolDoc):
            problems += _pool_inside_owner(item, spec, known)
        elif isinstance(spec, (VmNetworkDoc, VmSubnetDoc)):
            problems += _isolation_fits(item, spec, known)
    problems += _host_group_cycles(document, known[Kind.host_group])
    return problems


def _isolation_fits(item: Located, spec: BaseModel, known: dict[Kind, dict[str, Any]]) -> list[str]:
    """The two isolation mistakes a document makes most, caught before any write: a
    network-virtualised VM network on a logical network without network
    virtualisation, and a VLAN VM subnet whose subnet+VLAN no site of its logical
    network offers. (The controller checks these too; here they cost no write.)"""
    if isinstance(spec, VmNetworkDoc):
        logical = known[Kind.logical_network].get(spec.logical_network)
        if (
            spec.isolation is models.Isolation.WindowsNetworkVirtualization
            and logical is not None
            and not logical.network_virtualization
        ):
            return [
                f"{item.where}.isolation: logical network {spec.logical_network} does not allow network "
                "virtualisation (set its networkVirtualization, or choose isolation VLAN or NoIsolation)"
            ]
        return []
    network = known[Kind.vm_network].get(spec.vm_network)
    if network is None or network.isolation is not models.Isolation.VLAN or spec.vlan is None:
        return []
    offered = [
        (str(pair.subnet), pair.vlan)
        for site in known[Kind.network_site].values()
        if site.logical_network == network.logical_network
        for pair in site.subnet_vlans
    ]
    if (str(spec.prefix), spec.vlan) in offered:
        return []
    return [
        f"{item.where}.vlan: {spec.prefix} on VLAN {spec.vlan} is not a subnet/VLAN of logical network "
        f"{network.logical_network} (its sites offer: {', '.join(f'{s} VLAN {v}' for s, v in offered) or 'none'})"
    ]


def _pool_inside_owner(item: Located, pool: IpPoolDoc, known: dict[Kind, dict[str, Any]]) -> list[str]:
    """A pool's range lies in its VM subnet's prefix, or in one of its site's subnets."""
    if pool.network_site is not None:
        site = known[Kind.network_site].get(pool.network_site)
        prefixes = [sv.subnet for sv in getattr(site, "subnet_vlans", ())]
        owner = f"network site {pool.network_site}"
    else:
        subnet = known[Kind.vm_subnet].get(f"{pool.vm_network}/{pool.vm_subnet}")
        prefixes = [subnet.prefix] if getattr(subnet, "prefix", None) is not None else []
        owner = f"VM subnet {pool.vm_network}/{pool.vm_subnet}"
    nets = [ipaddress.ip_network(str(p)) for p in prefixes]
    if not nets:
        return []
    if pool.subnet is not None and pool.subnet not in nets:
        return [f"{item.where}.subnet: {pool.subnet} is not a subnet of {owner} ({', '.join(map(str, nets))})"]
    for name in ("range_start", "range_end", "gateway"):
        address = getattr(pool, name)
        if address is not None and not any(address in net for net in nets if net.version == address.version):
            return [f"{item.where}.{to_camel(name)}: {address} is outside {owner} ({', '.join(map(str, nets))})"]
    return []


def _host_group_cycles(document: FabricDocument, groups: dict[str, BaseModel]) -> list[str]:
    problems = []
    for item in document.of_kind(Kind.host_group):
        seen, parent = {item.key}, item.spec.parent
        while parent is not None and parent != ROOT_HOST_GROUP:
            if parent in seen:
                problems.append(f"{item.where}.parent: host group {item.key} would be its own ancestor")
                break
            seen.add(parent)
            parent = getattr(groups.get(parent), "parent", None)
    return problems


# --- the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One write of the plan. An update carries the fields it changes (camelCase)."""

    action: Literal["create", "update", "delete"]
    kind: Kind
    key: str
    spec: BaseModel | None = None  # the document's object (create, update)
    fields: tuple[str, ...] = ()
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    SYMBOLS: ClassVar[dict[str, str]] = {"create": "+", "update": "~", "delete": "-"}

    def describe(self) -> str:
        line = f"{self.SYMBOLS[self.action]} {label(self.kind, self.key)}"
        if self.action == "update":
            line += " (" + "; ".join(
                f"{to_camel(name)}: {_show(self.before.get(name))} -> {_show(self.after.get(name))}"
                for name in self.fields
            ) + ")"
        return line


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{to_camel(k)}: {_show(v)}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return "none" if value is None else str(value)


# Lists whose order carries no meaning compare as sets.
_UNORDERED = {"host_groups", "network_sites", "uplink_port_profiles", "dns_servers", "reserved", "subnet_vlans", "nics"}


def _comparable(value: Any, name: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _comparable(v, k) for k, v in value.items()}
    if isinstance(value, list):
        items = [_comparable(v) for v in value]
        return sorted(items, key=repr) if name in _UNORDERED else items
    return value


def _matches(stated: Any, live: Any, name: str) -> bool:
    """Does the live value hold what the document states? A nested object (a host's
    virtual switch) matches when every field the document states matches."""
    if isinstance(stated, dict) and isinstance(live, dict):
        return all(_matches(value, live.get(key), key) for key, value in stated.items())
    return _comparable(stated, name) == _comparable(live, name)


def stated_fields(spec: BaseModel) -> dict[str, Any]:
    """What the document states about an object (snake_case, JSON forms). A nested
    object keeps only the fields it states; a list keeps its items whole."""
    full = spec.model_dump(mode="json")
    out = {}
    for name in spec.model_fields_set:
        value = getattr(spec, name)
        out[name] = stated_fields(value) if isinstance(value, BaseModel) else full[name]
    return out


def plan_changes(
    document: FabricDocument, live: dict[Kind, dict[str, dict[str, Any]]], prune: bool = False
) -> list[Change]:
    """The writes that make the live fabric hold the document, in a safe order.

    `live` maps each kind to the controller's objects (their JSON, snake_case) by key;
    a host's JSON carries its virtual switch under `virtual_switch`. Only the fields the
    document states are compared: an unstated field keeps its live value (so a document
    may describe part of the fabric, and what the controller allocated - VSID, MAC, CA,
    the placed host - is left alone). With `prune`, live objects the document does not
    state are deleted, dependants first.
    """
    changes: list[Change] = []
    for item in _ordered(document.objects):
        current = live.get(item.kind, {}).get(item.key)
        if current is None:
            changes.append(Change("create", item.kind, item.key, item.spec))
            continue
        wanted = stated_fields(item.spec)
        differ = tuple(
            name for name, value in wanted.items() if name != "name" and not _matches(value, current.get(name), name)
        )
        if differ:
            changes.append(
                Change(
                    "update",
                    item.kind,
                    item.key,
                    item.spec,
                    differ,
                    {name: current.get(name) for name in differ},
                    {name: wanted[name] for name in differ},
                )
            )
    if prune:
        stated = {(item.kind, item.key) for item in document.objects}
        rank = {kind: i for i, kind in enumerate(APPLY_ORDER)}
        doomed = [
            (kind, key)
            for kind in reversed(APPLY_ORDER)
            for key in live.get(kind, {})
            if (kind, key) not in stated and not (kind is Kind.host_group and key == ROOT_HOST_GROUP)
        ]
        depth = _host_group_depths({key: obj.get("parent") for key, obj in live.get(Kind.host_group, {}).items()})
        # Dependants first: later kinds of APPLY_ORDER, then deeper host groups.
        doomed.sort(key=lambda pair: (-rank[pair[0]], -depth.get(pair[1], 0) if pair[0] is Kind.host_group else 0))
        changes += [Change("delete", kind, key) for kind, key in doomed]
    return changes


def _host_group_depths(parents: dict[str, str | None]) -> dict[str, int]:
    """How many host groups (of these) lie above each one; cycles are cut off."""
    depths = {}
    for name in parents:
        level, parent = 0, parents.get(name)
        while parent in parents and level <= len(parents):
            level, parent = level + 1, parents[parent]
        depths[name] = level
    return depths


def _ordered(items: list[Located]) -> list[Located]:
    """APPLY_ORDER by kind; host groups parents first; document order otherwise."""
    rank = {kind: i for i, kind in enumerate(APPLY_ORDER)}
    depth = _host_group_depths({item.key: item.spec.parent for item in items if item.kind is Kind.host_group})
    return sorted(items, key=lambda item: (rank[item.kind], depth.get(item.key, 0) if item.kind is Kind.host_group else 0))
