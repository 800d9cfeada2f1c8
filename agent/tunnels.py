"""The tunnel layer: which tunnel devices and tunnel FDB entries a VSID needs.

Owns the mapping of one VSID's remote lookup records onto encapsulation devices, for
both encapsulations, so that a flow-based variant (one collect-metadata gretap with
per-destination keys) can replace it later without touching the rest of the plan:

- NVGRE (the plain mapping): one gretap per (VSID, remote PA), local = this host's PA
  of the VM network, key = VSID << 8 (FlowID 0) in both directions, a port of the VSID
  bridge. A remote MAC is a bridge FDB entry MAC -> that gretap. Devices grow as
  VSIDs x peers; fine for hundreds, the flow-based variant is the answer beyond.
- NVGRE, tunnel_mode flow (agent.flowmode runs it): one collect-metadata (``external``)
  gretap per PA family and host, and per VSID one tunnel port (a dummy device, a port of
  the VSID bridge). A remote MAC is a bridge FDB entry MAC -> the tunnel port plus an
  eBPF map entry (VSID, MAC) -> (remote PA, local PA); the tunnel port's tc egress
  program sets the key VSID << 8 | FlowID and redirects to the gretap, whose tc ingress
  program hands each received frame to the tunnel port of key >> 8, any FlowID.
  Devices grow as VSIDs + 1.
- VXLAN: one VXLAN device per VSID (VNI = VSID, UDP 4789, local = PA, no learning), a
  port of the VSID bridge. A remote MAC is a bridge FDB entry MAC -> the VXLAN device
  plus a VXLAN FDB entry MAC -> remote PA on the device itself.

MTU: the gretap is created with ``pmtudisc`` (outer DF set) and ``ttl 64``. With DF the
PA network never fragments an encapsulated frame; the tenant MTU (provider MTU - 42, set
on the VSID bridge, the tunnel port and the VM's NIC, and checked by agent.state) is what
keeps frames small enough, and an oversized frame is dropped at the bridge port (counted
in tx_dropped) instead of being fragmented silently. A fixed TTL is required with DF:
the kernel refuses ``nopmtudisc`` only with a fixed TTL, and an inherited TTL would copy
the tenant's TTL onto the PA network.

IPv6 PAs: an ip6gretap, with hop limit 64 and ``encaplimit none``. IPv6 routers never
fragment (no DF to set; the tenant MTU is provider MTU - 62). Without ``encaplimit
none`` Linux puts an RFC 2473 tunnel encapsulation limit option in a destination options
header between the outer IPv6 header and GRE (next header 60, not 47): not the NVGRE of
RFC 7637, which a Hyper-V host or a middlebox matching next header 47 would not take.

Also reads tunnel statistics back from observed links. Pure: no pyroute2 import.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from agent import naming
from agent.kernel_model import QUIET, TUNNEL_PORT_FLAGS, Fdb, FlowPort, FlowRemote, Link, TcProgram

VXLAN_PORT = 4789
GRE_KEY_FLAG = 0x2000  # GRE_KEY in the GRE header flags (host order; the kernel wants it big-endian)
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1  # ip6gretap IFLA_GRE_FLAGS: send no encapsulation limit option
ENCAPLIMIT_NONE = "none"  # the ip6gretap option's value with that flag set, as ip(8) prints it


def gre_key(vsid: int, flow_id: int = 0) -> int:
    """The 32-bit GRE key of NVGRE: VSID in the upper 24 bits, FlowID in the lower 8."""
    return (vsid << 8) | flow_id


@dataclass(frozen=True)
class RemoteEndpoint:
    """One remote MAC of a VSID and the PA it lives behind."""

    mac: str
    pa: str


def nvgre_tunnel(vsid: int, local_pa: str, remote_pa: str, bridge: str, mtu: int) -> Link:
    key = gre_key(vsid)
    version = ip_address(local_pa).version
    # IPv4: DF on the outer header; IPv6: no encapsulation limit option (module docstring).
    outer = ("pmtudisc", 1) if version == 4 else ("encaplimit", ENCAPLIMIT_NONE)
    return Link(
        name=naming.nvgre_tunnel(vsid, local_pa, remote_pa),
        kind="gretap" if version == 4 else "ip6gretap",
        role=naming.TUNNEL,
        key=naming.tunnel_key(vsid, local_pa, remote_pa),
        options=(
            ("local", local_pa),
            ("remote", remote_pa),
            ("ikey", key),
            ("okey", key),
            ("ttl", naming.DEFAULT_TTL),
            outer,
        ),
        settings=QUIET,
        master=bridge,
        mtu=mtu,
        port_flags=TUNNEL_PORT_FLAGS,
    )


def vxlan_device(vsid: int, local_pa: str, bridge: str, mtu: int) -> Link:
    return Link(
        name=naming.vxlan_device(vsid),
        kind="vxlan",
        role=naming.VXLAN,
        key=str(vsid),
        options=(
            ("vni", vsid),
            ("local", local_pa),
            ("port", VXLAN_PORT),
            ("learning", 0),
            ("ttl", naming.DEFAULT_TTL),
        ),
        settings=QUIET,
        master=bridge,
        mtu=mtu,
        port_flags=TUNNEL_PORT_FLAGS,
    )


def tunnel_objects(
    encapsulation: str,
    vsid: int,
    local_pa: str,
    bridge: str,
    mtu: int,
    remotes: list[RemoteEndpoint],
    peers: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[Link | Fdb]:
    """Tunnel devices and FDB entries carrying `remotes` of one VSID from `local_pa`.

    `peers` are the PAs of the other hosts of the VM network: a tunnel to each exists in
    every VSID of the network, even with no remote VM of this VSID behind it. The
    distributed router needs that on the *receiving* side: a host routes a packet into
    the destination's VSID before encapsulating it, so a frame keyed with VSID 2 arrives
    from a host that has VMs only in VSID 1, and the kernel accepts a GRE packet only on
    a tunnel matching its (local, remote, key)."""
    objects: list[Link | Fdb] = []
    if not remotes and not peers:
        return objects
    if encapsulation == "vxlan":
        # VXLAN receives by VNI from any source: one device serves every peer.
        device = vxlan_device(vsid, local_pa, bridge, mtu)
        objects.append(device)
        for remote in remotes:
            objects.append(Fdb(device=bridge, mac=remote.mac, port=device.name, sticky=True))
            objects.append(Fdb(device=device.name, mac=remote.mac, dst=remote.pa))
        return objects
    tunnels: dict[str, Link] = {}
    for pa in sorted(set(peers) | {remote.pa for remote in remotes}):
        tunnels[pa] = nvgre_tunnel(vsid, local_pa, pa, bridge, mtu)
        objects.append(tunnels[pa])
    for remote in remotes:
        objects.append(Fdb(device=bridge, mac=remote.mac, port=tunnels[remote.pa].name, sticky=True))
    return objects


ENCAP_PROGRAM, DECAP_PROGRAM = "hnv_encap", "hnv_decap"  # in agent/bpf/hnv_flow.c


def flow_tunnel(family: int) -> list[Link | TcProgram]:
    """The host's collect-metadata gretap for PAs of `family` and its receive program."""
    name = naming.flow_tunnel(family)
    return [
        Link(name=name, kind="gretap" if family == 4 else "ip6gretap", role=naming.FLOW_TUNNEL,
             key=str(family), options=(("external", 1),), settings=QUIET),
        TcProgram(name, "ingress", DECAP_PROGRAM),
    ]


