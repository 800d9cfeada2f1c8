"""Small network-virtualised fabrics for the tests of every tier, built through the
controller's own write path (`Fabric` methods): hosts on one transport site (VLAN 802,
10.80.2.0/24) with a virtual switch each (`populate_transport`), and the migration
tests' fabric on top of it (`populate`: VM network Red, 192.168.0.0/24, VMs placed as
asked)."""

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


def populate_transport(fabric, hosts: tuple[str, ...], nics: tuple[str, ...] = ("eth0", "eth1"),
                       pa_range: tuple[str, str] = ("10.80.2.20", "10.80.2.40"),
                       switched: tuple[str, ...] | None = None):
    """Host group, logical network and site Virtualization (PAs from `pa_range`), its
    port profile and logical switch, `hosts` with `nics`, and a virtual switch on each of
    `switched` (default: every host). Returns the fabric."""
    fabric.create(Kind.host_group, HostGroupSpec(name="Virtualization"))
    fabric.create(Kind.logical_network, LogicalNetworkSpec(name="Virtualization", network_virtualization=True))
    fabric.create(Kind.network_site, NetworkSiteSpec(
        name="Virtualization", logical_network="Virtualization", host_groups=["Virtualization"],
        subnet_vlans=[{"subnet": "10.80.2.0/24", "vlan": 802}]))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", network_site="Virtualization",
                                           range_start=pa_range[0], range_end=pa_range[1]))
    fabric.create(Kind.uplink_port_profile, UplinkPortProfileSpec(name="Virtualization",
                                                                  network_sites=["Virtualization"]))
    fabric.create(Kind.logical_switch, LogicalSwitchSpec(name="Virtualization",
                                                         uplink_port_profiles=["Virtualization"]))
    fabric.create_many(Kind.host, [HostSpec(name=name, host_group="Virtualization", nics=list(nics))
                                   for name in hosts])
    for name in hosts if switched is None else switched:
        fabric.set_virtual_switch(name, VirtualSwitchSpec(logical_switch="Virtualization"))
    return fabric


def populate(fabric, hosts: tuple[str, ...], vms: dict[str, str], nics: tuple[str, ...] = ("eth0", "eth1"),
             netns: dict[str, str] | None = None):
    """`populate_transport`, VM network Red, and `vms`: VM name -> host (its namespace from
    `netns`, default its name). Returns the fabric."""
    populate_transport(fabric, hosts, nics)
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Red", logical_network="Virtualization"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Red", prefix="192.168.0.0/24"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Red"))
    for name, host in vms.items():
        fabric.create(Kind.vm, VmSpec(name=name, vm_network="Red", host=host, netns=(netns or {}).get(name)))
    return fabric
