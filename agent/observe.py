"""Observe: read the kernel back into the kernel-keyed model (agent.kernel_model).

Owns every netlink *read* of the agent: one dump each of links, bridge VLANs,
addresses, routes, FDB and neighbours on a socket the caller owns (one per namespace,
reused). It reports what it finds, filtered to what the agent may manage:

- every link (the plan decides what is ours from the ifalias marker), with the
  creation-time options and changeable settings of the kinds the agent creates;
- bridge VLANs only of VLAN-filtering bridges and their ports (a non-filtering VSID
  bridge keeps a meaningless default PVID on each port);
- FDB entries only on owned devices and on the VMs' taps plugged into an owned bridge,
  and only the static kind the agent writes: bridge entries in state NOARP without
  PERMANENT (a port's own MAC is a PERMANENT "local" entry of the bridge itself: never
  ours) and VXLAN entries with a remote PA;
- neighbours only PERMANENT ones on owned devices;
- routes: default routes of the main table (the management default route) and, in an
  owned VRF's table, the unicast and unreachable routes someone added (a catch-all, a
  customer route, a gateway leg's default), never the kernel's own (proto kernel:
  connected and local routes).

The gateway host's nftables table is read by agent.nat (`observe_table`), which
agent.reconcile calls when the kernel holds gateway devices.

Writes nothing. `read_tunnel_stats` reads the per-tunnel counters; `observe_links` reads
a few links by name (a VM's tap and its bridge: agent.reconcile's `plug_taps`).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from agent import naming
from agent.kernel_model import (
    Address,
    BridgeVlan,
    Fdb,
    KernelState,
    Link,
    Neighbour,
    Route,
)
from agent.flowmode import FlowDatapath
from agent.netlink_batch import NeighbourSocket
from agent.tunnels import ENCAPLIMIT_NONE, GRE_KEY_FLAG, IP6_TNL_F_IGN_ENCAP_LIMIT, TunnelStats, tunnel_identity

AF_BRIDGE = 7
IFF_UP = 0x1
IFF_TAP = 0x2  # IFLA_TUN_TYPE of a tap (IFF_TUN, 0x1, of a tun)
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
RTN_UNREACHABLE = 7
RTN_UNICAST = 1
RTPROT_KERNEL = 2
MACVLAN_MODES = {1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source"}
# Per-device IPv4 settings the agent manages, by link kind (agent.apply writes them).
_INET_SETTINGS = {"bridge": ("forwarding",), "macvlan": ("forwarding", "rp_filter", "arp_notify")}
# Kernel attribute -> option/setting name, per link kind.
_OPTIONS = {
    "bond": {"IFLA_BOND_MODE": "mode"},
    "bridge": {"IFLA_BR_VLAN_DEFAULT_PVID": "vlan_default_pvid"},
    "vlan": {"IFLA_VLAN_ID": "vlan_id"},
    "vrf": {"IFLA_VRF_TABLE": "table"},
    "macvlan": {"IFLA_MACVLAN_MODE": "mode"},
    "gretap": {"IFLA_GRE_LOCAL": "local", "IFLA_GRE_REMOTE": "remote",
               "IFLA_GRE_TTL": "ttl", "IFLA_GRE_PMTUDISC": "pmtudisc",
               "IFLA_GRE_COLLECT_METADATA": "external"},
    "vxlan": {"IFLA_VXLAN_ID": "vni", "IFLA_VXLAN_LOCAL": "local", "IFLA_VXLAN_PORT": "port",
              "IFLA_VXLAN_LEARNING": "learning", "IFLA_VXLAN_TTL": "ttl"},
}
# pyroute2 decodes an ip6gretap's attributes as IFLA_IP6GRE_* (the kernel's names are
# IFLA_GRE_* for both); IFLA_GRE_FLAGS carries ip6gretap's "encaplimit none".
_OPTIONS["ip6gretap"] = {"IFLA_IP6GRE_LOCAL": "local", "IFLA_IP6GRE_REMOTE": "remote",
                         "IFLA_IP6GRE_TTL": "ttl"}
_SETTINGS = {
    "bond": {"IFLA_BOND_MIIMON": "miimon", "IFLA_BOND_XMIT_HASH_POLICY": "xmit_hash_policy"},
    "bridge": {"IFLA_BR_VLAN_FILTERING": "vlan_filtering"},
}
_PORT_FLAGS = {
    "IFLA_BRPORT_LEARNING": "learning", "IFLA_BRPORT_NEIGH_SUPPRESS": "neigh_suppress",
    "IFLA_BRPORT_UNICAST_FLOOD": "unicast_flood", "IFLA_BRPORT_MCAST_FLOOD": "mcast_flood",
    "IFLA_BRPORT_BCAST_FLOOD": "bcast_flood",
}


def _attr_list(nla: Any) -> list[tuple[str, Any]]:
    """An NLA's nested attributes as (name, value) pairs, in kernel order."""
    if nla is None or isinstance(nla, (str, bytes)) or "attrs" not in nla:
        return []
    return [(item[0], item[1]) for item in nla["attrs"]]


