"""Rules for the HNV gateway: gateway services, gateways, NAT connections, NAT rules,
customer routes, and a host's role.

- a gateway service's hosts have the role gateway, serve no other service, carry
  network virtualisation on its back-end logical network (tagged) and reach its
  front-end site; the front-end is an external (not network-virtualised) logical
  network, its pool's subnet on a tagged VLAN; `active` is one of its hosts (default
  the first), stamped with when and why it last changed (`active_since`,
  `active_reason`: created, set by hand, a host that left, or a failover);
- a gateway connects one network-virtualised VM network of the back-end logical
  network; it takes a back-end CA in a VM subnet, a MAC, a PA on every host of its
  service and, for forwarding, a forwarding address from the front-end pool (its
  prefixes may not overlap another forwarding VM network's of that service, nor the
  front-end subnet);
- a NAT connection gives a nat gateway one external address from a pool of the
  front-end site (exactly once, like every lease; an exhausted pool is refused
  naming it);
- a NAT rule's (external address, protocol, port) is taken once; its VM is in the
  connection's VM network, its CA inside one of that network's subnets;
- a customer route's next hop lies inside a VM subnet of its VM network and is not
  the distributed router; its prefix is routed once per VM network;
- a host holding VMs does not become a gateway host; a host of a service stays one.

A rule mixin of `Fabric` (see `controller.fabric.common.Builders`); never commits.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from controller.compiler import subnet_gateway
from controller.fabric.common import Builders, _refuse_in_use, _Scope, _skipped
from controller.gateways import (
    customer_routes_of,
    gateway_of_network,
    gateways_of_service,
    nat_connection_of,
    nat_rules_of,
    service_hosts,
    service_of_host,
)
from controller.inventory import SPACE_MAC, Tx
from controller.models import (
    Conflict,
    Connectivity,
    Gateway,
    GatewayService,
    Host,
    HostRole,
    Invalid,
    IpPool,
    Isolation,
    Kind,
    LeaseKind,
    NetworkSite,
)
from controller.placement import why_not_gateway_host


class GatewayRules(Builders):
    # --- gateway services ------------------------------------------------------------------

    def _create_gateway_service(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        self._check_gateway_service(spec, f"gateway service {spec.name}")
        service = self._new(Kind.gateway_service, tx, spec, active=spec.active or spec.hosts[0],
                            active_since=datetime.now(timezone.utc), active_reason="created")
        return service, _Scope(hosts=set(service.hosts))

    def _delete_gateway_service(self, tx: Tx, service) -> tuple[None, _Scope]:
        users = [f"gateway {g.name}" for g in gateways_of_service(self.inventory, service.name)]
        _refuse_in_use(Kind.gateway_service, service.name, users)
        tx.delete(Kind.gateway_service, service.name)
        return None, _Scope(hosts=set(service.hosts))

    def _front_end(self, service: Any, what: str) -> tuple[NetworkSite, IpPool, int]:
        """The service's front-end site, pool and the pool subnet's VLAN (checked)."""
        front = self._require(Kind.logical_network, service.front_end_logical_network, "front_end_logical_network",
                              what)
        if front.network_virtualization:
            raise Invalid(f"{what}: logical network {front.name} is network-virtualised", "front_end_logical_network",
                          "the front-end connection is an external (VLAN) logical network; the back-end is the "
                          "network-virtualisation one")
        site = self._require(Kind.network_site, service.front_end_site, "front_end_site", what)
        if site.logical_network != front.name:
            raise Invalid(f"{what}: network site {site.name} is not a site of logical network {front.name}",
                          "front_end_site", f"network site {site.name} belongs to logical network {site.logical_network}")
        pool = self._require(Kind.ip_pool, service.pool_key, "external_ip_pool", what)
        vlan = next((pair.vlan for pair in site.subnet_vlans if pair.subnet == pool.subnet), 0)
        if vlan == 0:
            raise Invalid(f"{what}: the front-end subnet {pool.subnet} is untagged", "external_ip_pool",
                          f"{pool.subnet} is on VLAN 0 at network site {site.name}; the front-end leg is a VLAN on "
                          "the gateway hosts' trunk")
        return site, pool, vlan

    def _check_gateway_service(self, spec: Any, what: str) -> None:
        back = self._require(Kind.logical_network, spec.back_end_logical_network, "back_end_logical_network", what)
        if not back.network_virtualization:
            raise Invalid(f"{what}: logical network {back.name} is not network-virtualised", "back_end_logical_network",
                          "the back-end connection is the network-virtualisation logical network whose VM "
                          "networks the gateway serves")
        site, _pool, _vlan = self._front_end(spec, what)
        for i, name in enumerate(spec.hosts):
            host = self._require(Kind.host, name, f"hosts[{i}]", what)
            field = f"hosts[{i}]"
            if host.role is not HostRole.gateway:
                raise Invalid(f"{what}: host {name} is not a gateway host", field,
                              f"host {name} has role {host.role.value}; set its role to gateway first")
            other = service_of_host(self.inventory, name)
            if other is not None and other.name != spec.name:
                raise Conflict(f"{what}: host {name} serves gateway service {other.name}", field,
                               f"host {name} serves gateway service {other.name}; a gateway host serves one "
                               "gateway service")
            reason = why_not_gateway_host(self.inventory, host, back.name, site.name)
            if reason is not None:
                raise Conflict(f"{what}: host {name} cannot serve it", field, reason)

    # --- gateways (Add-SCVMNetworkGateway) -------------------------------------------------

    def _virtualised_network(self, name: str, what: str, why: str) -> Any:
        """The VM network `name` (field vm_network), refused unless network-virtualised."""
        network = self._require(Kind.vm_network, name, "vm_network", what)
        if network.isolation is not Isolation.WindowsNetworkVirtualization:
            raise Invalid(f"{what}: VM network {network.name} is not network-virtualised", "vm_network", why)
        return network

    def _create_gateway(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"gateway {spec.name}"
        network = self._virtualised_network(spec.vm_network, what, "a gateway serves network-virtualised VM "
                                            "networks (their traffic reaches it in NVGRE)")
        service = self._require(Kind.gateway_service, spec.gateway_service, "gateway_service", what)
        if network.logical_network != service.back_end_logical_network:
            raise Invalid(f"{what}: VM network {network.name} is on logical network {network.logical_network}",
                          "gateway_service", f"gateway service {service.name}'s back-end is logical network "
                          f"{service.back_end_logical_network}")
        existing = gateway_of_network(self.inventory, network.name)
        if existing is not None:
            raise Conflict(f"{what}: VM network {network.name} already has gateway {existing.name}", "vm_network",
                           "a VM network has at most one gateway")
        self._refuse_existing(Kind.gateway, spec.name)
        subnet_name = spec.vm_subnet or self._only_subnet(network, what)
        subnet = self._require(Kind.vm_subnet, f"{network.name}/{subnet_name}", "vm_subnet", what)
        site, _pool, _vlan = self._front_end(service, f"{what}: gateway service {service.name}")
        for name in service.hosts:
            host = self.inventory.get(Kind.host, name)
            reason = why_not_gateway_host(self.inventory, host, service.back_end_logical_network, site.name)
            if reason is not None:
                raise Conflict(f"{what}: host {name} of gateway service {service.name} cannot serve it",
                               "gateway_service", reason)
        ca = self._lease_ca(tx, spec.name, spec.back_end_ca, network, subnet, None, holder_kind="gateway",
                            field="back_end_ca")
        mac = self._new_mac(tx, f"gateway:{spec.name}")
        for name in service.hosts:
            self._ensure_pa(tx, self.inventory.get(Kind.host, name), network)
        forwarding = None
        if spec.connectivity is Connectivity.forwarding:
            forwarding = self._lease_forwarding(tx, spec.name, network.name, service)
        gateway = self._new(Kind.gateway, tx, spec, vm_subnet=subnet.name, back_end_ca=ca, back_end_mac=mac,
                            forwarding_address=forwarding)
        return gateway, _Scope(networks={network.name}, hosts=set(service.hosts))

    def _delete_gateway(self, tx: Tx, gateway) -> tuple[None, _Scope]:
        connection = nat_connection_of(self.inventory, gateway.name)
        _refuse_in_use(Kind.gateway, gateway.name, [f"NAT connection {connection.name}"] if connection else [])
        service = self.inventory.get(Kind.gateway_service, gateway.gateway_service)
        tx.delete(Kind.gateway, gateway.name)
        tx.free(SPACE_MAC, gateway.back_end_mac)
        self._release_held(tx, "gateway", gateway.name)
        for name in service.hosts:
            self._release_gateway_pa(tx, name, gateway.vm_network)
        return None, _Scope(networks={gateway.vm_network}, hosts=set(service.hosts))

    def _release_gateway_pa(self, tx: Tx, host: str, vm_network: str) -> None:
        """A gateway host's PA for a VM network, unless a VM of that network (or a migration
        from there) holds it too."""
        lease = self.inventory.pa_leases.get((host, vm_network))
        if lease is not None and not self.inventory.holds_network(host, vm_network):
            tx.release(lease)

    def _lease_forwarding(self, tx: Tx, holder: str, vm_network: str, service: GatewayService):
        """A forwarding VM network's address on the front-end (the next hop the upstream
        router's static route names); its prefixes must be unique on that network."""
        pool = self.inventory.get(Kind.ip_pool, service.pool_key)
        prefixes = self._prefixes(vm_network)
        for prefix in prefixes:
            if prefix.overlaps(pool.subnet):
                raise Conflict(f"gateway {holder}: VM network {vm_network} overlaps the front-end subnet",
                               "connectivity", f"{prefix} overlaps {pool.subnet}: forwarding routes the VM "
                               "network's prefixes unchanged onto the front-end network")
        for other in gateways_of_service(self.inventory, service.name):
            if other.connectivity is not Connectivity.forwarding or other.name == holder:
                continue
            for prefix in prefixes:
                for theirs in self._prefixes(other.vm_network):
                    if prefix.overlaps(theirs):
                        raise Conflict(
                            f"gateway {holder}: {prefix} of VM network {vm_network} overlaps {theirs} of VM network "
                            f"{other.vm_network}", "connectivity",
                            f"both are forwarded without NAT by gateway service {service.name}; only nat lets "
                            "customer addresses overlap")
        return self._lease_front_end(tx, pool, LeaseKind.Forwarding, "gateway", holder, vm_network,
                                     f"Forwarding address of {vm_network}", None, "connectivity", "connectivity")

    def _prefixes(self, vm_network: str) -> list:
        return [self.inventory.get(Kind.vm_subnet, key).prefix
                for key in self.inventory.subnets_by_network.get(vm_network, ())]

    def _lease_front_end(self, tx: Tx, pool: IpPool, kind: LeaseKind, holder_kind: str, holder: str,
                         vm_network: str, description: str, address, pool_field: str, address_field: str):
        """An address of a front-end pool (the one asked for, checked, or the next free):
        exhausted is refused naming the pool."""
        if address is not None:
            if not int(pool.range_start) <= int(address) <= int(pool.range_end) or address.version != \
                    pool.range_start.version:
                raise Invalid(f"{holder_kind} {holder}: {address} is outside IP pool {pool.key}", address_field,
                              f"IP pool {pool.key} hands out {pool.range_start} - {pool.range_end}")
            if address in _skipped(pool):
                raise Invalid(f"{holder_kind} {holder}: {address} is not handed out by IP pool {pool.key}",
                              address_field, f"{address} is the pool's gateway, a reserved, network or broadcast "
                              "address")
        try:
            lease = self._lease_from(tx, pool, kind, holder_kind, holder, None, vm_network, description,
                                     address=address, field=address_field)
        except Conflict as exc:
            if exc.field == address_field:
                raise
            raise Conflict(f"{holder_kind} {holder}: IP pool {pool.key} is exhausted", pool_field,
                           f"IP pool {pool.key} is exhausted: {exc.reason}") from None
        return lease.address

    def _patch_gateway(self, tx: Tx, current: Gateway, updated: Gateway) -> Gateway:
        """Connectivity changes: nat keeps its NAT connection until deleted; forwarding
        takes (or gives back) its forwarding address."""
        if updated.connectivity is current.connectivity:
            return updated
        connection = nat_connection_of(self.inventory, current.name)
        if connection is not None:
            raise Conflict(f"gateway {current.name}: connectivity cannot leave nat", "connectivity",
                           f"NAT connection {connection.name} still uses it; delete it first")
        if current.forwarding_address is not None:
            for lease in self.inventory.leases_by_holder.get(f"gateway:{current.name}", ()):
                if lease.kind is LeaseKind.Forwarding:
                    tx.release(lease)
            updated = updated.model_copy(update={"forwarding_address": None})
        if updated.connectivity is Connectivity.forwarding:
            service = self.inventory.get(Kind.gateway_service, current.gateway_service)
            address = self._lease_forwarding(tx, current.name, current.vm_network, service)
            updated = updated.model_copy(update={"forwarding_address": address})
        return updated

    # --- NAT connections and rules ------------------------------------------------------------

    def _create_nat_connection(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"NAT connection {spec.name}"
        gateway = self._require(Kind.gateway, spec.gateway, "gateway", what)
        if gateway.connectivity is not Connectivity.nat:
            raise Invalid(f"{what}: gateway {gateway.name} has connectivity {gateway.connectivity.value}", "gateway",
                          "a NAT connection belongs to a gateway with connectivity nat")
        existing = nat_connection_of(self.inventory, gateway.name)
        if existing is not None:
            raise Conflict(f"{what}: gateway {gateway.name} already has NAT connection {existing.name}", "gateway",
                           "a VM network has one external address")
        self._refuse_existing(Kind.nat_connection, spec.name)
        service = self.inventory.get(Kind.gateway_service, gateway.gateway_service)
        _site, front_pool, _vlan = self._front_end(service, f"{what}: gateway service {service.name}")
        pool_name = spec.external_ip_pool or service.external_ip_pool
        pool = self._require(Kind.ip_pool, f"{service.front_end_site}/{pool_name}", "external_ip_pool", what)
        if pool.subnet != front_pool.subnet:
            raise Invalid(f"{what}: IP pool {pool.key} is not on the front-end subnet", "external_ip_pool",
                          f"IP pool {pool.key} serves {pool.subnet}; the front-end leg is on {front_pool.subnet}")
        address = self._lease_front_end(tx, pool, LeaseKind.NAT, "nat-connection", spec.name, gateway.vm_network,
                                        f"NAT address of {gateway.vm_network}", spec.external_address,
                                        "external_ip_pool", "external_address")
        connection = self._new(Kind.nat_connection, tx, spec, external_ip_pool=pool.name, external_address=address,
                               vm_network=gateway.vm_network)
        return connection, _Scope(networks={gateway.vm_network}, hosts=set(service.hosts))

    def _delete_nat_connection(self, tx: Tx, connection) -> tuple[None, _Scope]:
        users = [f"NAT rule {rule.name}" for rule in nat_rules_of(self.inventory, connection.name)]
        _refuse_in_use(Kind.nat_connection, connection.name, users)
        tx.delete(Kind.nat_connection, connection.name)
        self._release_held(tx, "nat-connection", connection.name)
        return None, _Scope(networks={connection.vm_network}, hosts=self._service_hosts_of(connection.gateway))

    def _service_hosts_of(self, gateway_name: str) -> set[str]:
        return service_hosts(self.inventory, self.inventory.get(Kind.gateway, gateway_name))

    def _create_nat_rule(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"NAT rule {spec.name}"
        connection = self._require(Kind.nat_connection, spec.nat_connection, "nat_connection", what)
        network = connection.vm_network
        if spec.vm is not None:
            vm = self._require(Kind.vm, spec.vm, "vm", what)
            if vm.vm_network != network:
                raise Invalid(f"{what}: VM {vm.name} is not in VM network {network}", "vm",
                              f"VM {vm.name} is in VM network {vm.vm_network}; NAT connection {connection.name} "
                              f"serves {network}")
            if vm.ca is None:
                raise Invalid(f"{what}: VM {vm.name} has no CA", "vm", "a NAT rule forwards to a customer address")
        else:
            prefixes = self._prefixes(network)
            if not any(spec.ca in prefix for prefix in prefixes):
                raise Invalid(f"{what}: {spec.ca} is outside VM network {network}", "ca",
                              f"{spec.ca} is in none of {', '.join(map(str, prefixes))}")
        for other in self.inventory.all(Kind.nat_rule):
            other_connection = self.inventory.get(Kind.nat_connection, other.nat_connection)
            if (other.protocol is spec.protocol and other.external_port == spec.external_port
                    and other_connection.external_address == connection.external_address):
                raise Conflict(
                    f"{what}: {spec.protocol.value} port {spec.external_port} of {connection.external_address} is taken",
                    "external_port",
                    f"NAT rule {other.name} already forwards {spec.protocol.value} {connection.external_address}:"
                    f"{spec.external_port}")
        rule = self._new(Kind.nat_rule, tx, spec, internal_port=spec.internal_port or spec.external_port)
        return rule, _Scope(networks={network}, hosts=self._service_hosts_of(connection.gateway))

    def _delete_nat_rule(self, tx: Tx, rule) -> tuple[None, _Scope]:
        connection = self.inventory.get(Kind.nat_connection, rule.nat_connection)
        tx.delete(Kind.nat_rule, rule.name)
        return None, _Scope(networks={connection.vm_network}, hosts=self._service_hosts_of(connection.gateway))

    # --- customer routes ----------------------------------------------------------------------

    def _create_customer_route(self, tx: Tx, spec) -> tuple[Any, _Scope]:
        what = f"customer route {spec.vm_network}/{spec.name}"
        network = self._virtualised_network(spec.vm_network, what, "customer routes belong to a "
                                            "network-virtualised VM network's routing domain")
        if spec.prefix.version != network.ca_family.version:
            raise Invalid(f"{what}: {spec.prefix} is not {network.ca_family.value}", "prefix",
                          f"VM network {network.name} has ca_family {network.ca_family.value}")
        subnets = [self.inventory.get(Kind.vm_subnet, key)
                   for key in self.inventory.subnets_by_network.get(network.name, ())]
        inside = next((s for s in subnets if spec.next_hop in s.prefix), None)
        if inside is None:
            shown = ", ".join(str(s.prefix) for s in subnets) or "no VM subnet yet"
            raise Invalid(f"{what}: next hop {spec.next_hop} is outside VM network {network.name}", "next_hop",
                          f"a next hop is a customer address inside one of the VM network's subnets ({shown})")
        if spec.next_hop == subnet_gateway(self.inventory, inside):
            raise Invalid(f"{what}: next hop {spec.next_hop} is the distributed router", "next_hop",
                          f"{spec.next_hop} is the gateway of VM subnet {inside.key} on every host; a route to it "
                          "would loop")
        for subnet in subnets:
            if spec.prefix.subnet_of(subnet.prefix):
                raise Invalid(f"{what}: {spec.prefix} lies inside VM subnet {subnet.key}", "prefix",
                              f"{subnet.prefix} is routed by the distributed router")
        for other in customer_routes_of(self.inventory, network.name):
            if other.prefix == spec.prefix:
                raise Conflict(f"{what}: VM network {network.name} already routes {spec.prefix}", "prefix",
                               f"customer route {other.key} routes it via {other.next_hop}")
        route = self._new(Kind.customer_route, tx, spec)
        return route, _Scope(networks={network.name})

    def _delete_customer_route(self, tx: Tx, route) -> tuple[None, _Scope]:
        tx.delete(Kind.customer_route, route.key)
        return None, _Scope(networks={route.vm_network})

    # --- host role and service patches ---------------------------------------------------------

    def _check_role_change(self, host: Host, role: HostRole) -> None:
        if role is HostRole.gateway:
            vms = sorted(self.inventory.vms_by_host.get(host.name, ()))
            if vms:
                shown = ", ".join(vms[:5]) + (f" and {len(vms) - 5} more" if len(vms) > 5 else "")
                raise Conflict(f"host {host.name} cannot become a gateway host", "role",
                               f"it holds VMs {shown}; migrate them first: placement never puts a VM on a "
                               "gateway host")
            return
        service = service_of_host(self.inventory, host.name)
        if service is not None:
            raise Conflict(f"host {host.name} cannot leave the gateway role", "role",
                           f"it is a host of gateway service {service.name}; remove it from the service's hosts first")

    def _patch_gateway_service(self, tx: Tx, current: GatewayService, updated: GatewayService,
                               why: str | None = None) -> GatewayService:
        """New hosts are checked and take a PA for each served VM network; hosts that
        leave give theirs back. A move of `active` is stamped with its time and `why`
        (a failover says what it saw; a PATCH is "set by hand")."""
        self._check_gateway_service(updated, f"gateway service {current.name}")
        if updated.active != current.active:
            if why is None:
                why = "set by hand" if current.active in updated.hosts else f"{current.active} left the service's hosts"
            updated = updated.model_copy(update={"active_since": datetime.now(timezone.utc), "active_reason": why})
        added = [name for name in updated.hosts if name not in current.hosts]
        removed = [name for name in current.hosts if name not in updated.hosts]
        for gateway in gateways_of_service(self.inventory, current.name):
            network = self.inventory.get(Kind.vm_network, gateway.vm_network)
            for name in added:
                self._ensure_pa(tx, self.inventory.get(Kind.host, name), network)
            for name in removed:
                self._release_gateway_pa(tx, name, gateway.vm_network)
        return updated


def gateway_service_changes(current: GatewayService, changes: dict[str, Any]) -> dict[str, Any]:
    """A PATCH of the hosts that drops the active host moves `active` to the new first host."""
    hosts = changes.get("hosts")
    if "active" not in changes and isinstance(hosts, list) and hosts and current.active not in hosts:
        return {**changes, "active": hosts[0]}
    return changes
