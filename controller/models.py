"""The fabric objects, as users write them and as the controller keeps them.

Every kind mirrors a VMM cmdlet of the seed walkthrough (New-SCVMHostGroup,
New-SCLogicalNetwork, New-SCLogicalNetworkDefinition, New-SCStaticIPAddressPool,
New-SCNativeUplinkPortProfile, New-SCLogicalSwitch, New-SCVirtualNetwork, New-SCVMNetwork,
New-SCVMSubnet, New-SCVirtualMachine, Get-SCIPAddress) and of the HNV gateway
(Add-SCNetworkService for the gateway service, Add-SCVMNetworkGateway,
Add-SCNATConnection, Add-SCNATRule, New-NetVirtualizationCustomerRoute). For each kind there is a *spec*
(what a user sends on create; `extra="forbid"`, so a misspelt field is refused by name)
and a stored model (the spec plus what the controller decided: uuid, VSID, MAC, CA...).

Names are what users type. Most kinds have names unique per kind; two kinds are scoped,
because the seed itself repeats their names: a VM subnet's name is unique within its VM
network (both Fabrikam2 and Fabrikam3 have a VM subnet "Default"), and an IP pool's
name is unique within its network site or VM subnet (three pools are called "Default").
Their keys are therefore paths: ``Fabrikam2/Default`` for a VM subnet,
``Virtualization/Default`` for a site's pool, ``Fabrikam2/Default/Default`` for a VM
subnet's pool; a customer route is scoped by its VM network too (``Fabrikam2/default``).
`key_of` computes every kind's key; `PATH_KEYED` lists the kinds whose key is a path.

This module owns the shapes and the checks that need no other object (a range inside
its subnet, a family that matches, names and namespaces a terminal and `ip netns` take
safely). Checks across objects live in `controller.fabric`'s rule modules.
It must not touch the store or the network.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    IPvAnyAddress,
    IPvAnyInterface,
    IPvAnyNetwork,
    ValidationInfo,
    model_validator,
)

from agent import naming
from agent.state import (
    Ipv6Assignment,
    Encapsulation,
    IfName,
    LoadBalancing,
    MacAddress,
    PortKind,
    Protocol,
    TeamMode,
    TunnelMode,
    _refuse_twice,
    check_namespace_name,
)

ROOT_HOST_GROUP = "All Hosts"

DESCRIPTION_MAX = 1024  # characters of a description
# The lab's own namespaces (netns_lab: the switch's, `SwitchSpec.namespace`'s default;
# its hosts' namespaces are named after the hosts, which the fabric's rules refuse too).
LAB_INFRASTRUCTURE_NAMESPACES = frozenset({"lab-switch"})


def _unprintable(value: str) -> str | None:
    """The first character a terminal would act on rather than show, described, or None.

    Control characters (Cc: escape sequences, newlines), format characters (Cf: the
    bidirectional overrides U+202A-U+202E and isolates U+2066-U+2069, zero-width
    characters) and line/paragraph separators (Zl, Zp) are refused in every name and
    description, so that no name can rewrite the row a CLI prints it in.
    """
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            return f"U+{ord(char):04X} ({unicodedata.name(char, 'a control character')})"
    return None


# Validation context of objects read back from the store (`controller.inventory`): the
# rules added since an object was stored (names '.'/'..', format characters, description
# length, namespaces) are not applied to it, so a controller upgraded over an older
# database still starts and serves everything else; agent.state still refuses a
# namespace the kernel would misread, and a new write must follow today's rules.
STORED_CONTEXT = {"stored": True}


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("stored"))


def _check_name(value: str, info: ValidationInfo) -> str:
    if value != value.strip():
        raise ValueError(f"name {value!r} has leading or trailing white space")
    if "/" in value:
        raise ValueError(f"name {value!r} may not contain '/' (it separates the parts of a key)")
    if _stored(info):
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):  # the rule since the first release
            raise ValueError(f"name {value!r} may not contain control characters")
        return value
    if value in (".", ".."):
        raise ValueError(f"{value!r} is not a name (it means a directory to paths and namespaces)")
    bad = _unprintable(value)
    if bad is not None:
        raise ValueError(f"a name may not contain control or bidirectional-override characters; found {bad}")
    return value


def _check_description(value: str, info: ValidationInfo) -> str:
    if _stored(info):
        return value
    if len(value) > DESCRIPTION_MAX:
        raise ValueError(f"a description is at most {DESCRIPTION_MAX} characters, this one has {len(value)}")
    bad = _unprintable(value)
    if bad is not None:
        raise ValueError(f"a description may not contain control or bidirectional-override characters; found {bad}")
    return value


def _check_vm_namespace(value: str, info: ValidationInfo | None = None) -> str:
    if info is not None and _stored(info):
        return value
    check_namespace_name(value)
    if value in LAB_INFRASTRUCTURE_NAMESPACES:
        raise ValueError(f"namespace {value} is the lab's own (its switch); a VM may not join it")
    return value


# A name users type: 1..256 characters, no '/', which separates the parts of a key, not
# '.' or '..', no control or bidirectional-override characters.
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_check_name)]
Description = Annotated[str, Field(json_schema_extra={"maxLength": DESCRIPTION_MAX}),
                        AfterValidator(_check_description)]
# A VM's network namespace: what `ip netns` accepts, and not one of the lab's own.
VmNamespace = Annotated[str, AfterValidator(_check_name), AfterValidator(_check_vm_namespace)]


class Isolation(StrEnum):
    """New-SCVMNetwork -IsolationType."""

    NoIsolation = "NoIsolation"
    WindowsNetworkVirtualization = "WindowsNetworkVirtualization"
    VLAN = "VLAN"


class AddressFamily(StrEnum):
    IPv4 = "IPv4"
    IPv6 = "IPv6"

    @property
    def version(self) -> int:
        return 4 if self is AddressFamily.IPv4 else 6


class UplinkMode(StrEnum):
    Team = "Team"
    NoTeam = "NoTeam"


class LeaseKind(StrEnum):
    CA = "CA"  # a VM's (or a gateway's back-end) customer address, from its VM subnet's pool
    PA = "PA"  # a host's provider address for one VM network, from the transport pool
    Management = "Management"  # a host's management address, when a pool covers it
    NAT = "NAT"  # a VM network's external (NAT) address, from its gateway's front-end pool
    Forwarding = "Forwarding"  # a forwarding VM network's address on the front-end, same pool


class HostRole(StrEnum):
    """What a host is for: VMs (compute) or the HNV gateway (never a VM placed there)."""

    compute = "compute"
    gateway = "gateway"


class Connectivity(StrEnum):
    """How a VM network's traffic leaves it through its gateway (Add-SCVMNetworkGateway)."""

    none = "none"  # no way out: the VRF's default stays unreachable
    nat = "nat"  # SNAT to one external address; NAT rules forward ports in (Add-SCNATConnection)
    forwarding = "forwarding"  # routed, no NAT: the VM network's prefixes on the front-end network


