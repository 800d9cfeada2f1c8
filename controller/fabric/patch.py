"""PATCH: the fields a kind lets change, re-validated as a whole, and what must still
hold afterwards (a host's NICs used by its switch, every VM still placed after a site or
profile change, the management lease following the address, a VM's namespace, a host's
role, a gateway service's hosts and active host, a gateway's connectivity: the last
three are `controller.fabric.gateways`' rules).

A `Fabric` mixin, like the other rules; never commits.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from agent.state import Encapsulation, TunnelMode, describe_validation_error
from controller.fabric.common import ALL, Builders, _plain, _Scope
from controller.fabric.gateways import gateway_service_changes
from controller.inventory import Tx
from controller.models import SPEC_OF, Conflict, Invalid, Kind, LeaseKind, computed_fields
from controller.placement import transport_of, why_not, why_not_gateway_service


class PatchRules(Builders):
    def _patch(self, tx: Tx, kind: Kind, key: str, changes: dict[str, Any],
               why: str | None = None) -> tuple[Any, _Scope]:
        """`why`: the reason recorded with a gateway service's move of `active` (a
        failover's; None for a client's PATCH)."""
        current = self._existing(kind, key)
        spec_model = SPEC_OF[kind]
        if not isinstance(changes, dict):
            raise Invalid(f"{kind.label} {key}: a PATCH body is a JSON object", None, "send the fields to change")
        for name, value in changes.items():
            if name not in spec_model.model_fields:
                raise Invalid(f"{kind.label} {key}: unknown field {name}", name, f"{kind.label}s have no field {name}")
        if kind is Kind.gateway_service:
            changes = gateway_service_changes(current, changes)
        spec_data = {name: getattr(current, name) for name in spec_model.model_fields}
        try:
            merged = spec_model.model_validate({**_plain(spec_data), **changes})
        except ValidationError as exc:
            problem = describe_validation_error(exc)[0]
            field, _, reason = problem.partition(": ")
            raise Invalid(f"{kind.label} {key}: {problem}", field or None, reason or problem) from None
        for name in spec_model.model_fields:
            if getattr(merged, name) != getattr(current, name) and name not in spec_model.patchable:
                raise Invalid(
                    f"{kind.label} {key}: {name} cannot be changed",
                    name,
                    f"only {', '.join(sorted(spec_model.patchable))} can change; delete and recreate "
                    f"the {kind.label} to change {name}",
                )
        if kind is Kind.host and merged.nics != current.nics:
            switch = self.inventory.switches.get(key)
            missing = [nic for nic in (switch.nics if switch else ()) if nic not in merged.nics]
            if missing:
                raise Conflict(f"host {key}: NIC {missing[0]} is used by its virtual switch", "nics",
                               "remove it from the virtual switch first")
        if kind is Kind.vm:
            self._refuse_host_namespace(merged, f"VM {key}")
        if kind is Kind.network_site:
            for i, group in enumerate(merged.host_groups):
                self._require(Kind.host_group, group, f"host_groups[{i}]", f"network site {key}")
        if kind is Kind.uplink_port_profile:
            for i, site in enumerate(merged.network_sites):
                self._require(Kind.network_site, site, f"network_sites[{i}]", f"uplink port profile {key}")
        updated = current.model_copy(update={name: getattr(merged, name) for name in spec_model.patchable})
        updated = type(current).model_validate(updated.model_dump(exclude=computed_fields(updated)))
        if kind is Kind.host:
            if updated.role is not current.role:
                self._check_role_change(current, updated.role)
            if updated.tunnel_mode is TunnelMode.flow:
                transport = transport_of(self.inventory, updated)
                if transport is not None and transport.logical_network.encapsulation is not Encapsulation.nvgre:
                    raise Invalid(f"host {key} cannot use flow mode", "tunnel_mode",
                                  f"its provider network {transport.logical_network.name} uses "
                                  f"{transport.logical_network.encapsulation.value}; flow mode is for NVGRE")
        elif kind is Kind.gateway_service:
            updated = self._patch_gateway_service(tx, current, updated, why)
        elif kind is Kind.gateway:
            updated = self._patch_gateway(tx, current, updated)
        tx.put(kind, key, updated)
        switch = self.inventory.switches.get(key) if kind is Kind.host else None
        if switch is not None and updated.management_address != current.management_address:
            # The management lease follows the address.
            self._release_held(tx, "host", key, LeaseKind.Management)
            if switch.management_adapter is not None and updated.management_address is not None:
                self._lease_management(tx, updated, switch.management_adapter.vm_network)
        if kind in (Kind.network_site, Kind.uplink_port_profile):
            self._check_vms_still_placed(updated, kind)
        return updated, _Scope(networks=ALL)

    def _check_vms_still_placed(self, updated: Any, kind: Kind) -> None:
        """After a site or profile change, every VM's host must still reach its VM network,
        and every gateway host its service's back-end and front-end."""
        previous = self.inventory.objects[kind][updated.key]
        self.inventory.objects[kind][updated.key] = updated
        try:
            for vm in self.inventory.all(Kind.vm):
                host = self.inventory.get(Kind.host, vm.host)
                network = self.inventory.get(Kind.vm_network, vm.vm_network)
                subnet = self.inventory.get(Kind.vm_subnet, f"{vm.vm_network}/{vm.vm_subnet}")
                reason = why_not(self.inventory, host, network, subnet)
                if reason is not None:
                    raise Conflict(f"{kind.label} {updated.key}: VM {vm.name} would lose VM network {network.name}",
                                   None, reason)
            for service in self.inventory.all(Kind.gateway_service):
                reason = why_not_gateway_service(self.inventory, service)
                if reason is not None:
                    raise Conflict(f"{kind.label} {updated.key}: gateway service {service.name} would lose a host",
                                   None, reason)
        finally:
            self.inventory.objects[kind][updated.key] = previous
