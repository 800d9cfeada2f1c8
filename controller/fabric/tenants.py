"""Rules for tenants: VM networks, VM subnets, VMs, their CA and PA leases, migration.

- a network-virtualised VM network takes a routing domain id, each of its VM subnets a
  VSID and a gateway MAC;
- a VM is placed (or checked on the host it names), takes a MAC, a CA (never the
  subnet's network, broadcast or gateway address, nor one a pool reserves) and, with
  the host's first VM of its VM network, a PA; its namespace is not a host's;
- a migration moves the VM's leases to the destination at once; on a network-virtualised
  VM network it is staged (`Vm.migration`, stage `destination`; the stages after it are
  `controller.fabric.migrations`'), and the source keeps its PA until the last stage, so
  that it can forward to the new location; elsewhere the source's PA goes with its last VM;
- a second migration of a VM still migrating starts again from the VM's current host, and
  ends the old source's hold; deleting it ends its hold too;
- a VM a NAT rule forwards to is not deleted (the rule first); no VM takes its
  gateway's back-end CA. `_lease_ca` and `_ensure_pa` serve the gateway rules too.

A rule mixin of `Fabric` (see `controller.fabric.common.Builders`); never commits.
"""

from __future__ import annotations

import time
from typing import Any

from controller.allocate import allocate_routing_domain_id, allocate_vsid, slaac_address
from controller.compiler import subnet_gateway
from controller.fabric.common import Builders, _refuse_in_use, _Scope
from controller.gateways import customer_routes_of, gateway_of_network, nat_rules_for_vm
from controller.inventory import SPACE_MAC, SPACE_ROUTING_DOMAIN, SPACE_VSID, Tx
from controller.models import (
    Conflict,
    Host,
    Invalid,
    IpPool,
    Ipv6Assignment,
    Isolation,
    Kind,
    LeaseKind,
    MigrationStage,
    VmMigration,
    VmNetwork,
    VmSubnet,
)
from controller.placement import place, transport_of, why_not