class MigrationStage(StrEnum):
    """Where a make-before-break migration stands (see `VmMigration`)."""

    destination = "destination"  # the destination (and the source) hold the new location; peers do not yet
    peers = "peers"  # every host of the VM network holds it; the source still holds the VM network


class Kind(StrEnum):
    """Object kinds; the value is the collection's path segment under /v1."""

    host_group = "host-groups"
    cluster = "clusters"
    host = "hosts"
    logical_network = "logical-networks"
    network_site = "network-sites"
    ip_pool = "ip-pools"
    uplink_port_profile = "uplink-port-profiles"
    logical_switch = "logical-switches"
    vm_network = "vm-networks"
    vm_subnet = "vm-subnets"
    vm = "vms"
    gateway_service = "gateway-services"
    gateway = "gateways"
    nat_connection = "nat-connections"
    nat_rule = "nat-rules"
    customer_route = "customer-routes"

    @property
    def label(self) -> str:
        """How an error message names the kind: 'VM subnet', 'IP pool'."""
        return _LABELS[self]


_LABELS = {
    Kind.host_group: "host group",
    Kind.cluster: "cluster",
    Kind.host: "host",
    Kind.logical_network: "logical network",
    Kind.network_site: "network site",
    Kind.ip_pool: "IP pool",
    Kind.uplink_port_profile: "uplink port profile",
    Kind.logical_switch: "logical switch",
    Kind.vm_network: "VM network",
    Kind.vm_subnet: "VM subnet",
    Kind.vm: "VM",
    Kind.gateway_service: "gateway service",
    Kind.gateway: "gateway",
    Kind.nat_connection: "NAT connection",
    Kind.nat_rule: "NAT rule",
    Kind.customer_route: "customer route",
}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[Kind]
    # Fields a PATCH may change; everything else is fixed at create (delete and recreate).
    patchable: ClassVar[frozenset[str]] = frozenset({"description"})


