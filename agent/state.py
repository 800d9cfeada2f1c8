"""The wire contract between the controller and the agent: one host's desired state.

The controller compiles a `HostState` per host from its fabric; the agent validates it
(here), keeps the last accepted one on disk and realises it in the kernel. Nothing else
crosses that line, so every rule a kernel or a peer relies on is checked here, before
anything is touched:

- VSIDs lie in 4096..16777214 (RFC 7637 reserves 0..0xFFF and 0xFFFFFF);
- VLAN ids lie in 1..4094;
- MACs are unicast and well formed;
- a VM's CA and a lookup record's CA lie inside the prefix of their VSID's VM subnet;
- provider addresses (and the PAs of Static/L2Only records) lie in the provider subnet;
- (VSID, CA) and (VSID, MAC) are unique among the lookup records;
- interface names fit IFNAMSIZ (15 bytes); a tap device is one port's, never the switch,
  the team or one of its NICs;
- a tenant MTU plus the encapsulation overhead fits the provider MTU (never fragment
  silently);
- a routing domain (VM network) is IPv4 or IPv6, never both;
- a VM subnet's DNS servers (for DHCP) are unicast, of its family, each once; its DHCP
  lease time lies in 120 s..1 year;
- a customer route's next hop lies inside a subnet of its routing domain;
- the HNV gateway (`gateway`, on gateway hosts only): each leg belongs to a routing
  domain of the host, its back-end port lies in one of that domain's subnets, its
  external address in the front-end subnet, on a VLAN that is neither the provider's
  nor a VLAN network's; NAT rules only on nat legs, an (protocol, port) once per leg,
  forwarded to a CA of the leg's routing domain; forwarded prefixes never overlap
  between forwarding legs.

`fabric` names the fabric (the controller's store) a state comes from. Generations count
within one fabric: an agent that holds generation 9 of one fabric and is offered
generation 1 of another (a controller rebuilt or restored onto a new store) takes the new
one instead of ignoring it as stale (agent.intake). It is not content: two states that
differ only in `fabric` have the same `content_digest`.

This module owns the models and their validation. It must not import pyroute2, touch
the kernel, or know how objects are named in the kernel.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import Counter
from enum import StrEnum
from typing import Annotated, Any, Iterable

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyAddress,
    IPvAnyInterface,
    IPvAnyNetwork,
    ValidationError,
    model_validator,
)

from agent.text import describe_validation_error  # noqa: F401 - also imported from here

VSID_MIN = 4096
VSID_MAX = 16_777_214
VLAN_MIN = 1
VLAN_MAX = 4094
IFNAMSIZ = 15  # usable bytes of a Linux interface name (IFNAMSIZ 16 minus the NUL)
MAX_DNS_SERVERS = 8  # per VM subnet: what DHCP option 6 carries to a VM
LEASE_TIME_MIN = 120  # seconds; dnsmasq's own floor
LEASE_TIME_MAX = 365 * 24 * 3600

# Bytes an encapsulated tenant frame adds to the provider packet. The inner Ethernet
# header (14) travels inside the tunnel, so it counts against the provider MTU too.
# NVGRE: outer IP + GRE with key (8) + inner Ethernet. VXLAN: outer IP + UDP (8) +
# VXLAN (8) + inner Ethernet.
OUTER_IP_HEADER = {4: 20, 6: 40}
ENCAP_HEADER = {"nvgre": 8 + 14, "vxlan": 8 + 8 + 14}


def encapsulation_overhead(encapsulation: str, pa_version: int) -> int:
    """Bytes the encapsulation adds on top of the tenant MTU (42 for NVGRE over IPv4)."""
    return OUTER_IP_HEADER[pa_version] + ENCAP_HEADER[encapsulation]


# --- scalar types -------------------------------------------------------------------


def _check_vsid(value: int) -> int:
    if not VSID_MIN <= value <= VSID_MAX:
        raise ValueError(
            f"VSID {value} is outside {VSID_MIN}..{VSID_MAX} "
            "(RFC 7637 reserves 0..0xFFF and 0xFFFFFF)"
        )
    return value


def _check_vlan(value: int) -> int:
    if not VLAN_MIN <= value <= VLAN_MAX:
        raise ValueError(f"VLAN {value} is outside {VLAN_MIN}..{VLAN_MAX}")
    return value


def _check_ifname(value: str) -> str:
    size = len(value.encode())
    if size == 0:
        raise ValueError("interface name is empty")
    if size > IFNAMSIZ:
        raise ValueError(f"interface name {value!r} is {size} bytes, over the kernel's {IFNAMSIZ}")
    if value in (".", "..") or any(c in value for c in "/: \t\n"):
        raise ValueError(f"interface name {value!r} may not contain '/', ':' or white space")
    return value


_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def normalize_mac(value: Any) -> str:
    """'00-15-5D-01-02-03' or '00155d010203' -> '00:15:5d:01:02:03'; multicast refused."""
    if not isinstance(value, str):
        raise ValueError(f"MAC address must be a string, got {type(value).__name__}")
    text = value.strip().lower()
    if not _MAC_RE.match(text):
        raise ValueError(f"{value!r} is not a MAC address (six hex octets)")
    digits = re.sub(r"[:-]", "", text)
    mac = ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    if int(digits[0:2], 16) & 1:
        raise ValueError(f"MAC address {mac} is multicast (the low bit of its first octet is set)")
    if digits == "0" * 12:
        raise ValueError("MAC address 00:00:00:00:00:00 is not a usable unicast address")
    return mac


Vsid = Annotated[int, AfterValidator(_check_vsid)]
VlanId = Annotated[int, AfterValidator(_check_vlan)]
IfName = Annotated[str, AfterValidator(_check_ifname)]
MacAddress = Annotated[str, BeforeValidator(normalize_mac)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
FabricId = Annotated[str, Field(pattern=r"^[0-9A-Za-z-]{1,64}$")]

NAME_MAX = 255  # bytes in one file name: a named network namespace is the file /run/netns/<name>


def check_namespace_name(value: str) -> str:
    """A name `ip netns` and the kernel accept for a network namespace, else ValueError.

    iproute2 refuses an empty name, one longer than NAME_MAX bytes, one with '/', and
    '.' or '..' (they would name /run/netns itself or its parent); control characters
    are refused too, so a name never rewrites a terminal that prints it.
    """
    if not value:
        raise ValueError("a namespace name is empty")
    if value in (".", ".."):
        raise ValueError(f"{value!r} cannot name a network namespace (it would be /run/netns/{value})")
    if "/" in value:
        raise ValueError(f"{value!r} cannot name a network namespace: it contains '/'")
    if len(value.encode()) > NAME_MAX:
        raise ValueError(f"a namespace name is at most {NAME_MAX} bytes, this one has {len(value.encode())}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{value!r} cannot name a network namespace: it contains a control character")
    return value


NamespaceName = Annotated[str, AfterValidator(check_namespace_name)]


class Ipv6Assignment(StrEnum):
    """How the VMs of an IPv6 VM subnet get their address (an IP pool's choice)."""

    DHCPv6 = "DHCPv6"  # the CA the controller allocated, handed out by the host's DHCPv6 server
    SLAAC = "SLAAC"  # the VM forms it from the advertised /64 and its MAC (EUI-64); the CA is that


class TeamMode(StrEnum):
    """LBFO team modes. Kernel: active-backup, balance-xor, 802.3ad."""

    SwitchIndependent = "SwitchIndependent"
    Static = "Static"
    LACP = "LACP"


class LoadBalancing(StrEnum):
    """LBFO load-balancing algorithms. Kernel: a bond xmit_hash_policy."""

    HostDefault = "HostDefault"
    Dynamic = "Dynamic"
    HyperVPort = "HyperVPort"
    TransportPorts = "TransportPorts"
    IPAddresses = "IPAddresses"
    MacAddresses = "MacAddresses"


class Encapsulation(StrEnum):
    nvgre = "nvgre"
    vxlan = "vxlan"


class TunnelMode(StrEnum):
    """How NVGRE tunnels are built (docs/architecture.md, "Tunnel modes")."""

    device = "device"  # one gretap per (VSID, remote PA), FlowID 0
    flow = "flow"  # one collect-metadata gretap per host, eBPF at tc, per-flow FlowID


class RecordType(StrEnum):
    """Lookup record types, as Get-NetVirtualizationLookupRecord shows them."""

    Static = "Static"  # a VM: CA -> MAC on a PA
    Gateway = "Gateway"  # the VM subnet's gateway, answered by the local host
    # The HNV gateway's back-end port (the customer routes' next hop) on the ACTIVE
    # gateway host's PA: a CA -> MAC -> PA record like Static (Windows lists it with
    # CustomerAddress 0.0.0.0 and routes to it; here the CA is the next hop itself).
    GatewayWildcard = "GatewayWildcard"
    L2Only = "L2Only"  # MAC -> PA only: no CA is proxied for it


class PortKind(StrEnum):
    namespace = "namespace"  # lab: a veth pair, the VM end inside a network namespace
    tap = "tap"  # a real VM: an existing tap device created by the hypervisor


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- the host's fabric side -----------------------------------------------------------


class Team(_Model):
    """The uplink team (LBFO) over the host's NICs; a trunk port of the switch."""

    name: IfName = "hnv-team"
    members: tuple[IfName, ...]
    mode: TeamMode = TeamMode.SwitchIndependent
    load_balancing: LoadBalancing = LoadBalancing.HostDefault

    @model_validator(mode="after")
    def _members_unique(self) -> Team:
        if not self.members:
            raise ValueError("members: a team needs at least one NIC")
        twice = [name for name, count in Counter(self.members).items() if count > 1]
        if twice:
            raise ValueError(f"members: NIC {twice[0]} is listed twice")
        if self.name in self.members:
            raise ValueError(f"name: team {self.name} cannot be its own member")
        return self


class Switch(_Model):
    """The host's virtual switch, an instance of a logical switch."""

    name: IfName = "hnv-sw"
    logical_switch: Name


class Management(_Model):
    """The management adapter: untagged (native VLAN) on the switch."""

    address: IPvAnyInterface
    gateway: IPvAnyAddress | None = None

    @model_validator(mode="after")
    def _gateway_on_link(self) -> Management:
        if self.gateway is not None and self.gateway not in self.address.network:
            raise ValueError(f"gateway: {self.gateway} is outside {self.address.network}")
        return self


class ProviderAddress(_Model):
    """One PA: this host's address on the transport VLAN for one routing domain."""

    routing_domain: Name
    address: IPvAnyAddress


class ProviderNetwork(_Model):
    """The transport network (the logical network's site): VLAN, subnet, MTU, PAs."""

    logical_network: Name
    vlan: VlanId
    subnet: IPvAnyNetwork
    gateway: IPvAnyAddress | None = None
    mtu: int = Field(default=1500, ge=1280, le=9216)
    encapsulation: Encapsulation = Encapsulation.nvgre
    tunnel_mode: TunnelMode = TunnelMode.device
    addresses: tuple[ProviderAddress, ...] = ()

    @model_validator(mode="after")
    def _addresses_in_subnet(self) -> ProviderNetwork:
        for i, pa in enumerate(self.addresses):
            if pa.address not in self.subnet:
                raise ValueError(
                    f"addresses[{i}].address: provider address {pa.address} is outside "
                    f"the provider subnet {self.subnet} of logical network {self.logical_network}"
                )
        _refuse_twice(
            ((f"addresses[{i}].address", pa.address) for i, pa in enumerate(self.addresses)),
            "provider address {value} is given twice",
        )
        _refuse_twice(
            (
                (f"addresses[{i}].routing_domain", pa.routing_domain)
                for i, pa in enumerate(self.addresses)
            ),
            "routing domain {value} has two provider addresses on this host",
        )
        if self.tunnel_mode is TunnelMode.flow and self.encapsulation is not Encapsulation.nvgre:
            raise ValueError(
                f"tunnel_mode: flow mode is for NVGRE; {self.encapsulation} already uses "
                "one device per VSID"
            )
        if self.gateway is not None and self.gateway not in self.subnet:
            raise ValueError(f"gateway: {self.gateway} is outside the provider subnet {self.subnet}")
        return self

    def address_for(self, routing_domain: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        for pa in self.addresses:
            if pa.routing_domain == routing_domain:
                return pa.address
        return None


class VlanNetwork(_Model):
    """A VLAN-isolated VM network (HOSTCLUSTER style): ports carry the VLAN untagged."""

    name: Name
    vlan: VlanId


class VmSubnet(_Model):
    """A VM subnet: one VSID, one prefix, its gateway (the distributed router's .1)."""

    name: Name = "Default"
    vsid: Vsid
    prefix: IPvAnyNetwork
    gateway: IPvAnyAddress | None = None
    mtu: int | None = Field(default=None, ge=576, le=9216)
    # DHCP (agent.dhcp): the DNS servers of the subnet's IP pool, and the lease time
    # (None: DEFAULT_LEASE_TIME). dnsmasq refuses leases under two minutes.
    dns_servers: tuple[IPvAnyAddress, ...] = Field(default=(), max_length=MAX_DNS_SERVERS)
    lease_time: int | None = Field(default=None, ge=LEASE_TIME_MIN, le=LEASE_TIME_MAX)
    # An IPv6 subnet's: DHCPv6 (None, the default) or SLAAC (router advertisements with the
    # autonomous flag and no DHCPv6 server; each VM forms its CA from its MAC).
    ipv6_assignment: Ipv6Assignment | None = None

    @model_validator(mode="after")
    def _gateway_in_prefix(self) -> VmSubnet:
        if self.gateway is not None and self.gateway not in self.prefix:
            raise ValueError(f"gateway: {self.gateway} is outside the VM subnet {self.prefix}")
        if self.ipv6_assignment is not None and self.prefix.version != 6:
            raise ValueError(f"ipv6_assignment: the VM subnet {self.prefix} is not IPv6")
        if self.ipv6_assignment is Ipv6Assignment.SLAAC and self.prefix.prefixlen != 64:
            raise ValueError(f"ipv6_assignment: SLAAC needs a /64, the VM subnet is {self.prefix}")
        for i, server in enumerate(self.dns_servers):
            if server.version != self.prefix.version:
                raise ValueError(f"dns_servers[{i}]: {server} is not IPv{self.prefix.version} "
                                 f"like the VM subnet {self.prefix}")
            if server.is_unspecified or server.is_multicast or server.is_loopback:
                raise ValueError(f"dns_servers[{i}]: {server} is not a unicast address a VM can reach")
        _refuse_twice(((f"dns_servers[{i}]", s) for i, s in enumerate(self.dns_servers)),
                      "DNS server {value} is given twice")
        return self


class CustomerRoute(_Model):
    """New-NetVirtualizationCustomerRoute: a prefix routed, in the VRF, to a next hop
    inside one of the routing domain's subnets (0.0.0.0/0 to the gateway's back-end
    address when the VM network has a nat or forwarding gateway)."""

    prefix: IPvAnyNetwork
    next_hop: IPvAnyAddress


class RoutingDomain(_Model):
    """A network-virtualised VM network: one routing domain (a VRF) of VM subnets."""

    id: int = Field(ge=1, le=65_535)
    name: Name
    subnets: tuple[VmSubnet, ...]
    routes: tuple[CustomerRoute, ...] = ()
    # PAs of hosts that may send this VM network's frames while no record names them: the
    # two ends of a migration in progress (the VM has a NIC on both for a while). The
    # agent keeps a tunnel to each, as to the PAs its records name, since the kernel
    # accepts a GRE packet only on a tunnel matching its (local, remote, key).
    transit: tuple[IPvAnyAddress, ...] = ()

    @model_validator(mode="after")
    def _subnets_consistent(self) -> RoutingDomain:
        if not self.subnets:
            raise ValueError(f"subnets: VM network {self.name} has no VM subnet")
        versions = {subnet.prefix.version for subnet in self.subnets}
        if len(versions) > 1:
            raise ValueError(
                f"subnets: VM network {self.name} mixes IPv4 and IPv6; "
                "network virtualisation is never dual-stack"
            )
        for i, a in enumerate(self.subnets):
            for b in self.subnets[:i]:
                if a.prefix.overlaps(b.prefix):
                    raise ValueError(
                        f"subnets[{i}].prefix: {a.prefix} overlaps {b.prefix} "
                        f"in the same VM network {self.name}"
                    )
        version = self.subnets[0].prefix.version
        for i, route in enumerate(self.routes):
            if route.prefix.version != version or route.next_hop.version != version:
                raise ValueError(f"routes[{i}].prefix: route {route.prefix} via {route.next_hop} is not "
                                 f"IPv{version} like VM network {self.name}")
            if not any(route.next_hop in subnet.prefix for subnet in self.subnets):
                raise ValueError(f"routes[{i}].next_hop: {route.next_hop} is outside every subnet of "
                                 f"VM network {self.name}")
        _refuse_twice(((f"routes[{i}].prefix", r.prefix) for i, r in enumerate(self.routes)),
                      "prefix {value} is routed twice")
        return self


# --- the host's VMs and lookup records ---------------------------------------------------


class VmPort(_Model):
    """A VM's network adapter on this host."""

    name: Name  # the VM's name, e.g. TenantVM01
    mac: MacAddress
    vsid: Vsid | None = None
    vlan: VlanId | None = None
    ca: IPvAnyInterface | None = None  # the VM's address, with its prefix length
    kind: PortKind = PortKind.namespace
    netns: NamespaceName | None = None  # namespace kind: the VM's namespace (default: name)
    device: IfName | None = None  # tap kind: the hypervisor's tap device

    @model_validator(mode="after")
    def _one_network(self) -> VmPort:
        if (self.vsid is None) == (self.vlan is None):
            raise ValueError("vsid: a VM port has exactly one of vsid (virtualised) or vlan")
        if self.kind is PortKind.tap and self.device is None:
            raise ValueError("device: a tap port names its existing tap device")
        if self.kind is PortKind.namespace and self.device is not None:
            raise ValueError("device: only a tap port names a device")
        if self.kind is PortKind.namespace and self.netns is None:
            try:  # the VM's name is its namespace's name
                check_namespace_name(self.name)
            except ValueError as exc:
                raise ValueError(f"name: {exc}; give the port a netns") from None
        return self

    @property
    def namespace(self) -> str:
        return self.netns or self.name


class LookupRecord(_Model):
    """CA -> (MAC, PA) in one VSID: Get-NetVirtualizationLookupRecord, one row."""

    vsid: Vsid
    ca: IPvAnyAddress
    mac: MacAddress
    pa: IPvAnyAddress
    type: RecordType = RecordType.Static
    vm_name: str = ""


# --- the HNV gateway (gateway hosts only) ----------------------------------------------


class LegConnectivity(StrEnum):
    nat = "nat"  # SNAT to the leg's address; DNAT for the NAT rules
    forwarding = "forwarding"  # routed unchanged; the upstream routes `forwarded` to the leg's address


class Protocol(StrEnum):
    tcp = "tcp"
    udp = "udp"


class DnatRule(_Model):
    """Add-SCNATRule: protocol and external port of the leg's address -> a CA and port."""

    protocol: Protocol
    external_port: int = Field(ge=1, le=65_535)
    address: IPvAnyAddress  # a CA of the leg's routing domain
    port: int = Field(ge=1, le=65_535)
    name: str = ""  # the NAT rule's name, for logs


class BackEndPort(_Model):
    """The gateway's own port in a VM network: its CA (the customer routes' next hop)
    and MAC, on the bridge of `vsid`."""

    vsid: Vsid
    address: IPvAnyInterface
    mac: MacAddress


class GatewayLeg(_Model):
    """One VM network through this gateway host: its VRF's way out to the front-end.

    `address` is the leg's address on the front-end subnet: for nat the external
    (NAT) address every connection leaving the VRF is SNATed to; for forwarding the
    next hop the upstream router's static routes for `forwarded` name. The VRF's default
    route goes via the front-end's upstream gateway on this leg.
    """

    routing_domain: Name
    connectivity: LegConnectivity
    back_end: BackEndPort
    address: IPvAnyInterface
    dnat: tuple[DnatRule, ...] = ()
    forwarded: tuple[IPvAnyNetwork, ...] = ()  # forwarding: the VM network's prefixes


class FrontEnd(_Model):
    """The gateway service's front-end connection: a VLAN on the trunk, its subnet and
    the upstream router."""

    logical_network: Name
    vlan: VlanId
    subnet: IPvAnyNetwork
    gateway: IPvAnyAddress | None = None

    @model_validator(mode="after")
    def _gateway_in_subnet(self) -> FrontEnd:
        if self.gateway is not None and self.gateway not in self.subnet:
            raise ValueError(f"gateway: {self.gateway} is outside the front-end subnet {self.subnet}")
        return self


class GatewayRole(_Model):
    """This host is a host of gateway service `service`: active (it holds the legs'
    addresses and answers for the GatewayWildcard records) or standby (it builds the
    same legs, addresses down, ready to take over)."""

    service: Name
    active: bool
    front_end: FrontEnd
    legs: tuple[GatewayLeg, ...] = ()


class HostState(_Model):
    """Everything one host must hold, at one generation."""

    host: Name
    generation: int = Field(ge=0)
    fabric: FabricId | None = None  # the store it was compiled from; see the module docstring
    team: Team | None = None
    switch: Switch | None = None
    management: Management | None = None
    provider: ProviderNetwork | None = None
    vlan_networks: tuple[VlanNetwork, ...] = ()
    routing_domains: tuple[RoutingDomain, ...] = ()
    ports: tuple[VmPort, ...] = ()
    gateway: GatewayRole | None = None
    records: tuple[LookupRecord, ...] = ()

    @model_validator(mode="after")
    def _cross_checks(self) -> HostState:
        subnets = self._subnets_by_vsid()
        self._check_switch_prerequisites()
        self._check_provider_addresses()
        self._check_mtu()
        self._check_ports(subnets)
        self._check_records(subnets)
        self._check_gateway(subnets)
        return self

    # The checks below raise ValueError("<field path>: <reason>") so that the refusal
    # names the field even though pydantic reports model-level errors at the root.

    def _subnets_by_vsid(self) -> dict[int, tuple[RoutingDomain, VmSubnet]]:
        by_vsid: dict[int, tuple[RoutingDomain, VmSubnet]] = {}
        _refuse_twice(
            ((f"routing_domains[{i}].id", rd.id) for i, rd in enumerate(self.routing_domains)),
            "routing domain id {value} is used twice",
        )
        _refuse_twice(
            ((f"routing_domains[{i}].name", rd.name) for i, rd in enumerate(self.routing_domains)),
            "routing domain {value} is given twice",
        )
        for i, rd in enumerate(self.routing_domains):
            for j, subnet in enumerate(rd.subnets):
                if subnet.vsid in by_vsid:
                    raise ValueError(
                        f"routing_domains[{i}].subnets[{j}].vsid: VSID {subnet.vsid} "
                        f"is already used by VM network {by_vsid[subnet.vsid][0].name}"
                    )
                by_vsid[subnet.vsid] = (rd, subnet)
        _refuse_twice(
            ((f"vlan_networks[{i}].vlan", n.vlan) for i, n in enumerate(self.vlan_networks)),
            "VLAN {value} is given to two VLAN networks",
        )
        return by_vsid

    def _check_switch_prerequisites(self) -> None:
        needs_switch = self.routing_domains or self.vlan_networks or self.ports or self.management
        if needs_switch and self.switch is None:
            raise ValueError("switch: VM networks, ports and the management adapter need a virtual switch")
        if self.routing_domains and self.provider is None:
            raise ValueError("provider: network-virtualised VM networks need a provider network")
        if self.provider and self.vlan_networks:
            for i, net in enumerate(self.vlan_networks):
                if net.vlan == self.provider.vlan:
                    raise ValueError(
                        f"vlan_networks[{i}].vlan: VLAN {net.vlan} is the provider network's VLAN"
                    )

    def _check_provider_addresses(self) -> None:
        if self.provider is None:
            return
        names = {rd.name for rd in self.routing_domains}
        for i, pa in enumerate(self.provider.addresses):
            if pa.routing_domain not in names:
                raise ValueError(
                    f"provider.addresses[{i}].routing_domain: {pa.routing_domain} "
                    "is not a routing domain of this host"
                )
        for i, rd in enumerate(self.routing_domains):
            pa = self.provider.address_for(rd.name)
            if pa is None:
                raise ValueError(
                    f"routing_domains[{i}]: VM network {rd.name} has no provider address on this host"
                )

    def _check_mtu(self) -> None:
        if self.provider is None:
            return
        overhead = encapsulation_overhead(self.provider.encapsulation, self.provider.subnet.version)
        limit = self.provider.mtu - overhead
        for i, rd in enumerate(self.routing_domains):
            for j, subnet in enumerate(rd.subnets):
                if subnet.mtu is not None and subnet.mtu > limit:
                    raise ValueError(
                        f"routing_domains[{i}].subnets[{j}].mtu: tenant MTU {subnet.mtu} "
                        f"does not fit the provider MTU {self.provider.mtu} after "
                        f"{self.provider.encapsulation} encapsulation ({overhead} bytes); "
                        f"at most {limit}"
                    )

    def _check_ports(self, subnets: dict[int, tuple[RoutingDomain, VmSubnet]]) -> None:
        vlans = {net.vlan for net in self.vlan_networks}
        _refuse_twice(((f"ports[{i}].name", p.name) for i, p in enumerate(self.ports)), "VM {value} has two ports")
        _refuse_twice(((f"ports[{i}].mac", p.mac) for i, p in enumerate(self.ports)), "MAC {value} is on two ports")
        _refuse_twice(((f"ports[{i}].device", p.device) for i, p in enumerate(self.ports) if p.device is not None),
                      "tap device {value} is given to two ports")
        host_devices = {self.switch.name: "the virtual switch"} if self.switch else {}
        if self.team is not None:
            host_devices[self.team.name] = "the team"
            host_devices.update((nic, "a NIC of the team") for nic in self.team.members)
        for i, port in enumerate(self.ports):
            if port.device in host_devices:
                raise ValueError(f"ports[{i}].device: {port.device} is {host_devices[port.device]}, not a VM's tap")
        for i, port in enumerate(self.ports):
            if port.vsid is not None:
                if port.vsid not in subnets:
                    raise ValueError(f"ports[{i}].vsid: VSID {port.vsid} is not a VM subnet of this host")
                prefix = subnets[port.vsid][1].prefix
                if port.ca is not None and (port.ca.ip not in prefix or port.ca.network != prefix):
                    raise ValueError(
                        f"ports[{i}].ca: {port.ca} is outside the prefix {prefix} of VSID {port.vsid}"
                    )
            elif port.vlan not in vlans:
                raise ValueError(f"ports[{i}].vlan: VLAN {port.vlan} is not a VLAN network of this host")

    def _check_records(self, subnets: dict[int, tuple[RoutingDomain, VmSubnet]]) -> None:
        for i, record in enumerate(self.records):
            where = f"records[{i}]"
            if record.vsid not in subnets:
                raise ValueError(f"{where}.vsid: VSID {record.vsid} is not a VM subnet of this host")
            prefix = subnets[record.vsid][1].prefix
            if record.ca not in prefix:
                raise ValueError(
                    f"{where}.ca: lookup record {record.ca} in VSID {record.vsid} "
                    f"is outside the prefix {prefix}"
                )
            if record.type is not RecordType.Gateway and self.provider is not None:
                if record.pa not in self.provider.subnet:
                    raise ValueError(
                        f"{where}.pa: lookup record {record.ca} in VSID {record.vsid}: "
                        f"provider address {record.pa} is not in the provider subnet "
                        f"{self.provider.subnet} of logical network {self.provider.logical_network}"
                    )
        _refuse_twice(
            ((f"records[{i}].ca", (r.vsid, r.ca)) for i, r in enumerate(self.records)),
            "(VSID, CA) {value} has two lookup records",
        )
        _refuse_twice(
            (
                (f"records[{i}].mac", (r.vsid, r.mac))
                for i, r in enumerate(self.records)
            ),
            "(VSID, MAC) {value} has two lookup records",
        )

    def _check_gateway(self, subnets: dict[int, tuple[RoutingDomain, VmSubnet]]) -> None:
        role = self.gateway
        if role is None:
            return
        if self.switch is None or self.provider is None:
            raise ValueError("gateway: a gateway host needs a virtual switch and a provider network")
        if role.front_end.vlan == self.provider.vlan:
            raise ValueError(f"gateway.front_end.vlan: VLAN {role.front_end.vlan} is the provider network's VLAN")
        if role.front_end.vlan in {net.vlan for net in self.vlan_networks}:
            raise ValueError(f"gateway.front_end.vlan: VLAN {role.front_end.vlan} is a VLAN network's VLAN")
        domains = {rd.name: rd for rd in self.routing_domains}
        _refuse_twice(((f"gateway.legs[{i}].routing_domain", leg.routing_domain) for i, leg in enumerate(role.legs)),
                      "routing domain {value} has two legs")
        _refuse_twice(((f"gateway.legs[{i}].address", leg.address.ip) for i, leg in enumerate(role.legs)),
                      "front-end address {value} is given to two legs")
        forwarded: list[tuple[str, Any]] = []
        for i, leg in enumerate(role.legs):
            where = f"gateway.legs[{i}]"
            domain = domains.get(leg.routing_domain)
            if domain is None:
                raise ValueError(f"{where}.routing_domain: {leg.routing_domain} is not a routing domain of this host")
            owner = subnets.get(leg.back_end.vsid)
            if owner is None or owner[0].name != domain.name:
                raise ValueError(f"{where}.back_end.vsid: VSID {leg.back_end.vsid} is not a VM subnet of "
                                 f"routing domain {domain.name}")
            if leg.back_end.address.network != owner[1].prefix:
                raise ValueError(f"{where}.back_end.address: {leg.back_end.address} is outside the prefix "
                                 f"{owner[1].prefix} of VSID {leg.back_end.vsid}")
            if leg.address.network != role.front_end.subnet:
                raise ValueError(f"{where}.address: {leg.address} is outside the front-end subnet "
                                 f"{role.front_end.subnet}")
            if leg.dnat and leg.connectivity is not LegConnectivity.nat:
                raise ValueError(f"{where}.dnat: only a nat leg forwards ports")
            if leg.forwarded and leg.connectivity is not LegConnectivity.forwarding:
                raise ValueError(f"{where}.forwarded: only a forwarding leg has prefixes routed to it")
            _refuse_twice(((f"{where}.dnat[{j}].external_port", (r.protocol.value, r.external_port))
                           for j, r in enumerate(leg.dnat)), "{value} is forwarded twice")
            for j, rule in enumerate(leg.dnat):
                if not any(rule.address in subnet.prefix for subnet in domain.subnets):
                    raise ValueError(f"{where}.dnat[{j}].address: {rule.address} is outside routing domain "
                                     f"{domain.name}")
            for j, prefix in enumerate(leg.forwarded):
                if not any(prefix.subnet_of(subnet.prefix) for subnet in domain.subnets
                           if subnet.prefix.version == prefix.version):
                    raise ValueError(f"{where}.forwarded[{j}]: {prefix} is not a prefix of routing domain "
                                     f"{domain.name}")
                for other_where, other in forwarded:
                    if prefix.overlaps(other):
                        raise ValueError(f"{where}.forwarded[{j}]: {prefix} overlaps {other} of {other_where}")
                forwarded.append((where, prefix))

    # --- helpers for both sides ---------------------------------------------------------

    def content_digest(self) -> str:
        """A digest of everything but the generation and the fabric id: equal digests,
        equal desired state."""
        body = self.model_dump(mode="json", exclude={"generation", "fabric"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def routing_domain_of(self, vsid: int) -> RoutingDomain | None:
        for rd in self.routing_domains:
            if any(subnet.vsid == vsid for subnet in rd.subnets):
                return rd
        return None

    def subnet_of(self, vsid: int) -> VmSubnet | None:
        for rd in self.routing_domains:
            for subnet in rd.subnets:
                if subnet.vsid == vsid:
                    return subnet
        return None

    def local_provider_addresses(self) -> set[Any]:
        return {pa.address for pa in self.provider.addresses} if self.provider else set()


def _refuse_twice(items: Iterable[tuple[str, Any]], reason: str) -> None:
    seen: set[Any] = set()
    for field, value in items:
        if value in seen:
            shown = value if not isinstance(value, tuple) else "(" + ", ".join(map(str, value)) + ")"
            raise ValueError(f"{field}: " + reason.format(value=shown))
        seen.add(value)


# --- intake -------------------------------------------------------------------------


class StateError(ValueError):
    """A state document was refused. `problems` holds one 'field: reason' line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_host_state(document: bytes | str | dict[str, Any]) -> HostState:
    """Validate a state document (JSON text or a decoded dict); raise StateError if bad."""
    try:
        if isinstance(document, (bytes, str)):
            return HostState.model_validate_json(document)
        return HostState.model_validate(document)
    except ValidationError as exc:
        raise StateError(describe_validation_error(exc)) from None
