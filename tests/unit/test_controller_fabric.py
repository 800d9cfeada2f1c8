"""The controller's rooms without HTTP: allocators, the store's transaction, the fabric's
rules over a real SQLite file (tmp_path)."""

from __future__ import annotations

import ipaddress
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.state import VSID_MAX, VSID_MIN, parse_host_state
from controller.allocate import (
    MAC_POOL_END,
    MAC_POOL_START,
    allocate_address,
    allocate_mac,
    allocate_routing_domain_id,
    allocate_vsid,
    mac_text,
    slaac_address,
)
from controller.fabric import Fabric
from controller.models import (
    Conflict,
    Invalid,
    HostSpec,
    IpPoolSpec,
    Kind,
    LogicalNetworkSpec,
    LogicalSwitchSpec,
    NetworkSiteSpec,
    UplinkPortProfileSpec,
    VirtualSwitchSpec,
    VmNetworkSpec,
    VmSpec,
    VmSubnetSpec,
)
from controller.store import ChangeSet, Store
from tests.lib.nv_fabric import populate_transport

# --- allocators ---------------------------------------------------------------------------------


@given(st.sets(st.integers(VSID_MIN, VSID_MIN + 50), max_size=40))
@settings(max_examples=50, deadline=None)
def test_vsid_is_fresh_and_in_range(taken):
    vsid = allocate_vsid(taken)
    assert VSID_MIN <= vsid <= VSID_MAX and vsid not in taken


def test_routing_domain_ids_fill_from_one():
    assert allocate_routing_domain_id(set()) == 1
    assert allocate_routing_domain_id({1, 2, 4}) == 3


def test_mac_pool_is_vmms_default_and_wraps_once():
    assert mac_text(allocate_mac(set())) == "00:1d:d8:b7:1c:00"
    assert allocate_mac({MAC_POOL_START}, hint=MAC_POOL_END) == MAC_POOL_END
    assert allocate_mac({MAC_POOL_END}, hint=MAC_POOL_END) == MAC_POOL_START + 0  # wrapped to the start


def test_address_allocation_skips_gateway_reserved_and_taken_then_refuses():
    start, end = ipaddress.ip_address("192.168.0.1"), ipaddress.ip_address("192.168.0.4")
    skip = [ipaddress.ip_address("192.168.0.1"), ipaddress.ip_address("192.168.0.3")]
    taken = {int(ipaddress.ip_address("192.168.0.2"))}
    assert str(allocate_address("p", start, end, taken, skip)) == "192.168.0.4"
    taken.add(int(ipaddress.ip_address("192.168.0.4")))
    with pytest.raises(Conflict) as refused:
        allocate_address("Fabrikam2/Default/Default", start, end, taken, skip)
    assert "Fabrikam2/Default/Default is exhausted" in refused.value.error
    v6 = allocate_address("p6", ipaddress.ip_address("fd00::10"), ipaddress.ip_address("fd00::20"), set())
    assert str(v6) == "fd00::10"


# --- the store -------------------------------------------------------------------------------------


def test_store_commit_is_all_or_nothing(tmp_path):
    store = Store(tmp_path / "c.db")
    first = ChangeSet(put_allocations={("mac", "00:1d:d8:b7:1c:00"): "vm:a"})
    store.commit(first)
    clash = ChangeSet(
        put_objects={("vms", "b"): ("uuid-b", "{}")},
        put_allocations={("mac", "00:1d:d8:b7:1c:00"): "vm:b"},  # taken: the whole change set fails
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.commit(clash)
    snapshot = store.load()
    assert snapshot.objects == [] and snapshot.allocations == [("mac", "00:1d:d8:b7:1c:00", "vm:a")]


# --- the fabric's rules -------------------------------------------------------------------------------


def small_fabric(tmp_path) -> Fabric:
    """Two NV hosts (one transport pool with only three PAs) and one host without a switch."""
    return populate_small_fabric(Fabric.open(tmp_path, synchronous="NORMAL"))


def populate_small_fabric(fabric: Fabric) -> Fabric:
    """`small_fabric`'s objects, created on any fabric (any store)."""
    populate_transport(fabric, ("A", "B", "Bare"), pa_range=("10.80.2.20", "10.80.2.22"), switched=("A", "B"))
    for network in ("Red", "Blue"):
        fabric.create(Kind.vm_network, VmNetworkSpec(name=network, logical_network="Virtualization"))
        fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network=network, prefix="192.168.0.0/24"))
        fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network=network))
    return fabric


