"""agent.plan over hand-made desired and observed kernel states: no root, no kernel."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

from agent import naming
from agent.kernel_model import BridgeVlan, Fdb, KernelState, Link, Neighbour
from agent.plan import desired_kernel_state, diff
from agent.state import parse_host_state
from tests.unit.test_state_validation import BASE

VSID = 3535905
BRIDGE = naming.vsid_bridge(VSID)
TUNNEL_21 = naming.nvgre_tunnel(VSID, "10.80.2.20", "10.80.2.21")
TUNNEL_22 = naming.nvgre_tunnel(VSID, "10.80.2.20", "10.80.2.22")


def state(mutate=None):
    doc = copy.deepcopy(BASE)
    if mutate:
        mutate(doc)
    return parse_host_state(json.dumps(doc))


def as_observed(want: KernelState) -> KernelState:
    """What the kernel shows once `want` is realised (a VM's end is not visible)."""
    have = copy.deepcopy(want)
    for name, link in want.links.items():
        have.links[name] = replace(link, vm=None, kind="veth" if link.kind == "nic" else link.kind)
    return have


def test_first_plan_builds_in_dependency_order():
    plan = diff(desired_kernel_state(state()), KernelState())
    kinds = [op.kind for op in plan]
    assert [op.name for op in plan][:4] == ["hnv-sw", "hnv-team", "eth0", "eth1"]
    assert all(op.action in ("add", "set") for op in plan if op.kind != "vlan")
    # links, then VLANs, addresses, routes, then FDB before neighbours
    last_link = max(i for i, k in enumerate(kinds) if k in ("switch", "team", "member", "provider", "vrf", "bridge", "tunnel", "port"))
    assert last_link < kinds.index("vlan") < kinds.index("address") < kinds.index("fdb") < kinds.index("neighbour")
    assert f"add tunnel {TUNNEL_21} vsid {VSID} 10.80.2.20 -> 10.80.2.21" in plan.describe().splitlines()
    assert f"add fdb 00:15:5d:01:02:04 on {BRIDGE} -> {TUNNEL_21}" in plan.describe()
    assert f"add neighbour 192.168.0.11 on {BRIDGE} -> 00:15:5d:01:02:04" in plan.describe()
    assert "add route unreachable default table 10001" in plan.describe()


def test_tunnel_is_keyed_by_vsid_and_flagged_for_l2population():
    want = desired_kernel_state(state())
    tunnel = want.links[TUNNEL_21]
    assert tunnel.kind == "gretap" and tunnel.master == BRIDGE and tunnel.mtu == 1458
    assert tunnel.option("ikey") == tunnel.option("okey") == VSID << 8
    assert dict(tunnel.port_flags) == {"learning": 0, "neigh_suppress": 1, "unicast_flood": 0,
                                       "mcast_flood": 0, "bcast_flood": 0}
    assert want.links[BRIDGE].mac == naming.gateway_mac(VSID)
    assert want.links[BRIDGE].master == naming.vrf(1)


def test_realised_state_gives_an_empty_plan():
    want = desired_kernel_state(state())
    plan = diff(want, as_observed(want))
    assert plan.is_empty and len(plan) == 0 and plan.describe() == "nothing to do"


def test_removing_one_record_removes_exactly_it():
    want = desired_kernel_state(state())
    have = as_observed(want)
    smaller = state(lambda d: d["records"].append(
        {"vsid": VSID, "ca": "192.168.0.12", "mac": "00:15:5d:01:02:05", "pa": "10.80.2.21"}))
    have = as_observed(desired_kernel_state(smaller))
    plan = diff(want, have)
    assert plan.describe().splitlines() == [
        f"delete neighbour 192.168.0.12 on {BRIDGE} -> 00:15:5d:01:02:05",
        f"delete fdb 00:15:5d:01:02:05 on {BRIDGE} -> {TUNNEL_21}",
    ]


def test_every_bridge_entry_is_sticky_and_a_loose_one_is_replaced():
    """The agent's bridge FDB entries are sticky (agent.kernel_model.Fdb: a VM sending by a
    port its entry no longer names must not pull it back there); one found without the
    flag, as an agent before it wrote them, is replaced in place, never deleted first."""
    want = desired_kernel_state(state())
    bridge_entries = [f for f in want.fdb.values() if f.port is not None]
    assert bridge_entries and all(f.sticky for f in bridge_entries)
    have = as_observed(want)
    entry = want.fdb[(BRIDGE, "00:15:5d:01:02:04")]
    have.fdb[entry.key] = replace(entry, sticky=False)
    assert diff(want, have).describe().splitlines() == [
        f"replace fdb 00:15:5d:01:02:04 on {BRIDGE} -> {TUNNEL_21} "
        f"(was 00:15:5d:01:02:04 on {BRIDGE} -> {TUNNEL_21} (not sticky))"]


def test_migration_is_make_before_break():
    before = desired_kernel_state(state())
    moved = desired_kernel_state(state(lambda d: d["records"][1].update(pa="10.80.2.22")))
    plan = diff(moved, as_observed(before))
    lines = plan.describe().splitlines()
    assert lines[0].startswith(f"add tunnel {TUNNEL_22}")
    assert lines[1] == f"replace fdb 00:15:5d:01:02:04 on {BRIDGE} -> {TUNNEL_22} (was 00:15:5d:01:02:04 on {BRIDGE} -> {TUNNEL_21})"
    assert lines[-1].startswith(f"delete tunnel {TUNNEL_21}")
    assert len(lines) == 3  # the neighbour (CA -> MAC) did not change


def test_foreign_objects_are_never_touched():
    want = desired_kernel_state(state())
    have = as_observed(want)
    have.add(Link(name="docker0", kind="bridge", role="external", owned=False))
    have.add(Link(name="hnvb4242", kind="bridge", role="external", owned=False))  # our prefix, no marker
    have.add(BridgeVlan("docker0", 5))
    plan = diff(want, have)
    assert plan.is_empty, plan.describe()


def test_stale_owned_objects_are_deleted_leaves_first():
    want = desired_kernel_state(state())
    have = as_observed(want)
    have.add(Link(name="hnvb9999", kind="bridge", role=naming.BRIDGE, key="9999"))
    have.add(Link(name="hnvp0000000000", kind="veth", role=naming.PORT, key="OldVM:abcd", master="hnvb9999"))
    have.add(Fdb("hnvb9999", "00:15:5d:09:09:09", port="hnvp0000000000"))
    have.add(Neighbour("hnvb9999", "10.9.9.9", "00:15:5d:09:09:09"))
    lines = diff(want, have).describe().splitlines()
    assert [l.split()[:2] for l in lines] == [
        ["delete", "neighbour"], ["delete", "fdb"], ["delete", "port"], ["delete", "bridge"]]


def test_changed_creation_option_recreates_and_says_why():
    want = desired_kernel_state(state())
    have = as_observed(want)
    vlan_dev = naming.provider_vlan("hnv-sw", 802)
    have.links[vlan_dev] = replace(have.links[vlan_dev], options=(("link", "hnv-sw"), ("vlan_id", 803)))
    op, *rest = diff(want, have).ops
    assert op.action == "replace" and op.name == vlan_dev and "vlan_id 803 -> 802" in op.detail
    # The PA lived on the old device: it comes back in the same plan.
    assert [o.describe() for o in rest] == [f"add address 10.80.2.20/24 on {vlan_dev}"]


def test_changed_settable_attribute_is_set_in_place():
    want = desired_kernel_state(state())
    have = as_observed(want)
    have.links[TUNNEL_21] = replace(have.links[TUNNEL_21], mtu=1500, port_flags=(("learning", 1),))
    (op,) = diff(want, have).ops
    assert op.action == "set" and "mtu 1500 -> 1458" in op.detail and "learning 1 -> 0" in op.detail


def test_name_taken_by_foreign_device_is_reported_not_taken_over():
    want = desired_kernel_state(state())
    have = as_observed(want)
    have.links[BRIDGE] = Link(name=BRIDGE, kind="bridge", role="external", owned=False)
    ops = [op for op in diff(want, have) if op.name == BRIDGE]
    assert ops and ops[0].action == "add" and "does not own" in ops[0].detail


def test_new_vlan_port_loses_the_default_pvid_in_the_same_plan():
    vlan_state = state(lambda d: d["ports"].append({"name": "HostVM100", "mac": "00:15:5d:64:00:01", "vlan": 100}))
    want = desired_kernel_state(vlan_state)
    have = as_observed(desired_kernel_state(state()))
    port = naming.vm_port("HostVM100")
    lines = diff(want, have).describe().splitlines()
    assert f"add vlan 100 on {port} pvid untagged" in lines
    assert f"delete vlan 1 on {port} pvid untagged" in lines


def test_team_member_removed_from_the_team_is_released_not_deleted():
    want = desired_kernel_state(state(lambda d: d["team"].update(members=["eth0"])))
    have = as_observed(desired_kernel_state(state()))
    lines = diff(want, have).describe().splitlines()
    assert lines == ["release external eth1 from hnv-team"]


def test_vxlan_mode_uses_one_device_per_vsid_with_remote_fdb():
    want = desired_kernel_state(state(lambda d: d["provider"].update(encapsulation="vxlan")))
    vx = want.links[naming.vxlan_device(VSID)]
    assert vx.option("vni") == VSID and vx.option("port") == 4789 and vx.option("learning") == 0
    assert want.fdb[(vx.name, "00:15:5d:01:02:04")].dst == "10.80.2.21"
    assert want.fdb[(BRIDGE, "00:15:5d:01:02:04")].port == vx.name
    assert not [l for l in want.links.values() if l.role == naming.TUNNEL]
    assert vx.mtu == 1450


def test_management_address_moves_off_the_team_members():
    want = desired_kernel_state(state())
    have = as_observed(want)
    del have.addresses[("hnv-sw", "10.0.0.16/24")]
    from agent.kernel_model import Address
    have.add(Address("eth0", "10.0.0.16/24"))
    lines = diff(want, have).describe().splitlines()
    assert lines == ["add address 10.0.0.16/24 on hnv-sw", "delete address 10.0.0.16/24 on eth0"]


def test_every_subnet_of_a_vm_network_gets_a_tunnel_to_every_peer():
    """Distributed router, receiving side: a peer routes into our second subnet and sends
    the frame keyed with that subnet's VSID, although no remote VM lives in it."""
    second = 3535906

    def two_subnets(doc):
        doc["routing_domains"][0]["subnets"].append(
            {"name": "Second", "vsid": second, "prefix": "192.168.1.0/24", "gateway": "192.168.1.1"})
    want = desired_kernel_state(state(two_subnets))
    tunnel = naming.nvgre_tunnel(second, "10.80.2.20", "10.80.2.21")
    assert want.links[tunnel].master == naming.vsid_bridge(second)
    assert want.links[tunnel].option("ikey") == second << 8
    assert not [f for f in want.fdb.values() if f.port == tunnel]  # no MAC behind it


def test_recreated_link_gets_what_lived_on_it_back_in_the_same_plan():
    want = desired_kernel_state(state())
    have = as_observed(want)
    port = naming.vm_port("TenantVM01")
    # The VM's CA changed: its port is rebuilt, and its FDB entry dies with the old one.
    moved = desired_kernel_state(state(lambda d: (d["ports"][0].update(ca="192.168.0.50/24"),
                                                  d["records"][0].update(ca="192.168.0.50"))))
    lines = diff(moved, have).describe().splitlines()
    assert lines[0].startswith(f"replace port {port}") and "VM end changed" in lines[0]
    assert f"add fdb 00:15:5d:01:02:03 on {BRIDGE} -> {port}" in lines
    assert f"delete neighbour 192.168.0.10 on {BRIDGE} -> 00:15:5d:01:02:03" in lines


def test_provider_vlan_device_sits_on_the_team_beside_the_switch():
    """So that encapsulated super-packets keep their size to the NICs (a bridge offers no
    segmentation offload for them): the switch carries no provider VLAN at all."""
    want = desired_kernel_state(state())
    vlan_dev = naming.provider_vlan("hnv-sw", 802)
    assert want.links[vlan_dev].option("link") == "hnv-team"
    assert not [v for v in want.vlans.values() if v.vid == 802]
    # Without a team there is nothing beside the switch: the device is on it, tagged.
    teamless = desired_kernel_state(state(lambda d: d.pop("team")))
    assert teamless.links[vlan_dev].option("link") == "hnv-sw"
    assert {(v.device, v.vid) for v in teamless.vlans.values() if v.vid == 802} == {("hnv-sw", 802)}


def test_vlan_device_is_rebuilt_with_its_lower_team_and_survives_a_new_switch():
    want = desired_kernel_state(state())
    vlan_dev = naming.provider_vlan("hnv-sw", 802)
    have = as_observed(want)
    have.links["hnv-team"] = replace(have.links["hnv-team"], options=(("mode", "balance-xor"),))
    lines = diff(want, have).describe().splitlines()
    assert lines[0].startswith("replace team hnv-team")
    assert f"add provider {vlan_dev} vlan_id 802 link hnv-team" in lines
    assert f"add address 10.80.2.20/24 on {vlan_dev}" in lines

    have = as_observed(want)
    have.links["hnv-sw"] = replace(have.links["hnv-sw"], options=(("vlan_default_pvid", 7),))
    lines = diff(want, have).describe().splitlines()
    assert lines[0].startswith("replace switch hnv-sw")
    assert "set team hnv-team master none -> hnv-sw" in lines
    assert not [l for l in lines if vlan_dev in l]


def test_provider_vlan_device_on_the_switch_moves_to_the_team():
    """A host whose agent put the device on the switch (before it went on the team): one
    plan moves it, its addresses with it."""
    want = desired_kernel_state(state())
    vlan_dev = naming.provider_vlan("hnv-sw", 802)
    have = as_observed(want)
    have.links[vlan_dev] = replace(have.links[vlan_dev], options=(("link", "hnv-sw"), ("vlan_id", 802)))
    lines = diff(want, have).describe().splitlines()
    assert lines[0].startswith(f"replace provider {vlan_dev}") and "link hnv-sw -> hnv-team" in lines[0]
    assert f"add address 10.80.2.20/24 on {vlan_dev}" in lines


def test_with_vm_dhcp_an_ipv4_tenant_vm_is_left_to_its_dhcp_client_and_a_vlan_vm_is_not():
    both = state(lambda d: d["ports"].append({"name": "HostVM100", "mac": "00:15:5d:64:00:01", "vlan": 100,
                                              "ca": "172.16.100.10/24"}))
    static = desired_kernel_state(both)
    dhcp = desired_kernel_state(both, vm_dhcp=True)
    tenant, vlan_vm = naming.vm_port("TenantVM01"), naming.vm_port("HostVM100")
    assert static.links[tenant].vm.ca == "192.168.0.10/24" and not static.links[tenant].vm.dhcp
    end = dhcp.links[tenant].vm
    assert end.dhcp and (end.ca, end.gateway, end.mtu) == (None, None, None)
    assert dhcp.links[tenant].mtu == static.links[tenant].mtu, "the host end keeps the tenant MTU"
    assert dhcp.links[tenant].key != static.links[tenant].key, "a change of mode makes the VM's NIC again"
    assert dhcp.links[vlan_vm].vm == static.links[vlan_vm].vm, "no DHCP server on a VLAN network: static"
