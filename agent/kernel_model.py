"""The kernel-keyed object model shared by plan, observe, tunnels and apply.

Owns plain frozen records of the kernel objects the agent manages, keyed the way the
kernel keys them: links by name, bridge VLANs by (device, vid), addresses by (device,
address/prefix), routes by (table, family, destination, metric), FDB entries by (bridge or VXLAN device,
MAC), neighbours by (device, IP), the one nftables table of a gateway host
(`NatTable`, by digest), and in flow mode the eBPF map entries and the tc programs of
agent.flowmode. `KernelState` holds one set of them; the desired
state (compiled from a HostState by ``agent.plan``) and the observed state (read back by
``agent.observe``) are both a `KernelState`, so the diff compares like with like.

Pure data: no kernel access, no pyroute2 import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent import naming

Options = tuple[tuple[str, Any], ...]

# Bridge port flags of a tunnel port (gretap or VXLAN device on a VSID bridge),
# l2population style: no learning (the lookup records are the truth), ARP/ND for a
# remote CA answered on the host from the permanent neighbour entry (neigh_suppress),
# and no flooding of unknown unicast, multicast or broadcast onto the PA network.
# IPv6 off on a device that must never speak for itself. A bridge port with IPv6 sends
# its own router solicitations and MLD reports straight out (past the bridge's flood
# flags), and a bridge floods what it originates itself to every port whatever the
# port's flood flags say: either way host noise would cross the PA network inside a
# tenant's VSID. Set before the device first goes up, so not one packet leaves.
QUIET: Options = (("disable_ipv6", 1),)
# A VRF, and an IPv6 device of a VM network (VSID bridge, gateway leg or back-end port), route by
# the agent's routes alone: a router advertisement arriving on it (a tenant VM's rogue
# one, or the host's own server's looped back) must not put a default route into the
# VRF. With the kernel's default (accept_ra 1) one did, in the seed lab's IPv6 tenant, and
# every resync deleted it again: a drift repair every few seconds, forever.
NO_ROUTER_ADVERTISEMENTS: Options = (("accept_ra", 0),)

TUNNEL_PORT_FLAGS: Options = (
    ("learning", 0),
    ("neigh_suppress", 1),
    ("unicast_flood", 0),
    ("mcast_flood", 0),
    ("bcast_flood", 0),
)


@dataclass(frozen=True)
class VmEnd:
    """The VM side of a lab (namespace) port: what the agent, as hypervisor, sets up."""

    namespace: str
    mac: str
    ca: str | None  # "192.168.0.10/24"
    gateway: str | None
    mtu: int | None
    # The guest asks DHCP for its address (hnv-agent run --vm-dhcp): ca, gateway and mtu
    # are None, and the agent starts the guest's client once the NIC is made (agent.guest).
    dhcp: bool = False


@dataclass(frozen=True)
class Link:
    """One network device. `owned` links carry the ifalias marker and may be deleted;
    external ones (team member NICs, a hypervisor's tap) are only configured."""

    name: str
    kind: str  # bond, bridge, vlan, vrf, gretap, vxlan, veth, nic, tap
    role: str  # naming.TEAM, SWITCH, ... or "member" / "external"
    key: str = ""
    owned: bool = True
    options: Options = ()  # fixed at creation; a difference means delete and recreate
    settings: Options = ()  # kind-specific, changeable in place (bond hash policy, ...)
    master: str | None = None
    mtu: int | None = None  # None: not managed
    mac: str | None = None  # None: not managed
    up: bool = True
    port_flags: Options = ()  # bridge port flags; empty: not managed
    vm: VmEnd | None = None
    # A device the agent neither creates nor owns and plugs only while its address is
    # this one: a real VM's tap (agent.plan, "Tap ports"). Checked, never set.
    expect_mac: str | None = None
    index: int = 0  # observed only

    @property
    def alias(self) -> str | None:
        return naming.marker(self.role, self.key) if self.owned else None

    def option(self, name: str) -> Any:
        return dict(self.options).get(name)

    def setting(self, name: str) -> Any:
        return dict(self.settings).get(name)


@dataclass(frozen=True)
class BridgeVlan:
    """A VLAN on a port of the switch (or on the switch itself: ``self``)."""

    device: str
    vid: int
    pvid: bool = False
    untagged: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.device, self.vid)


@dataclass(frozen=True)
class Address:
    device: str
    cidr: str  # "10.80.2.20/24"

    @property
    def key(self) -> tuple[str, str]:
        return (self.device, self.cidr)


@dataclass(frozen=True)
class Route:
    """A route the agent manages: a VRF's unreachable default (so nothing leaks into the
    main table), a VRF's customer route (a prefix via a next hop on a VSID bridge), a
    gateway leg's default route, or the management default route. Keyed with its metric:
    a VRF's customer default route and its unreachable default live side by side."""

    table: int
    dst: str  # "default" or a prefix
    family: int  # 4 or 6
    type: str = "unicast"  # unicast | unreachable
    gateway: str | None = None
    device: str | None = None
    metric: int = 0

    @property
    def key(self) -> tuple[int, int, str, int]:
        return (self.table, self.family, self.dst, self.metric)


