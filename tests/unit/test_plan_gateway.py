"""The plan of a gateway host and of the VM hosts behind it (agent.plan, agent.nat's table).

The documents are the kernel tier's (tests/kernel/gatewaylab.py): hosts A and B with the
seed's overlapping tenants, gateway host G with one NAT leg per tenant. Pure: no kernel.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from agent import naming
from agent.kernel_model import KernelState
from agent.plan import VRF_UNREACHABLE_METRIC, desired_kernel_state, diff
from agent.state import parse_host_state
from tests.kernel import agentlab
from tests.kernel.gatewaylab import BACK_END_MAC, NAT_ADDRESS, gateway_host_state, with_gateway

VM_NETNS = {vm.name: vm.name.lower() for vm in agentlab.VMS}
LAB = SimpleNamespace(state=lambda host, **kw: agentlab.host_state(host, VM_NETNS, **kw))
F2_TABLE, F3_TABLE = naming.vrf_table(2), naming.vrf_table(3)


def gateway(**kwargs) -> KernelState:
    return desired_kernel_state(parse_host_state(gateway_host_state(LAB, 2, **kwargs)))


def rules_of(want: KernelState) -> list[dict]:
    assert want.nat is not None
    return [json.loads(c)["add"]["rule"] for c in want.nat.commands if "rule" in json.loads(c)["add"]]


def test_gateway_host_front_end_vlan_on_the_trunk_and_a_leg_per_vm_network():
    want = gateway()
    front = want.links["hnv-sw.30"]
    assert (front.kind, front.role, front.option("vlan_id"), front.option("link")) == ("vlan", "frontend", 30, "hnv-sw")
    assert ("hnv-team", 30) in want.vlans and ("hnv-sw", 30) in want.vlans
    for rd_id, network in ((2, "Fabrikam2"), (3, "Fabrikam3")):
        leg = want.links[naming.gateway_leg(rd_id)]
        assert (leg.kind, leg.master, leg.option("link"), leg.up) == ("macvlan", f"hnvr{rd_id}", "hnv-sw.30", True)
        assert leg.setting("arp_notify") == 1  # the gratuitous ARP when it comes up
        assert (leg.name, f"{NAT_ADDRESS[network]}/24") in want.addresses
        back = want.links[naming.gateway_back_end(rd_id)]
        assert (back.kind, back.master, back.mac) == ("macvlan", f"hnvr{rd_id}", BACK_END_MAC[network])
        assert (back.name, "192.168.0.12/32") in want.addresses


def test_gateway_host_vrf_default_goes_out_of_the_leg_and_other_customer_routes_stay():
    routes = {(r.table, r.dst, r.type): r for r in gateway().routes.values()}
    leg_default = routes[(F2_TABLE, "default", "unicast")]
    assert (leg_default.gateway, leg_default.device) == ("203.0.113.1", "hnvl2")
    # The customer route to its own back-end is not installed here; the one to a VM is.
    assert not [r for r in routes.values() if r.gateway == "192.168.0.12"]
    assert routes[(F2_TABLE, "10.99.0.0/16", "unicast")].gateway == "192.168.0.11"
    assert (F2_TABLE, "default", "unreachable") in routes and (F3_TABLE, "default", "unreachable") in routes


def test_standby_builds_the_same_legs_down_without_the_default_route():
    active, standby = gateway(), gateway(active=False)
    assert not standby.links["hnvl2"].up and not standby.links["hnvg2"].up
    assert set(standby.addresses) == set(active.addresses)  # taking over is only bringing legs up
    assert not [r for r in standby.routes.values() if r.gateway == "203.0.113.1"]
    assert standby.nat == active.nat


def test_nat_table_zones_both_passes_of_a_vrf_and_nats_each_leg_to_its_address():
    rules = rules_of(gateway())
    [zone] = [r for r in rules if r["chain"] == "zone"]
    mapping = dict(map(tuple, zone["expr"][0]["mangle"]["value"]["map"]["data"]["set"]))
    # The enslaved device (first prerouting pass) and the VRF (second) get the same zone.
    assert mapping["hnvl2"] == mapping["hnvr2"] == mapping["hnvg2"] == mapping["hnvb5001"] == 2
    assert mapping["hnvl3"] == mapping["hnvr3"] == 3
    snat = [r["expr"] for r in rules if r["chain"] == "snat"]
    assert [(e[0]["match"]["right"], e[1]["snat"]["addr"]) for e in snat] == [
        ("hnvl2", NAT_ADDRESS["Fabrikam2"]), ("hnvl3", NAT_ADDRESS["Fabrikam3"])]
    dnat = [r["expr"] for r in rules if r["chain"] == "dnat"]
    assert [[m["match"]["right"] for m in e[:3]] + [e[3]["dnat"]] for e in dnat] == [
        ["hnvl2", NAT_ADDRESS["Fabrikam2"], 80, {"family": "ip", "addr": "192.168.0.11", "port": 8080}],
        ["hnvl3", NAT_ADDRESS["Fabrikam3"], 80, {"family": "ip", "addr": "192.168.0.11", "port": 8080}],
    ]


def test_forwarding_leg_gets_a_zone_and_no_nat():
    rules = rules_of(gateway(fabrikam3="forwarding"))
    text = json.dumps([r for r in rules if r["chain"] != "zone"])
    assert NAT_ADDRESS["Fabrikam3"] not in text and "hnvl3" not in text
    assert NAT_ADDRESS["Fabrikam2"] in text


def test_vm_host_customer_routes_next_to_the_unreachable_default():
    want = desired_kernel_state(parse_host_state(with_gateway(LAB.state("a"))))
    f2 = sorted((r.dst, r.type, r.gateway, r.device, r.metric) for r in want.routes.values() if r.table == F2_TABLE)
    assert f2 == [
        ("10.99.0.0/16", "unicast", "192.168.0.11", "hnvb5001", 0),
        ("default", "unicast", "192.168.0.12", "hnvb5001", 0),
        ("default", "unreachable", None, None, VRF_UNREACHABLE_METRIC),
    ]
    # The GatewayWildcard record is installed like a Static one: neighbour and FDB.
    assert want.neighbours[("hnvb5001", "192.168.0.12")].mac == BACK_END_MAC["Fabrikam2"]
    assert ("hnvb5001", BACK_END_MAC["Fabrikam2"]) in want.fdb
    assert want.nat is None and not [l for l in want.links.values() if l.kind == "macvlan"]


def test_removing_the_gateway_deletes_exactly_its_objects():
    with_gw, without = gateway(), desired_kernel_state(parse_host_state(gateway_host_state(LAB, 3, gateway=False)))
    plan = diff(without, with_gw)
    assert all(op.action == "delete" for op in plan), plan.describe()
    assert {(op.kind, op.name) for op in plan if op.kind in ("frontend", "leg", "backend", "nat")} == {
        ("frontend", "hnv-sw.30"), ("leg", "hnvl2"), ("leg", "hnvl3"), ("backend", "hnvg2"),
        ("backend", "hnvg3"), ("nat", "inet openhnv")}
    kinds = {op.kind for op in plan}
    assert kinds == {"frontend", "leg", "backend", "nat", "route", "address", "vlan", "neighbour"}, plan.describe()
    # The NAT table goes before the devices its rules name, routes before the legs.
    order = [op.kind for op in plan]
    assert order.index("nat") < order.index("route") < order.index("leg")