class _Stored(BaseModel):
    """Mixin for what the controller adds: the object's uuid (and its key, computed)."""

    uuid: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def key(self) -> str:
        """The identifier in its collection: the name, or a path for scoped kinds."""
        return key_of(self.kind, self)  # type: ignore[attr-defined]


# --- host groups, clusters, hosts --------------------------------------------------------


class HostGroupSpec(_Spec):
    kind: ClassVar[Kind] = Kind.host_group
    name: Name
    parent: Name | None = ROOT_HOST_GROUP
    description: Description = ""


class HostGroup(HostGroupSpec, _Stored):
    pass


class ClusterSpec(_Spec):
    kind: ClassVar[Kind] = Kind.cluster
    name: Name
    host_group: Name = ROOT_HOST_GROUP
    description: Description = ""


class Cluster(ClusterSpec, _Stored):
    pass


class HostSpec(_Spec):
    kind: ClassVar[Kind] = Kind.host
    patchable: ClassVar[frozenset[str]] = frozenset(
        {"description", "management_address", "management_gateway", "nics", "role", "tunnel_mode"}
    )
    name: Name
    # Default: the cluster's host group if a cluster is given, else All Hosts.
    host_group: Name | None = None
    cluster: Name | None = None
    management_address: IPvAnyInterface | None = None  # e.g. 10.0.0.16/24
    management_gateway: IPvAnyAddress | None = None
    nics: tuple[IfName, ...] = Field(min_length=1)
    # gateway: a host of a gateway service; placement never puts a VM there.
    role: HostRole = HostRole.compute
    # How NVGRE is built on the host (agent: HostState provider.tunnel_mode): a gretap per
    # (VSID, peer), or one flow-based tunnel with eBPF; hosts in either mode talk.
    tunnel_mode: TunnelMode = TunnelMode.device
    description: Description = ""

    @model_validator(mode="after")
    def _check(self) -> HostSpec:
        if len(set(self.nics)) != len(self.nics):
            raise ValueError("nics: a NIC is listed twice")
        if (
            self.management_gateway is not None
            and self.management_address is not None
            and self.management_gateway not in self.management_address.network
        ):
            raise ValueError(
                f"management_gateway: {self.management_gateway} is outside "
                f"{self.management_address.network}"
            )
        return self


class Host(HostSpec, _Stored):
    host_group: Name = ROOT_HOST_GROUP


class ManagementAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Name = "Management"
    vm_network: Name


