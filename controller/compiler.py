"""Fabric -> one `agent.state.HostState` per host.

For a host with a virtual switch:
- team: the switch's NICs, team mode and load balancing of its uplink port profile;
- switch: the logical switch's name; management: the host's address when the virtual
  switch has a management adapter;
- provider: the transport site (VLAN, subnet), its pool's gateway, the logical
  network's MTU and encapsulation, and this host's PAs (one per routing domain here);
- routing_domains: every network-virtualised VM network with a VM on this host, with
  all its VM subnets (each with its pool's gateway and DNS servers, for DHCP);
  vlan_networks: every VLAN VM network with a VM here;
- ports: every VM on this host;
- records: for each routing domain here, every VM of that VM network anywhere (Static:
  CA, MAC, the PA of the VM's host) and one Gateway record per VM subnet; with an HNV
  gateway, one GatewayWildcard record (the gateway's back-end CA and MAC on the ACTIVE
  gateway host's PA);
- a staged migration (`Vm.migration`, advanced by `controller.fabric.migrations`): the
  source keeps the VM network's routing domain and PA until the migration ends; while
  the stage is `destination` it also keeps the VM's port, and every host of the network
  but the destination (the source, peers, gateway hosts) gets the *previous* view of the
  records, the VM still on the source's PA; from the `peers` stage on, the source has no
  port and its record for the VM names the destination's PA (it forwards what peers
  still send it). So a VM network has at most two records fragments: the current one
  and, during that stage, the previous one. While a migration is in progress, the
  routing domain's `transit` names the PAs of its source and destination: every host
  of the network receives from both, whichever NIC the VM sends by;
- routing domains carry their customer routes, plus 0.0.0.0/0 (::/0) to the gateway's
  back-end CA when the VM network's gateway is nat or forwarding (a customer route of
  the user's for that prefix wins);
- gateway hosts (hosts of a gateway service) hold the routing domain of every VM
  network their service serves (a PA each, no VM) and `gateway`: the front-end and one
  leg per nat (with a NAT connection) or forwarding VM network (`_gateway_role`).

Cost, which is what lets a migration cost O(hosts of one VM network), not O(fabric):
- a VM network's records are built once, validated once per provider subnet and
  serialised once (`invalidate` drops them when one of its VMs, subnets or PAs
  changes); every host of that network shares the same tuple and the same bytes;
- a host's "head" (everything but records: team, switch, provider, domains, ports) is
  validated and serialised once and reused while its inputs are the very same objects
  (the inventory replaces, never mutates, an object that changes);
- a host's digest is its head's bytes plus each records fragment's digest.

Pure: reads the writer's working inventory (only under the fabric's write lock), returns
models, keeps only caches; never writes. Its caches may hold what a transaction's trial
compile built from uncommitted state, so the engine invalidates the transaction's VM
networks again when it undoes it, and caches are keyed by the very objects they were
built from: nothing compiled from a rolled-back change is served or published.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

from pydantic import TypeAdapter

from agent.state import (
    Ipv6Assignment,
    BackEndPort,
    CustomerRoute,
    DnatRule,
    FrontEnd,
    GatewayLeg,
    GatewayRole,
    HostState,
    LegConnectivity,
    LookupRecord,
    Management,
    ProviderAddress,
    ProviderNetwork,
    RecordType,
    RoutingDomain,
    Switch,
    Team,
    VlanNetwork,
    VmPort,
)
from agent.state import VmSubnet as StateSubnet
from controller.gateways import (
    customer_routes_of,
    gateway_of_network,
    gateways_of_service,
    nat_connection_of,
    nat_rules_of,
    routes_out,
    service_of_host,
)
from controller.inventory import Inventory
from controller.models import Connectivity, Isolation, Kind, MigrationStage, VmSubnet, first_host_address
from controller.placement import transport_of

UNSPECIFIED_PA = {4: ipaddress.IPv4Address("0.0.0.0"), 6: ipaddress.IPv6Address("::")}

# A records key is a VM network's name (the current records) or the name plus this suffix
# (the previous view, for hosts a staged migration has not reached yet). Names never hold
# control characters, so the two never collide.
PREVIOUS_VIEW = "\x00previous"


def subnet_gateway(inventory: Inventory, subnet: VmSubnet):
    """The gateway of the VM subnet's first pool that names one, else the prefix's first address."""
    for pool_key in inventory.pools_by_owner.get(subnet.key, ()):
        pool = inventory.get(Kind.ip_pool, pool_key)
        if pool is not None and pool.gateway is not None:
            return pool.gateway
    return first_host_address(subnet.prefix)


def subnet_ipv6_assignment(inventory: Inventory, subnet: VmSubnet):
    """SLAAC when the VM subnet's pools say so (they agree: controller.fabric.networks), else None."""
    for pool_key in inventory.pools_by_owner.get(subnet.key, ()):
        pool = inventory.get(Kind.ip_pool, pool_key)
        if pool is not None and pool.ipv6_assignment is Ipv6Assignment.SLAAC:
            return Ipv6Assignment.SLAAC
    return None


