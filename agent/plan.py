"""Plan: the pure diff between what a HostState wants and what the kernel holds.

Owns two pure functions and the `Plan` they produce:

- `desired_kernel_state(state)` compiles a validated HostState into kernel terms (the
  kernel mapping, tabled in docs/architecture.md);
- `diff(desired, observed)` compares two `KernelState`s and returns the ordered
  operations that turn the observed kernel into the desired one.

A gateway host (HostState.gateway) also gets its front-end VLAN, per leg a macvlan on it
in the leg's VRF (its address; up, with the VRF's default route via the upstream, only
while the role is active) and a macvlan back-end port on the leg's VSID bridge (the
back-end CA as /32 and MAC: the customer routes' next hop), and one nftables table
(agent.nat: conntrack zone per VRF, SNAT, DNAT) built from the same state.

Never flush: only objects the agent owns (ifalias marker, see agent.naming) are deleted,
FDB and neighbour entries only on owned devices and only the static/permanent kind the
agent writes. An empty HostState is a real answer ("hold nothing") but a failed fetch is
never turned into one; that is the daemon's job.

A real VM's port (kind tap) is the hypervisor's tap device: never created or deleted
here, plugged into its bridge (tenant MTU, IPv6 off, up) only while it exists and carries
the MAC libvirt gives the VM's tap (agent.naming.tap_mac). `Plan.taps` says, per tap,
whether it is plugged, waiting (absent: the VM is not running) or refused (another MAC,
or not a tap); an absent or refused tap plans nothing (a refused one still on its bridge
is released), and neither is an operation or an error of the plan.

Flow mode (tunnel_mode flow, agent.tunnels and agent.flowmode) adds eBPF map entries
and tc programs: made after the links (entries hold their ifindexes), map entries before
the programs that read them, deleted in the reverse order before the links.

Ordering ("why this order"): links first, in dependency order (the switch, then the
team that becomes its trunk port, then the NICs that join the team; the switch before
the provider VLAN and VM ports, the VRF before its VSID
bridges, bridges before tunnels and ports); then bridge VLANs, addresses and routes,
which need the links; then FDB before neighbours, so that by the time a neighbour entry
makes the VRF or neigh_suppress use a MAC, the bridge already knows which port the MAC is
behind (otherwise the first frames flood, and flooding is off on tunnel ports: they are
lost). The nftables table is replaced after the links its rules name exist, and deleted
before them. Every add and replace comes before any delete (make-before-break): a moved VM gets
its new tunnel and its FDB entry moved (an atomic replace) before the old tunnel goes.
Deletes run in the reverse order: neighbours, FDB, routes, addresses, VLANs, then links
from the leaves (ports, tunnels) to the trunk (team).

No pyroute2 import, no kernel access: unit-testable without root.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from agent import naming
from agent.nat import nat_table
from agent.kernel_model import (
    Address,
    BridgeVlan,
    Fdb,
    FlowPort,
    FlowRemote,
    KernelState,
    NO_ROUTER_ADVERTISEMENTS,
    QUIET,
    Link,
    Neighbour,
    Route,
    TcProgram,
    VmEnd,
)
from agent.state import (
    HostState,
    LegConnectivity,
    LoadBalancing,
    PortKind,
    RecordType,
    TeamMode,
    TunnelMode,
    encapsulation_overhead,
)
from agent.tunnels import RemoteEndpoint, flow_tunnel, flow_tunnel_objects, tunnel_objects

# Team -> bond. Kernel bond mode numbers: 1 active-backup, 2 balance-xor, 4 802.3ad.
BOND_MODE = {TeamMode.SwitchIndependent: 1, TeamMode.Static: 2, TeamMode.LACP: 4}
BOND_MIIMON_MS = 100
# LBFO load balancing -> xmit_hash_policy (0 layer2, 1 layer3+4, 2 layer2+3).
# HostDefault/Dynamic hash on transport ports on Windows; HyperVPort pins each VM port
# (each VM MAC) to one member, which the MAC hash (layer2) reproduces.
XMIT_HASH_POLICY = {
    LoadBalancing.HostDefault: 1,
    LoadBalancing.Dynamic: 1,
    LoadBalancing.TransportPorts: 1,
    LoadBalancing.IPAddresses: 2,
    LoadBalancing.MacAddresses: 0,
    LoadBalancing.HyperVPort: 0,
}
MANAGEMENT_VLAN = 1  # the native VLAN of the trunk: untagged, the switch's default PVID
MAIN_TABLE = 254
# A VRF's catch-all: without it a lookup that misses the VRF table falls through the
# l3mdev rule to the main table and a tenant packet could leave by the management route.
VRF_UNREACHABLE_METRIC = 4278198272

# Link creation order; deletes run in reverse.
ROLE_ORDER = {
    naming.SWITCH: 0, naming.TEAM: 1, "member": 2, naming.PROVIDER: 3, naming.VRF: 4,
    naming.BRIDGE: 5, naming.TUNNEL: 6, naming.VXLAN: 6, naming.FLOW_TUNNEL: 6,
    naming.FLOW_PORT: 7, naming.PORT: 7, "external": 7,
    naming.FRONTEND: 3, naming.LEG: 6, naming.BACKEND: 6,
}
# A gateway leg: kernel settings of its two macvlans. arp_notify: the kernel sends a
# gratuitous ARP for the leg's address when the leg comes up, which is what a standby
# becoming active does (its address is already there, down). forwarding: both are
# ingress devices of routed traffic. rp_filter loose on the back-end port: its address is
# a /32, the VM network's subnet route is the bridge's, so strict mode would drop every
# packet from a VM arriving on it.
LEG_SETTINGS = (("arp_notify", 1), ("forwarding", 1))
BACK_END_SETTINGS = (("forwarding", 1), ("rp_filter", 2))
LEG_MACVLAN_MODE = "private"  # legs of two VM networks never talk to each other directly
BACK_END_MACVLAN_MODE = "bridge"


# --- desired state ---------------------------------------------------------------------


def tenant_mtu(state: HostState, vsid: int) -> int:
    subnet = state.subnet_of(vsid)
    assert subnet is not None and state.provider is not None
    if subnet.mtu is not None:
        return subnet.mtu
    return state.provider.mtu - encapsulation_overhead(
        state.provider.encapsulation, state.provider.subnet.version
    )


def _port_digest(end: VmEnd) -> str:
    """Part of a port's marker: a changed MAC, CA or gateway recreates the VM end, which
    the kernel cannot show us from the host side."""
    text = f"{end.namespace}|{end.mac}|{end.ca}|{end.gateway}|{end.mtu}" + ("|dhcp" if end.dhcp else "")
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def desired_kernel_state(state: HostState, *, vm_dhcp: bool = False) -> KernelState:
    """Everything `state` asks of the kernel, in kernel terms."""
    want = KernelState()
    switch = state.switch.name if state.switch else None
    provider = state.provider

    if state.team is not None:
        team = state.team
        want.add(Link(
            name=team.name, kind="bond", role=naming.TEAM, key=team.name,
            options=(("mode", BOND_MODE[team.mode]),),
            settings=(("miimon", BOND_MIIMON_MS),
                      ("xmit_hash_policy", XMIT_HASH_POLICY[team.load_balancing])),
            master=switch, mtu=provider.mtu if provider else None,
        ))
        for nic in team.members:
            want.add(Link(name=nic, kind="nic", role="member", owned=False, master=team.name))

    if state.switch is not None:
        assert switch is not None
        want.add(Link(
            name=switch, kind="bridge", role=naming.SWITCH, key=state.switch.logical_switch,
            options=(("vlan_default_pvid", MANAGEMENT_VLAN),),
            settings=(("vlan_filtering", 1),),
            mtu=provider.mtu if provider else None,
        ))
        # The switch itself (its management address) sits untagged on the native VLAN.
        want.add(BridgeVlan(switch, MANAGEMENT_VLAN, pvid=True, untagged=True))
        trunk_vlans = [net.vlan for net in state.vlan_networks]
        if state.gateway is not None:
            trunk_vlans.append(state.gateway.front_end.vlan)
            want.add(BridgeVlan(switch, state.gateway.front_end.vlan))  # the front-end VLAN device
        if provider is not None and state.team is None:
            # Without a team the provider VLAN device sits on the switch, tagged on it.
            trunk_vlans.append(provider.vlan)
            want.add(BridgeVlan(switch, provider.vlan))
        if state.team is not None:
            want.add(BridgeVlan(state.team.name, MANAGEMENT_VLAN, pvid=True, untagged=True))
            for vid in trunk_vlans:
                want.add(BridgeVlan(state.team.name, vid))

    if state.management is not None and switch is not None:
        want.add(Address(switch, str(state.management.address)))
        if state.management.gateway is not None:
            gateway = state.management.gateway
            want.add(Route(MAIN_TABLE, "default", gateway.version, gateway=str(gateway), device=switch))

    local_pas: set[str] = set()
    if provider is not None and switch is not None:
        # The provider VLAN device sits on the team, beside the switch rather than on it:
        # the kernel hands a tagged frame to a port's VLAN device before the bridge sees
        # it, and a bridge offers no segmentation offload for encapsulated packets (its
        # hw_enc_features are empty), so a VLAN device on the switch segments every
        # tunnelled TCP super-packet in software. One on the bond passes it on to the NICs
        # where the bonding driver lets its VLAN devices offer encapsulated segmentation
        # (stable kernels from late 2024; not Debian 12's 6.1: docs/benchmarks.md).
        vlan_dev = naming.provider_vlan(switch, provider.vlan)
        lower = state.team.name if state.team is not None else switch
        want.add(Link(
            name=vlan_dev, kind="vlan", role=naming.PROVIDER, key=str(provider.vlan),
            options=(("vlan_id", provider.vlan), ("link", lower)), mtu=provider.mtu,
        ))
        for pa in provider.addresses:
            local_pas.add(str(pa.address))
            want.add(Address(vlan_dev, f"{pa.address}/{provider.subnet.prefixlen}"))

    gateway_macs = {r.vsid: r.mac for r in state.records if r.type is RecordType.Gateway}
    # The next hops this gateway host is itself (its legs' back-end CAs): a customer
    # route to one of them is replaced here by the leg's own default route.
    own_next_hops = {(leg.routing_domain, leg.back_end.address.ip)
                     for leg in (state.gateway.legs if state.gateway else ())}
    for rd in state.routing_domains:
        vrf = naming.vrf(rd.id)
        table = naming.vrf_table(rd.id)
        # The VRF device too takes no RA: the host's own server's RAs on the VRF's
        # bridges loop back to the host through it (the seed lab's learnt default route
        # was "via fe80::... dev hnvr3"), and a route learnt there lands in the VRF's table.
        want.add(Link(name=vrf, kind="vrf", role=naming.VRF, key=str(rd.id),
                      options=(("table", table),), settings=NO_ROUTER_ADVERTISEMENTS))
        family = rd.subnets[0].prefix.version
        want.add(Route(table, "default", family, type="unreachable", metric=VRF_UNREACHABLE_METRIC))
        # Distributed router: a bridge (and the gateway address) for every subnet of
        # the VM network, whether or not a local VM uses it.
        for subnet in rd.subnets:
            bridge = naming.vsid_bridge(subnet.vsid)
            want.add(Link(
                name=bridge, kind="bridge", role=naming.BRIDGE, key=str(subnet.vsid),
                # An IPv6 VM network needs the bridge's IPv6 (its gateway); an IPv4 one
                # must not have the bridge soliciting routers into the tunnels.
                settings=(("forwarding", 1),) + (QUIET if family == 4 else NO_ROUTER_ADVERTISEMENTS),
                master=vrf, mtu=tenant_mtu(state, subnet.vsid),
                mac=gateway_macs.get(subnet.vsid, naming.gateway_mac(subnet.vsid)),
            ))
            if subnet.gateway is not None:
                want.add(Address(bridge, f"{subnet.gateway}/{subnet.prefix.prefixlen}"))
        for route in rd.routes:
            if (rd.name, route.next_hop) in own_next_hops:
                continue
            on = next(s for s in rd.subnets if route.next_hop in s.prefix)  # validated
            # Via the next hop on its subnet's bridge: the packet leaves through the
            # distributed router, encapsulated to the next hop's record like any CA.
            want.add(Route(table, _route_dst(route.prefix), route.prefix.version,
                           gateway=str(route.next_hop), device=naming.vsid_bridge(on.vsid)))

    if state.gateway is not None and switch is not None:
        _add_gateway(state, want, switch)

    port_devices: dict[str, str] = {}  # VM MAC -> host-side device of its port
    for port in state.ports:
        if port.vsid is not None:
            master = naming.vsid_bridge(port.vsid)
            mtu: int | None = tenant_mtu(state, port.vsid)
            subnet = state.subnet_of(port.vsid)
            gateway = str(subnet.gateway) if subnet and subnet.gateway else None
        else:
            master, mtu, gateway = switch, None, None
        if port.kind is PortKind.tap:
            assert port.device is not None
            device = port.device
            # The hypervisor's device: plugged only while it carries the MAC libvirt gives
            # this VM's tap (naming.tap_mac), never created, never deleted (see tap_ports).
            link = Link(name=device, kind="tap", role="external", key=port.name, owned=False,
                        settings=QUIET, master=master, mtu=mtu, expect_mac=naming.tap_mac(port.mac))
        else:
            device = naming.vm_port(port.name)
            if vm_dhcp and gateway is not None and port.ca is not None and port.ca.version == 4:
                # The lab's guest asks the host's DHCP server (agent.dhcp) for all of it.
                end = VmEnd(namespace=port.namespace, mac=port.mac, ca=None, gateway=None, mtu=None, dhcp=True)
            else:
                end = VmEnd(namespace=port.namespace, mac=port.mac,
                            ca=str(port.ca) if port.ca else None, gateway=gateway, mtu=mtu)
            link = Link(name=device, kind="veth", role=naming.PORT, settings=QUIET,
                        key=f"{port.name}:{_port_digest(end)}", master=master, mtu=mtu, vm=end)
        want.add(link)
        port_devices[port.mac] = device
        if port.vlan is not None:
            # The VLAN network's VLAN is the port's only VLAN, untagged: the VM never
            # sees a tag and never reaches the native (management) VLAN.
            want.add(BridgeVlan(device, port.vlan, pvid=True, untagged=True))

    _add_records(state, want, local_pas, port_devices)
    return want


def _route_dst(prefix: Any) -> str:
    """A route's destination as observe reads it back: "default" for /0."""
    return "default" if prefix.prefixlen == 0 else str(prefix)