class VirtualSwitchSpec(BaseModel):
    """New-SCVirtualNetwork: a logical switch instantiated on one host."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    logical_switch: Name
    # Default: every NIC of the host.
    nics: tuple[IfName, ...] | None = None
    # Default: the logical switch's first uplink port profile.
    uplink_port_profile: Name | None = None
    management_adapter: ManagementAdapter | None = None


class VirtualSwitch(VirtualSwitchSpec):
    host: Name
    nics: tuple[IfName, ...]
    uplink_port_profile: Name


# --- logical networks, sites, pools --------------------------------------------------------


class LogicalNetworkSpec(_Spec):
    kind: ClassVar[Kind] = Kind.logical_network
    patchable: ClassVar[frozenset[str]] = frozenset({"description", "mtu"})
    name: Name
    network_virtualization: bool = False
    encapsulation: Encapsulation = Encapsulation.nvgre  # UseGRE $true
    mtu: int = Field(default=1500, ge=1280, le=9216)
    description: Description = ""


class LogicalNetwork(LogicalNetworkSpec, _Stored):
    pass


class SubnetVlan(BaseModel):
    """New-SCSubnetVLan: a subnet and its VLAN; VLAN 0 is untagged (the native VLAN)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    subnet: IPvAnyNetwork
    vlan: int = Field(default=0, ge=0, le=4094)


class NetworkSiteSpec(_Spec):
    """New-SCLogicalNetworkDefinition."""

    kind: ClassVar[Kind] = Kind.network_site
    patchable: ClassVar[frozenset[str]] = frozenset({"description", "host_groups"})
    name: Name
    logical_network: Name
    host_groups: tuple[Name, ...] = Field(min_length=1)
    subnet_vlans: tuple[SubnetVlan, ...] = Field(min_length=1)
    description: Description = ""

    @model_validator(mode="after")
    def _check(self) -> NetworkSiteSpec:
        for i, a in enumerate(self.subnet_vlans):
            for b in self.subnet_vlans[:i]:
                if a.subnet.overlaps(b.subnet):
                    raise ValueError(f"subnet_vlans[{i}].subnet: {a.subnet} overlaps {b.subnet}")
        return self


class NetworkSite(NetworkSiteSpec, _Stored):
    pass


class IpPoolSpec(_Spec):
    """New-SCStaticIPAddressPool: on a network site, or on a VM subnet (CA space)."""

    kind: ClassVar[Kind] = Kind.ip_pool
    patchable: ClassVar[frozenset[str]] = frozenset({"description", "dns_servers"})
    name: Name
    network_site: Name | None = None
    vm_network: Name | None = None
    vm_subnet: Name | None = None
    # Default: the site's only subnet, or the VM subnet's prefix.
    subnet: IPvAnyNetwork | None = None
    # Default: the subnet's usable addresses (after the gateway when it is the first).
    range_start: IPvAnyAddress | None = None
    range_end: IPvAnyAddress | None = None
    gateway: IPvAnyAddress | None = None
    dns_servers: tuple[IPvAnyAddress, ...] = ()
    reserved: tuple[IPvAnyAddress, ...] = ()
    # An IPv6 VM subnet's pool only (default DHCPv6): SLAAC makes each VM's CA the EUI-64
    # of its MAC in the /64, which the VM forms itself from the router advertisement.
    ipv6_assignment: Ipv6Assignment | None = None
    description: Description = ""

    @model_validator(mode="after")
    def _check(self) -> IpPoolSpec:
        on_site = self.network_site is not None
        on_subnet = self.vm_network is not None or self.vm_subnet is not None
        if on_site == on_subnet:
            raise ValueError(
                "network_site: a pool is on exactly one of a network site (network_site) "
                "or a VM subnet (vm_network + vm_subnet)"
            )
        if on_subnet and self.vm_network is None:
            raise ValueError("vm_network: a VM subnet's pool names its VM network")
        if self.ipv6_assignment is not None and not on_subnet:
            raise ValueError("ipv6_assignment: only a VM subnet's pool assigns VM addresses")
        if self.ipv6_assignment is not None and self.subnet is not None and self.subnet.version != 6:
            raise ValueError(f"ipv6_assignment: {self.subnet} is not an IPv6 subnet")
        if self.subnet is not None:
            for field in ("range_start", "range_end", "gateway"):
                value = getattr(self, field)
                if value is not None and value not in self.subnet:
                    raise ValueError(f"{field}: {value} is outside the pool's subnet {self.subnet}")
            for i, value in enumerate(self.reserved):
                if value not in self.subnet:
                    raise ValueError(f"reserved[{i}]: {value} is outside the pool's subnet {self.subnet}")
        if self.range_start is not None and self.range_end is not None:
            if self.range_start.version != self.range_end.version:
                raise ValueError("range_end: range_start and range_end are of different families")
            if int(self.range_start) > int(self.range_end):
                raise ValueError(f"range_end: {self.range_end} is before range_start {self.range_start}")
        return self


