"""The fabric document: loading, refusals naming path and reason, the plan.

Pure: no controller. The live fabric is given as the JSON the controller would send.
Rules across objects (references, isolation, pools) are the fabric's: they are tested
through `POST /v1/fabric/apply` (test_fabric_apply.py, test_hnvctl.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.fabric_document import (
    DocumentError,
    FabricDocument,
    YamlError,
    load_yaml,
    plan_changes,
    read_document,
)
from controller.models import Kind

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_fabric(text: str) -> FabricDocument:
    return read_document(load_yaml(text))


def seed() -> FabricDocument:
    fabric = load_yaml((EXAMPLES / "seed-fabric.yaml").read_text())
    tenants = load_yaml((EXAMPLES / "seed-tenants.yaml").read_text())
    return read_document({section: fabric.get(section, []) + tenants.get(section, [])
                          for section in {**fabric, **tenants} if not section.startswith("x-")})


def refusal(text: str) -> list[str]:
    try:
        raw = load_yaml(text)
    except YamlError as exc:
        return [str(exc)]
    with pytest.raises(DocumentError) as caught:
        read_document(raw)
    return caught.value.lines


def test_seed_documents_load_with_their_nested_objects():
    document = seed()
    keys = {(item.kind, item.key) for item in document.objects}
    assert (Kind.vm_subnet, "Fabrikam2/Default") in keys
    assert (Kind.vm_subnet, "Fabrikam3/Default") in keys
    assert (Kind.ip_pool, "Virtualization/Default") in keys
    assert (Kind.ip_pool, "Fabrikam3/Default/Default") in keys
    assert len(document.of_kind(Kind.host)) == 7
    site = next(i.spec for i in document.of_kind(Kind.network_site) if i.key == "Virtualization")
    assert [(str(sv.subnet), sv.vlan) for sv in site.subnet_vlans] == [("10.80.2.0/24", 802)]


def test_prefix_with_host_bits_names_the_path():
    problems = refusal(
        "vmNetworks:\n"
        "  - name: A\n    logicalNetwork: V\n"
        "  - name: B\n    logicalNetwork: V\n"
        "  - name: C\n    logicalNetwork: V\n    subnets:\n      - {name: Default, prefix: 192.168.0.5/24}\n"
    )
    assert problems == [
        "vmNetworks[2].subnets[0].prefix: 192.168.0.5/24 has host bits set "
        "(the prefix is 192.168.0.0/24)"
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hostGroups: [{name: G, colour: red}]", "hostGroups[0].colour: unknown field"),
        ("tenants: []", "tenants: unknown section"),
        (
            "logicalNetworks:\n  - name: L\n    networkVirtualization: true\n    sites:\n      - name: S\n        hostGroups: [All Hosts]\n"
            "        subnetVlans: [{subnet: 10.80.2.0/24, vlan: 5000}]\n",
            "logicalNetworks[0].sites[0].subnetVlans[0].vlan: 5000 is out of range",
        ),
        (
            "vmNetworks:\n  - name: T\n    logicalNetwork: L\n    isolation: VLAN\n"
            "    subnets: [{name: Default, prefix: 172.16.0.0/24, vlan: 0}]\n",
            "vmNetworks[0].subnets[0].vlan: 0 is out of range",
        ),
        ("vms: [{name: V, vmNetwork: N, mac: 'ff:ff:ff:ff:ff:ff'}]", "vms[0].mac: MAC address ff:ff:ff:ff:ff:ff is multicast"),
        ("hosts:\n  - {name: H, nics: [eth0]}\n  - {name: H, nics: [eth1]}\n", "hosts[1].name: host H is already defined at hosts[0]"),
        ("hostGroups:\n  - name: G\n    name: H\n", "line 3, column 5: key 'name' is given twice"),
        ("hostGroups: [{name: G\n", "line 2, column 1:"),
        ("- just a list", "the document must be a mapping"),
        ("hostGroups: [{name: All Hosts}]", "hostGroups[0].name: All Hosts is the root host group"),
        ("logicalNetworks: [{name: L, encapsulation: ipip}]", "logicalNetworks[0].encapsulation: 'ipip': Input should be"),
    ],
)
def test_bad_documents_are_refused_with_path_and_reason(text, expected):
    problems = refusal(text)
    assert problems[0].startswith(expected), problems


def test_anchors_in_extension_fields_template_hosts():
    document = load_fabric(
        "x-host: &host {cluster: VIRTUALCLUSTER, nics: [eth0, eth1], virtualSwitch: {logicalSwitch: Virtualization}}\n"
        "hosts:\n"
        "  - {<<: *host, name: A, managementAddress: 10.0.0.21/24}\n"
        "  - {<<: *host, name: B, managementAddress: 10.0.0.22/24, nics: [eth0]}\n"
    )
    hosts = {item.key: item.spec for item in document.objects}
    assert hosts["A"].nics == ("eth0", "eth1") and hosts["B"].nics == ("eth0",)  # stated again: an override
    assert hosts["B"].virtual_switch.logical_switch == "Virtualization"


def test_every_problem_is_reported_not_only_the_first():
    problems = refusal("hostGroups: [{name: A, x: 1}, {name: B, y: 2}]")
    assert problems == ["hostGroups[0].x: unknown field", "hostGroups[1].y: unknown field"]
    with pytest.raises(DocumentError, match=r"\(and 1 more\)"):
        read_document({"hostGroups": [{"name": "A", "x": 1}, {"name": "B", "y": 2}]})


def test_nested_objects_may_not_contradict_their_parent():
    problems = refusal(
        "vmNetworks:\n  - name: T\n    logicalNetwork: L\n    subnets:\n"
        "      - {name: Default, vmNetwork: Other, prefix: 10.1.0.0/16}\n"
    )
    assert problems == ["vmNetworks[0].subnets[0].vmNetwork: 'Other' contradicts the enclosing 'T'"]


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
    first = {kind: order.index(kind) for kind in Kind if kind in order}  # the seed has no gateway
    assert first[Kind.host_group] < first[Kind.cluster] < first[Kind.host] < first[Kind.vm]
    assert first[Kind.logical_network] < first[Kind.network_site] < first[Kind.uplink_port_profile]
    assert first[Kind.vm_network] < first[Kind.vm_subnet] < first[Kind.ip_pool] < first[Kind.vm]
    assert first[Kind.logical_switch] < first[Kind.host]


def test_host_groups_are_created_parents_first_whatever_the_document_order():
    document = load_fabric("hostGroups: [{name: Child, parent: Parent}, {name: Parent}]")
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
        "uplinkPortProfiles: [{name: U, networkSites: [B, A]}]\nhosts: [{name: H, cluster: C, nics: [eth0]}]"
    )
    live = {
        Kind.uplink_port_profile: {"U": {"name": "U", "network_sites": ["A", "B"], "team_mode": "LACP"}},
        Kind.host: {"H": {"name": "H", "cluster": "C", "nics": ["eth0"], "host_group": "HostCluster"}},
    }
    assert plan_changes(document, live) == []


def test_virtual_switch_compares_the_stated_fields_only():
    document = load_fabric(
        "hosts: [{name: H, cluster: C, nics: [eth0, eth1], "
        "virtualSwitch: {logicalSwitch: S, managementAdapter: {vmNetwork: Management}}}]"
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
    document = load_fabric("hostGroups: [{name: Keep}]")
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
