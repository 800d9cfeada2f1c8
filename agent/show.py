"""Show: the HNV view of what the kernel holds, read back from the kernel.

Owns the tables of ``hnv-agent show``, shaped like the Windows cmdlets users compare us
to: Get-NetVirtualizationLookupRecord (records), Get-NetVirtualizationProviderAddress
(provider-addresses), plus tunnels and ports. Everything comes from an observation of
the kernel (agent.observe), never from a state file: what you see is what forwards.
Pure formatting over a KernelState; no netlink here.
"""

from __future__ import annotations

import json
from ipaddress import ip_interface
from typing import Any

from agent import naming, text
from agent.kernel_model import KernelState
from agent.tunnels import TunnelStats

VIEWS = ("records", "provider-addresses", "tunnels", "ports")


def _vsid_of_bridge(name: str | None) -> int | None:
    if name and name.startswith(naming.PREFIX + "b") and name[4:].isdigit():
        return int(name[4:])
    return None


def lookup_records(have: KernelState) -> list[dict[str, Any]]:
    """One row per CA: neighbour CA -> MAC on a VSID bridge, joined with the FDB entry
    saying which port (tunnel -> remote PA, VM port -> this host's PA) the MAC is behind."""
    ports_to_pa: dict[str, str] = {}
    vm_names: dict[str, str] = {}
    local_pa: dict[str, str] = {}  # VSID bridge -> this host's PA (the local end of its tunnels)
    for link in have.links.values():
        if link.role == naming.TUNNEL:
            ports_to_pa[link.name] = str(link.option("remote"))
        elif link.role == naming.PORT:
            vm_names[link.name] = link.key.rpartition(":")[0]
        if link.role in (naming.TUNNEL, naming.VXLAN) and link.master:
            local_pa[link.master] = str(link.option("local"))
    vxlan_dst = {(f.device, f.mac): f.dst for f in have.fdb.values() if f.dst}
    fdb_by_mac = {(f.device, f.mac): f for f in have.fdb.values() if f.port}
    rows = []
    for n in sorted(have.neighbours.values(), key=lambda n: (n.device, n.ip)):
        vsid = _vsid_of_bridge(n.device)
        if vsid is None:
            continue
        entry = fdb_by_mac.get((n.device, n.mac))
        pa, vm = "", ""
        if entry is not None:
            if entry.port in ports_to_pa:
                pa = ports_to_pa[entry.port]
            elif (entry.port, n.mac) in vxlan_dst:
                pa = vxlan_dst[(entry.port, n.mac)]
            elif entry.port in vm_names:
                vm = vm_names[entry.port]
                pa = local_pa.get(n.device, "")
        rows.append({"CustomerAddress": n.ip, "VirtualSubnetID": vsid, "MACAddress": n.mac,
                     "ProviderAddress": pa, "Type": "Static", "VMName": vm})
    for link in sorted(have.links.values(), key=lambda l: l.name):
        vsid = _vsid_of_bridge(link.name) if link.role == naming.BRIDGE else None
        if vsid is None:
            continue
        for address in have.addresses.values():
            if address.device == link.name:
                rows.append({"CustomerAddress": ip_interface(address.cidr).ip.compressed,
                             "VirtualSubnetID": vsid, "MACAddress": link.mac,
                             "ProviderAddress": "", "Type": "Gateway", "VMName": ""})
    return rows


def provider_addresses(have: KernelState) -> list[dict[str, Any]]:
    rows = []
    for address in sorted(have.addresses.values(), key=lambda a: a.cidr):
        link = have.links.get(address.device)
        if link is None or link.role != naming.PROVIDER:
            continue
        rows.append({"ProviderAddress": ip_interface(address.cidr).ip.compressed,
                     "InterfaceIndex": link.index, "VlanID": link.option("vlan_id"),
                     "AddressState": "Preferred" if link.up else "Deprecated"})
    return rows


def tunnels(stats: list[TunnelStats]) -> list[dict[str, Any]]:
    return [{"Name": s.name, "VirtualSubnetID": s.vsid, "LocalPA": s.local,
             "RemotePA": s.remote or "(per MAC)", "RxPackets": s.rx_packets,
             "TxPackets": s.tx_packets, "RxBytes": s.rx_bytes, "TxBytes": s.tx_bytes}
            for s in stats]


def ports(have: KernelState) -> list[dict[str, Any]]:
    rows = []
    for link in sorted(have.links.values(), key=lambda l: l.name):
        if link.role != naming.PORT:
            continue
        rows.append({"VMName": link.key.rpartition(":")[0], "Port": link.name,
                     "Switch": link.master or "", "VirtualSubnetID": _vsid_of_bridge(link.master) or "",
                     "MTU": link.mtu, "State": "Up" if link.up else "Down"})
    return rows


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> str:
    """Rows as a Format-Table style text table (header, dashes, one line per row)."""
    columns = columns or (tuple(rows[0]) if rows else ())
    return text.format_table(columns, [[row.get(c, "") for c in columns] for row in rows], empty="(none)")


def render(view: str, rows: list[dict[str, Any]], output: str = "table") -> str:
    if output == "json":
        return json.dumps(rows, indent=2)
    return format_table(rows)