def snapshot(fabric: Fabric) -> tuple:
    return (
        {kind: [obj.model_dump() for obj in fabric.list(kind)] for kind in Kind},
        [lease.model_dump() for lease in fabric.leases()],
        {name: entry.generation for name, entry in fabric.entries.items()},
    )


def test_batch_is_all_or_nothing_and_names_the_failing_item(tmp_path):
    fabric = small_fabric(tmp_path)
    before = snapshot(fabric)
    specs = [VmSpec(name="r1", vm_network="Red", host="A"), VmSpec(name="b1", vm_network="Blue", host="A"),
             VmSpec(name="r2", vm_network="Red", host="B"), VmSpec(name="b2", vm_network="Blue", host="B")]
    with pytest.raises(Conflict) as refused:  # the 4th PA does not fit the 3-address pool
        fabric.create_many(Kind.vm, specs)
    assert refused.value.field == "items[3].host" and "b2" in refused.value.error
    assert "IP pool Virtualization/Default is exhausted" in refused.value.reason
    assert snapshot(fabric) == before
    # the same batch minus the last VM fits, and reopening the store shows exactly it
    created = fabric.create_many(Kind.vm, specs[:3])
    assert [vm.host for vm in created] == ["A", "A", "B"]
    assert len(fabric.leases(kind="PA")) == 3
    fabric.store.close()
    reopened = Fabric.open(tmp_path, synchronous="NORMAL")
    assert sorted(vm.name for vm in reopened.list(Kind.vm)) == ["b1", "r1", "r2"]


def test_compiled_states_validate_and_generations_move_only_on_change(tmp_path):
    fabric = small_fabric(tmp_path)
    fabric.create(Kind.vm, VmSpec(name="r1", vm_network="Red", host="A"))
    generations = {name: entry.generation for name, entry in fabric.entries.items()}
    # a VM network nobody uses on B and Bare: neither host's state changes
    fabric.create(Kind.vm, VmSpec(name="r2", vm_network="Red", host="A"))
    after = {name: entry.generation for name, entry in fabric.entries.items()}
    assert after == {**generations, "A": generations["A"] + 1}
    for name, entry in fabric.entries.items():
        assert parse_host_state(entry.state_json) == entry.state
    # a description change compiles every host but bumps none
    fabric.patch(Kind.logical_network, "Virtualization", {"description": "transport"})
    assert {name: entry.generation for name, entry in fabric.entries.items()} == after


def test_management_address_is_leased_from_the_management_pool_and_follows_a_patch(tmp_path):
    fabric = Fabric.open(tmp_path, synchronous="NORMAL")
    fabric.create(Kind.logical_network, LogicalNetworkSpec(name="Management"))
    fabric.create(Kind.network_site, NetworkSiteSpec(name="Management", logical_network="Management",
                                                     host_groups=["All Hosts"],
                                                     subnet_vlans=[{"subnet": "10.0.0.0/24", "vlan": 0}]))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Hosts", network_site="Management",
                                           range_start="10.0.0.10", range_end="10.0.0.50"))
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Management", logical_network="Management",
                                                 isolation="NoIsolation"))
    fabric.create(Kind.uplink_port_profile, UplinkPortProfileSpec(name="Management", network_sites=["Management"]))
    fabric.create(Kind.logical_switch, LogicalSwitchSpec(name="Management", uplink_port_profiles=["Management"]))
    fabric.create(Kind.host, HostSpec(name="CON-HyperV1", management_address="10.0.0.11/24", nics=["eth0"]))
    fabric.set_virtual_switch("CON-HyperV1", VirtualSwitchSpec(
        logical_switch="Management", management_adapter={"vm_network": "Management"}))
    held = [(str(lease.address), lease.kind.value, lease.holder) for lease in fabric.leases()]
    assert held == [("10.0.0.11", "Management", "CON-HyperV1")]
    assert str(fabric.entries["CON-HyperV1"].state.management.address) == "10.0.0.11/24"
    fabric.patch(Kind.host, "CON-HyperV1", {"management_address": "10.0.0.12/24"})
    assert [str(lease.address) for lease in fabric.leases()] == ["10.0.0.12"]
    assert str(fabric.entries["CON-HyperV1"].state.management.address) == "10.0.0.12/24"
    with pytest.raises(Conflict) as refused:
        fabric.delete(Kind.ip_pool, "Management/Hosts")
    assert "10.0.0.12 (Management of CON-HyperV1)" in refused.value.reason
    fabric.delete_virtual_switch("CON-HyperV1")
    assert fabric.leases() == []


