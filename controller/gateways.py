"""Who serves whom in the HNV gateway: lookups over the inventory's gateway objects.

The gateway kinds (`controller.models`: gateway services, gateways, NAT connections,
NAT rules, customer routes) are few next to VMs, so they are found by a scan of their
kind instead of indexes kept in `controller.inventory`; each answer is what the rules
(`controller.fabric.gateways`), the compiler and the engine's choice of affected hosts
need. Works on any object with the inventory's `get`/`all` (the working inventory or a
committed view).

Pure reads; nothing here writes, decides a rule or touches the store.
"""

from __future__ import annotations

from typing import Any, Iterator

from controller.models import (
    Connectivity,
    CustomerRoute,
    Gateway,
    GatewayService,
    Kind,
    NatConnection,
    NatRule,
)


def gateway_of_network(inventory: Any, vm_network: str) -> Gateway | None:
    """The gateway of a VM network (at most one), or None."""
    return next((g for g in inventory.all(Kind.gateway) if g.vm_network == vm_network), None)


def service_of(inventory: Any, gateway: Gateway) -> GatewayService | None:
    return inventory.get(Kind.gateway_service, gateway.gateway_service)


def service_hosts(inventory: Any, gateway: Gateway | None) -> set[str]:
    """Every host (active and standby) of the gateway service a gateway belongs to."""
    service = service_of(inventory, gateway) if gateway is not None else None
    return set(service.hosts) if service is not None else set()


def gateway_hosts_of_network(inventory: Any, vm_network: str) -> set[str]:
    """Every host of the gateway service that serves this VM network (active and standby)."""
    return service_hosts(inventory, gateway_of_network(inventory, vm_network))


def service_of_host(inventory: Any, host: str) -> GatewayService | None:
    """The gateway service a host belongs to (a host serves at most one)."""
    return next((s for s in inventory.all(Kind.gateway_service) if host in s.hosts), None)


def gateways_of_service(inventory: Any, service: str) -> list[Gateway]:
    """The service's gateways, by VM network name (the order a host's legs are listed in)."""
    return sorted((g for g in inventory.all(Kind.gateway) if g.gateway_service == service),
                  key=lambda g: g.vm_network)


def nat_connection_of(inventory: Any, gateway: str) -> NatConnection | None:
    return next((c for c in inventory.all(Kind.nat_connection) if c.gateway == gateway), None)


def nat_rules_of(inventory: Any, connection: str) -> list[NatRule]:
    return sorted((r for r in inventory.all(Kind.nat_rule) if r.nat_connection == connection),
                  key=lambda r: (r.protocol.value, r.external_port))


def nat_rules_for_vm(inventory: Any, vm: str) -> Iterator[NatRule]:
    return (r for r in inventory.all(Kind.nat_rule) if r.vm == vm)


def customer_routes_of(inventory: Any, vm_network: str) -> list[CustomerRoute]:
    return sorted((r for r in inventory.all(Kind.customer_route) if r.vm_network == vm_network),
                  key=lambda r: (r.prefix.prefixlen, int(r.prefix.network_address)))


def routes_out(gateway: Gateway | None) -> bool:
    """Does the gateway take the VM network's default route (nat or forwarding)?"""
    return gateway is not None and gateway.connectivity is not Connectivity.none
