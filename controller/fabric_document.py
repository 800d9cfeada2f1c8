"""The declarative fabric document, and its apply as ONE fabric transaction.

A fabric document is what `examples/seed-fabric.yaml` holds: top-level lists of host
groups, clusters, logical networks (with their sites and the sites' IP pools), uplink
port profiles, logical switches, VM networks (with their VM subnets and the subnets'
IP pools), hosts (with their virtual switch) and VMs, and the HNV gateway: gateway
services, gateways, NAT connections, NAT rules and customer routes. Keys are the controller's fields
in camelCase, close to the cmdlet parameters of the seed walkthrough
(`networkVirtualization` for -EnableNetworkVirtualization, `teamMode` for
-LBFOTeamMode, `managementAdapter.vmNetwork` for -ManagementAdapterVMNetwork).
`POST /v1/fabric/apply` takes it as JSON (`hnvctl apply -f` reads the YAML).

The objects are the controller's own specs (`controller.models`), read with camelCase
aliases, so a document accepts exactly what the API accepts and no schema is written
twice. This module adds what a document needs on top:

- `read_document(raw)`: the decoded document -> `FabricDocument`; every shape problem
  as (path, reason) (`vmNetworks[2].subnets[0].prefix`, `192.168.0.5/24 has host bits
  set`); unknown sections and fields and an object stated twice are refused; a site
  inside its logical network, a pool inside its site or VM subnet, a VM subnet inside
  its VM network, a virtual switch inside its host;
- `load_yaml(text)`: YAML text -> the raw document, a key given twice refused (for
  hnvctl, which parses the files);
- `plan_changes`: the ordered creates, updates (and, with prune, deletes) that make the
  live fabric hold the document, compared field by field;
- `apply_document(fabric, document)`: the plan, computed from the fabric itself, run as
  one `Fabric.transact` (all or nothing; a dry run is exactly the real run, undone),
  a refusal re-worded to name the document's object (`vms[3] (TenantVM04): ...`).

Every rule across objects (references, isolation, pools, placement) is the fabric's:
nothing here re-checks one. It uses only the Fabric's public reads and `transact`; it
never touches the store or HTTP.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from agent.text import snake_to_camel, validation_problems
from controller import models
from controller.models import ROOT_HOST_GROUP, SPEC_OF, FabricError, Invalid, Kind, key_of
from controller.operations import Create, Delete, Migrate, Operation, Patch, SetVirtualSwitch
from controller.operations import describe as describe_operation

if TYPE_CHECKING:
    from controller.fabric import Fabric

_DOCUMENT_CONFIG = ConfigDict(
    extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
)


class DocumentError(Invalid):
    """A fabric document was refused before any operation ran (422).

    `problems` holds (path, reason) pairs, every problem found, not only the first; the
    error line is the first, with how many more there are.
    """

    def __init__(self, problems: list[tuple[str | None, str]]):
        self.problems = problems or [(None, "invalid fabric document")]
        first_field, first_reason = self.problems[0]
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        line = f"{first_field}: {first_reason}" if first_field else first_reason
        super().__init__(f"{line}{more}", first_field, first_reason)

    @property
    def lines(self) -> list[str]:
        return [f"{path}: {reason}" if path else reason for path, reason in self.problems]

    def body(self) -> dict[str, Any]:
        return {**super().body(), "problems": [{"field": path, "reason": reason} for path, reason in self.problems]}


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
        raise ValueError(f"{text[:60]!r} is not an IP prefix (like 192.168.0.0/24)") from None
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

    def spec(self) -> BaseModel:
        """The controller's spec of this object, as a POST of it would carry."""
        return SPEC_OF[self.kind].model_validate(self.model_dump(mode="json", exclude_unset=True,
                                                                 exclude={"virtual_switch"}))