def test_ipv6_customer_addresses_over_an_ipv4_transport(tmp_path):
    fabric = small_fabric(tmp_path)
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Six", logical_network="Virtualization", ca_family="IPv6"))
    with pytest.raises(Invalid) as refused:
        fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Six", prefix="10.9.0.0/24"))
    assert refused.value.field == "prefix" and "never dual-stack" in refused.value.reason
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Six", prefix="fd00:6::/64"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Six"))
    vm = fabric.create(Kind.vm, VmSpec(name="v6", vm_network="Six", host="A"))
    assert str(vm.ca) == "fd00:6::2"  # ::1 is the gateway
    state = parse_host_state(fabric.entries["A"].state_json)
    gateway = [r for r in state.records if r.type == "Gateway"][0]
    assert str(gateway.ca) == "fd00:6::1" and str(gateway.pa) == "0.0.0.0"
    assert str(state.ports[0].ca) == "fd00:6::2/64"


def test_slaac_address_is_the_modified_eui64_of_the_mac():
    prefix = ipaddress.IPv6Network("fd00:6::/64")
    assert str(slaac_address(prefix, "00:15:5d:00:00:01")) == "fd00:6::215:5dff:fe00:1"
    assert str(slaac_address(prefix, "02:1d:d8:b7:1c:04")) == "fd00:6::1d:d8ff:feb7:1c04"  # U/L bit set: cleared


def test_a_slaac_pool_gives_each_vm_the_address_it_forms_from_its_mac(tmp_path):
    fabric = small_fabric(tmp_path)
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Six", logical_network="Virtualization", ca_family="IPv6"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Six", prefix="fd00:6::/64"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Six", ipv6_assignment="SLAAC"))
    vm = fabric.create(Kind.vm, VmSpec(name="v6", vm_network="Six", host="A"))
    assert vm.ca == slaac_address(ipaddress.IPv6Network("fd00:6::/64"), vm.mac)
    state = parse_host_state(fabric.entries["A"].state_json)
    assert state.routing_domains[-1].subnets[0].ipv6_assignment == "SLAAC"
    assert str(state.ports[0].ca) == f"{vm.ca}/64"
    with pytest.raises(Invalid) as refused:  # an address the VM would not form
        fabric.create(Kind.vm, VmSpec(name="v6b", vm_network="Six", host="B", ca="fd00:6::99"))
    assert refused.value.field == "ca" and "assigns addresses by SLAAC" in refused.value.reason
    with pytest.raises(Conflict) as mixed:
        fabric.create(Kind.ip_pool, IpPoolSpec(name="Second", vm_network="Six", range_start="fd00:6::1:0",
                                               range_end="fd00:6::1:ff"))
    assert mixed.value.field == "ipv6_assignment"


@pytest.mark.parametrize(("prefix", "vms", "field", "reason"), [
    ("fd00:7::/80", 0, "ipv6_assignment", "SLAAC needs a /64"),
    ("10.9.0.0/24", 0, "ipv6_assignment", "is not IPv6"),
    ("fd00:7::/64", 1, "ipv6_assignment", "has VMs with allocated addresses"),
])
def test_slaac_is_refused_where_a_vm_could_not_form_its_address(tmp_path, prefix, vms, field, reason):
    fabric = small_fabric(tmp_path)
    family = "IPv6" if ":" in prefix else "IPv4"
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Seven", logical_network="Virtualization", ca_family=family))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Seven", prefix=prefix))
    if vms:  # a VM given its address before the subnet had a pool
        fabric.create(Kind.vm, VmSpec(name="v7", vm_network="Seven", host="A", ca="fd00:7::10"))
    with pytest.raises((Invalid, Conflict)) as refused:
        fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Seven", ipv6_assignment="SLAAC"))
    assert refused.value.field == field and reason in str(refused.value), refused.value


