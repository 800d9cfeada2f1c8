"""A small network-virtualised fabric for the migration tests of every tier: hosts on one
transport site (VLAN 802, 10.80.2.0/24), VM network Red (192.168.0.0/24), VMs placed as
asked. Built through the controller's own write path (`Fabric` methods)."""

from __future__ import annotations

from controller.models import (
    HostGroupSpec,
    HostSpec,
    IpPoolSpec,
    Kind,
    LogicalNetworkSpec,
    LogicalSwitchSpec,
    NetworkSiteSpec,
    UplinkPortProfileSpec,
    VirtualSwitchSpec,
    VmNetworkSpec,
    VmSpec,
    VmSubnetSpec,
)


def populate(fabric, hosts: tuple[str, ...], vms: dict[str, str], nics: tuple[str, ...] = ("eth0", "eth1"),
             netns: dict[str, str] | None = None):
    """`hosts` with a virtual switch each; VM network Red; `vms`: VM name -> host (its
    namespace from `netns`, default its name). Returns the fabric."""
    fabric.create(Kind.host_group, HostGroupSpec(name="Virtualization"))
    fabric.create(Kind.logical_network, LogicalNetworkSpec(name="Virtualization", network_virtualization=True))
    fabric.create(Kind.network_site, NetworkSiteSpec(
        name="Virtualization", logical_network="Virtualization", host_groups=["Virtualization"],
        subnet_vlans=[{"subnet": "10.80.2.0/24", "vlan": 802}]))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", network_site="Virtualization",
                                           range_start="10.80.2.20", range_end="10.80.2.40"))
    fabric.create(Kind.uplink_port_profile, UplinkPortProfileSpec(name="Virtualization",
                                                                  network_sites=["Virtualization"]))
    fabric.create(Kind.logical_switch, LogicalSwitchSpec(name="Virtualization",
                                                         uplink_port_profiles=["Virtualization"]))
    fabric.create_many(Kind.host, [HostSpec(name=name, host_group="Virtualization", nics=list(nics))
                                   for name in hosts])
    for name in hosts:
        fabric.set_virtual_switch(name, VirtualSwitchSpec(logical_switch="Virtualization"))
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Red", logical_network="Virtualization"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Red", prefix="192.168.0.0/24"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Red"))
    for name, host in vms.items():
        fabric.create(Kind.vm, VmSpec(name=name, vm_network="Red", host=host, netns=(netns or {}).get(name)))
    return fabric