class HostGroupDoc(_Document, models.HostGroupSpec):
    @model_validator(mode="after")
    def _not_root(self) -> HostGroupDoc:
        if self.name == ROOT_HOST_GROUP:
            raise ValueError(f"name: {ROOT_HOST_GROUP} is the root host group; it always exists")
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

    def spec(self) -> models.VirtualSwitchSpec:
        return models.VirtualSwitchSpec.model_validate(self.model_dump(mode="json", exclude_unset=True))


class HostDoc(_Document, models.HostSpec):
    """A host and, nested, its virtual switch (New-SCVirtualNetwork)."""

    virtual_switch: VirtualSwitchDoc | None = None


class VmDoc(_Document, models.VmSpec):
    pass


class GatewayServiceDoc(_Document, models.GatewayServiceSpec):
    pass


class GatewayDoc(_Document, models.GatewaySpec):
    pass


class NatConnectionDoc(_Document, models.NatConnectionSpec):
    pass


class NatRuleDoc(_Document, models.NatRuleSpec):
    pass


class CustomerRouteDoc(_Document, models.CustomerRouteSpec):
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
    Kind.gateway_service: GatewayServiceDoc,
    Kind.gateway: GatewayDoc,
    Kind.nat_connection: NatConnectionDoc,
    Kind.nat_rule: NatRuleDoc,
    Kind.customer_route: CustomerRouteDoc,
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
    Kind.gateway_service,
    Kind.gateway,
    Kind.nat_connection,
    Kind.nat_rule,
    Kind.customer_route,
)


def label(kind: Kind, key: str) -> str:
    """'VM subnet Fabrikam2/Default', 'IP pool Virtualization/Default'."""
    return f"{kind.label} {key}"


def validate_object(kind: Kind, data: dict[str, Any], path: str = "") -> _Document:
    """Validate one object as the document (or a CLI command) states it."""
    try:
        return DOCUMENT_MODEL[kind].model_validate(data)
    except ValidationError as exc:
        raise DocumentError(validation_problems(exc, path, camel=True)) from None


# --- the document ---------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """An object of the document and where the document states it ('vms[3]')."""

    spec: _Document
    path: str

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    @property
    def key(self) -> str:
        return key_of(self.kind, self.spec)


@dataclass
class FabricDocument:
    objects: list[Located] = field(default_factory=list)

    def of_kind(self, kind: Kind) -> list[Located]:
        return [item for item in self.objects if item.kind is kind]


# Document section -> (kind, nested sections).
SECTIONS: dict[str, tuple[Kind, dict[str, Any]]] = {
    "hostGroups": (Kind.host_group, {}),
    "clusters": (Kind.cluster, {}),
    "logicalNetworks": (Kind.logical_network, {"sites": (Kind.network_site, {"ipPools": (Kind.ip_pool, {})})}),
    "uplinkPortProfiles": (Kind.uplink_port_profile, {}),
    "logicalSwitches": (Kind.logical_switch, {}),
    "vmNetworks": (Kind.vm_network, {"subnets": (Kind.vm_subnet, {"ipPools": (Kind.ip_pool, {})})}),
    "hosts": (Kind.host, {}),
    "vms": (Kind.vm, {}),
    "gatewayServices": (Kind.gateway_service, {}),
    "gateways": (Kind.gateway, {}),
    "natConnections": (Kind.nat_connection, {}),
    "natRules": (Kind.nat_rule, {}),
    "customerRoutes": (Kind.customer_route, {}),
}


def is_extension(key: Any) -> bool:
    """A top-level `x-` key: ignored, a place for YAML anchors (x-host: &host {...})."""
    return isinstance(key, str) and key.startswith("x-")


def read_document(raw: Any) -> FabricDocument:
    """Validate a decoded document, object by object; every problem, not just one.

    References to other objects are the fabric's to check when the plan runs.
    """
    if not isinstance(raw, dict):
        raise DocumentError([(None, f"the document must be a mapping of sections ({', '.join(SECTIONS)})")])
    document = FabricDocument()
    problems: list[tuple[str | None, str]] = []
    for key, value in raw.items():
        if is_extension(key):
            continue
        if key not in SECTIONS:
            problems.append((str(key)[:60], f"unknown section (expected one of: {', '.join(SECTIONS)})"))
            continue
        kind, children = SECTIONS[key]
        _read_section(value, key, kind, children, {}, document, problems)
    problems += _duplicates(document)
    if problems:
        raise DocumentError(problems)
    return document


