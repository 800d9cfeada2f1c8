"""Rules for logical networks, network sites, IP pools, uplink port profiles and
logical switches: the provider side of the fabric.

A rule mixin of `Fabric` (see `controller.fabric.common.Builders`); never commits.
"""

from __future__ import annotations

from typing import Any

from controller.fabric.common import ALL, Builders, _refuse_in_use, _Scope
from controller.inventory import Tx
from controller.models import Conflict, Invalid, Ipv6Assignment, Kind, first_host_address, last_host_address


class NetworkRules(Builders):
    def _create_logical_network(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        return self._new(Kind.logical_network, tx, spec), _Scope()

    def _delete_logical_network(self, tx: Tx, network) -> tuple[None, _Scope]:
        users = [f"network site {s.name}" for s in self.inventory.all(Kind.network_site)
                 if s.logical_network == network.name]
        users += [f"VM network {n.name}" for n in self.inventory.all(Kind.vm_network)
                  if n.logical_network == network.name]
        _refuse_in_use(Kind.logical_network, network.name, users)
        tx.delete(Kind.logical_network, network.name)
        return None, _Scope()

    def _create_network_site(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        self._require(Kind.logical_network, spec.logical_network, "logical_network", f"network site {spec.name}")
        for i, group in enumerate(spec.host_groups):
            self._require(Kind.host_group, group, f"host_groups[{i}]", f"network site {spec.name}")
        return self._new(Kind.network_site, tx, spec), _Scope(networks=ALL)

    def _delete_network_site(self, tx: Tx, site) -> tuple[None, _Scope]:
        users = [f"IP pool {key}" for key in self.inventory.pools_by_owner.get(site.name, ())]
        users += [f"uplink port profile {p.name}" for p in self.inventory.all(Kind.uplink_port_profile)
                  if site.name in p.network_sites]
        _refuse_in_use(Kind.network_site, site.name, users)
        tx.delete(Kind.network_site, site.name)
        return None, _Scope(networks=ALL)

    def _check_ipv6_assignment(self, spec, vm_subnet, siblings: list, what: str) -> None:
        """SLAAC needs an IPv6 /64 (the EUI-64 fills the other 64 bits), the pools of one VM
        subnet agree (a VM's address is either allocated or formed from its MAC), and a
        subnet whose VMs already hold allocated addresses does not turn to SLAAC."""
        prefix = vm_subnet.prefix
        if prefix.version != 6:
            if spec.ipv6_assignment is not None:
                raise Invalid(f"{what}: VM subnet {vm_subnet.key} ({prefix}) is not IPv6", "ipv6_assignment",
                              "only IPv6 addresses are assigned by DHCPv6 or SLAAC")
            return
        wanted = spec.ipv6_assignment or Ipv6Assignment.DHCPv6
        for other in siblings:
            theirs = other.ipv6_assignment or Ipv6Assignment.DHCPv6
            if theirs != wanted:
                raise Conflict(f"{what}: IP pool {other.key} of VM subnet {vm_subnet.key} assigns addresses by "
                               f"{theirs}", "ipv6_assignment", "the pools of one VM subnet assign addresses alike")
        if wanted is not Ipv6Assignment.SLAAC:
            return
        if prefix.prefixlen != 64:
            raise Invalid(f"{what}: SLAAC needs a /64, VM subnet {vm_subnet.key} is {prefix}", "ipv6_assignment",
                          "a VM forms its address from the prefix and the 64-bit EUI-64 of its MAC")
        holders = [vm.name for vm in self.inventory.vms_of_network(vm_subnet.vm_network)
                   if vm.vm_subnet == vm_subnet.name and vm.ca is not None]
        if holders:
            raise Conflict(f"{what}: VM subnet {vm_subnet.key} has VMs with allocated addresses", "ipv6_assignment",
                           f"{', '.join(sorted(holders)[:5])} would keep addresses SLAAC never forms; "
                           "give the VM subnet its SLAAC pool before its VMs")

    def _create_ip_pool(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"IP pool {spec.name}"
        if spec.network_site is not None:
            site = self._require(Kind.network_site, spec.network_site, "network_site", what)
            subnets = [pair.subnet for pair in site.subnet_vlans]
            if spec.subnet is None:
                if len(subnets) != 1:
                    raise Invalid(f"{what}: network site {site.name} has {len(subnets)} subnets", "subnet",
                                  "name the subnet of the site this pool serves")
                subnet = subnets[0]
            elif spec.subnet not in subnets:
                raise Invalid(f"{what}: subnet {spec.subnet} is not a subnet of network site {site.name}", "subnet",
                              f"network site {site.name} has {', '.join(map(str, subnets))}")
            else:
                subnet = spec.subnet
            gateway = spec.gateway
            scope: _Scope = _Scope(networks=ALL)
            siblings = [self.inventory.get(Kind.ip_pool, key)
                        for s in self.inventory.all(Kind.network_site) if s.logical_network == site.logical_network
                        for key in self.inventory.pools_by_owner.get(s.name, ())]
        else:
            network = self._require(Kind.vm_network, spec.vm_network, "vm_network", what)
            subnet_name = spec.vm_subnet or self._only_subnet(network, what)
            vm_subnet = self._require(Kind.vm_subnet, f"{network.name}/{subnet_name}", "vm_subnet", what)
            if spec.subnet is not None and spec.subnet != vm_subnet.prefix:
                raise Invalid(f"{what}: subnet {spec.subnet} is not the prefix of VM subnet {vm_subnet.key}",
                              "subnet", f"VM subnet {vm_subnet.key} is {vm_subnet.prefix}")
            subnet = vm_subnet.prefix
            gateway = spec.gateway if spec.gateway is not None else first_host_address(subnet)
            scope = _Scope(networks={network.name})
            siblings = [self.inventory.get(Kind.ip_pool, key)
                        for key in self.inventory.pools_by_owner.get(vm_subnet.key, ())]
            spec = spec.model_copy(update={"vm_subnet": subnet_name})
            self._check_ipv6_assignment(spec, vm_subnet, siblings, what)
        for name in ("range_start", "range_end", "gateway"):
            value = getattr(spec, name)
            if value is not None and value not in subnet:
                raise Invalid(f"{what}: {name} {value} is outside the subnet {subnet}", name,
                              f"{value} is not in {subnet}")
        for i, value in enumerate(spec.reserved):
            if value not in subnet:
                raise Invalid(f"{what}: reserved address {value} is outside {subnet}", f"reserved[{i}]",
                              f"{value} is not in {subnet}")
        start = spec.range_start
        if start is None:
            start = first_host_address(subnet)
            if gateway is not None and start == gateway:
                start += 1
        end = spec.range_end if spec.range_end is not None else last_host_address(subnet)
        if int(start) > int(end):
            raise Invalid(f"{what}: the range {start} - {end} is empty", "range_end", f"{end} is before {start}")
        for other in siblings:
            if other.subnet == subnet and int(other.range_start) <= int(end) and int(start) <= int(other.range_end):
                raise Conflict(
                    f"{what}: range {start} - {end} overlaps IP pool {other.key} ({other.range_start} - "
                    f"{other.range_end})",
                    "range_start",
                    "two pools of one subnet would hand out the same address",
                )
        pool = self._new(Kind.ip_pool, tx, spec, subnet=subnet, range_start=start, range_end=end, gateway=gateway)
        return pool, scope

    def _delete_ip_pool(self, tx: Tx, pool) -> tuple[None, _Scope]:
        leases = sorted(self.inventory.leases.get(pool.key, {}).values(), key=lambda lease: int(lease.address))
        _refuse_in_use(Kind.ip_pool, pool.key, [f"{lease.address} ({lease.description or lease.holder})"
                                                for lease in leases], noun="leases")
        _refuse_in_use(Kind.ip_pool, pool.key, [f"gateway service {service.name}" for service
                                                in self.inventory.all(Kind.gateway_service)
                                                if service.pool_key == pool.key])
        tx.delete(Kind.ip_pool, pool.key)
        return None, _Scope(networks=ALL)

    def _create_uplink_port_profile(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        for i, site in enumerate(spec.network_sites):
            self._require(Kind.network_site, site, f"network_sites[{i}]", f"uplink port profile {spec.name}")
        return self._new(Kind.uplink_port_profile, tx, spec), _Scope()

    def _delete_uplink_port_profile(self, tx: Tx, profile) -> tuple[None, _Scope]:
        users = [f"logical switch {s.name}" for s in self.inventory.all(Kind.logical_switch)
                 if profile.name in s.uplink_port_profiles]
        _refuse_in_use(Kind.uplink_port_profile, profile.name, users)
        tx.delete(Kind.uplink_port_profile, profile.name)
        return None, _Scope()

    def _create_logical_switch(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        for i, profile in enumerate(spec.uplink_port_profiles):
            self._require(Kind.uplink_port_profile, profile, f"uplink_port_profiles[{i}]",
                          f"logical switch {spec.name}")
        return self._new(Kind.logical_switch, tx, spec), _Scope()

    def _delete_logical_switch(self, tx: Tx, switch) -> tuple[None, _Scope]:
        users = [f"host {host}" for host, vs in sorted(self.inventory.switches.items())
                 if vs.logical_switch == switch.name]
        _refuse_in_use(Kind.logical_switch, switch.name, users)
        tx.delete(Kind.logical_switch, switch.name)
        return None, _Scope()