def _add_gateway(state: HostState, want: KernelState, switch: str) -> None:
    """A gateway host's front-end VLAN, its legs (front-end and back-end macvlans in each
    leg's VRF), the legs' default routes and the nftables table."""
    role = state.gateway
    assert role is not None
    front = role.front_end
    quiet = QUIET if front.subnet.version == 4 else NO_ROUTER_ADVERTISEMENTS
    front_dev = naming.provider_vlan(switch, front.vlan)
    want.add(Link(name=front_dev, kind="vlan", role=naming.FRONTEND, key=str(front.vlan),
                  options=(("link", switch), ("vlan_id", front.vlan)), settings=quiet))
    domains = {rd.name: rd for rd in state.routing_domains}
    zones: dict[str, int] = {}
    snat: list[tuple[str, str]] = []
    dnat: list[tuple[str, str, str, int, str, int]] = []
    for leg in role.legs:
        rd = domains[leg.routing_domain]  # validated: a leg's routing domain is the host's
        vrf = naming.vrf(rd.id)
        leg_dev = naming.gateway_leg(rd.id)
        want.add(Link(
            name=leg_dev, kind="macvlan", role=naming.LEG, key=str(rd.id),
            options=(("link", front_dev), ("mode", LEG_MACVLAN_MODE)),
            settings=LEG_SETTINGS + quiet, master=vrf, up=role.active,
        ))
        # The address stays on a standby's leg, which is down: taking over is bringing
        # the leg up (and its gratuitous ARP, see LEG_SETTINGS).
        want.add(Address(leg_dev, str(leg.address)))
        if role.active and front.gateway is not None:
            want.add(Route(naming.vrf_table(rd.id), "default", front.gateway.version,
                           gateway=str(front.gateway), device=leg_dev))
        back = leg.back_end
        bridge = naming.vsid_bridge(back.vsid)
        back_dev = naming.gateway_back_end(rd.id)
        want.add(Link(
            name=back_dev, kind="macvlan", role=naming.BACKEND, key=str(rd.id),
            options=(("link", bridge), ("mode", BACK_END_MACVLAN_MODE)),
            settings=BACK_END_SETTINGS + (QUIET if back.address.version == 4 else NO_ROUTER_ADVERTISEMENTS),
            master=vrf, mtu=tenant_mtu(state, back.vsid) if state.provider else None,
            mac=back.mac, up=role.active,
        ))
        # A host route: the subnet's route stays the bridge's (the distributed router).
        want.add(Address(back_dev, f"{back.address.ip}/{back.address.max_prefixlen}"))
        for device in (vrf, leg_dev, back_dev, *(naming.vsid_bridge(s.vsid) for s in rd.subnets)):
            zones[device] = rd.id
        if leg.connectivity is LegConnectivity.nat:
            external = str(leg.address.ip)
            snat.append((leg_dev, external))
            dnat.extend((leg_dev, external, rule.protocol.value, rule.external_port,
                         str(rule.address), rule.port) for rule in leg.dnat)
    if role.legs:
        want.nat = nat_table(zones, snat, dnat)