class TenantRules(Builders):
    def _create_vm_network(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"VM network {spec.name}"
        logical = self._require(Kind.logical_network, spec.logical_network, "logical_network", what)
        decided: dict[str, Any] = {}
        if spec.isolation is Isolation.WindowsNetworkVirtualization:
            if not logical.network_virtualization:
                raise Invalid(
                    f"{what}: logical network {logical.name} does not allow network virtualisation",
                    "isolation",
                    "create it with network_virtualization true, or choose isolation VLAN or NoIsolation",
                )
            decided["routing_domain_id"] = allocate_routing_domain_id(self._taken(tx, SPACE_ROUTING_DOMAIN))
        network = self._new(Kind.vm_network, tx, spec, **decided)
        if network.routing_domain_id is not None:
            tx.take(SPACE_ROUTING_DOMAIN, str(network.routing_domain_id), f"vm-network:{network.name}")
        return network, _Scope()

    def _delete_vm_network(self, tx: Tx, network) -> tuple[None, _Scope]:
        users = [f"VM {name}" for name in sorted(self.inventory.vms_by_network.get(network.name, ()))]
        users += [f"VM subnet {key}" for key in self.inventory.subnets_by_network.get(network.name, ())]
        users += [f"the management adapter of host {host}" for host, vs in sorted(self.inventory.switches.items())
                  if vs.management_adapter is not None and vs.management_adapter.vm_network == network.name]
        gateway = gateway_of_network(self.inventory, network.name)
        users += [f"gateway {gateway.name}"] if gateway is not None else []
        users += [f"customer route {route.key}" for route in customer_routes_of(self.inventory, network.name)]
        _refuse_in_use(Kind.vm_network, network.name, users)
        tx.delete(Kind.vm_network, network.name)
        if network.routing_domain_id is not None:
            tx.free(SPACE_ROUTING_DOMAIN, str(network.routing_domain_id))
        return None, _Scope()

    def _only_subnet(self, network: VmNetwork, what: str) -> str:
        keys = self.inventory.subnets_by_network.get(network.name, [])
        if len(keys) != 1:
            raise Invalid(f"{what}: VM network {network.name} has {len(keys)} VM subnets", "vm_subnet",
                          "name the VM subnet")
        return keys[0].split("/", 1)[1]

    def _create_vm_subnet(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"VM subnet {spec.vm_network}/{spec.name}"
        network = self._require(Kind.vm_network, spec.vm_network, "vm_network", what)
        decided: dict[str, Any] = {}
        if network.isolation is Isolation.NoIsolation:
            raise Invalid(f"{what}: VM network {network.name} has no isolation", "vm_network",
                          "VM subnets belong to network-virtualised or VLAN VM networks")
        if network.isolation is Isolation.WindowsNetworkVirtualization:
            if spec.vlan is not None:
                raise Invalid(f"{what}: a network-virtualised VM subnet has no VLAN", "vlan",
                              "its traffic is carried in NVGRE on the transport VLAN")
            if spec.prefix.version != network.ca_family.version:
                raise Invalid(f"{what}: {spec.prefix} is not {network.ca_family.value}", "prefix",
                              f"VM network {network.name} has ca_family {network.ca_family.value}; "
                              "network virtualisation is never dual-stack")
            for key in self.inventory.subnets_by_network.get(network.name, ()):
                other = self.inventory.get(Kind.vm_subnet, key)
                if other.prefix.overlaps(spec.prefix):
                    raise Conflict(f"{what}: {spec.prefix} overlaps VM subnet {key} ({other.prefix})", "prefix",
                                   "VM subnets of one VM network share a routing domain")
            vsid = allocate_vsid(self._taken(tx, SPACE_VSID))
            decided["vsid"] = vsid
            decided["gateway_mac"] = self._new_mac(tx, f"gateway:{network.name}/{spec.name}")
        else:
            if spec.vlan is None:
                raise Invalid(f"{what}: a VLAN VM subnet names its VLAN", "vlan",
                              f"VM network {network.name} is isolated by VLAN")
            pairs = [(site.name, pair) for site in self.inventory.all(Kind.network_site)
                     if site.logical_network == network.logical_network for pair in site.subnet_vlans]
            if not any(pair.vlan == spec.vlan and pair.subnet == spec.prefix for _, pair in pairs):
                offered = ", ".join(f"{pair.subnet} VLAN {pair.vlan} ({site})" for site, pair in pairs) or "none"
                raise Invalid(
                    f"{what}: {spec.prefix} on VLAN {spec.vlan} is not a subnet/VLAN of logical network "
                    f"{network.logical_network}",
                    "vlan",
                    f"the sites of logical network {network.logical_network} offer: {offered}",
                )
        subnet = self._new(Kind.vm_subnet, tx, spec, **decided)
        if subnet.vsid is not None:
            tx.take(SPACE_VSID, str(subnet.vsid), f"vm-subnet:{subnet.key}")
        return subnet, _Scope(networks={network.name})

    def _delete_vm_subnet(self, tx: Tx, subnet) -> tuple[None, _Scope]:
        users = [f"VM {vm.name}" for vm in self.inventory.vms_of_network(subnet.vm_network)
                 if vm.vm_subnet == subnet.name]
        users += [f"IP pool {key}" for key in self.inventory.pools_by_owner.get(subnet.key, ())]
        gateway = gateway_of_network(self.inventory, subnet.vm_network)
        if gateway is not None and gateway.vm_subnet == subnet.name:
            users.append(f"gateway {gateway.name}")
        _refuse_in_use(Kind.vm_subnet, subnet.key, users)
        tx.delete(Kind.vm_subnet, subnet.key)
        if subnet.vsid is not None:
            tx.free(SPACE_VSID, str(subnet.vsid))
        if subnet.gateway_mac is not None:
            tx.free(SPACE_MAC, subnet.gateway_mac)
        return None, _Scope(networks={subnet.vm_network})

    def _create_vm(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"VM {spec.name}"
        self._refuse_existing(Kind.vm, spec.name)
        network = self._require(Kind.vm_network, spec.vm_network, "vm_network", what)
        if network.isolation is Isolation.NoIsolation:
            raise Invalid(f"{what}: VM network {network.name} has no isolation", "vm_network",
                          "VMs join network-virtualised or VLAN VM networks")
        subnet_name = spec.vm_subnet or self._only_subnet(network, what)
        subnet = self._require(Kind.vm_subnet, f"{network.name}/{subnet_name}", "vm_subnet", what)
        if spec.host_group is not None:
            self._require(Kind.host_group, spec.host_group, "host_group", what)
        self._refuse_host_namespace(spec, what)
        if spec.host is not None:
            host = self._require(Kind.host, spec.host, "host", what)
            reason = why_not(self.inventory, host, network, subnet)
            if reason is not None:
                raise Conflict(f"{what}: host {host.name} cannot carry VM network {network.name}", "host", reason)
        else:
            host = place(self.inventory, network, subnet, spec.host_group)
        if spec.mac is not None:
            self._take_mac(tx, spec.mac, f"vm:{spec.name}")
            mac = spec.mac
        else:
            mac = self._new_mac(tx, f"vm:{spec.name}")
        ca = self._lease_ca(tx, spec.name, spec.ca, network, subnet, host.name, mac=mac)
        if network.isolation is Isolation.WindowsNetworkVirtualization:
            self._ensure_pa(tx, host, network)
        vm = self._new(Kind.vm, tx, spec, vm_subnet=subnet.name, host=host.name, mac=mac, ca=ca)
        return vm, _Scope(networks={network.name}, hosts={host.name})

    def _forbidden_cas(self, subnet: VmSubnet, pools: list[IpPool]) -> dict:
        """Addresses of a VM subnet no VM may have, each with the reason."""
        prefix = subnet.prefix
        forbidden = {}
        for pool in pools:
            for address in pool.reserved:
                forbidden[address] = f"{address} is reserved in IP pool {pool.key}"
            if pool.gateway is not None:
                forbidden[pool.gateway] = f"{pool.gateway} is the gateway of IP pool {pool.key}"
        gateway = subnet_gateway(self.inventory, subnet)
        forbidden[gateway] = f"{gateway} is the gateway of VM subnet {subnet.key} (its distributed router)"
        hnv_gateway = gateway_of_network(self.inventory, subnet.vm_network)
        if hnv_gateway is not None and hnv_gateway.vm_subnet == subnet.name:
            forbidden[hnv_gateway.back_end_ca] = (f"{hnv_gateway.back_end_ca} is the back-end address of gateway "
                                                  f"{hnv_gateway.name}")
        # IPv4 /31 and /32 (RFC 3021) and IPv6 /127 and /128 have no network or broadcast address.
        if prefix.num_addresses > 2:
            forbidden[prefix.network_address] = f"{prefix.network_address} is the network address of {prefix}"
            if prefix.version == 4:
                forbidden[prefix.broadcast_address] = f"{prefix.broadcast_address} is the broadcast address of {prefix}"
        return forbidden

    def _refuse_host_namespace(self, vm: Any, what: str) -> None:
        """A VM's namespace may not be a host's: in the lab, each host is a namespace of its name."""
        namespace = vm.namespace
        if namespace is not None and self.inventory.get(Kind.host, namespace) is not None:
            field = "netns" if vm.netns is not None else "name"
            raise Invalid(f"{what}: namespace {namespace} is the name of host {namespace}", field,
                          f"host {namespace} is a namespace of that name in the lab; a VM may not join it")

    def _lease_ca(self, tx: Tx, holder: str, wanted, network: VmNetwork, subnet: VmSubnet, host: str | None,
                  holder_kind: str = "vm", field: str = "ca", mac: str | None = None):
        """A CA for a VM (or, holder_kind "gateway", a gateway's back-end address): the one
        wanted, checked, or the next free of the VM subnet's pools; leased when a pool covers it.
        In a SLAAC pool's subnet a VM's CA is the one it forms from its MAC (allocate.slaac_address)."""
        pools = [self.inventory.get(Kind.ip_pool, key) for key in self.inventory.pools_by_owner.get(subnet.key, ())]
        what = f"VM {holder}" if holder_kind == "vm" else f"{holder_kind} {holder}"
        if mac is not None and any(pool.ipv6_assignment is Ipv6Assignment.SLAAC for pool in pools):
            formed = slaac_address(subnet.prefix, mac)
            if wanted is not None and wanted != formed:
                raise Invalid(f"{what}: CA {wanted} is not the address the VM forms by SLAAC", field,
                              f"VM subnet {subnet.key} assigns addresses by SLAAC: MAC {mac} forms {formed}")
            wanted = formed
        description = (f"CA of {holder} in {network.name}" if holder_kind == "vm"
                       else f"Back-end CA of {holder_kind} {holder} in {network.name}")
        forbidden = self._forbidden_cas(subnet, pools)
        if wanted is not None:
            if wanted not in subnet.prefix:
                raise Invalid(f"{what}: CA {wanted} is outside VM subnet {subnet.key} ({subnet.prefix})", field,
                              f"{wanted} is not in {subnet.prefix}")
            if wanted in forbidden:
                raise Invalid(f"{what}: CA {wanted} cannot be a VM's address", field, forbidden[wanted])
            for other in self.inventory.vms_of_network(network.name):
                if other.ca == wanted and other.vm_subnet == subnet.name:
                    raise Conflict(f"{what}: CA {wanted} is already used by VM {other.name}", field,
                                   f"CAs are unique within VM subnet {subnet.key}")
            for pool in pools:
                if int(pool.range_start) <= int(wanted) <= int(pool.range_end):
                    self._lease_from(tx, pool, LeaseKind.CA, holder_kind, holder, host, network.name, description,
                                     address=wanted, field=field)
                    break
            return wanted
        if not pools:
            if network.isolation is Isolation.VLAN:
                return None
            raise Conflict(f"{what}: VM subnet {subnet.key} has no IP pool", field,
                           f"create an IP pool on the VM subnet or give the {holder_kind} a CA")
        exhausted = []
        for pool in pools:
            try:
                return self._lease_from(tx, pool, LeaseKind.CA, holder_kind, holder, host, network.name,
                                        description, also_skip=forbidden).address
            except Conflict as exc:
                exhausted.append(f"{exc.error} ({exc.reason})")
        raise Conflict(f"{what}: no free CA in VM subnet {subnet.key}", field, "; ".join(exhausted))

    def _ensure_pa(self, tx: Tx, host: Host, network: VmNetwork) -> None:
        """One PA per (host, VM network): taken with the host's first VM of that network."""
        if (host.name, network.name) in self.inventory.pa_leases:
            return
        transport = transport_of(self.inventory, host)
        if transport is None:
            raise Conflict(f"host {host.name} has no provider address for VM network {network.name}", "host",
                           f"host {host.name} reaches no network-virtualisation logical network")
        pools = [self.inventory.get(Kind.ip_pool, key) for key in self.inventory.pools_by_owner.get(transport.site.name, ())]
        pools = [pool for pool in pools if pool.subnet == transport.subnet_vlan.subnet]
        if not pools:
            raise Conflict(
                f"host {host.name} has no provider address for VM network {network.name}",
                "host",
                f"the transport site {transport.site.name} ({transport.subnet_vlan.subnet}) has no IP pool for PAs",
            )
        description = f"PA of {host.name} for {network.name}"
        exhausted = []
        for pool in pools:
            try:
                self._lease_from(tx, pool, LeaseKind.PA, "host", host.name, host.name, network.name, description)
                return
            except Conflict as exc:
                exhausted.append(f"{exc.error} ({exc.reason})")
        raise Conflict(f"host {host.name} has no provider address for VM network {network.name}", "host",
                       "; ".join(exhausted))

    def _release_pa_if_last(self, tx: Tx, host: str, network: str, leaving_vms: int = 1,
                            leaving_migrations: int = 0) -> None:
        """Release the host's PA for the VM network unless it still holds the network once
        `leaving_vms` of its VMs and `leaving_migrations` of the migrations from it are gone."""
        if not self.inventory.holds_network(host, network, leaving_vms, leaving_migrations):
            lease = self.inventory.pa_leases.get((host, network))
            if lease is not None:
                tx.release(lease)

    def _end_migration_hold(self, tx: Tx, vm, staying: str | None = None) -> str | None:
        """A VM's migration in progress ends (deleted, moved again): its source lets the
        VM network go unless it holds it otherwise (or is `staying`, the VM's next host).
        The host that held it, to recompile; None when the VM was not migrating."""
        if vm.migration is None:
            return None
        source = vm.migration.source
        if source != staying:
            self._release_pa_if_last(tx, source, vm.vm_network, leaving_vms=0, leaving_migrations=1)
        return source

    def _delete_vm(self, tx: Tx, vm) -> tuple[None, _Scope]:
        _refuse_in_use(Kind.vm, vm.name, [f"NAT rule {rule.name}" for rule in nat_rules_for_vm(self.inventory, vm.name)])
        tx.delete(Kind.vm, vm.name)
        tx.free(SPACE_MAC, vm.mac)
        self._release_held(tx, "vm", vm.name)
        self._release_pa_if_last(tx, vm.host, vm.vm_network)
        source = self._end_migration_hold(tx, vm)
        return None, _Scope(networks={vm.vm_network}, hosts={vm.host} | ({source} if source else set()))

    def _migrate(self, tx: Tx, vm_name: str, destination: str) -> tuple[Any, _Scope]:
        vm = self._existing(Kind.vm, vm_name)
        host = self._require(Kind.host, destination, "host", f"migration of VM {vm_name}")
        if host.name == vm.host:
            return vm, _Scope()
        network = self.inventory.get(Kind.vm_network, vm.vm_network)
        subnet = self.inventory.get(Kind.vm_subnet, f"{vm.vm_network}/{vm.vm_subnet}")
        reason = why_not(self.inventory, host, network, subnet)
        if reason is not None:
            raise Conflict(f"VM {vm_name} cannot migrate to host {host.name}", "host", reason)
        hosts = {vm.host, host.name}
        migration = None
        if network.isolation is Isolation.WindowsNetworkVirtualization:
            # Staged: the source keeps its PA (it forwards to the new location) until
            # controller.fabric.migrations ends the migration. A VM still migrating starts
            # again from where it is now; its previous source lets go (unless it is the
            # destination now: moving back).
            previous_source = self._end_migration_hold(tx, vm, staying=host.name)
            hosts |= {previous_source} if previous_source else set()
            self._ensure_pa(tx, host, network)
            migration = VmMigration(source=vm.host, stage=MigrationStage.destination, since=time.time())
        else:
            self._release_pa_if_last(tx, vm.host, network.name)
        for lease in self.inventory.leases_by_holder.get(f"vm:{vm.name}", ()):
            tx.lease(lease.model_copy(update={"host": host.name}))
        moved = vm.model_copy(update={"host": host.name, "migration": migration})
        tx.put(Kind.vm, vm.name, moved)
        return moved, _Scope(networks={network.name}, hosts=hosts)