def _attrs(nla: Any) -> dict[str, Any]:
    """An NLA's nested attributes as a dict (first value of each name)."""
    out: dict[str, Any] = {}
    for name, value in _attr_list(nla):
        out.setdefault(name, value)
    return out


def _value(nla: Any) -> Any:
    # pyroute2 returns scalars as-is, structs as dicts; normalise booleans to ints.
    return int(nla) if isinstance(nla, bool) else nla


def _link_from_msg(msg: Any, names: dict[int, str]) -> Link:
    name = msg.get_attr("IFLA_IFNAME")
    info = _attrs(msg.get_attr("IFLA_LINKINFO"))
    kind = info.get("IFLA_INFO_KIND") or "nic"
    data = _attrs(info.get("IFLA_INFO_DATA"))
    if kind == "tun":
        # The kernel calls tun and tap devices "tun"; IFLA_TUN_TYPE tells them apart.
        kind = "tap" if data.get("IFLA_TUN_TYPE") == IFF_TAP else "tun"
    options = {opt: _value(data[attr]) for attr, opt in _OPTIONS.get(kind, {}).items() if attr in data}
    if kind in ("vlan", "macvlan"):
        options["link"] = names.get(msg.get_attr("IFLA_LINK") or 0)
    if kind == "macvlan" and isinstance(options.get("mode"), int):
        options["mode"] = MACVLAN_MODES.get(options["mode"], options["mode"])
    if kind in ("gretap", "ip6gretap"):
        # The key only counts when the KEY flag is set; otherwise the kernel sends no key.
        # pyroute2 reads an ip6gretap's flags as a host-order u16 (agent.apply.gre_tunnel_spec).
        prefix = "IFLA_GRE_" if kind == "gretap" else "IFLA_IP6GRE_"
        for direction in ("i", "o"):
            flags = data.get(f"{prefix}{direction.upper()}FLAGS") or 0
            if kind == "ip6gretap":
                flags = socket.ntohs(flags)
            key = data.get(f"{prefix}{direction.upper()}KEY")
            options[f"{direction}key"] = key if flags & GRE_KEY_FLAG else None
        if kind == "ip6gretap" and "IFLA_IP6GRE_FLAGS" in data:
            ignored = data["IFLA_IP6GRE_FLAGS"] & IP6_TNL_F_IGN_ENCAP_LIMIT
            options["encaplimit"] = ENCAPLIMIT_NONE if ignored else data.get("IFLA_IP6GRE_ENCAP_LIMIT")
    settings = {opt: _value(data[attr]) for attr, opt in _SETTINGS.get(kind, {}).items() if attr in data}
    af_spec = _attrs(msg.get_attr("IFLA_AF_SPEC"))
    inet = af_spec.get("AF_INET")
    for setting in _INET_SETTINGS.get(kind, ()):
        if inet is not None and setting in inet:
            settings[setting] = inet[setting]
    inet6 = _attrs(af_spec.get("AF_INET6")).get("IFLA_INET6_CONF")
    for setting in ("disable_ipv6", "accept_ra"):
        if inet6 is not None and setting in inet6:
            settings[setting] = inet6[setting]
    port_flags: dict[str, int] = {}
    if info.get("IFLA_INFO_SLAVE_KIND") == "bridge":
        slave = _attrs(info.get("IFLA_INFO_SLAVE_DATA"))
        port_flags = {flag: _value(slave[attr]) for attr, flag in _PORT_FLAGS.items() if attr in slave}
    alias = msg.get_attr("IFLA_IFALIAS")
    owner = naming.parse_marker(alias)
    return Link(
        name=name,
        kind=kind,
        role=owner[0] if owner else "external",
        key=owner[1] if owner else "",
        owned=naming.is_owned(name, alias),
        options=tuple(sorted(options.items())),
        settings=tuple(sorted(settings.items())),
        master=names.get(msg.get_attr("IFLA_MASTER") or 0),
        mtu=msg.get_attr("IFLA_MTU"),
        mac=msg.get_attr("IFLA_ADDRESS"),
        up=bool(msg["flags"] & IFF_UP),
        port_flags=tuple(sorted(port_flags.items())),
        index=msg["index"],
    )