def _add_records(state: HostState, want: KernelState, local_pas: set[str],
                 port_devices: dict[str, str]) -> None:
    provider = state.provider
    remotes: dict[int, list[RemoteEndpoint]] = {}
    for record in state.records:
        if record.type is RecordType.Gateway:
            continue  # the local VSID bridge owns the gateway address and MAC
        bridge = naming.vsid_bridge(record.vsid)
        pa = str(record.pa)
        if pa in local_pas:
            device = port_devices.get(record.mac)
            if device is not None:
                want.add(Fdb(bridge, record.mac, port=device, sticky=True))
        else:
            remotes.setdefault(record.vsid, []).append(RemoteEndpoint(record.mac, pa))
        if record.type in (RecordType.Static, RecordType.GatewayWildcard):
            # Permanent: answered by neigh_suppress for ARP from local VMs, and what the
            # VRF routes with for traffic from other subnets.
            want.add(Neighbour(bridge, str(record.ca), record.mac))
    if provider is None:
        return
    flow = provider.tunnel_mode is TunnelMode.flow
    for rd in state.routing_domains:
        local = provider.address_for(rd.name)
        if local is None:
            continue
        if flow:
            for obj in flow_tunnel(local.version):
                want.add(obj)
            for subnet in rd.subnets:
                for obj in flow_tunnel_objects(subnet.vsid, str(local), naming.vsid_bridge(subnet.vsid),
                                               tenant_mtu(state, subnet.vsid), remotes.get(subnet.vsid, [])):
                    want.add(obj)
            continue
        # The peers of a VM network: every remote PA behind any of its subnets, and the
        # ends of a migration in progress (`transit`, received from before any record
        # names them).
        vsids = [subnet.vsid for subnet in rd.subnets]
        peers = {e.pa for vsid in vsids for e in remotes.get(vsid, [])}
        peers |= {str(pa) for pa in rd.transit if pa.version == local.version} - local_pas
        for vsid in vsids:
            for obj in tunnel_objects(provider.encapsulation.value, vsid, str(local),
                                      naming.vsid_bridge(vsid), tenant_mtu(state, vsid),
                                      remotes.get(vsid, []), peers):
                want.add(obj)