def flow_tunnel_objects(vsid: int, local_pa: str, bridge: str, mtu: int,
                        remotes: list[RemoteEndpoint]) -> list[Link | Fdb | FlowPort | FlowRemote | TcProgram]:
    """Tunnel port, FDB and map entries carrying `remotes` of one VSID in flow mode. The
    port exists even with no remote (it is also how frames of the VSID are received)."""
    port = naming.flow_port(vsid)
    tunnel = naming.flow_tunnel(ip_address(local_pa).version)
    objects: list[Link | Fdb | FlowPort | FlowRemote | TcProgram] = [
        Link(name=port, kind="dummy", role=naming.FLOW_PORT, key=str(vsid), settings=QUIET,
             master=bridge, mtu=mtu, port_flags=TUNNEL_PORT_FLAGS),
        FlowPort(vsid, port, tunnel),
        TcProgram(port, "egress", ENCAP_PROGRAM),
    ]
    for remote in remotes:
        objects.append(Fdb(device=bridge, mac=remote.mac, port=port, sticky=True))
        objects.append(FlowRemote(vsid, remote.mac, remote.pa, local_pa))
    return objects


@dataclass(frozen=True)
class TunnelStats:
    """Per-tunnel counters from the kernel's link statistics."""

    name: str
    vsid: int
    local: str
    remote: str  # "" for a VXLAN device (one device serves every peer)
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int


def tunnel_identity(role: str, key: str, options: dict[str, Any]) -> tuple[int, str, str] | None:
    """(VSID, local, remote) of an observed tunnel link from its marker, or None."""
    if role == naming.TUNNEL:
        parts = key.split("/")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        return int(parts[0]), parts[1], parts[2]
    if role == naming.VXLAN and key.isdigit():
        return int(key), str(options.get("local", "")), ""
    return None