def observe(ipr: Any, records: NeighbourSocket, flow: FlowDatapath | None = None) -> KernelState:
    """One read of everything the agent manages in the namespace of `ipr` (a pyroute2
    IPRoute) and `records` (the same namespace's netlink_batch socket); with `flow`, the
    flow-mode maps and tc programs of that namespace too (nothing when never loaded)."""
    have = KernelState()
    messages = list(ipr.get_links())
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in messages}
    for msg in messages:
        have.add(_link_from_msg(msg, names))
    owned = {l.index for l in have.links.values() if l.owned}
    owned_names = {names[i] for i in owned}

    filtering = {l.name for l in have.links.values() if l.kind == "bridge" and l.setting("vlan_filtering")}
    vlan_devices = filtering | {l.name for l in have.links.values() if l.master in filtering}
    for msg in ipr.get_vlans():
        device = names.get(msg["index"])
        if device not in vlan_devices:
            continue
        for attr, value in _attr_list(msg.get_attr("IFLA_AF_SPEC")):
            if attr == "IFLA_BRIDGE_VLAN_INFO":
                flags = value["flags"]
                have.add(BridgeVlan(device, value["vid"], pvid=bool(flags & BRIDGE_VLAN_INFO_PVID),
                                    untagged=bool(flags & BRIDGE_VLAN_INFO_UNTAGGED)))

    for msg in ipr.get_addr():
        address = msg.get_attr("IFA_ADDRESS") if msg["family"] == socket.AF_INET6 else (
            msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
        if msg["family"] == socket.AF_INET6 and address.lower().startswith("fe80"):
            continue  # link-local: the kernel's own
        have.add(Address(names.get(msg["index"], "?"), f"{address}/{msg['prefixlen']}"))

    vrf_tables = {l.option("table") for l in have.links.values() if l.owned and l.kind == "vrf"}
    for msg in ipr.get_routes():
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if table in vrf_tables:
            if msg["proto"] == RTPROT_KERNEL:
                continue  # connected and local routes: the kernel's, from the addresses
        elif table != 254 or msg["dst_len"] != 0:
            continue
        family = 4 if msg["family"] == socket.AF_INET else 6
        dst = "default" if msg["dst_len"] == 0 else f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}"
        metric = msg.get_attr("RTA_PRIORITY") or 0
        if msg["type"] == RTN_UNREACHABLE:
            have.add(Route(table, dst, family, type="unreachable", metric=metric))
        elif msg["type"] == RTN_UNICAST:
            have.add(Route(table, dst, family, gateway=msg.get_attr("RTA_GATEWAY"),
                           device=names.get(msg.get_attr("RTA_OIF") or 0), metric=metric))

    # FDB and neighbours can number tens of thousands: dumped through netlink_batch's
    # lean parser rather than pyroute2's generic one. A VM's tap on one of our bridges is
    # not ours, but the static entry of the VM's MAC on it is (agent.plan): read, or every
    # reconcile would write it again.
    taps = {l.index for l in have.links.values() if l.kind == "tap" and l.master in owned_names}
    for entry in records.dump_fdb(owned | taps):
        port = names[entry.ifindex]
        if not entry.master and entry.dst is not None and port.startswith(naming.PREFIX + "x"):
            have.add(Fdb(port, entry.mac, dst=entry.dst))
        elif entry.master and entry.static and entry.vlan is None:
            bridge = have.links[port].master
            if bridge in owned_names:
                have.add(Fdb(bridge, entry.mac, port=port, sticky=entry.sticky))
    for entry in records.dump_neigh(owned):
        have.add(Neighbour(names[entry.ifindex], entry.ip, entry.mac))
    if flow is not None and flow.present():
        remotes, ports = flow.observe(names)
        for obj in [*remotes, *ports]:
            have.add(obj)
        pinned = flow.program_ids()
        for link in have.links.values():
            if link.owned and link.role in (naming.FLOW_TUNNEL, naming.FLOW_PORT):
                direction = "ingress" if link.role == naming.FLOW_TUNNEL else "egress"
                attached = flow.attached(link.name, direction, pinned)
                if attached is not None:
                    have.add(attached)
    return have


def observe_links(ipr: Any, names: Iterable[str]) -> KernelState:
    """The named links alone, each read by name (no dump): what plugging a VM's tap needs
    to know (the tap and its bridge), at a cost that does not grow with the host. A name
    the kernel does not know is left out; a master that is not one of `names` reads as
    None (not worth a read of its own: the plan then sets the master it wants)."""
    messages = []
    for name in names:
        try:
            messages.append(ipr.link("get", ifname=name)[0])
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                continue
            raise
    indexes = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in messages}
    have = KernelState()
    for msg in messages:
        have.add(_link_from_msg(msg, indexes))
    return have


def read_tunnel_stats(records: NeighbourSocket) -> list[TunnelStats]:
    """Counters of every owned tunnel device (gretap per peer, VXLAN per VSID), from the
    raw link dump (netlink_batch.dump_link_counters: five attributes of each link, not
    all of them as pyroute2 parses)."""
    stats = []
    for link in records.dump_link_counters():
        if not naming.is_owned(link.name, link.alias):
            continue
        kind, key = naming.parse_marker(link.alias)
        identity = tunnel_identity(kind, key, {"local": link.vxlan_local or ""})
        if identity is None:
            continue
        stats.append(TunnelStats(
            name=link.name, vsid=identity[0], local=identity[1], remote=identity[2],
            rx_packets=link.rx_packets, tx_packets=link.tx_packets,
            rx_bytes=link.rx_bytes, tx_bytes=link.tx_bytes,
        ))
    return sorted(stats, key=lambda s: (s.vsid, s.remote))