# --- tap ports ---------------------------------------------------------------------------

# What became of a real VM's tap in a plan.
PLUGGED = "plugged"  # there with the right MAC: plugged (or kept) on its bridge
WAITING = "waiting"  # not there: the VM is not running; plugged when it appears
REFUSED = "refused"  # there but not the VM's (another MAC, not a tap): never plugged


@dataclass(frozen=True)
class TapPort:
    """One real VM's tap as a plan found it: the device, where it goes, and its state."""

    vm: str
    device: str
    state: str  # PLUGGED, WAITING or REFUSED
    bridge: str | None  # its master when plugged (a VSID bridge, or the switch for a VLAN network)
    expected_mac: str
    seen_mac: str | None = None
    reason: str = ""

    def describe(self) -> str:
        text = f"{self.state} tap {self.device} of VM {self.vm}"
        return f"{text}: {self.reason}" if self.reason else f"{text} on {self.bridge}"

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "device": self.device, "state": self.state, "bridge": self.bridge,
                "expected_mac": self.expected_mac, "seen_mac": self.seen_mac, "reason": self.reason}


def tap_ports(want: KernelState, have: KernelState) -> tuple[TapPort, ...]:
    """Each wanted tap (a Link with `expect_mac`) against the kernel.

    Why the MAC decides: the name alone says nothing about whose device it is (a VM of
    another tenant restarted under a reused name, a tap made by hand). libvirt gives the
    host end of a tap the VM's MAC with its first octet replaced (naming.tap_mac), so a
    tap carrying that address was made for this VM; any other address is refused and the
    tap never joins the tenant's bridge."""
    found = []
    for link in sorted(want.links.values(), key=lambda l: l.name):
        if link.expect_mac is None:
            continue
        old = have.links.get(link.name)
        seen = old.mac.lower() if old is not None and old.mac else None
        base = dict(vm=link.key, device=link.name, bridge=link.master, expected_mac=link.expect_mac, seen_mac=seen)
        if old is None:
            found.append(TapPort(state=WAITING, reason="not there yet (the hypervisor creates it when the VM "
                                 "starts); plugged when it appears", **base))
        elif old.kind != "tap":
            found.append(TapPort(state=REFUSED, reason=f"{link.name} is a {old.kind} device, not a tap; "
                                 "not plugged", **base))
        elif seen != link.expect_mac:
            found.append(TapPort(state=REFUSED, reason=f"its MAC is {seen}, expected {link.expect_mac} (the "
                                 "VM's MAC with the first octet fe, or fa for a MAC beginning with fe, as libvirt "
                                 "sets it); not plugged", **base))
        else:
            found.append(TapPort(state=PLUGGED, **base))
    return tuple(found)