def _read_section(
    items: Any,
    path: str,
    kind: Kind,
    children: dict[str, Any],
    inherited: dict[str, str],
    document: FabricDocument,
    problems: list[tuple[str | None, str]],
) -> None:
    if items is None:
        return
    if not isinstance(items, list):
        problems.append((path, f"must be a list of {kind.label}s, got {type(items).__name__}"))
        return
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            problems.append((where, f"must be a mapping of fields, got {type(item).__name__}"))
            continue
        own = {k: v for k, v in item.items() if k not in children}
        for name, value in inherited.items():
            if own.get(name) not in (None, value):
                problems.append((f"{where}.{name}", f"{str(own[name])[:60]!r} contradicts the enclosing {value!r}"))
            own[name] = value
        try:
            spec = validate_object(kind, own, where)
        except DocumentError as exc:
            problems.extend(exc.problems)
            continue
        document.objects.append(Located(spec, where))
        for child_key, (child_kind, grandchildren) in children.items():
            _read_section(item.get(child_key), f"{where}.{child_key}", child_kind, grandchildren,
                          _inherited_by(spec, child_kind), document, problems)


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


def _duplicates(document: FabricDocument) -> list[tuple[str | None, str]]:
    """An object stated twice: which of the two statements should win is not ours to guess."""
    stated: dict[tuple[Kind, str], str] = {}
    problems: list[tuple[str | None, str]] = []
    for item in document.objects:
        where = stated.setdefault((item.kind, item.key), item.path)
        if where != item.path:
            problems.append((f"{item.path}.name", f"{label(item.kind, item.key)} is already defined at {where}"))
    return problems


# --- YAML -----------------------------------------------------------------------------


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


class YamlError(ValueError):
    """YAML that does not parse: 'line 2, column 1: <what the parser expected>'."""


def load_yaml(text: str) -> Any:
    """Parse YAML with keys unique per mapping; YamlError says where it went wrong."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise YamlError(f"{where}{problem}") from None


# --- the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One change of the plan. An update carries the fields it changes (snake_case)."""

    action: Literal["create", "update", "delete"]
    kind: Kind
    key: str
    spec: _Document | None = None  # the document's object (create, update)
    path: str | None = None  # where the document states it (None: a pruned object)
    fields: tuple[str, ...] = ()
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    SYMBOLS: ClassVar[dict[str, str]] = {"create": "+", "update": "~", "delete": "-"}

    def describe(self) -> str:
        """'+ VM TenantVM04', '~ logical network Virtualization (mtu: 1500 -> 1600)'."""
        line = f"{self.SYMBOLS[self.action]} {label(self.kind, self.key)}"
        if self.action == "update":
            line += " (" + "; ".join(
                f"{to_camel(name)}: {_show(self.before.get(name))} -> {_show(self.after.get(name))}"
                for name in self.fields
            ) + ")"
        return line

    def operations(self) -> list[Operation]:
        """The fabric operations that make this change, in the order they must run."""
        if self.action == "delete":
            return [Delete(self.kind, self.key)]
        spec = self.spec
        switch = getattr(spec, "virtual_switch", None)
        if self.action == "create":
            ops: list[Operation] = [Create(self.kind, spec.spec())]
            if switch is not None:
                ops.append(SetVirtualSwitch(self.key, switch.spec()))
            return ops
        ops = []
        if self.kind is Kind.vm and "host" in self.fields:  # Move-SCVirtualMachine
            ops.append(Migrate(self.key, self.after["host"]))
        patch = {name: self.after[name] for name in self.fields if name not in ("virtual_switch", "host")}
        if patch:
            ops.append(Patch(self.kind, self.key, patch))
        if "virtual_switch" in self.fields:
            ops.append(SetVirtualSwitch(self.key, switch.spec()))
        return ops


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
    """The changes that make the live fabric hold the document, in a safe order.

    `live` maps each kind to the fabric's objects (their JSON, snake_case) by key; a
    host's JSON carries its virtual switch under `virtual_switch`. Only the fields the
    document states are compared: an unstated field keeps its live value (so a document
    may describe part of the fabric, and what the controller allocated - VSID, MAC, CA,
    the placed host - is left alone). With `prune`, live objects the document does not
    state are deleted, dependants first.
    """
    changes: list[Change] = []
    for item in _ordered(document.objects):
        current = live.get(item.kind, {}).get(item.key)
        if current is None:
            changes.append(Change("create", item.kind, item.key, item.spec, item.path))
            continue
        wanted = stated_fields(item.spec)
        differ = tuple(
            name for name, value in wanted.items() if name != "name" and not _matches(value, current.get(name), name)
        )
        if differ:
            changes.append(Change("update", item.kind, item.key, item.spec, item.path, differ,
                                  {name: current.get(name) for name in differ},
                                  {name: wanted[name] for name in differ}))
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