class IpPool(IpPoolSpec, _Stored):
    subnet: IPvAnyNetwork
    range_start: IPvAnyAddress
    range_end: IPvAnyAddress
    gateway: IPvAnyAddress | None = None

    @property
    def size(self) -> int:
        return int(self.range_end) - int(self.range_start) + 1


# --- port profiles and switches ------------------------------------------------------------


class UplinkPortProfileSpec(_Spec):
    """New-SCNativeUplinkPortProfile."""

    kind: ClassVar[Kind] = Kind.uplink_port_profile
    patchable: ClassVar[frozenset[str]] = frozenset(
        {"description", "team_mode", "load_balancing", "network_sites"}
    )
    name: Name
    network_sites: tuple[Name, ...] = ()
    network_virtualization: bool = False
    team_mode: TeamMode = TeamMode.SwitchIndependent
    load_balancing: LoadBalancing = LoadBalancing.HostDefault
    description: Description = ""


class UplinkPortProfile(UplinkPortProfileSpec, _Stored):
    pass


class LogicalSwitchSpec(_Spec):
    """New-SCLogicalSwitch plus its uplink port profile sets (one per profile)."""

    kind: ClassVar[Kind] = Kind.logical_switch
    patchable: ClassVar[frozenset[str]] = frozenset({"description"})
    name: Name
    uplink_mode: UplinkMode = UplinkMode.Team
    uplink_port_profiles: tuple[Name, ...] = Field(min_length=1)
    description: Description = ""


class LogicalSwitch(LogicalSwitchSpec, _Stored):
    pass


# --- VM networks, VM subnets, VMs ----------------------------------------------------------


class VmNetworkSpec(_Spec):
    kind: ClassVar[Kind] = Kind.vm_network
    name: Name
    logical_network: Name
    isolation: Isolation = Isolation.WindowsNetworkVirtualization
    ca_family: AddressFamily = AddressFamily.IPv4
    pa_family: AddressFamily = AddressFamily.IPv4
    description: Description = ""


class VmNetwork(VmNetworkSpec, _Stored):
    # Network-virtualised VM networks only: the routing domain's id (a VRF), 1..65535.
    routing_domain_id: int | None = None


class VmSubnetSpec(_Spec):
    """New-SCVMSubnet: a prefix (NV: a VSID is allocated) or a site's subnet + VLAN."""

    kind: ClassVar[Kind] = Kind.vm_subnet
    name: Name = "Default"
    vm_network: Name
    prefix: IPvAnyNetwork
    vlan: int | None = Field(default=None, ge=1, le=4094)  # VLAN VM networks only
    description: Description = ""


class VmSubnet(VmSubnetSpec, _Stored):
    vsid: int | None = None  # network-virtualised VM networks only
    gateway_mac: MacAddress | None = None  # the distributed router's MAC, same on every host