def _without_devices(want: KernelState, devices: set[str]) -> KernelState:
    """`want` without the links `devices` and what lives on them (FDB entries pointing at
    them, their VLANs): an absent or refused tap is no part of the plan, and a refused tap
    still on its bridge is released like any device the agent no longer wants."""
    kept = replace(want)
    kept.links = {name: link for name, link in want.links.items() if name not in devices}
    kept.fdb = {key: f for key, f in want.fdb.items() if f.port not in devices}
    kept.vlans = {key: v for key, v in want.vlans.items() if v.device not in devices}
    return kept


# --- the plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One kernel operation. `action` is add, replace, set, release or delete."""

    action: str
    kind: str  # team, member, switch, provider, vrf, bridge, tunnel, vxlan, port, external,
    #            frontend, leg, backend, vlan, address, route, fdb, neighbour, nat
    name: str
    desired: Any = None
    observed: Any = None
    detail: str = ""

    def describe(self) -> str:
        text = f"{self.action} {self.kind} {self.name}"
        return f"{text} {self.detail}" if self.detail else text


@dataclass(frozen=True)
class Plan:
    ops: tuple[Op, ...] = ()
    desired: KernelState = field(default_factory=KernelState, compare=False, repr=False)
    taps: tuple[TapPort, ...] = ()  # the real VMs' taps: plugged, waiting or refused (not ops)

    @property
    def is_empty(self) -> bool:
        return not self.ops

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self):
        return iter(self.ops)

    def describe(self) -> str:
        lines = [op.describe() for op in self.ops]
        lines += [tap.describe() for tap in self.taps if tap.state != PLUGGED]
        return "\n".join(lines) if lines else "nothing to do"

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        return counts