@dataclass(frozen=True)
class Fdb:
    """A forwarding entry. A bridge entry (``port`` set) says which port of ``device`` (a
    bridge) a MAC lives behind; the kernel keys it by (bridge, MAC), so moving a MAC to
    another port is a replace, never a delete then add. A VXLAN entry (``dst`` set, on the
    VXLAN device itself) says which PA a MAC lives behind.

    Every bridge entry the agent writes is ``sticky``: the lookup records, not what the
    bridge sees, say where a MAC is. A static entry that is not sticky moves to whichever
    port a frame from that MAC last came in by (learning, on a VM's port); on a
    migration's source, where the VM still sends by its old port after its entry moved
    to the tunnel towards the destination, the entry went back onto that port and was
    flushed with it when the port was deleted, and what the peers still sent the source
    for the VM was flooded, which tunnel ports refuse: lost until the peers switched (the
    agent's own kernel events wake no reconcile to put the entry back).
    Sticky also keeps another port from taking a VM's MAC over by sending from it."""

    device: str
    mac: str
    port: str | None = None
    dst: str | None = None
    sticky: bool = False  # NTF_STICKY (bridge entries); observed as the kernel has it

    @property
    def key(self) -> tuple[str, str]:
        return (self.device, self.mac)


@dataclass(frozen=True)
class Neighbour:
    """A permanent neighbour (ARP/ND) entry CA -> MAC on a VSID bridge."""

    device: str
    ip: str
    mac: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.device, self.ip)


@dataclass(frozen=True)
class NatTable:
    """The agent's nftables table (agent.nat): compared by the digest of its document
    and its number of rules; `commands` (nft JSON, one string per command) and `summary`
    are carried by the desired table only, to build it."""

    digest: str
    rules: int
    commands: tuple[str, ...] = field(default=(), compare=False, repr=False)
    summary: str = field(default="", compare=False)


@dataclass(frozen=True)
class FlowRemote:
    """Flow mode (agent.flowmode): a remote MAC of a VSID and the PAs to encapsulate
    with (an entry of the eBPF map hnv_remotes)."""

    vsid: int
    mac: str
    remote: str
    local: str

    @property
    def key(self) -> tuple[int, str]:
        return (self.vsid, self.mac)


@dataclass(frozen=True)
class FlowPort:
    """Flow mode: a VSID's tunnel port and the flow tunnel it encapsulates into (entries
    of hnv_vsids, VSID -> port, and hnv_ports, port -> VSID and tunnel)."""

    vsid: int
    port: str
    tunnel: str

    @property
    def key(self) -> int:
        return self.vsid


@dataclass(frozen=True)
class TcProgram:
    """Flow mode: an eBPF program attached at tc (clsact) on a device, one direction."""

    device: str
    direction: str  # ingress | egress
    program: str  # hnv_encap | hnv_decap; observed: "<name> id <n>" when not the pinned one

    @property
    def key(self) -> tuple[str, str]:
        return (self.device, self.direction)


@dataclass
class KernelState:
    """One complete set of managed kernel objects, desired or observed."""

    links: dict[str, Link] = field(default_factory=dict)
    vlans: dict[tuple[str, int], BridgeVlan] = field(default_factory=dict)
    addresses: dict[tuple[str, str], Address] = field(default_factory=dict)
    routes: dict[tuple[int, int, str, int], Route] = field(default_factory=dict)
    fdb: dict[tuple[str, str], Fdb] = field(default_factory=dict)
    neighbours: dict[tuple[str, str], Neighbour] = field(default_factory=dict)
    nat: NatTable | None = None
    flow_remotes: dict[tuple[int, str], FlowRemote] = field(default_factory=dict)
    flow_ports: dict[int, FlowPort] = field(default_factory=dict)
    tc_programs: dict[tuple[str, str], TcProgram] = field(default_factory=dict)

    def add(self, obj: Link | BridgeVlan | Address | Route | Fdb | Neighbour
            | FlowRemote | FlowPort | TcProgram) -> None:
        if isinstance(obj, Link):
            self.links[obj.name] = obj
        else:
            table = {
                BridgeVlan: self.vlans, Address: self.addresses, Route: self.routes,
                Fdb: self.fdb, Neighbour: self.neighbours, FlowRemote: self.flow_remotes,
                FlowPort: self.flow_ports, TcProgram: self.tc_programs,
            }[type(obj)]
            table[obj.key] = obj  # type: ignore[index]

    def counts(self) -> dict[str, int]:
        """Objects by kind, as the daemon's metrics report them."""
        counts: dict[str, int] = {}
        for link in self.links.values():
            counts[link.role] = counts.get(link.role, 0) + 1
        counts.update(
            vlan=len(self.vlans), address=len(self.addresses), route=len(self.routes),
            fdb=len(self.fdb), neighbour=len(self.neighbours),
        )
        if self.nat is not None:
            counts["nat_rule"] = self.nat.rules
        if self.flow_remotes or self.flow_ports or self.tc_programs:
            counts.update(flowremote=len(self.flow_remotes), flowvsid=len(self.flow_ports),
                          tcprogram=len(self.tc_programs))
        return counts
