"""The lab topology YAML: the seed default and refusals that name the field and the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from netns_lab.topology import (
    ClusterRole,
    TopologyError,
    load_topology,
    parse_topology,
    seed_topology_text,
)


def _seed() -> dict:
    return yaml.safe_load(seed_topology_text())


def _refusal(document: dict) -> list[str]:
    with pytest.raises(TopologyError) as caught:
        parse_topology(yaml.safe_dump(document), "lab.yaml")
    return caught.value.problems


def test_seed_is_the_walkthroughs_fabric():
    topology = load_topology()
    assert [c.name for c in topology.clusters] == ["MANAGEMENT", "HOSTCLUSTER", "VIRTUALCLUSTER", "GATEWAYCLUSTER"]
    assert [h.name for h in topology.hosts] == [*(f"CON-HyperV{i}" for i in range(1, 8)), "CON-GW1", "CON-GW2"]
    # host i gets 10.0.0.1i, gateway host i 10.0.0.2i, two NICs each
    assert [str(h.address) for h in topology.hosts] == [*(f"10.0.0.1{i}" for i in range(1, 8)),
                                                        "10.0.0.21", "10.0.0.22"]
    assert all(h.nics == ("eth0", "eth1") for h in topology.hosts)
    assert [h.name for h in topology.clusters_with_role(ClusterRole.virtualization)[0].hosts] == [
        "CON-HyperV6", "CON-HyperV7"]
    assert topology.switch.native_vlan == 1
    assert set(topology.switch.trunk_vlans) == {802, 100, 101, 30}
    assert topology.controller_url == "https://10.0.0.11:8080"
    assert topology.switch_port(topology.host("CON-HyperV6"), "eth1") == "h6-eth1"
    assert topology.namespaces[0] == "lab-switch"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["clusters"][2]["hosts"][0].update(address="10.9.0.16"),
         "clusters[2].hosts[0].address: 10.9.0.16 is outside the management subnet 10.0.0.0/24"),
        (lambda d: d["clusters"][2]["hosts"][1].update(address="10.0.0.16"),
         "clusters[2].hosts[1].address: 10.0.0.16 is already CON-HyperV6's"),
        (lambda d: d["clusters"][1]["hosts"][0].update(name="CON-HyperV1"),
         "clusters[1].hosts[0].name: CON-HyperV1 is already used by clusters[0].hosts[0].name"),
        (lambda d: d["switch"].update(trunk_vlans=[802, 4095]),
         "switch.trunk_vlans[1]: VLAN 4095 is outside 1..4094"),
        (lambda d: d["switch"].update(trunk_vlans=[1, 802]),
         "switch.trunk_vlans: VLAN 1 is the native VLAN"),
        (lambda d: d["switch"].update(trunk_vlans=[802, 802]),
         "switch.trunk_vlans: VLAN 802 is listed twice"),
        (lambda d: d["controller"].update(host="CON-HyperV9"),
         "controller.host: CON-HyperV9 is not a host of any cluster"),
        (lambda d: d["controller"].update(host="CON-HyperV6"),
         "controller.host: CON-HyperV6 is not in a cluster with role management"),
        (lambda d: d["controller"].update(port=70000),
         "controller.port: 70000 is out of range: input should be less than or equal to 65535"),
        (lambda d: d["clusters"][0].update(role="storage"),
         "clusters[0].role: 'storage': Input should be 'management', 'vlan', 'virtualization' or 'gateway'"),
        (lambda d: d["clusters"][0]["hosts"][0].update(nics=["eth0", "eth0"]),
         "clusters[0].hosts[0].nics: NIC eth0 is listed twice"),
        (lambda d: d["clusters"][0]["hosts"][0].update(nics=["a-very-long-nic"]),
         "clusters[0].hosts[0].nics[0]: switch port name h1-a-very-long-nic is over the kernel's 15 bytes"),
        (lambda d: d["clusters"][0]["hosts"][0].update(name="a/b"),
         "clusters[0].hosts[0].name: 'a/b' cannot name a network namespace"),
        (lambda d: d["clusters"][0]["hosts"][0].update(colour="red"),
         "clusters[0].hosts[0].colour: unknown field"),
        (lambda d: d["clusters"][1].update(hosts=[]),
         "clusters[1].hosts: cluster HOSTCLUSTER has no host"),
        (lambda d: d["management"].update(subnet="10.0.0.0/33"),
         "management.subnet: "),
        (lambda d: d["clusters"][2]["hosts"][0].update(address="10.0.0.255"),
         "clusters[2].hosts[0].address: 10.0.0.255 is not a host address of 10.0.0.0/24"),
    ],
)
def test_bad_field_is_refused_with_field_and_reason(edit, expected):
    document = _seed()
    edit(document)
    problems = _refusal(document)
    assert any(p.startswith(expected) for p in problems), problems


def test_missing_required_field_is_named():
    document = _seed()
    del document["controller"]
    assert _refusal(document) == ["controller: is required"]


def test_not_yaml_and_not_a_mapping_are_refused(tmp_path):
    with pytest.raises(TopologyError, match="not valid YAML"):
        parse_topology("clusters: [", "lab.yaml")
    with pytest.raises(TopologyError, match="top level must be a mapping"):
        parse_topology("- a\n- b\n", "lab.yaml")
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "absent.yaml")


def test_cli_exits_2_naming_the_field(tmp_path):
    document = _seed()
    document["clusters"][2]["hosts"][0]["address"] = "10.9.0.16"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    proc = subprocess.run([sys.executable, "-m", "netns_lab.cli", "graph", "--text", "--topology", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "clusters[2].hosts[0].address: 10.9.0.16 is outside the management subnet" in proc.stderr