def _link_detail(link: Link) -> str:
    if link.role == naming.TUNNEL:
        return (f"vsid {link.option('ikey') >> 8} {link.option('local')} -> "
                f"{link.option('remote')}")
    if link.role == naming.VXLAN:
        return f"vni {link.option('vni')} local {link.option('local')} port {link.option('port')}"
    if link.kind == "macvlan":
        return f"on {link.option('link')} mode {link.option('mode')} master {link.master}"
    if link.role == naming.PORT and link.vm is not None:
        vm = link.key.rpartition(":")[0]
        return f"vm {vm} netns {link.vm.namespace} mac {link.vm.mac} ca {link.vm.ca}"
    parts = [f"{k} {v}" for k, v in link.options]
    if link.master:
        parts.append(f"master {link.master}")
    return " ".join(parts)


def link_changes(want: Link, have: Link) -> list[str]:
    """What an existing link must change to become `want`, as 'field old -> new'."""
    changes = []
    if want.owned and have.alias != want.alias:
        changes.append(f"alias {have.alias} -> {want.alias}")
    if have.master != want.master:
        changes.append(f"master {have.master or 'none'} -> {want.master or 'none'}")
    if want.mtu is not None and have.mtu != want.mtu:
        changes.append(f"mtu {have.mtu} -> {want.mtu}")
    if want.mac is not None and have.mac != want.mac:
        changes.append(f"mac {have.mac} -> {want.mac}")
    if have.up != want.up:
        changes.append(f"state {'up' if have.up else 'down'} -> {'up' if want.up else 'down'}")
    for name, value in want.settings:
        if have.setting(name) != value:
            changes.append(f"{name} {have.setting(name)} -> {value}")
    for name, value in want.port_flags:
        old = dict(have.port_flags).get(name)
        if old != value:
            changes.append(f"{name} {old} -> {value}")
    return changes


def option_changes(want: Link, have: Link) -> list[str]:
    """Creation-time attributes that differ: the link must be recreated."""
    if have.kind != want.kind:
        return [f"kind {have.kind} -> {want.kind}"]
    changes = [f"{k} {have.option(k)} -> {v}" for k, v in want.options if have.option(k) != v]
    if want.role == naming.PORT and have.key != want.key:
        # The VM end (MAC, CA, gateway, MTU) lives in the VM's namespace; its digest in
        # the marker is all the host side shows, and a change means rebuilding it.
        changes.append("VM end changed")
    return changes


def _without_recreated(want: KernelState, have: KernelState) -> KernelState:
    """`have` as it will be once the links that must be recreated are deleted: whatever
    lives on them (FDB, neighbours, addresses, VLANs) is gone with them, their ports lose
    their master, and a VLAN or macvlan device dies with its lower device. Planning against this
    view puts those objects back in the same plan instead of the next one."""
    direct = {name for name, link in want.links.items()
              if name in have.links and link.owned and have.links[name].owned
              and option_changes(link, have.links[name])}
    if not direct:
        return have
    dependents: set[str] = set()
    grew = True
    while grew:
        grew = False
        for old in have.links.values():
            if old.kind in ("vlan", "macvlan") and old.option("link") in direct | dependents \
                    and old.name not in direct | dependents:
                dependents.add(old.name)
                grew = True
    gone = direct | dependents
    after = KernelState()
    for link in have.links.values():
        if link.name in dependents:
            continue
        after.add(replace(link, master=None) if link.master in gone else link)
    for obj in have.vlans.values():
        if obj.device not in gone:
            after.add(obj)
    for obj in have.addresses.values():
        if obj.device not in gone:
            after.add(obj)
    for obj in have.routes.values():
        after.add(obj)
    for obj in have.fdb.values():
        if obj.device not in gone and obj.port not in gone:
            after.add(obj)
    for obj in have.neighbours.values():
        if obj.device not in gone:
            after.add(obj)
    return after


