"""The HNV gateway's model, rules and compiled host states (controller side).

The unit tests' small fabric (compute hosts A, B; Red and Blue share 192.168.0.0/24)
with two gateway hosts (GW1 active, GW2 standby) of one gateway service whose
front-end is 203.0.113.0/24 on VLAN 30, with a pool of only two external addresses. Checked as a user
would: what is refused (status class, field, reason) and that nothing changed; which
host a VM lands on; what each host is given to realise (parsed with the agent's own
validation).
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from pydantic import ValidationError

from agent.state import HostState, RecordType, parse_host_state
from controller.fabric import Fabric
from controller.models import (
    Conflict,
    CustomerRouteSpec,
    GatewayServiceSpec,
    GatewaySpec,
    HostSpec,
    Invalid,
    IpPoolSpec,
    Kind,
    LogicalNetworkSpec,
    LogicalSwitchSpec,
    NatConnectionSpec,
    NatRuleSpec,
    NetworkSiteSpec,
    UplinkPortProfileSpec,
    VirtualSwitchSpec,
    VmNetworkSpec,
    VmSpec,
    VmSubnetSpec,
)
from tests.unit.test_controller_fabric import populate_small_fabric, snapshot


def gateway_fabric(tmp_path) -> Fabric:
    """`small_fabric` (compute hosts A and B, Red and Blue) with more PAs, an External
    network and two gateway hosts of gateway service Edge."""
    fabric = populate_small_fabric(Fabric.open(tmp_path, synchronous="OFF"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="More", network_site="Virtualization",
                                           range_start="10.80.2.30", range_end="10.80.2.99"))
    fabric.create(Kind.logical_network, LogicalNetworkSpec(name="External"))
    fabric.create(Kind.network_site, NetworkSiteSpec(
        name="External", logical_network="External", host_groups=["Virtualization"],
        subnet_vlans=[{"subnet": "203.0.113.0/24", "vlan": 30}]))
    # Only two external addresses.
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", network_site="External", range_start="203.0.113.10",
                                           range_end="203.0.113.11", gateway="203.0.113.1"))
    fabric.create(Kind.uplink_port_profile, UplinkPortProfileSpec(name="Gateway",
                                                                  network_sites=["Virtualization", "External"]))
    fabric.create(Kind.logical_switch, LogicalSwitchSpec(name="Gateway", uplink_port_profiles=["Gateway"]))
    for name in ("GW1", "GW2"):
        fabric.create(Kind.host, HostSpec(name=name, host_group="Virtualization", nics=["eth0"], role="gateway"))
        fabric.set_virtual_switch(name, VirtualSwitchSpec(logical_switch="Gateway"))
    fabric.create(Kind.gateway_service, GatewayServiceSpec(
        name="Edge", front_end_logical_network="External", front_end_site="External", external_ip_pool="Default",
        back_end_logical_network="Virtualization", hosts=["GW1", "GW2"]))
    return fabric


@pytest.fixture
def fabric(tmp_path):
    return gateway_fabric(tmp_path)


def refused(fabric, call, kind, field, reason_part):
    """The call is refused with this error class, field and reason, and nothing changed."""
    before = snapshot(fabric)
    with pytest.raises(kind) as caught:
        call()
    assert caught.value.field == field, caught.value.body()
    assert reason_part in caught.value.reason, caught.value.body()
    assert snapshot(fabric) == before
    return caught.value


def state_of(fabric, host) -> HostState:
    """The host's published document, through the agent's full validation."""
    return parse_host_state(fabric.host_entry(host).state_json)


def nat(fabric, network="Red"):
    """A nat gateway for the VM network and its NAT connection (the connection returned)."""
    fabric.create(Kind.gateway, GatewaySpec(name=f"{network}GW", vm_network=network, gateway_service="Edge",
                                            connectivity="nat"))
    return fabric.create(Kind.nat_connection, NatConnectionSpec(name=f"{network}NAT", gateway=f"{network}GW"))


# --- gateway hosts and placement ------------------------------------------------------------------


def test_placement_never_puts_a_vm_on_a_gateway_host(fabric):
    hosts = {fabric.create(Kind.vm, VmSpec(name=f"V{i}", vm_network="Red")).host for i in range(6)}
    assert hosts == {"A", "B"}
    refused(fabric, lambda: fabric.create(Kind.vm, VmSpec(name="X", vm_network="Red", host="GW1")),
            Conflict, "host", "host GW1 is a gateway host; placement never puts a VM there")
    refused(fabric, lambda: fabric.migrate("V0", "GW2"), Conflict, "host", "GW2 is a gateway host")


def test_a_host_holding_vms_does_not_become_a_gateway_host(fabric):
    fabric.create(Kind.vm, VmSpec(name="V1", vm_network="Red", host="A"))
    refused(fabric, lambda: fabric.patch(Kind.host, "A", {"role": "gateway"}), Conflict, "role",
            "it holds VMs V1; migrate them first")
    refused(fabric, lambda: fabric.patch(Kind.host, "GW1", {"role": "compute"}), Conflict, "role",
            "it is a host of gateway service Edge")
    assert fabric.patch(Kind.host, "B", {"role": "gateway"}).role == "gateway"  # B holds no VM


def test_a_gateway_service_takes_only_gateway_hosts(fabric):
    spec = dict(name="Edge2", front_end_logical_network="External", front_end_site="External",
                external_ip_pool="Default", back_end_logical_network="Virtualization")
    refused(fabric, lambda: fabric.create(Kind.gateway_service, GatewayServiceSpec(**spec, hosts=["A"])),
            Invalid, "hosts[0]", "host A has role compute; set its role to gateway first")
    refused(fabric, lambda: fabric.create(Kind.gateway_service, GatewayServiceSpec(**spec, hosts=["GW2"])),
            Conflict, "hosts[0]", "host GW2 serves gateway service Edge")
    bad_front = {**spec, "front_end_logical_network": "Virtualization", "front_end_site": "Virtualization"}
    refused(fabric, lambda: fabric.create(Kind.gateway_service, GatewayServiceSpec(**bad_front, hosts=["GW1"])),
            Invalid, "front_end_logical_network", "the front-end connection is an external (VLAN) logical network")
    with pytest.raises(ValidationError, match="active: GW9 is not one of the service's hosts"):
        GatewayServiceSpec(**spec, hosts=["GW1"], active="GW9")
    assert fabric.get(Kind.gateway_service, "Edge").active == "GW1"  # the first host, by default


# --- NAT: external addresses, rules ---------------------------------------------------------------


def test_nat_connection_leases_one_external_address_and_an_exhausted_pool_is_refused(fabric):
    red, blue = nat(fabric, "Red"), nat(fabric, "Blue")
    assert (str(red.external_address), str(blue.external_address)) == ("203.0.113.10", "203.0.113.11")
    leases = {str(lease.address): lease.description for lease in fabric.leases(kind="NAT")}
    assert leases == {"203.0.113.10": "NAT address of Red", "203.0.113.11": "NAT address of Blue"}
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Green", logical_network="Virtualization"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Green", prefix="10.9.0.0/24"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Green"))
    fabric.create(Kind.gateway, GatewaySpec(name="GreenGW", vm_network="Green", gateway_service="Edge",
                                            connectivity="nat"))
    refused(fabric, lambda: fabric.create(Kind.nat_connection, NatConnectionSpec(name="GreenNAT", gateway="GreenGW")),
            Conflict, "external_ip_pool", "IP pool External/Default is exhausted")
    # one external address per VM network, and only for a nat gateway
    refused(fabric, lambda: fabric.create(Kind.nat_connection, NatConnectionSpec(name="RedNAT2", gateway="RedGW")),
            Conflict, "gateway", "a VM network has one external address")


def test_nat_rule_on_a_taken_port_or_a_vm_of_another_network_is_refused(fabric):
    nat(fabric, "Red")
    fabric.create(Kind.vm, VmSpec(name="R1", vm_network="Red", host="A"))
    fabric.create(Kind.vm, VmSpec(name="B1", vm_network="Blue", host="A"))
    fabric.create(Kind.nat_rule, NatRuleSpec(name="web", nat_connection="RedNAT", external_port=80, vm="R1"))
    refused(fabric, lambda: fabric.create(Kind.nat_rule, NatRuleSpec(name="web2", nat_connection="RedNAT",
                                                                       external_port=80, vm="R1",
                                                                       internal_port=8080)),
            Conflict, "external_port", "NAT rule web already forwards tcp 203.0.113.10:80")
    udp = fabric.create(Kind.nat_rule, NatRuleSpec(name="dns", nat_connection="RedNAT", protocol="udp",
                                                   external_port=80, ca="192.168.0.50"))
    assert udp.internal_port == 80
    refused(fabric, lambda: fabric.create(Kind.nat_rule, NatRuleSpec(name="b", nat_connection="RedNAT",
                                                                       external_port=81, vm="B1")),
            Invalid, "vm", "VM B1 is in VM network Blue; NAT connection RedNAT serves Red")
    refused(fabric, lambda: fabric.create(Kind.nat_rule, NatRuleSpec(name="c", nat_connection="RedNAT",
                                                                       external_port=82, ca="10.1.1.1")),
            Invalid, "ca", "10.1.1.1 is in none of 192.168.0.0/24")
    refused(fabric, lambda: fabric.delete(Kind.vm, "R1"), Conflict, "name", "NAT rule web")


# --- customer routes --------------------------------------------------------------------------------


def test_customer_route_next_hop_must_lie_inside_the_vm_network(fabric):
    refused(fabric, lambda: fabric.create(Kind.customer_route, CustomerRouteSpec(
        name="lab", vm_network="Red", prefix="10.99.0.0/16", next_hop="10.0.0.1")),
        Invalid, "next_hop", "a next hop is a customer address inside one of the VM network's subnets (192.168.0.0/24)")
    refused(fabric, lambda: fabric.create(Kind.customer_route, CustomerRouteSpec(
        name="lab", vm_network="Red", prefix="10.99.0.0/16", next_hop="192.168.0.1")),
        Invalid, "next_hop", "192.168.0.1 is the gateway of VM subnet Red/Default")
    route = fabric.create(Kind.customer_route, CustomerRouteSpec(
        name="lab", vm_network="Red", prefix="10.99.0.0/16", next_hop="192.168.0.20"))
    assert route.key == "Red/lab"
    refused(fabric, lambda: fabric.create(Kind.customer_route, CustomerRouteSpec(
        name="lab2", vm_network="Red", prefix="10.99.0.0/16", next_hop="192.168.0.21")),
        Conflict, "prefix", "customer route Red/lab routes it via 192.168.0.20")


# --- the compiled host states -------------------------------------------------------------------------


def test_compiled_state_of_a_gateway_host_and_of_an_ordinary_host(fabric):
    fabric.create(Kind.vm, VmSpec(name="R1", vm_network="Red", host="A"))
    fabric.create(Kind.vm, VmSpec(name="B1", vm_network="Blue", host="B"))
    nat(fabric, "Red")
    nat(fabric, "Blue")
    fabric.create(Kind.nat_rule, NatRuleSpec(name="web", nat_connection="RedNAT", external_port=80, vm="R1",
                                             internal_port=8080))
    fabric.create(Kind.customer_route, CustomerRouteSpec(name="lab", vm_network="Red", prefix="10.99.0.0/16",
                                                         next_hop="192.168.0.20"))
    red_gw, blue_gw = fabric.get(Kind.gateway, "RedGW"), fabric.get(Kind.gateway, "BlueGW")
    pa = {(lease.host, lease.vm_network): str(lease.address) for lease in fabric.leases(kind="PA")}

    gw1 = state_of(fabric, "GW1")
    assert [rd.name for rd in gw1.routing_domains] == ["Blue", "Red"] and gw1.ports == ()
    assert gw1.gateway.active is True and gw1.gateway.service == "Edge"
    assert (gw1.gateway.front_end.vlan, str(gw1.gateway.front_end.subnet), str(gw1.gateway.front_end.gateway)) == (
        30, "203.0.113.0/24", "203.0.113.1")
    legs = {leg.routing_domain: leg for leg in gw1.gateway.legs}
    # Overlapping tenants: same back-end CA, two different external addresses.
    assert str(legs["Red"].back_end.address) == str(legs["Blue"].back_end.address) == f"{red_gw.back_end_ca}/24"
    assert (str(legs["Red"].address), str(legs["Blue"].address)) == ("203.0.113.10/24", "203.0.113.11/24")
    [rule] = legs["Red"].dnat
    r1 = fabric.get(Kind.vm, "R1")
    assert (rule.protocol, rule.external_port, rule.address, rule.port) == ("tcp", 80, r1.ca, 8080)
    assert legs["Blue"].dnat == ()
    assert state_of(fabric, "GW2").gateway.active is False  # the standby builds the same legs

    a = state_of(fabric, "A")
    assert a.gateway is None
    [red] = [rd for rd in a.routing_domains if rd.name == "Red"]
    assert [(str(r.prefix), str(r.next_hop)) for r in red.routes] == [
        ("0.0.0.0/0", str(red_gw.back_end_ca)), ("10.99.0.0/16", "192.168.0.20")]
    wildcards = {r.vm_name: r for r in a.records if r.type is RecordType.GatewayWildcard}
    assert set(wildcards) == {"RedGW"}  # A holds only Red
    assert (wildcards["RedGW"].ca, wildcards["RedGW"].mac, str(wildcards["RedGW"].pa)) == (
        red_gw.back_end_ca, red_gw.back_end_mac, pa[("GW1", "Red")])
    b = state_of(fabric, "B")
    [blue_wildcard] = [r for r in b.records if r.type is RecordType.GatewayWildcard]
    assert str(blue_wildcard.pa) == pa[("GW1", "Blue")] and blue_wildcard.mac == blue_gw.back_end_mac


def test_moving_active_points_every_record_at_the_standby(fabric):
    fabric.create(Kind.vm, VmSpec(name="R1", vm_network="Red", host="A"))
    nat(fabric, "Red")
    pa = {(lease.host, lease.vm_network): str(lease.address) for lease in fabric.leases(kind="PA")}
    generation = fabric.host_entry("A").generation
    fabric.patch(Kind.gateway_service, "Edge", {"active": "GW2"})
    [wildcard] = [r for r in state_of(fabric, "A").records if r.type is RecordType.GatewayWildcard]
    assert str(wildcard.pa) == pa[("GW2", "Red")]
    assert fabric.host_entry("A").generation == generation + 1
    assert (state_of(fabric, "GW1").gateway.active, state_of(fabric, "GW2").gateway.active) == (False, True)
    # The active host leaves the service: the next one becomes active.
    fabric.patch(Kind.gateway_service, "Edge", {"hosts": ["GW1"]})
    assert fabric.get(Kind.gateway_service, "Edge").active == "GW1"
    assert ("GW2", "Red") not in {(lease.host, lease.vm_network) for lease in fabric.leases(kind="PA")}
    assert state_of(fabric, "GW2").gateway is None and state_of(fabric, "GW2").routing_domains == ()


def test_forwarding_routes_the_prefixes_and_takes_a_forwarding_address(fabric):
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Green", logical_network="Virtualization"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Green", prefix="10.9.0.0/24"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Green"))
    gateway = fabric.create(Kind.gateway, GatewaySpec(name="GreenGW", vm_network="Green", gateway_service="Edge",
                                                      connectivity="forwarding"))
    [lease] = fabric.leases(kind="Forwarding")
    assert (lease.address, lease.description) == (gateway.forwarding_address, "Forwarding address of Green")
    [leg] = state_of(fabric, "GW1").gateway.legs
    assert (leg.connectivity, [str(p) for p in leg.forwarded], leg.dnat) == ("forwarding", ["10.9.0.0/24"], ())
    # Red and Blue share 192.168.0.0/24: forwarded unchanged, they would collide upstream.
    fabric.create(Kind.gateway, GatewaySpec(name="RedGW", vm_network="Red", gateway_service="Edge",
                                            connectivity="forwarding"))
    refused(fabric, lambda: fabric.create(Kind.gateway, GatewaySpec(
        name="BlueGW", vm_network="Blue", gateway_service="Edge", connectivity="forwarding")),
        Conflict, "connectivity", "only nat lets customer addresses overlap")


def test_removing_a_gateway_removes_exactly_its_routes_records_and_addresses(fabric):
    fabric.create(Kind.vm, VmSpec(name="R1", vm_network="Red", host="A"))
    before = {host: fabric.host_entry(host).state_json for host in ("A", "GW1", "GW2")}
    leases_before = fabric.leases()
    nat(fabric, "Red")
    fabric.create(Kind.nat_rule, NatRuleSpec(name="web", nat_connection="RedNAT", external_port=80, vm="R1"))
    refused(fabric, lambda: fabric.delete(Kind.gateway, "RedGW"), Conflict, "name", "NAT connection RedNAT")
    fabric.delete(Kind.nat_rule, "web")
    fabric.delete(Kind.nat_connection, "RedNAT")
    fabric.delete(Kind.gateway, "RedGW")
    assert fabric.leases() == leases_before
    for host, document in before.items():
        assert json.loads(fabric.host_entry(host).state_json) | {"generation": 0} == \
            json.loads(document) | {"generation": 0}


# --- the wire contract's own refusals ---------------------------------------------------------------


def test_host_state_refuses_a_gateway_leg_that_does_not_fit_and_names_the_field(fabric):
    fabric.create(Kind.vm, VmSpec(name="R1", vm_network="Red", host="A"))
    nat(fabric, "Red")
    fabric.create(Kind.nat_rule, NatRuleSpec(name="web", nat_connection="RedNAT", external_port=80, vm="R1"))
    document = json.loads(fabric.host_entry("GW1").state_json)
    leg = document["gateway"]["legs"][0]
    cases = [
        (["gateway", "legs", 0, "routing_domain"], "Nowhere", "gateway.legs[0].routing_domain: Nowhere is not a routing domain"),
        (["gateway", "legs", 0, "address"], "198.51.100.5/24", "gateway.legs[0].address: 198.51.100.5/24 is outside the front-end"),
        (["gateway", "legs", 0, "dnat", 0, "address"], "10.1.1.1", "gateway.legs[0].dnat[0].address: 10.1.1.1 is outside"),
        (["gateway", "front_end", "vlan"], 802, "gateway.front_end.vlan: VLAN 802 is the provider network's VLAN"),
        (["gateway", "legs", 0, "connectivity"], "forwarding", "gateway.legs[0].dnat: only a nat leg forwards ports"),
        (["routing_domains", 0, "routes", 0, "next_hop"], "10.1.1.1", "routes[0].next_hop: 10.1.1.1 is outside every subnet"),
    ]
    assert leg["dnat"]
    for path, value, message in cases:
        bad = json.loads(json.dumps(document))
        target = bad
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        with pytest.raises(Exception) as caught:
            parse_host_state(bad)
        assert message in str(caught.value), (path, str(caught.value))
    assert ipaddress.ip_interface(leg["address"]).ip == ipaddress.ip_address("203.0.113.10")


def test_what_a_gateway_service_stands_on_is_not_taken_from_under_it(fabric):
    refused(fabric, lambda: fabric.delete(Kind.host, "GW2"), Conflict, "name", "gateway service Edge")
    refused(fabric, lambda: fabric.delete_virtual_switch("GW1"), Conflict, "host",
            "host GW1 serves gateway service Edge through it")
    refused(fabric, lambda: fabric.set_virtual_switch("GW1", VirtualSwitchSpec(logical_switch="Virtualization")),
            Conflict, "logical_switch", "does not reach the front-end network site External")
    refused(fabric, lambda: fabric.patch(Kind.uplink_port_profile, "Gateway", {"network_sites": ["Virtualization"]}),
            Conflict, None, "does not reach the front-end network site External")
    refused(fabric, lambda: fabric.delete(Kind.ip_pool, "External/Default"), Conflict, "name", "gateway service Edge")
    nat(fabric, "Red")
    refused(fabric, lambda: fabric.delete(Kind.vm_network, "Red"), Conflict, "name", "gateway RedGW")
    refused(fabric, lambda: fabric.delete(Kind.gateway_service, "Edge"), Conflict, "name", "gateway RedGW")


def test_connectivity_changes_take_and_give_back_the_forwarding_address(fabric):
    nat(fabric, "Red")
    refused(fabric, lambda: fabric.patch(Kind.gateway, "RedGW", {"connectivity": "none"}), Conflict,
            "connectivity", "NAT connection RedNAT still uses it; delete it first")
    fabric.delete(Kind.nat_connection, "RedNAT")
    fabric.patch(Kind.gateway, "RedGW", {"connectivity": "none"})
    [red] = [rd for rd in state_of(fabric, "GW1").routing_domains if rd.name == "Red"]
    assert red.routes == () and state_of(fabric, "GW1").gateway.legs == ()
    forwarding = fabric.patch(Kind.gateway, "RedGW", {"connectivity": "forwarding"})
    assert [lease.address for lease in fabric.leases(kind="Forwarding")] == [forwarding.forwarding_address]
    assert fabric.patch(Kind.gateway, "RedGW", {"connectivity": "nat"}).forwarding_address is None
    assert fabric.leases(kind="Forwarding") == []