class VmSpec(_Spec):
    kind: ClassVar[Kind] = Kind.vm
    patchable: ClassVar[frozenset[str]] = frozenset({"description", "nic_kind", "device", "netns"})
    name: Name
    vm_network: Name
    vm_subnet: Name | None = None  # default: the VM network's only VM subnet
    host: Name | None = None  # default: placement picks one
    host_group: Name | None = None  # placement only among hosts in this group
    mac: MacAddress | None = None  # default: from the MAC pool
    ca: IPvAnyAddress | None = None  # default: from the VM subnet's pool
    nic_kind: PortKind = PortKind.namespace
    device: IfName | None = None
    netns: VmNamespace | None = None  # namespace NIC: its namespace (default: the VM's name)
    description: Description = ""

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> VmSpec:
        if self.nic_kind is PortKind.namespace and self.device is not None:
            raise ValueError("device: only a tap NIC names a device")
        derived = naming.vm_tap(self.name)
        if self.device is not None and self.device.startswith(naming.PREFIX) and self.device != derived \
                and not _stored(info):
            raise ValueError(f"device: {self.device} begins with {naming.PREFIX}, which names openhnv's own "
                             f"devices; leave device out and the tap is {derived}")
        if self.nic_kind is PortKind.namespace and self.netns is None and not _stored(info):
            try:  # the VM's name is its namespace's name
                _check_vm_namespace(self.name)
            except ValueError as exc:
                raise ValueError(f"name: {exc}; give the VM a netns") from None
        return self

    @property
    def namespace(self) -> str | None:
        """The network namespace of a namespace NIC (None for a tap NIC)."""
        return (self.netns or self.name) if self.nic_kind is PortKind.namespace else None


# How long a stage of a staged migration waits for its hosts to report InSync before the
# next stage is published anyway (`hnv-controller run --migration-bound`).
MIGRATION_BOUND_S = 5.0