def _link_ops(want: KernelState, have: KernelState) -> tuple[list[Op], list[Op]]:
    make, destroy = [], []
    for link in sorted(want.links.values(), key=lambda l: (ROLE_ORDER.get(l.role, 9), l.name)):
        old = have.links.get(link.name)
        if old is None:
            make.append(Op("add", link.role, link.name, link, None, _link_detail(link)))
            continue
        if link.owned:
            if not old.owned:
                # A foreign device holds our name: never take over or delete it.
                make.append(Op("add", link.role, link.name, link, old,
                               "(name taken by a device openhnv does not own)"))
                continue
            recreate = option_changes(link, old)
            if recreate:
                make.append(Op("replace", link.role, link.name, link, old,
                               f"{_link_detail(link)} ({', '.join(recreate)})"))
                continue
        changes = link_changes(link, old)
        if changes:
            make.append(Op("set", link.role, link.name, link, old, ", ".join(changes)))
    owned_masters = {name for name, l in have.links.items() if l.owned} | set(want.links)
    for old in sorted(have.links.values(), key=lambda l: (-ROLE_ORDER.get(l.role, 9), l.name)):
        if old.name in want.links:
            continue
        if old.owned:
            destroy.append(Op("delete", old.role, old.name, None, old, _link_detail(old)))
        elif old.master in owned_masters:
            # A NIC or tap we once enslaved and no longer want: release, never delete.
            destroy.append(Op("release", "external", old.name, None, old, f"from {old.master}"))
    return make, destroy


def _managed_devices(want: KernelState, have: KernelState) -> set[str]:
    """Devices whose addresses and VLANs the agent owns exactly: its own links, the NICs it
    teamed (a team member's address is useless once the NIC is enslaved) and the VMs' taps
    it plugs (a tap on a VLAN network has that VLAN alone: not the switch's default PVID,
    the management VLAN, which the kernel gives every new port)."""
    devices = {n for n, l in want.links.items() if l.owned or l.role == "member" or l.expect_mac is not None}
    devices |= {n for n, l in have.links.items() if l.owned}
    return devices


def _table_ops(kind: str, want: dict, have: dict, managed=None, describe=str,
               replaceable=True) -> tuple[list[Op], list[Op]]:
    """add/replace ops for `want` - `have`, delete ops for `have` - `want`."""
    make, destroy = [], []
    for key, obj in want.items():
        old = have.get(key)
        if old is None:
            make.append(Op("add", kind, describe(obj), obj))
        elif old != obj:
            if replaceable:
                make.append(Op("replace", kind, describe(obj), obj, old, f"(was {describe(old)})"))
            else:
                destroy.append(Op("delete", kind, describe(old), None, old))
                make.append(Op("add", kind, describe(obj), obj))
    for key, old in have.items():
        if key not in want and (managed is None or managed(old)):
            destroy.append(Op("delete", kind, describe(old), None, old))
    return make, destroy


def _describe_vlan(v: BridgeVlan) -> str:
    flags = " pvid" * v.pvid + " untagged" * v.untagged
    return f"{v.vid} on {v.device}{flags}"


def _describe_route(r: Route) -> str:
    what = f"{r.type} {r.dst}" if r.type != "unicast" else r.dst
    via = f" via {r.gateway}" if r.gateway else ""
    dev = f" dev {r.device}" if r.device else ""
    return f"{what}{via}{dev} table {r.table}"


def _describe_fdb(f: Fdb) -> str:
    # Only the exception is named: an entry found without NTF_STICKY (written by an
    # agent before it was sticky, or by hand) is replaced by a sticky one.
    loose = f.port is not None and not f.sticky
    return f"{f.mac} on {f.device} -> {f.port or f.dst}" + (" (not sticky)" if loose else "")


def _describe_neighbour(n: Neighbour) -> str:
    return f"{n.ip} on {n.device} -> {n.mac}"


def _describe_flow_remote(r: FlowRemote) -> str:
    return f"vsid {r.vsid} {r.mac} -> {r.remote} from {r.local}"


def _describe_flow_port(p: FlowPort) -> str:
    return f"vsid {p.vsid} port {p.port} tunnel {p.tunnel}"


def _describe_tc_program(t: TcProgram) -> str:
    return f"{t.program} on {t.device} {t.direction}"


def _with_default_pvid(want: KernelState, have: KernelState, link_make: list[Op]) -> dict:
    """Observed VLANs plus the ones the kernel will add by itself: a port that joins a
    VLAN-filtering bridge gets the bridge's default PVID (VLAN 1, untagged). A VLAN
    network's port must lose it in the same plan, or the VM would sit on the management
    VLAN until the next reconcile."""
    vlans = dict(have.vlans)
    filtering = {n for n, l in want.links.items() if l.setting("vlan_filtering")}
    for op in link_make:
        link = op.desired
        if link.master not in filtering:
            continue
        was_port = op.observed is not None and op.observed.master == link.master and op.action != "replace"
        if not was_port:
            vlans.setdefault((link.name, MANAGEMENT_VLAN),
                             BridgeVlan(link.name, MANAGEMENT_VLAN, pvid=True, untagged=True))
    return vlans