def test_a_host_whose_stored_fabric_no_longer_compiles_is_not_served_and_others_are(tmp_path, monkeypatch):
    fabric = small_fabric(tmp_path)
    fabric.create(Kind.vm, VmSpec(name="r1", vm_network="Red", host="A"))
    generation = fabric.entries["A"].generation
    fabric.store.close()
    # A newer controller whose rules refuse what was stored (simulated: a provider network
    # with addresses is refused), restarted on the same database.
    import controller.compiler as compiler

    real = compiler.ProviderNetwork

    def stricter(**fields):
        if fields.get("addresses"):
            raise ValueError("provider.mtu: the new rules refuse this provider network")
        return real(**fields)

    monkeypatch.setattr(compiler, "ProviderNetwork", stricter)
    reopened = Fabric.open(tmp_path, synchronous="NORMAL")
    assert "A" not in reopened.entries and reopened.entries["B"].state.host == "B"
    with pytest.raises(Exception) as refused:
        reopened.host_entry("A")
    assert refused.value.status == 503 and "new rules" in refused.value.reason
    assert reopened.view(Kind.host, reopened.get(Kind.host, "A")).sync == "Error"
    monkeypatch.setattr(compiler, "ProviderNetwork", real)
    reopened.create(Kind.vm, VmSpec(name="r2", vm_network="Red", host="A"))  # compiles again
    assert reopened.host_entry("A").generation == generation + 1  # generations never go back


def test_cached_compilation_equals_compiling_from_scratch(tmp_path):
    """Memoised records, shared fragments and reused heads never leave a stale state."""
    from controller.compiler import Compiler

    fabric = small_fabric(tmp_path)

    def assert_fresh() -> None:
        scratch = Compiler(fabric.inventory)
        for name, entry in fabric.entries.items():
            fresh = scratch.compile(name)
            assert entry.state.model_copy(update={"generation": 0, "fabric": None}) == fresh, name
            assert entry.state.fabric == fabric.fabric_id and entry.state.fabric is not None, name
            assert scratch.serialise(fresh)[0] == entry.digest, name
            assert parse_host_state(entry.state_json) == entry.state

    fabric.create_many(Kind.vm, [VmSpec(name=f"r{i}", vm_network="Red") for i in range(4)])
    fabric.create(Kind.vm, VmSpec(name="b1", vm_network="Blue", host="B"))
    assert_fresh()
    fabric.migrate("r0", "B" if fabric.get(Kind.vm, "r0").host == "A" else "A")
    assert_fresh()
    fabric.patch(Kind.logical_network, "Virtualization", {"mtu": 9000})
    assert_fresh()
    assert fabric.entries["A"].state.provider.mtu == 9000
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Red", name="Second", prefix="192.168.1.0/24"))
    assert_fresh()
    assert len(fabric.entries["A"].state.routing_domain_of(fabric.get(Kind.vm_subnet, "Red/Default").vsid).subnets) == 2
    fabric.delete(Kind.vm, "r1")
    fabric.patch(Kind.uplink_port_profile, "Virtualization", {"team_mode": "LACP"})
    assert_fresh()
    assert fabric.entries["B"].state.team.mode == "LACP"


def test_transaction_of_mixed_operations_is_all_or_nothing_and_a_dry_run_changes_nothing(tmp_path):
    from controller.operations import Create, Delete, Migrate, Patch

    fabric = small_fabric(tmp_path)
    fabric.create(Kind.vm, VmSpec(name="r1", vm_network="Red", host="A"))
    before = snapshot(fabric)
    operations = [Create(Kind.vm, VmSpec(name="r2", vm_network="Red", host="B")),
                  Patch(Kind.vm_network, "Blue", {"description": "blue tenant"}),
                  Migrate("r1", "B"),
                  Delete(Kind.vm_network, "Red")]  # refused: r1 and r2 are in it
    with pytest.raises(Conflict) as refused:
        fabric.transact(operations)
    assert refused.value.field.startswith("operations[3]") and "delete vms" not in refused.value.error
    assert "operations[3] (delete vm-networks Red)" in refused.value.error
    assert snapshot(fabric) == before
    # a dry run of the first three answers what a real run would create, and changes nothing
    dry = fabric.transact(operations[:3], dry_run=True)
    assert dry[0].name == "r2" and dry[2].host == "B"
    assert snapshot(fabric) == before
    done = fabric.transact(operations[:3])
    assert [done[0].host, done[1].description, done[2].host] == ["B", "blue tenant", "B"]
    assert fabric.get(Kind.vm, "r1").host == "B" and fabric.get(Kind.vm, "r2").host == "B"


def test_every_kind_has_its_create_and_delete_rules_in_the_registry():
    from controller.fabric import RULES

    assert set(RULES) == set(Kind)
    for kind, rules in RULES.items():
        assert rules.create.__name__ == f"_create_{kind.name}" and rules.delete.__name__ == f"_delete_{kind.name}"
