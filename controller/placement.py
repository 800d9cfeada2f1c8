"""Which hosts can carry a VM network, and which one gets the next VM.

A host reaches a logical network when its virtual switch's uplink port profile lists a
site of that logical network whose host groups cover the host's host group (or one of
its ancestors) - the chain New-SCVirtualNetwork -> uplink port profile set -> uplink
port profile -> logical network definition -> logical network of the seed.

- A network-virtualised VM network needs a host whose transport (the first
  network-virtualisation logical network its switch reaches) is the VM network's
  logical network, on a tagged site (the PAs live on that VLAN).
- A VLAN VM network needs a host reaching a site of its logical network that carries
  the VM subnet's subnet and VLAN.
- A gateway host (role gateway) is never a candidate: it serves a gateway service. It
  can serve one when its transport is the service's back-end (tagged) and its switch
  reaches the service's front-end site (`why_not_gateway_host`).
- Among candidates placement picks the host with the fewest VMs (tie: the name), as
  VMM's star rating would for identical hosts.

Pure functions over `controller.inventory.Inventory`; nothing is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.inventory import Inventory
from controller.models import (
    ROOT_HOST_GROUP,
    Conflict,
    Host,
    HostRole,
    Isolation,
    Kind,
    LogicalNetwork,
    NetworkSite,
    SubnetVlan,
    VmNetwork,
    VmSubnet,
)


@dataclass(frozen=True)
class Transport:
    """Where a host's provider addresses live."""

    logical_network: LogicalNetwork
    site: NetworkSite
    subnet_vlan: SubnetVlan


def host_group_chain(inventory: Inventory, group: str) -> list[str]:
    """The group and its ancestors up to All Hosts."""
    chain: list[str] = []
    current: str | None = group
    while current is not None and current not in chain:
        chain.append(current)
        obj = inventory.get(Kind.host_group, current)
        current = obj.parent if obj is not None else None
    if ROOT_HOST_GROUP not in chain:
        chain.append(ROOT_HOST_GROUP)
    return chain


def sites_reached(inventory: Inventory, host: Host) -> list[NetworkSite]:
    switch = inventory.switches.get(host.name)
    if switch is None:
        return []
    profile = inventory.get(Kind.uplink_port_profile, switch.uplink_port_profile)
    if profile is None:
        return []
    groups = set(host_group_chain(inventory, host.host_group))
    sites = []
    for name in profile.network_sites:
        site = inventory.get(Kind.network_site, name)
        if site is not None and groups.intersection(site.host_groups):
            sites.append(site)
    return sites


def transport_of(inventory: Inventory, host: Host) -> Transport | None:
    """The first network-virtualisation logical network the host's switch reaches."""
    for site in sites_reached(inventory, host):
        network = inventory.get(Kind.logical_network, site.logical_network)
        if network is not None and network.network_virtualization:
            return Transport(network, site, site.subnet_vlans[0])
    return None


def site_for_vlan_subnet(inventory: Inventory, host: Host, subnet: VmSubnet, logical_network: str) -> NetworkSite | None:
    for site in sites_reached(inventory, host):
        if site.logical_network != logical_network:
            continue
        for pair in site.subnet_vlans:
            if pair.subnet == subnet.prefix and pair.vlan == subnet.vlan:
                return site
    return None


def why_not(inventory: Inventory, host: Host, network: VmNetwork, subnet: VmSubnet) -> str | None:
    """None if the host can carry a VM of this VM subnet, else the reason it cannot."""
    if host.role is HostRole.gateway:
        return f"host {host.name} is a gateway host; placement never puts a VM there"
    switch = inventory.switches.get(host.name)
    if switch is None:
        return f"host {host.name} has no virtual switch"
    if network.isolation is Isolation.WindowsNetworkVirtualization:
        transport = transport_of(inventory, host)
        if transport is None:
            return (
                f"the logical switch {switch.logical_switch} of host {host.name} reaches no "
                "network-virtualisation logical network"
            )
        if transport.logical_network.name != network.logical_network:
            return (
                f"host {host.name} carries network virtualisation on logical network "
                f"{transport.logical_network.name}, not {network.logical_network}"
            )
        if transport.subnet_vlan.vlan == 0:
            return (
                f"the transport site {transport.site.name} of host {host.name} is untagged (VLAN 0); "
                "provider addresses need a VLAN"
            )
        if transport.subnet_vlan.subnet.version != network.pa_family.version:
            return f"the transport site {transport.site.name} is not {network.pa_family.value}"
        return None
    if network.isolation is Isolation.VLAN:
        if site_for_vlan_subnet(inventory, host, subnet, network.logical_network) is None:
            return (
                f"the logical switch {switch.logical_switch} of host {host.name} reaches no site of "
                f"logical network {network.logical_network} with {subnet.prefix} on VLAN {subnet.vlan}"
            )
        return None
    return f"VM network {network.name} has no isolation; VMs join network-virtualised or VLAN VM networks"


def why_not_gateway_host(inventory: Inventory, host: Host, back_end: str, front_end_site: str) -> str | None:
    """None if the host can be a gateway host of this back-end logical network and
    front-end site (its transport is the back-end, tagged; its switch reaches the site)."""
    switch = inventory.switches.get(host.name)
    if switch is None:
        return f"host {host.name} has no virtual switch"
    transport = transport_of(inventory, host)
    if transport is None or transport.logical_network.name != back_end:
        carried = transport.logical_network.name if transport is not None else "no logical network"
        return f"host {host.name} carries network virtualisation on {carried}, not the back-end {back_end}"
    if transport.subnet_vlan.vlan == 0:
        return f"the transport site {transport.site.name} of host {host.name} is untagged (VLAN 0)"
    if front_end_site not in {site.name for site in sites_reached(inventory, host)}:
        return (f"the logical switch {switch.logical_switch} of host {host.name} does not reach the front-end "
                f"network site {front_end_site}")
    return None


def why_not_gateway_service(inventory: Inventory, service: Any) -> str | None:
    """None if every host of a gateway service can still serve it, else the first reason."""
    for name in service.hosts:
        host = inventory.get(Kind.host, name)
        if host is None:
            return f"host {name} of gateway service {service.name} does not exist"
        reason = why_not_gateway_host(inventory, host, service.back_end_logical_network, service.front_end_site)
        if reason is not None:
            return f"gateway service {service.name}: {reason}"
    return None


def candidates(
    inventory: Inventory, network: VmNetwork, subnet: VmSubnet, host_group: str | None = None
) -> tuple[list[Host], dict[str, str]]:
    """(hosts that can carry the VM, {host: reason} for those that cannot)."""
    good: list[Host] = []
    refused: dict[str, str] = {}
    for host in inventory.all(Kind.host):
        if host_group is not None and host_group not in host_group_chain(inventory, host.host_group):
            continue
        reason = why_not(inventory, host, network, subnet)
        if reason is None:
            good.append(host)
        else:
            refused[host.name] = reason
    return good, refused


def place(inventory: Inventory, network: VmNetwork, subnet: VmSubnet, host_group: str | None = None) -> Host:
    good, refused = candidates(inventory, network, subnet, host_group)
    if not good:
        scope = f" in host group {host_group}" if host_group else ""
        detail = "; ".join(f"{reason}" for _, reason in sorted(refused.items())[:5]) or "there are no hosts"
        raise Conflict(
            f"no host{scope} can take a VM of VM network {network.name}",
            "host",
            f"no placement candidate: {detail}",
        )
    return min(good, key=lambda host: (len(inventory.vms_by_host.get(host.name, ())), host.name))