def _nat_ops(want: KernelState, have: KernelState) -> tuple[list[Op], list[Op]]:
    """The nftables table: replaced whole when its digest or rule count differs."""
    name = "inet openhnv"
    if want.nat is not None and want.nat != have.nat:
        action = "add" if have.nat is None else "replace"
        return [Op(action, "nat", name, want.nat, have.nat, want.nat.summary)], []
    if want.nat is None and have.nat is not None:
        return [], [Op("delete", "nat", name, None, have.nat)]
    return [], []


def diff(want: KernelState, have: KernelState) -> Plan:
    """The ordered operations that turn `have` (observed) into `want` (desired)."""
    desired = want
    have = _without_recreated(want, have)
    taps = tap_ports(want, have)
    unplugged = {tap.device for tap in taps if tap.state != PLUGGED}
    if unplugged:
        want = _without_devices(want, unplugged)
    managed = _managed_devices(want, have)
    owned_tables = {l.option("table") for l in have.links.values() if l.owned and l.role == naming.VRF}
    owned_tables |= {l.option("table") for l in want.links.values() if l.role == naming.VRF}

    link_make, link_destroy = _link_ops(want, have)
    vlan_make, vlan_destroy = _table_ops(
        "vlan", want.vlans, _with_default_pvid(want, have, link_make),
        lambda v: v.device in managed, _describe_vlan)
    addr_make, addr_destroy = _table_ops(
        "address", want.addresses, have.addresses, lambda a: a.device in managed,
        lambda a: f"{a.cidr} on {a.device}")
    # Routes: only a VRF's own catch-all may be deleted; the main table's default route
    # is replaced when the management gateway asks for one, never removed.
    route_make, route_destroy = _table_ops(
        "route", want.routes, have.routes, lambda r: r.table in owned_tables, _describe_route)
    fdb_make, fdb_destroy = _table_ops("fdb", want.fdb, have.fdb, None, _describe_fdb)
    neigh_make, neigh_destroy = _table_ops(
        "neighbour", want.neighbours, have.neighbours, None, _describe_neighbour)
    nat_make, nat_destroy = _nat_ops(want, have)
    # Flow mode: map entries before the programs that read them (a program attached to
    # empty maps drops), all after the devices whose ifindexes the entries hold.
    port_make, port_destroy = _table_ops(
        "flowvsid", want.flow_ports, have.flow_ports, None, _describe_flow_port)
    remote_make, remote_destroy = _table_ops(
        "flowremote", want.flow_remotes, have.flow_remotes, None, _describe_flow_remote)
    prog_make, prog_destroy = _table_ops(
        "tcprogram", want.tc_programs, have.tc_programs, None, _describe_tc_program)
    flow_make = port_make + remote_make + prog_make
    flow_destroy = prog_destroy + remote_destroy + port_destroy

    ops = (link_make + vlan_make + addr_make + route_make + flow_make + fdb_make + neigh_make
           + nat_make + nat_destroy + neigh_destroy + fdb_destroy + flow_destroy + route_destroy
           + addr_destroy
           + vlan_destroy + link_destroy)
    return Plan(tuple(ops), desired, taps)


def tap_plan(want: KernelState, have: KernelState, devices: set[str]) -> Plan:
    """The plan for the taps `devices` alone, against `have` holding those links and
    their masters only (agent.observe.observe_links): the taps' own settings, master and
    VLANs and the FDB entries on them, nothing else. Their masters are taken as they
    are (a bridge that is missing or wrong is the full reconcile's): a tap whose master
    is absent plans nothing here."""
    taps = {name for name in devices if name in want.links and want.links[name].expect_mac is not None}
    sub = KernelState()
    for name in sorted(taps):
        master = want.links[name].master
        if master is None or master not in have.links:
            continue
        sub.add(want.links[name])
        sub.add(have.links[master])  # as it is: never changed here, read for its VLAN filtering
        for entry in want.fdb.values():
            if entry.port == name:
                sub.add(entry)
        for vlan in want.vlans.values():
            if vlan.device == name:
                sub.add(vlan)
    seen = KernelState()
    seen.links = {name: link for name, link in have.links.items() if name in sub.links}
    return diff(sub, seen)


def plan(state: HostState, observed: KernelState) -> Plan:
    return diff(desired_kernel_state(state), observed)