def subnet_dns_servers(inventory: Inventory, subnet: VmSubnet) -> tuple:
    """The DNS servers of the VM subnet's first pool that names any (what DHCP hands its VMs)."""
    for pool_key in inventory.pools_by_owner.get(subnet.key, ()):
        pool = inventory.get(Kind.ip_pool, pool_key)
        if pool is not None and pool.dns_servers:
            return tuple(pool.dns_servers)
    return ()


class Compiler:
    def __init__(self, inventory: Inventory):
        self.inventory = inventory
        self._records: dict[str, tuple[LookupRecord, ...]] = {}
        self._domains: dict[str, RoutingDomain] = {}
        # A VM's LookupRecord and VmPort by their field values: a VM whose CA, MAC, PA and
        # VSID did not change reuses them.
        #
        # They are built with model_construct: their fields are values the controller's own
        # models already validated with the same types (Vm.mac through agent.state's
        # normalize_mac, CA and PA as ipaddress objects, VSIDs allocated in range, the tap
        # device an IfName), and pydantic's field validators would only parse every
        # address and MAC from text once more - most of a full compile's cost at 50,000
        # VMs. Everything that relates them (VSID known, CA in its prefix, PA in the
        # provider subnet, no (VSID, CA) or (VSID, MAC) twice, one network per port) is
        # still checked by HostState's own validators below; the unit tests parse every
        # published document with agent.state's full validation.
        self._memo: dict[tuple, Any] = {}
        # VM network -> (records tuple, routing domain, provider subnets it was checked against)
        self._checked: dict[str, tuple[tuple[LookupRecord, ...], RoutingDomain, set]] = {}
        self._records_json: dict[str, tuple[tuple[LookupRecord, ...], bytes, bytes]] = {}  # + digest
        self._stale_domains: set[str] = set()
        # host -> (the inputs it was built from, its validated HostState without records,
        # that head's JSON members or None): a host whose inputs are the very same objects
        # reuses it, so a migration re-validates only the source and destination hosts'
        # heads and swaps the records everywhere else.
        self._heads: dict[str, list] = {}
        # host -> its last GatewayRole: an equal one is replaced by it, so the head cache
        # (which compares its inputs by identity) keeps a gateway host whose role did not change.
        self._roles: dict[str, GatewayRole] = {}
        # host -> the records key of each of its routing domains, as last compiled (serialise reads it)
        self._record_keys: dict[str, tuple[str, ...]] = {}

    def _memoized(self, model: type, **fields: Any) -> Any:
        key = (model, *fields.values())
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) > 4 * len(self.inventory.objects[Kind.vm]) + 10_000:
                self._memo.clear()  # drop entries of deleted and changed VMs now and then
            found = self._memo[key] = model.model_construct(**fields)
        return found

    def reset(self) -> None:
        """Drop every cache (records, domains, heads, fragments, memo): the next compile
        of each host is a compile from scratch, as at start-up."""
        self.__init__(self.inventory)

    def invalidate(self, networks: set[str] | None = None) -> None:
        """Forget cached records of these VM networks (None: of all).

        Routing domains are only marked stale: rebuilt on next use, and the old object is
        kept when the new one is equal, so hosts whose VM networks did not really change
        keep their cached, validated heads (see `compile`).
        """
        names = list(self._records) + list(self._domains) if networks is None else networks
        for name in names:
            self._records.pop(name, None)
            self._records.pop(name + PREVIOUS_VIEW, None)
            if name in self._domains:
                self._stale_domains.add(name)

    # --- per VM network (cached) ----------------------------------------------------------

    def routing_domain(self, network_name: str) -> RoutingDomain:
        cached = self._domains.get(network_name)
        if cached is None or network_name in self._stale_domains:
            self._stale_domains.discard(network_name)
            previous = cached
            inv = self.inventory
            network = inv.get(Kind.vm_network, network_name)
            subnets = [inv.get(Kind.vm_subnet, key) for key in inv.subnets_by_network.get(network_name, ())]
            cached = RoutingDomain(
                id=network.routing_domain_id,
                name=network.name,
                subnets=tuple(
                    StateSubnet(name=s.name, vsid=s.vsid, prefix=s.prefix, gateway=subnet_gateway(inv, s),
                                dns_servers=subnet_dns_servers(inv, s),
                                ipv6_assignment=subnet_ipv6_assignment(inv, s))
                    for s in sorted(subnets, key=lambda s: s.vsid)
                ),
                routes=self._customer_routes(network),
                transit=self._transit(network_name),
            )
            if previous is not None and previous == cached:
                cached = previous
            self._domains[network_name] = cached
        return cached

    def _customer_routes(self, network: Any) -> tuple[CustomerRoute, ...]:
        """The VM network's customer routes, and its default route to its gateway."""
        routes = [CustomerRoute(prefix=r.prefix, next_hop=r.next_hop)
                  for r in customer_routes_of(self.inventory, network.name)]
        gateway = gateway_of_network(self.inventory, network.name)
        if routes_out(gateway):
            default = ipaddress.ip_network("0.0.0.0/0" if network.ca_family.version == 4 else "::/0")
            if all(route.prefix != default for route in routes):
                routes.insert(0, CustomerRoute(prefix=default, next_hop=gateway.back_end_ca))
        return tuple(routes)

    def _transit(self, network_name: str) -> tuple:
        """The PAs of both ends of every migration in progress in the VM network, sorted."""
        leases = self.inventory.pa_leases
        found = {lease.address for vm in self.inventory.migrations_of_network(network_name)
                 for host in (vm.migration.source, vm.host)
                 if (lease := leases.get((host, network_name))) is not None}
        return tuple(sorted(found, key=lambda address: (address.version, int(address))))

    def records_key(self, network_name: str, host_name: str) -> str:
        """Which records of the VM network a host gets: the previous view while a migration
        of it is in its `destination` stage and the host is not that VM's destination (the
        source still delivers to the VM's NIC there); the current records otherwise (and
        always when none is staged)."""
        staged = [vm for vm in self.inventory.migrations_of_network(network_name)
                  if vm.migration.stage is MigrationStage.destination]
        if not staged or any(host_name == vm.host for vm in staged):
            return network_name
        return network_name + PREVIOUS_VIEW

    def records(self, key: str) -> tuple[LookupRecord, ...]:
        """The records of a VM network (`key` its name), or their previous view (see `records_key`)."""
        cached = self._records.get(key)
        if cached is None:
            network_name = key.removesuffix(PREVIOUS_VIEW)
            previous = key != network_name
            inv = self.inventory
            vsid_of = {
                s.name: s.vsid
                for s in (inv.get(Kind.vm_subnet, key) for key in inv.subnets_by_network.get(network_name, ()))
            }
            records = []
            for vm in inv.vms_of_network(network_name):
                host = vm.host
                if previous and vm.migration is not None and vm.migration.stage is MigrationStage.destination:
                    host = vm.migration.source
                pa = inv.pa_leases.get((host, network_name))
                if vm.ca is None or pa is None:
                    continue
                records.append(
                    self._memoized(
                        LookupRecord, vsid=vsid_of[vm.vm_subnet], ca=vm.ca, mac=vm.mac, pa=pa.address,
                        type=RecordType.Static, vm_name=vm.name,
                    )
                )
            domain = self.routing_domain(network_name)
            # The gateway's PA is the unspecified address of the PA family: the local
            # host answers for it (Get-NetVirtualizationLookupRecord shows 0.0.0.0).
            no_pa = UNSPECIFIED_PA[inv.get(Kind.vm_network, network_name).pa_family.version]
            for subnet in domain.subnets:
                gateway_mac = inv.get(Kind.vm_subnet, f"{network_name}/{subnet.name}").gateway_mac
                records.append(
                    LookupRecord(
                        vsid=subnet.vsid, ca=subnet.gateway, mac=gateway_mac,
                        pa=no_pa, type=RecordType.Gateway,
                        vm_name="Gateway",
                    )
                )
            wildcard = self._gateway_wildcard(network_name, vsid_of)
            if wildcard is not None:
                records.append(wildcard)
            cached = tuple(records)
            self._records[key] = cached
        return cached

    def _gateway_wildcard(self, network_name: str, vsid_of: dict[str, int]) -> LookupRecord | None:
        """The GatewayWildcard record of a VM network with a gateway: its back-end CA and
        MAC on the PA the ACTIVE gateway host holds for this VM network."""
        inv = self.inventory
        gateway = gateway_of_network(inv, network_name)
        service = inv.get(Kind.gateway_service, gateway.gateway_service) if gateway is not None else None
        pa = inv.pa_leases.get((service.active, network_name)) if service is not None else None
        if pa is None:
            return None
        return LookupRecord(vsid=vsid_of[gateway.vm_subnet], ca=gateway.back_end_ca, mac=gateway.back_end_mac,
                            pa=pa.address, type=RecordType.GatewayWildcard, vm_name=gateway.name)

    def _gateway_role(self, host_name: str, service: Any, gateways: list) -> GatewayRole | None:
        """What a host of a gateway service holds: the front-end and one leg per VM
        network that leaves through it (nat with a NAT connection, or forwarding).
        `service` is the host's (None: not a gateway host), `gateways` the service's."""
        inv = self.inventory
        if service is None:
            return None
        site = inv.get(Kind.network_site, service.front_end_site)
        pool = inv.get(Kind.ip_pool, service.pool_key)
        vlan = next(pair.vlan for pair in site.subnet_vlans if pair.subnet == pool.subnet)
        front_end = FrontEnd(logical_network=site.logical_network, vlan=vlan, subnet=pool.subnet,
                             gateway=pool.gateway)
        legs = []
        for gateway in gateways:
            if gateway.connectivity is Connectivity.none:
                continue
            subnet = inv.get(Kind.vm_subnet, f"{gateway.vm_network}/{gateway.vm_subnet}")
            back_end = BackEndPort(vsid=subnet.vsid, mac=gateway.back_end_mac,
                                   address=ipaddress.ip_interface(f"{gateway.back_end_ca}/{subnet.prefix.prefixlen}"))
            dnat: list[DnatRule] = []
            forwarded: tuple = ()
            if gateway.connectivity is Connectivity.nat:
                connection = nat_connection_of(inv, gateway.name)
                if connection is None:
                    continue  # no external address yet: nothing leaves
                address = connection.external_address
                for rule in nat_rules_of(inv, connection.name):
                    target = inv.get(Kind.vm, rule.vm).ca if rule.vm is not None else rule.ca
                    dnat.append(DnatRule(protocol=rule.protocol, external_port=rule.external_port, address=target,
                                         port=rule.internal_port, name=rule.name))
            else:
                address = gateway.forwarding_address
                forwarded = tuple(inv.get(Kind.vm_subnet, key).prefix
                                  for key in sorted(inv.subnets_by_network.get(gateway.vm_network, ())))
            legs.append(GatewayLeg(
                routing_domain=gateway.vm_network, connectivity=LegConnectivity(gateway.connectivity.value),
                back_end=back_end, address=ipaddress.ip_interface(f"{address}/{pool.subnet.prefixlen}"),
                dnat=tuple(dnat), forwarded=forwarded,
            ))
        role = GatewayRole(service=service.name, active=service.active == host_name, front_end=front_end,
                           legs=tuple(legs))
        previous = self._roles.get(host_name)
        if previous is not None and previous == role:
            return previous
        self._roles[host_name] = role
        return role

    def _port(self, vm: Any, subnet: VmSubnet, isolation: Isolation) -> VmPort:
        virtualised = isolation is Isolation.WindowsNetworkVirtualization
        key = (VmPort, vm.name, vm.mac, vm.ca, subnet.prefix.prefixlen, subnet.vsid if virtualised else None,
               None if virtualised else subnet.vlan, vm.nic_kind, vm.netns, vm.tap_device)
        port = self._memo.get(key)
        if port is None:
            ca = None
            if vm.ca is not None:  # (int, prefix length): no parsing of text
                interface = ipaddress.IPv4Interface if vm.ca.version == 4 else ipaddress.IPv6Interface
                ca = interface((int(vm.ca), subnet.prefix.prefixlen))
            if (key[5] is None) == (key[6] is None):
                raise ValueError(f"ports: VM {vm.name} needs exactly one of a VSID or a VLAN")
            port = self._memo[key] = VmPort.model_construct(
                name=vm.name, mac=vm.mac, ca=ca, kind=vm.nic_kind, netns=vm.netns, device=vm.tap_device,
                vsid=key[5], vlan=key[6],
            )
        return port

    # --- per host -------------------------------------------------------------------------

    def compile(self, host_name: str, generation: int = 0) -> HostState:
        inv = self.inventory
        host = inv.get(Kind.host, host_name)
        switch = inv.switches.get(host_name)
        if switch is None:
            self._record_keys.pop(host_name, None)
            return HostState(host=host_name, generation=generation)
        profile = inv.get(Kind.uplink_port_profile, switch.uplink_port_profile)
        vm_objects = inv.objects[Kind.vm]
        items = []
        # The source of a migration in its `destination` stage keeps the VM's port: the
        # VM has a NIC there until the peers send to the destination.
        staying = [vm.name for vm in inv.migrations_from(host_name) if vm.migration.stage is MigrationStage.destination]
        for name in sorted({*inv.vms_by_host.get(host_name, ()), *staying}):
            vm = vm_objects[name]
            items.append((vm, inv.get(Kind.vm_network, vm.vm_network),
                          inv.get(Kind.vm_subnet, f"{vm.vm_network}/{vm.vm_subnet}")))
        # A gateway host also holds the routing domain of every VM network its service serves.
        service = service_of_host(inv, host_name)
        gateways = gateways_of_service(inv, service.name) if service is not None else []
        # ... and the source of a migration in progress the VM network the VM left.
        nv_networks = sorted({network.name for _, network, _ in items
                              if network.isolation is Isolation.WindowsNetworkVirtualization}
                             | {gateway.vm_network for gateway in gateways}
                             | inv.networks_migrating_from(host_name))
        role = self._gateway_role(host_name, service, gateways)
        domains = tuple(self.routing_domain(name) for name in nv_networks)
        pa_leases = tuple(inv.pa_leases.get((host_name, name)) for name in nv_networks)
        transport = transport_of(inv, host)
        pools = ()
        if transport is not None:
            pools = tuple(inv.get(Kind.ip_pool, key) for key in inv.pools_by_owner.get(transport.site.name, ()))
        inputs = (host, switch, profile, transport and transport.site, transport and transport.logical_network,
                  *pools, *(obj for item in items for obj in item), *domains, *pa_leases, role)
        cached = self._heads.get(host_name)
        if cached is not None and len(cached[0]) == len(inputs) and all(a is b for a, b in zip(cached[0], inputs)):
            head = cached[1]
        else:
            head = self._head(host_name, host, switch, profile, items, domains, pa_leases, transport, pools, role)
            self._heads[host_name] = [inputs, head, None]
        # The records of a VM network are the same tuple on every host of that network,
        # and every check agent.state makes on them (VSID, CA in prefix, PA in the
        # provider subnet, (VSID, CA) and (VSID, MAC) unique) depends only on that
        # network and the provider subnet - VSIDs of different networks never meet. So
        # each network's records are validated once per provider subnet
        # (`_validated_records`, a real HostState holding just that network) and then
        # attached without re-validation.
        state = head
        keys = tuple(self.records_key(domain.name, host_name) for domain in domains)
        self._record_keys[host_name] = keys
        if domains:
            records: tuple[LookupRecord, ...] = ()
            for domain, key in zip(domains, keys):
                records += self._validated_records(domain, key, head.provider)
            state = head.model_copy(update={"records": records})
        if generation:
            state = state.model_copy(update={"generation": generation})
        return state

    def _head(self, host_name, host, switch, profile, items, domains, pa_leases, transport, pools,
              role) -> HostState:
        """The host's validated state without records."""
        team = Team(members=switch.nics, mode=profile.team_mode, load_balancing=profile.load_balancing)
        management = None
        if switch.management_adapter is not None and host.management_address is not None:
            management = Management(address=host.management_address, gateway=host.management_gateway)
        vlan_networks: dict[int, VlanNetwork] = {}
        ports: list[VmPort] = []
        for vm, network, subnet in items:
            if network.isolation is not Isolation.WindowsNetworkVirtualization:
                vlan_networks.setdefault(subnet.vlan, VlanNetwork(name=network.name, vlan=subnet.vlan))
            ports.append(self._port(vm, subnet, network.isolation))
        provider = None
        if transport is not None and transport.subnet_vlan.vlan != 0:
            gateway = next(
                (p.gateway for p in pools if p.gateway is not None and p.subnet == transport.subnet_vlan.subnet),
                None,
            )
            addresses = tuple(
                self._memoized(ProviderAddress, routing_domain=domain.name, address=lease.address)
                for domain, lease in zip(domains, pa_leases)
                if lease is not None
            )
            provider = ProviderNetwork(
                logical_network=transport.logical_network.name,
                vlan=transport.subnet_vlan.vlan,
                subnet=transport.subnet_vlan.subnet,
                gateway=gateway,
                mtu=transport.logical_network.mtu,
                encapsulation=transport.logical_network.encapsulation,
                tunnel_mode=host.tunnel_mode,
                addresses=addresses,
            )
        return HostState(
            host=host_name,
            generation=0,
            team=team,
            switch=Switch(logical_switch=switch.logical_switch),
            management=management,
            provider=provider,
            vlan_networks=tuple(sorted(vlan_networks.values(), key=lambda n: n.vlan)),
            routing_domains=domains,
            ports=tuple(ports),
            gateway=role,
        )

    def _validated_records(self, domain: RoutingDomain, key: str,
                           provider: ProviderNetwork) -> tuple[LookupRecord, ...]:
        records = self.records(key)
        checked = self._checked.get(key)
        if checked is not None and checked[0] is records and checked[1] is domain and provider.subnet in checked[2]:
            return records
        HostState(  # raises ValidationError exactly as the whole host's state would
            host="records-of-" + domain.name[:200],
            generation=0,
            switch=Switch(logical_switch="check"),
            provider=provider.model_copy(
                update={"addresses": tuple(pa for pa in provider.addresses if pa.routing_domain == domain.name)}
            ),
            routing_domains=(domain,),
            records=records,
        )
        subnets = checked[2] if checked is not None and checked[0] is records and checked[1] is domain else set()
        self._checked[key] = (records, domain, subnets | {provider.subnet})
        return records

    def serialise(self, state: HostState) -> tuple[str, "Serialised"]:
        """(digest, JSON pieces) of a state this compiler made.

        The digest has the meaning of `HostState.content_digest()` (a hash of everything
        but the generation and the fabric id: equal digests, equal desired state), computed over
        pydantic's compiled JSON. Each VM network's records are serialised once and the
        same bytes object is shared by every host of that network (records are most of
        a state's bytes), so a host costs its own head (ports, PAs, domains) plus
        pointers: neither joined nor copied, and hashed as its own members plus each
        fragment's cached digest. The controller only
        compares its own digests with each other.
        """
        members = None
        cached = self._heads.get(state.host)
        if cached is not None and _same_head(state, cached[1]):
            members = cached[2]
        if members is None:
            members = state.model_dump_json(exclude={"fabric", "generation", "records"}).encode()[1:-1]
            if cached is not None and _same_head(state, cached[1]):
                cached[2] = members
        fragments, fragment_digests = [], []
        keys = self._record_keys.get(state.host) or tuple(domain.name for domain in state.routing_domains)
        for key in keys:
            records = self._records[key]
            cached = self._records_json.get(key)
            if cached is None or cached[0] is not records:
                fragment = _RECORDS_JSON.dump_json(records)[1:-1]
                cached = (records, fragment, hashlib.sha256(fragment).digest())
                self._records_json[key] = cached
            if cached[1]:
                fragments.append(cached[1])
                fragment_digests.append(cached[2])
        serialised = Serialised(members, tuple(fragments))
        # The host's own members, then each shared fragment by its own (cached) digest:
        # equal content gives equal digests, and a migration hashes the fragment of one
        # VM network once instead of every host's copy of it.
        digest = hashlib.sha256(serialised.members)
        for fragment_digest in fragment_digests:
            digest.update(fragment_digest)
        return digest.hexdigest(), serialised


