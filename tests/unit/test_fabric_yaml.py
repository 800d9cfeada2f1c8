"""The fabric document: loading, refusals naming path and reason, references, the plan.

Pure: no controller. The live fabric is given as the JSON the controller would send.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.fabric_yaml import (
    FabricDocument,
    FabricError,
    check_references,
    load_fabric,
    plan_changes,
)
from controller.models import Kind

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def seed() -> FabricDocument:
    document = load_fabric((EXAMPLES / "seed-fabric.yaml").read_text(), "seed-fabric.yaml")
    document.extend(load_fabric((EXAMPLES / "seed-tenants.yaml").read_text(), "seed-tenants.yaml"))
    return document


def refusal(text: str) -> list[str]:
    with pytest.raises(FabricError) as caught:
        load_fabric(text, "fabric.yaml")
    return caught.value.problems


def test_seed_documents_load_and_reference_only_each_other():
    document = seed()
    assert check_references(document, {}) == []
    keys = {(item.kind, item.key) for item in document.objects}
    assert (Kind.vm_subnet, "Fabrikam2/Default") in keys
    assert (Kind.vm_subnet, "Fabrikam3/Default") in keys
    assert (Kind.ip_pool, "Virtualization/Default") in keys
    assert (Kind.ip_pool, "Fabrikam3/Default/Default") in keys
    assert len(document.of_kind(Kind.host)) == 7
    site = next(i.spec for i in document.of_kind(Kind.network_site) if i.key == "Virtualization")
    assert [(str(sv.subnet), sv.vlan) for sv in site.subnet_vlans] == [("10.80.2.0/24", 802)]


def test_tenants_alone_name_what_is_missing():
    tenants = load_fabric((EXAMPLES / "seed-tenants.yaml").read_text(), "seed-tenants.yaml")
    problems = check_references(tenants, {})
    assert problems[0] == (
        "seed-tenants.yaml: vmNetworks[0].logicalNetwork: logical network Virtualization "
        "is not in the document nor on the controller"
    )


def test_prefix_with_host_bits_names_the_path():
    problems = refusal(
        "vmNetworks:\n"
        "  - name: A\n    logicalNetwork: V\n"
        "  - name: B\n    logicalNetwork: V\n"
        "  - name: C\n    logicalNetwork: V\n    subnets:\n      - {name: Default, prefix: 192.168.0.5/24}\n"
    )
    assert problems == [
        "fabric.yaml: vmNetworks[2].subnets[0].prefix: 192.168.0.5/24 has host bits set "
        "(the prefix is 192.168.0.0/24)"
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hostGroups: [{name: G, colour: red}]", "fabric.yaml: hostGroups[0].colour: unknown field"),
        ("tenants: []", "fabric.yaml: tenants: unknown section"),
        (
            "logicalNetworks:\n  - name: L\n    networkVirtualization: true\n    sites:\n      - name: S\n        hostGroups: [All Hosts]\n"
            "        subnetVlans: [{subnet: 10.80.2.0/24, vlan: 5000}]\n",
            "fabric.yaml: logicalNetworks[0].sites[0].subnetVlans[0].vlan: 5000 is out of range",
        ),
        (
            "vmNetworks:\n  - name: T\n    logicalNetwork: L\n    isolation: VLAN\n"
            "    subnets: [{name: Default, prefix: 172.16.0.0/24, vlan: 0}]\n",
            "fabric.yaml: vmNetworks[0].subnets[0].vlan: 0 is out of range",
        ),
        ("vms: [{name: V, vmNetwork: N, mac: 'ff:ff:ff:ff:ff:ff'}]", "fabric.yaml: vms[0].mac: MAC address ff:ff:ff:ff:ff:ff is multicast"),
        ("hosts:\n  - {name: H, nics: [eth0]}\n  - {name: H, nics: [eth1]}\n", "fabric.yaml: hosts[1].name: host H is already defined at hosts[0]"),
        ("hostGroups:\n  - name: G\n    name: H\n", "fabric.yaml: line 3, column 5: key 'name' is given twice"),
        ("hostGroups: [{name: G\n", "fabric.yaml: line 2, column 1:"),
        ("- just a list", "fabric.yaml: the document must be a mapping"),
        ("hostGroups: [{name: All Hosts}]", "fabric.yaml: hostGroups[0].name: All Hosts is the root host group"),
        ("logicalNetworks: [{name: L, encapsulation: ipip}]", "fabric.yaml: logicalNetworks[0].encapsulation: 'ipip': Input should be"),
    ],
)
def test_bad_documents_are_refused_with_path_and_reason(text, expected):
    problems = refusal(text)
    assert problems[0].startswith(expected), problems


def test_a_pool_outside_its_vm_subnet_says_which_bound():
    problems = refusal(
        "vmNetworks:\n  - name: T\n    logicalNetwork: L\n    subnets:\n      - name: Default\n"
        "        prefix: 192.168.0.0/24\n        ipPools: [{name: P, subnet: 192.168.0.0/24, rangeStart: 192.168.1.10, rangeEnd: 192.168.0.20}]\n"
    )
    assert problems[0].startswith("fabric.yaml: vmNetworks[0].subnets[0].ipPools[0].rangeStart: 192.168.1.10 is outside")


def test_a_pool_outside_its_owner_is_refused_before_any_write():
    document = load_fabric(
        "vmNetworks:\n  - name: T\n    logicalNetwork: L\n    subnets:\n      - name: Default\n"
        "        prefix: 192.168.0.0/24\n        ipPools: [{name: P, rangeStart: 192.168.1.10, rangeEnd: 192.168.1.20}]\n"
        "logicalNetworks:\n  - name: L\n    networkVirtualization: true\n    sites:\n      - name: S\n        hostGroups: [All Hosts]\n"
        "        subnetVlans: [{subnet: 10.80.2.0/24, vlan: 802}]\n"
        "        ipPools: [{name: PA, rangeStart: 10.80.2.20, rangeEnd: 10.80.3.250}]\n",
        "f.yaml",
    )
    assert sorted(check_references(document, {})) == [
        "f.yaml: logicalNetworks[0].sites[0].ipPools[0].rangeEnd: 10.80.3.250 is outside network site S (10.80.2.0/24)",
        "f.yaml: vmNetworks[0].subnets[0].ipPools[0].rangeStart: 192.168.1.10 is outside "
        "VM subnet T/Default (192.168.0.0/24)",
    ]


def test_isolation_must_fit_the_logical_network():
    document = seed()
    document.extend(
        load_fabric(
            "vmNetworks:\n"
            "  - {name: Wrong, logicalNetwork: Tenants, isolation: WindowsNetworkVirtualization}\n"
            "  - name: TenantC\n    logicalNetwork: Tenants\n    isolation: VLAN\n"
            "    subnets: [{name: Default, prefix: 172.16.102.0/24, vlan: 102}]\n",
            "more.yaml",
        )
    )
    assert check_references(document, {}) == [
        "more.yaml: vmNetworks[0].isolation: logical network Tenants does not allow network virtualisation "
        "(set its networkVirtualization, or choose isolation VLAN or NoIsolation)",
        "more.yaml: vmNetworks[1].subnets[0].vlan: 172.16.102.0/24 on VLAN 102 is not a subnet/VLAN of logical "
        "network Tenants (its sites offer: 172.16.100.0/24 VLAN 100, 172.16.101.0/24 VLAN 101)",
    ]


def test_anchors_in_extension_fields_template_hosts():
    document = load_fabric(
        "x-host: &host {cluster: VIRTUALCLUSTER, nics: [eth0, eth1], virtualSwitch: {logicalSwitch: Virtualization}}\n"
        "hosts:\n"
        "  - {<<: *host, name: A, managementAddress: 10.0.0.21/24}\n"
        "  - {<<: *host, name: B, managementAddress: 10.0.0.22/24, nics: [eth0]}\n",
        "f.yaml",
    )
    hosts = {item.key: item.spec for item in document.objects}
    assert hosts["A"].nics == ("eth0", "eth1") and hosts["B"].nics == ("eth0",)  # stated again: an override
    assert hosts["B"].virtual_switch.logical_switch == "Virtualization"


def test_every_problem_is_reported_not_only_the_first():
    problems = refusal("hostGroups: [{name: A, x: 1}, {name: B, y: 2}]")
    assert problems == ["fabric.yaml: hostGroups[0].x: unknown field", "fabric.yaml: hostGroups[1].y: unknown field"]
    assert "(and 1 more)" in str(FabricError(problems))


def test_nested_objects_may_not_contradict_their_parent():
    problems = refusal(
        "vmNetworks:\n  - name: T\n    logicalNetwork: L\n    subnets:\n"
        "      - {name: Default, vmNetwork: Other, prefix: 10.1.0.0/16}\n"
    )
    assert problems == ["fabric.yaml: vmNetworks[0].subnets[0].vmNetwork: 'Other' contradicts the enclosing 'T'"]


def test_references_may_point_at_live_objects():
    tenants = load_fabric((EXAMPLES / "seed-tenants.yaml").read_text(), "seed-tenants.yaml")
    fabric = seed()
    live = {item.kind: {} for item in fabric.objects}
    for item in fabric.objects:
        live[item.kind][item.key] = item.spec
    assert check_references(tenants, live) == []


def test_host_group_cycles_are_refused():
    document = load_fabric("hostGroups: [{name: A, parent: B}, {name: B, parent: A}]", "f.yaml")
    assert check_references(document, {})[0] == "f.yaml: hostGroups[0].parent: host group A would be its own ancestor"


def test_virtual_switch_nics_must_be_the_hosts():
    problems = refusal(
        "hosts: [{name: H, cluster: C, nics: [eth0, eth1], virtualSwitch: {logicalSwitch: S, nics: [eth2]}}]"
    )
    assert problems == ["fabric.yaml: hosts[0].virtualSwitch.nics[0]: eth2 is not a NIC of host H (eth0, eth1)"]


# --- the plan ---------------------------------------------------------------------------


def live_from(document: FabricDocument, **allocated) -> dict:
    """The JSON the controller would hold after applying the document, with allocations."""
    live: dict = {}
    for item in document.objects:
        body = item.spec.model_dump(mode="json")
        body.update(allocated.get(item.key, {}))
        live.setdefault(item.kind, {})[item.key] = body
    return live


def test_plan_creates_in_dependency_order():
    changes = plan_changes(seed(), {})
    order = [change.kind for change in changes]
    assert all(change.action == "create" for change in changes)
    first = {kind: order.index(kind) for kind in Kind}
    assert first[Kind.host_group] < first[Kind.cluster] < first[Kind.host] < first[Kind.vm]
    assert first[Kind.logical_network] < first[Kind.network_site] < first[Kind.uplink_port_profile]
    assert first[Kind.vm_network] < first[Kind.vm_subnet] < first[Kind.ip_pool] < first[Kind.vm]
    assert first[Kind.logical_switch] < first[Kind.host]


def test_host_groups_are_created_parents_first_whatever_the_document_order():
    document = load_fabric("hostGroups: [{name: Child, parent: Parent}, {name: Parent}]", "f.yaml")
    assert [c.key for c in plan_changes(document, {})] == ["Parent", "Child"]


def test_second_plan_is_empty_even_with_allocated_fields():
    document = seed()
    live = live_from(document, TenantVM01={"mac": "00:1d:d8:b7:1c:00", "ca": "192.168.0.10", "uuid": "u"})
    assert plan_changes(document, live) == []


def test_a_changed_field_is_one_update_naming_the_field():
    document = seed()
    live = live_from(document)
    live[Kind.logical_network]["Virtualization"]["encapsulation"] = "vxlan"
    live[Kind.logical_network]["Virtualization"]["mtu"] = 9000  # not stated: left alone
    live[Kind.network_site]["Tenants"]["subnet_vlans"].reverse()  # order carries no meaning
    (change,) = plan_changes(document, live)
    assert change.action == "update" and change.key == "Virtualization"
    assert change.describe() == "~ logical network Virtualization (encapsulation: vxlan -> nvgre)"


def test_unstated_fields_and_list_order_are_not_changes():
    document = load_fabric(
        "uplinkPortProfiles: [{name: U, networkSites: [B, A]}]\nhosts: [{name: H, cluster: C, nics: [eth0]}]",
        "f.yaml",
    )
    live = {
        Kind.uplink_port_profile: {"U": {"name": "U", "network_sites": ["A", "B"], "team_mode": "LACP"}},
        Kind.host: {"H": {"name": "H", "cluster": "C", "nics": ["eth0"], "host_group": "HostCluster"}},
    }
    assert plan_changes(document, live) == []


def test_virtual_switch_compares_the_stated_fields_only():
    document = load_fabric(
        "hosts: [{name: H, cluster: C, nics: [eth0, eth1], "
        "virtualSwitch: {logicalSwitch: S, managementAdapter: {vmNetwork: Management}}}]",
        "f.yaml",
    )
    switch = {
        "host": "H",
        "logical_switch": "S",
        "nics": ["eth0", "eth1"],
        "uplink_port_profile": "U",
        "management_adapter": {"name": "Management", "vm_network": "Management"},
    }
    live = {Kind.host: {"H": {"name": "H", "cluster": "C", "nics": ["eth1", "eth0"], "virtual_switch": switch}}}
    assert plan_changes(document, live) == []
    live[Kind.host]["H"]["virtual_switch"] = None
    (change,) = plan_changes(document, live)
    assert change.fields == ("virtual_switch",)


def test_prune_deletes_only_what_the_document_omits_dependants_first():
    document = load_fabric("hostGroups: [{name: Keep}]", "f.yaml")
    live = {
        Kind.host_group: {
            "All Hosts": {"name": "All Hosts", "parent": None},
            "Old": {"name": "Old", "parent": "All Hosts"},
            "Keep": {"name": "Keep", "parent": "All Hosts"},
            "OldChild": {"name": "OldChild", "parent": "Old"},
        },
        Kind.vm: {"VM1": {"name": "VM1"}},
        Kind.host: {"H1": {"name": "H1"}},
    }
    assert plan_changes(document, live) == []
    changes = plan_changes(document, live, prune=True)
    assert [c.describe() for c in changes] == ["- VM VM1", "- host H1", "- host group OldChild", "- host group Old"]
