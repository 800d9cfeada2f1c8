"""Rules for host groups, clusters, hosts and their virtual switches (with the
management address lease that follows a host's management adapter). A host serving a
gateway service keeps it: it is not deleted, and its switch is neither removed nor
changed to one that no longer reaches the service's back-end and front-end. A host a
migration in progress left forwards for it: it is not deleted, nor its switch removed,
until the migration ends.

A rule mixin of `Fabric` (see `controller.fabric.common.Builders`); never commits.
"""

from __future__ import annotations

from typing import Any

from controller.fabric.common import ALL, Builders, _refuse_in_use, _Scope
from controller.inventory import VIRTUAL_SWITCH, Tx
from controller.models import (
    ROOT_HOST_GROUP,
    Conflict,
    Host,
    Invalid,
    Kind,
    LeaseKind,
    VirtualSwitch,
    VirtualSwitchSpec,
)
from controller.gateways import service_of_host
from controller.placement import why_not, why_not_gateway_service


class HostRules(Builders):
    def _create_host_group(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        if spec.parent is None:
            raise Invalid(f"host group {spec.name} needs a parent", "parent", f"only {ROOT_HOST_GROUP} has no parent")
        self._require(Kind.host_group, spec.parent, "parent", f"host group {spec.name}")
        return self._new(Kind.host_group, tx, spec), _Scope()

    def _delete_host_group(self, tx: Tx, group) -> tuple[None, _Scope]:
        if group.name == ROOT_HOST_GROUP:
            raise Conflict(f"host group {ROOT_HOST_GROUP} cannot be deleted", "name", "it is the root of all host groups")
        users = (
            [f"host group {g.name}" for g in self.inventory.all(Kind.host_group) if g.parent == group.name]
            + [f"cluster {c.name}" for c in self.inventory.all(Kind.cluster) if c.host_group == group.name]
            + [f"host {h.name}" for h in self.inventory.all(Kind.host) if h.host_group == group.name]
            + [f"network site {s.name}" for s in self.inventory.all(Kind.network_site) if group.name in s.host_groups]
        )
        _refuse_in_use(Kind.host_group, group.name, users)
        tx.delete(Kind.host_group, group.name)
        return None, _Scope(networks=ALL)

    def _create_cluster(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        self._require(Kind.host_group, spec.host_group, "host_group", f"cluster {spec.name}")
        return self._new(Kind.cluster, tx, spec), _Scope()

    def _delete_cluster(self, tx: Tx, cluster) -> tuple[None, _Scope]:
        users = [f"host {h.name}" for h in self.inventory.all(Kind.host) if h.cluster == cluster.name]
        _refuse_in_use(Kind.cluster, cluster.name, users)
        tx.delete(Kind.cluster, cluster.name)
        return None, _Scope()

    def _create_host(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        group = spec.host_group
        if spec.cluster is not None:
            cluster = self._require(Kind.cluster, spec.cluster, "cluster", f"host {spec.name}")
            if group is not None and group != cluster.host_group:
                raise Invalid(
                    f"host {spec.name}: host group {group} is not the host group of cluster {cluster.name}",
                    "host_group",
                    f"cluster {cluster.name} is in host group {cluster.host_group}",
                )
            group = cluster.host_group
        group = group or ROOT_HOST_GROUP
        self._require(Kind.host_group, group, "host_group", f"host {spec.name}")
        host = self._new(Kind.host, tx, spec, host_group=group)
        return host, _Scope(hosts={host.name})

    def _delete_host(self, tx: Tx, host) -> tuple[None, _Scope]:
        vms = sorted(self.inventory.vms_by_host.get(host.name, ()))
        service = service_of_host(self.inventory, host.name)
        _refuse_in_use(Kind.host, host.name, [f"VM {name}" for name in vms]
                       + ([f"gateway service {service.name}"] if service is not None else [])
                       + self._forwarding_for(host.name))
        if host.name in self.inventory.switches:
            self._delete_virtual_switch(tx, host.name)
        tx.delete(Kind.host, host.name)
        return None, _Scope(hosts={host.name})

    def _forwarding_for(self, host_name: str) -> list[str]:
        """What a host forwards for: the migrations in progress that left it (until they end)."""
        return [f"the migration of VM {vm.name} to {vm.host}" for vm in self.inventory.migrations_from(host_name)]

    def _set_virtual_switch(self, tx: Tx, host_name: str, spec: VirtualSwitchSpec) -> tuple[Any, _Scope]:
        host = self._require(Kind.host, host_name, "host", "virtual switch")
        switch = self._require(Kind.logical_switch, spec.logical_switch, "logical_switch",
                               f"virtual switch of host {host_name}")
        nics = spec.nics if spec.nics is not None else host.nics
        for i, nic in enumerate(nics):
            if nic not in host.nics:
                raise Invalid(
                    f"virtual switch of host {host_name}: NIC {nic} is not a NIC of the host",
                    f"nics[{i}]",
                    f"host {host_name} has NICs {', '.join(host.nics)}",
                )
        if not nics:
            raise Invalid(f"virtual switch of host {host_name} has no NIC", "nics", "a switch needs an uplink")
        if len(set(nics)) != len(nics):
            raise Invalid(f"virtual switch of host {host_name}: a NIC is listed twice", "nics", "NICs are unique")
        profile = spec.uplink_port_profile or switch.uplink_port_profiles[0]
        if profile not in switch.uplink_port_profiles:
            raise Invalid(
                f"virtual switch of host {host_name}: uplink port profile {profile} is not in logical switch "
                f"{switch.name}",
                "uplink_port_profile",
                f"logical switch {switch.name} has {', '.join(switch.uplink_port_profiles)}",
            )
        if switch.uplink_mode.value == "NoTeam" and len(nics) != 1:
            raise Invalid(
                f"virtual switch of host {host_name}: logical switch {switch.name} is NoTeam",
                "nics",
                f"a NoTeam switch takes exactly one NIC, got {len(nics)}",
            )
        if spec.management_adapter is not None:
            self._require(Kind.vm_network, spec.management_adapter.vm_network, "management_adapter.vm_network",
                          f"virtual switch of host {host_name}")
        result = VirtualSwitch(host=host_name, logical_switch=switch.name, nics=tuple(nics),
                               uplink_port_profile=profile, management_adapter=spec.management_adapter)
        # The management address becomes a lease when a pool of the management VM network's
        # logical network covers it (Get-SCIPAddress lists it as the host's).
        self._release_held(tx, "host", host_name, LeaseKind.Management)
        if spec.management_adapter is not None and host.management_address is not None:
            self._lease_management(tx, host, spec.management_adapter.vm_network)
        tx.put(VIRTUAL_SWITCH, host_name, result)
        # Every VM already on the host must still be reachable through the new switch.
        old = self.inventory.switches.get(host_name)
        self.inventory.switches[host_name] = result
        try:
            for vm_name in sorted(self.inventory.vms_by_host.get(host_name, ())):
                vm = self.inventory.get(Kind.vm, vm_name)
                network = self.inventory.get(Kind.vm_network, vm.vm_network)
                subnet = self.inventory.get(Kind.vm_subnet, f"{vm.vm_network}/{vm.vm_subnet}")
                reason = why_not(self.inventory, host, network, subnet)
                if reason is not None:
                    raise Conflict(
                        f"virtual switch of host {host_name}: VM {vm_name} would lose VM network {network.name}",
                        "logical_switch",
                        reason,
                    )
            # ... and a gateway host its gateway service's back-end and front-end.
            service = service_of_host(self.inventory, host_name)
            reason = why_not_gateway_service(self.inventory, service) if service is not None else None
            if reason is not None:
                raise Conflict(f"virtual switch of host {host_name}: the host would stop serving gateway service "
                               f"{service.name}", "logical_switch", reason)
        finally:
            if old is None:
                self.inventory.switches.pop(host_name, None)
            else:
                self.inventory.switches[host_name] = old
        return result, _Scope(hosts={host_name})

    def _lease_management(self, tx: Tx, host: Host, vm_network_name: str) -> None:
        network = self.inventory.get(Kind.vm_network, vm_network_name)
        address = host.management_address.ip
        for site in self.inventory.all(Kind.network_site):
            if site.logical_network != network.logical_network:
                continue
            for pool_key in self.inventory.pools_by_owner.get(site.name, ()):
                pool = self.inventory.get(Kind.ip_pool, pool_key)
                if pool.range_start.version != address.version:
                    continue
                if not int(pool.range_start) <= int(address) <= int(pool.range_end):
                    continue
                current = self.inventory.leases[pool.key].get(str(address))
                if current is None:
                    self._lease_from(tx, pool, LeaseKind.Management, "host", host.name, host.name,
                                     vm_network_name, f"Management of {host.name}", address=address)
                elif current.holder == host.name and current.kind is LeaseKind.Management:
                    tx.lease(current)  # keep it (the release above is overridden)
                else:
                    raise Conflict(
                        f"management address {address} of host {host.name} is leased by {current.holder}",
                        "management_address",
                        f"IP pool {pool.key} already gave it to {current.holder}",
                    )
                return

    def _delete_virtual_switch(self, tx: Tx, host_name: str) -> tuple[None, _Scope]:
        self._switch_of(self.inventory, host_name)
        vms = sorted(self.inventory.vms_by_host.get(host_name, ()))
        if vms:
            raise Conflict(
                f"the virtual switch of host {host_name} is in use",
                "host",
                f"VMs {', '.join(vms[:5])} are connected to it",
            )
        service = service_of_host(self.inventory, host_name)
        if service is not None:
            raise Conflict(f"the virtual switch of host {host_name} is in use", "host",
                           f"host {host_name} serves gateway service {service.name} through it")
        forwarding = self._forwarding_for(host_name)
        if forwarding:
            raise Conflict(f"the virtual switch of host {host_name} is in use", "host",
                           f"host {host_name} forwards through it for {', '.join(forwarding)}")
        self._release_held(tx, "host", host_name, LeaseKind.Management)
        tx.delete(VIRTUAL_SWITCH, host_name)
        return None, _Scope(hosts={host_name})