class VmMigration(BaseModel):
    """A migration in progress, as the controller stages it (never written by a user).

    `source` is the host the VM left; `stage` the stage published now; `since` the Unix
    time that stage was committed (every replica measures the bound from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Name
    stage: MigrationStage
    since: float


class Vm(VmSpec, _Stored):
    vm_subnet: Name
    host: Name
    mac: MacAddress
    migration: VmMigration | None = None  # set by the controller while a migration is staged

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tap_device(self) -> str | None:
        """A tap NIC's device on its host: `device` when given, else derived from the VM's
        name (agent.naming.vm_tap). What the hypervisor must name the tap (libvirt's
        ``<target dev=.../>``, qemu's ``ifname=``) and what the host's agent plugs."""
        if self.nic_kind is not PortKind.tap:
            return None
        return self.device or naming.vm_tap(self.name)


def computed_fields(obj: BaseModel) -> set[str]:
    """The fields a stored object shows but does not keep (its key, a VM's tap device):
    left out wherever it is written down or validated again."""
    return set(type(obj).model_computed_fields)


# --- the HNV gateway ----------------------------------------------------------------------


class GatewayServiceSpec(_Spec):
    """The HNV gateway as VMM's network service (Add-SCNetworkService).

    Front-end connection: an external logical network (no network virtualisation), one
    of its sites, and that site's static IP pool the external addresses come from.
    Back-end connection: the network-virtualisation logical network whose VM networks it
    serves. Its gateway hosts are ordered: the active one, then the standbys; `active`
    is the host that holds the external addresses now (default the first). The
    controller may change `active` (failover moves it to the next host that reports),
    so it is a stored, patchable field and never inferred from the order alone.
    """

    kind: ClassVar[Kind] = Kind.gateway_service
    patchable: ClassVar[frozenset[str]] = frozenset({"description", "hosts", "active"})
    name: Name
    front_end_logical_network: Name
    front_end_site: Name
    external_ip_pool: Name  # the pool's name within front_end_site
    back_end_logical_network: Name
    hosts: tuple[Name, ...] = Field(min_length=1)
    active: Name | None = None
    description: Description = ""

    @model_validator(mode="after")
    def _check(self) -> GatewayServiceSpec:
        _refuse_twice(((f"hosts[{i}]", host) for i, host in enumerate(self.hosts)), "host {value} is listed twice")
        if self.active is not None and self.active not in self.hosts:
            raise ValueError(f"active: {self.active} is not one of the service's hosts ({', '.join(self.hosts)})")
        return self

    @property
    def pool_key(self) -> str:
        """The key of the front-end pool: ``External/Default``."""
        return f"{self.front_end_site}/{self.external_ip_pool}"


class GatewayService(GatewayServiceSpec, _Stored):
    active: Name
    # When `active` last changed and why ("created", "set by hand", "failover: ..."): what
    # `hnvctl gateway-service list` shows; stamped by the fabric, never given by a client.
    active_since: datetime | None = None
    active_reason: str = ""


class GatewaySpec(_Spec):
    """Add-SCVMNetworkGateway: a VM network connected to a gateway service's back-end.

    The gateway takes a back-end CA (from the VM subnet's pool unless given) and a MAC
    in the VM network: the next hop of the VM network's default customer route on
    every host. `connectivity` says how traffic leaves: none, nat (with a NAT
    connection) or forwarding (routed, no NAT; takes a forwarding address from the
    service's front-end pool).
    """

    kind: ClassVar[Kind] = Kind.gateway
    patchable: ClassVar[frozenset[str]] = frozenset({"description", "connectivity"})
    name: Name
    vm_network: Name
    gateway_service: Name
    connectivity: Connectivity = Connectivity.none
    vm_subnet: Name | None = None  # where the back-end CA lives (default: the VM network's only VM subnet)
    back_end_ca: IPvAnyAddress | None = None  # default: the VM subnet's pool's next free
    description: Description = ""


class Gateway(GatewaySpec, _Stored):
    vm_subnet: Name
    back_end_ca: IPvAnyAddress
    back_end_mac: MacAddress
    forwarding_address: IPvAnyAddress | None = None  # connectivity forwarding only


class NatConnectionSpec(_Spec):
    """Add-SCNATConnection -ExternalIPPool: the external address of a nat gateway."""

    kind: ClassVar[Kind] = Kind.nat_connection
    name: Name
    gateway: Name
    external_ip_pool: Name | None = None  # default: the service's; a pool of its front-end site
    external_address: IPvAnyAddress | None = None  # default: the pool's next free address
    description: Description = ""


class NatConnection(NatConnectionSpec, _Stored):
    external_ip_pool: Name
    external_address: IPvAnyAddress
    vm_network: Name


class NatRuleSpec(_Spec):
    """Add-SCNATRule: protocol and external port of a NAT connection -> a VM (or a CA) and port."""

    kind: ClassVar[Kind] = Kind.nat_rule
    name: Name
    nat_connection: Name
    protocol: Protocol = Protocol.tcp
    external_port: int = Field(ge=1, le=65_535)
    vm: Name | None = None  # follows the VM's CA
    ca: IPvAnyAddress | None = None  # or a fixed customer address of the VM network
    internal_port: int | None = Field(default=None, ge=1, le=65_535)  # default: the external port
    description: Description = ""

    @model_validator(mode="after")
    def _check(self) -> NatRuleSpec:
        if (self.vm is None) == (self.ca is None):
            raise ValueError("vm: a NAT rule forwards to exactly one of a VM (vm) or a customer address (ca)")
        return self


class NatRule(NatRuleSpec, _Stored):
    internal_port: int = Field(ge=1, le=65_535)


class CustomerRouteSpec(_Spec):
    """New-NetVirtualizationCustomerRoute: a destination prefix of a VM network's routing
    domain and its next hop, a customer address inside one of the VM network's subnets."""

    kind: ClassVar[Kind] = Kind.customer_route
    name: Name
    vm_network: Name
    prefix: IPvAnyNetwork
    next_hop: IPvAnyAddress
    description: Description = ""

    @model_validator(mode="after")
    def _check(self) -> CustomerRouteSpec:
        if self.prefix.version != self.next_hop.version:
            raise ValueError(f"next_hop: {self.next_hop} is not of the family of the prefix {self.prefix}")
        return self


class CustomerRoute(CustomerRouteSpec, _Stored):
    pass


# --- leases ------------------------------------------------------------------------------


class Lease(BaseModel):
    """One row of Get-SCIPAddress: an address taken from a pool and what holds it."""

    model_config = ConfigDict(frozen=True)
    address: IPvAnyAddress
    pool: str  # the pool's key
    kind: LeaseKind
    holder_kind: str  # "vm" or "host"
    holder: str  # the VM's or the host's name
    host: str | None = None
    vm_network: str | None = None
    description: Description = ""


# --- keys --------------------------------------------------------------------------------

SPEC_OF: dict[Kind, type[_Spec]] = {
    Kind.host_group: HostGroupSpec,
    Kind.cluster: ClusterSpec,
    Kind.host: HostSpec,
    Kind.logical_network: LogicalNetworkSpec,
    Kind.network_site: NetworkSiteSpec,
    Kind.ip_pool: IpPoolSpec,
    Kind.uplink_port_profile: UplinkPortProfileSpec,
    Kind.logical_switch: LogicalSwitchSpec,
    Kind.vm_network: VmNetworkSpec,
    Kind.vm_subnet: VmSubnetSpec,
    Kind.vm: VmSpec,
    Kind.gateway_service: GatewayServiceSpec,
    Kind.gateway: GatewaySpec,
    Kind.nat_connection: NatConnectionSpec,
    Kind.nat_rule: NatRuleSpec,
    Kind.customer_route: CustomerRouteSpec,
}
STORED_OF: dict[Kind, type[BaseModel]] = {
    Kind.host_group: HostGroup,
    Kind.cluster: Cluster,
    Kind.host: Host,
    Kind.logical_network: LogicalNetwork,
    Kind.network_site: NetworkSite,
    Kind.ip_pool: IpPool,
    Kind.uplink_port_profile: UplinkPortProfile,
    Kind.logical_switch: LogicalSwitch,
    Kind.vm_network: VmNetwork,
    Kind.vm_subnet: VmSubnet,
    Kind.vm: Vm,
    Kind.gateway_service: GatewayService,
    Kind.gateway: Gateway,
    Kind.nat_connection: NatConnection,
    Kind.nat_rule: NatRule,
    Kind.customer_route: CustomerRoute,
}
# Kinds whose key is a path (their names are unique within a parent): the API serves
# them under /v1/<kind>/{key:path}.
PATH_KEYED = frozenset({Kind.vm_subnet, Kind.ip_pool, Kind.customer_route})


def key_of(kind: Kind, obj: Any) -> str:
    """The object's identifier in its collection (its name, or a path for scoped kinds)."""
    if kind in (Kind.vm_subnet, Kind.customer_route):
        return f"{obj.vm_network}/{obj.name}"
    if kind is Kind.ip_pool:
        if obj.network_site is not None:
            return f"{obj.network_site}/{obj.name}"
        return f"{obj.vm_network}/{obj.vm_subnet}/{obj.name}"
    return obj.name


def first_host_address(network: ipaddress.IPv4Network | ipaddress.IPv6Network):
    """The first usable address of a prefix: the default gateway (192.168.0.1)."""
    if network.num_addresses == 1:
        return network.network_address
    return network.network_address + 1


def last_host_address(network: ipaddress.IPv4Network | ipaddress.IPv6Network):
    if network.version == 4 and network.num_addresses > 2:
        return network.broadcast_address - 1
    return network.broadcast_address


# --- errors ------------------------------------------------------------------------------


class FabricError(Exception):
    """A refused operation: HTTP status, a line naming the object, the field, the reason.

    The API turns it into {"error": ..., "field": ..., "reason": ...}.
    """

    status = 422

    def __init__(self, error: str, field: str | None = None, reason: str | None = None):
        super().__init__(error)
        self.error = error
        self.field = field
        self.reason = reason or error

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "field": self.field, "reason": self.reason}


class Invalid(FabricError):
    """The request itself is wrong (a field's value): 422."""

    status = 422


class NotFound(FabricError):
    status = 404


class Conflict(FabricError):
    """The request is well formed but the fabric refuses it (exists, in use, exhausted): 409."""

    status = 409