# --- apply -----------------------------------------------------------------------------


def live_fabric(fabric: Fabric) -> dict[Kind, dict[str, dict[str, Any]]]:
    """Every object of the fabric by kind and key, as JSON; hosts with their switch."""
    return {
        kind: {obj.key: fabric.view(kind, obj).model_dump(mode="json") for obj in fabric.list(kind)}
        for kind in Kind
    }


def apply_document(fabric: Fabric, document: FabricDocument, *, dry_run: bool = False,
                   prune: bool = False) -> list[Change]:
    """Make the fabric hold the document in ONE transaction; the changes (to be) made.

    The plan is computed from the fabric's own objects and run as one
    `fabric.transact(operations, dry_run=...)`: all or nothing, and a dry run builds
    and trial-compiles exactly what the real run would. A refusal raises the fabric's
    error re-worded to name the change in document terms: `vms[3] (TenantVM04): ...`,
    field `vms[3].host`. Nothing changes.
    """
    changes = plan_changes(document, live_fabric(fabric), prune=prune)
    operations: list[Operation] = []
    owners: list[tuple[Change, Operation]] = []
    for change in changes:
        for operation in change.operations():
            operations.append(operation)
            owners.append((change, operation))
    if operations:
        try:
            fabric.transact(operations, dry_run=dry_run)
        except FabricError as exc:
            raise _in_document_terms(exc, owners) from None
    return changes


_OPERATION_INDEX = re.compile(r"^operations\[(\d+)\]")


def _in_document_terms(exc: FabricError, owners: list[tuple[Change, Operation]]) -> FabricError:
    """'operations[7] (create vms TenantVM04): ...' -> 'vms[3] (TenantVM04): ...'."""
    match = _OPERATION_INDEX.match(exc.field or "") or _OPERATION_INDEX.match(exc.error)
    if match is None or int(match.group(1)) >= len(owners):
        return exc  # not one operation's: the trial compile or the store refused the whole
    index = int(match.group(1))
    change, operation = owners[index]
    error = exc.error.removeprefix(f"operations[{index}] ({describe_operation(operation)}): ")
    inner_field = (exc.field or "").removeprefix(f"operations[{index}]").removeprefix(".")
    if change.path is None:  # a pruned object: the document does not state it
        where, field_path = f"prune ({describe_operation(operation)})", None
    else:
        where = f"{change.path} ({change.key})"
        base = f"{change.path}.virtualSwitch" if isinstance(operation, SetVirtualSwitch) else change.path
        field_path = f"{base}.{snake_to_camel(inner_field)}" if inner_field else base
    return type(exc)(f"{where}: {error}", field_path, exc.reason)