class Serialised:
    """A host state's JSON as pieces: the host's own members and shared record fragments."""

    __slots__ = ("members", "fragments")

    def __init__(self, members: bytes, fragments: tuple[bytes, ...]):
        self.members = members  # the members but records, without the braces
        self.fragments = fragments

    def pieces(self, generation: int | None, fabric: str | None = None) -> list[bytes]:
        """The document in pieces, opening with the fabric id and the generation unless None
        (neither is part of the digest: both are stamped on at serving time)."""
        opening = b"{"
        if fabric is not None:
            opening += b'"fabric":"%s",' % fabric.encode("ascii")
        if generation is not None:
            opening += b'"generation":%d,' % generation
        pieces = [opening + self.members + b',"records":[']
        for i, fragment in enumerate(self.fragments):
            pieces.append(b"," + fragment if i else fragment)
        pieces.append(b"]}")
        return pieces


_RECORDS_JSON = TypeAdapter(tuple[LookupRecord, ...])


def _same_head(state: HostState, head: HostState) -> bool:
    """Is `state` that head plus records (model_copy keeps every other member as is)?"""
    return (
        state.host == head.host
        and state.team is head.team
        and state.switch is head.switch
        and state.management is head.management
        and state.provider is head.provider
        and state.vlan_networks is head.vlan_networks
        and state.routing_domains is head.routing_domains
        and state.ports is head.ports
        and state.gateway is head.gateway
    )
