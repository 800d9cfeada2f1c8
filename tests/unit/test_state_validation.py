"""agent.state refusals: each rule of the module docstring, as field path + reason."""

from __future__ import annotations

import copy
import json

import pytest

from agent.state import StateError, parse_host_state

BASE = {
    "host": "CON-HyperV6",
    "generation": 3,
    "team": {"members": ["eth0", "eth1"]},
    "switch": {"logical_switch": "Virtualization"},
    "management": {"address": "10.0.0.16/24", "gateway": "10.0.0.1"},
    "provider": {
        "logical_network": "Virtualization", "vlan": 802, "subnet": "10.80.2.0/24",
        "addresses": [{"routing_domain": "Fabrikam2", "address": "10.80.2.20"}],
    },
    "vlan_networks": [{"name": "Tenant100", "vlan": 100}],
    "routing_domains": [{"id": 1, "name": "Fabrikam2", "subnets": [
        {"vsid": 3535905, "prefix": "192.168.0.0/24", "gateway": "192.168.0.1"}]}],
    "ports": [{"name": "TenantVM01", "mac": "00-15-5D-01-02-03", "vsid": 3535905, "ca": "192.168.0.10/24"}],
    "records": [
        {"vsid": 3535905, "ca": "192.168.0.10", "mac": "00:15:5d:01:02:03", "pa": "10.80.2.20"},
        {"vsid": 3535905, "ca": "192.168.0.11", "mac": "00:15:5d:01:02:04", "pa": "10.80.2.21"},
    ],
}


def refusal(mutate) -> list[str]:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(StateError) as caught:
        parse_host_state(json.dumps(doc))
    return caught.value.problems


def test_base_document_is_accepted_and_normalised():
    state = parse_host_state(json.dumps(BASE))
    assert state.ports[0].mac == "00:15:5d:01:02:03"
    assert state.provider.address_for("Fabrikam2").compressed == "10.80.2.20"


def _set(path, value):
    def mutate(doc):
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return mutate


@pytest.mark.parametrize("path, value, expected", [
    (("routing_domains", 0, "subnets", 0, "vsid"), 4095, "routing_domains[0].subnets[0].vsid: VSID 4095 is outside 4096..16777214"),
    (("routing_domains", 0, "subnets", 0, "vsid"), 0xFFFFFF, "VSID 16777215 is outside"),
    (("records", 1, "vsid"), 12, "records[1].vsid: VSID 12 is outside"),
    (("provider", "vlan"), 4095, "provider.vlan: VLAN 4095 is outside 1..4094"),
    (("vlan_networks", 0, "vlan"), 0, "vlan_networks[0].vlan: VLAN 0 is outside 1..4094"),
    (("ports", 0, "mac"), "01:00:5e:00:00:01", "ports[0].mac: MAC address 01:00:5e:00:00:01 is multicast"),
    (("records", 0, "mac"), "00:15:5d:01:02", "records[0].mac: '00:15:5d:01:02' is not a MAC address"),
    (("records", 0, "mac"), "00:00:00:00:00:00", "records[0].mac: MAC address 00:00:00:00:00:00 is not a usable unicast"),
    (("ports", 0, "ca"), "192.168.1.10/24", "ports[0].ca: 192.168.1.10/24 is outside the prefix 192.168.0.0/24 of VSID 3535905"),
    (("records", 1, "ca"), "10.9.9.9", "records[1].ca: lookup record 10.9.9.9 in VSID 3535905 is outside the prefix 192.168.0.0/24"),
    (("records", 1, "pa"), "10.80.3.5", "records[1].pa: lookup record 192.168.0.11 in VSID 3535905: provider address 10.80.3.5 is not in the provider subnet 10.80.2.0/24"),
    (("provider", "addresses", 0, "address"), "10.80.9.20", "provider.addresses[0].address: provider address 10.80.9.20 is outside the provider subnet"),
    (("records", 1, "ca"), "192.168.0.10", "records[1].ca: (VSID, CA) (3535905, 192.168.0.10) has two lookup records"),
    (("records", 1, "mac"), "00:15:5d:01:02:03", "records[1].mac: (VSID, MAC) (3535905, 00:15:5d:01:02:03) has two lookup records"),
    (("switch", "name"), "openhnv-switch-01", "switch.name: interface name 'openhnv-switch-01' is 17 bytes, over the kernel's 15"),
    (("team", "members"), ["eth0", "a-very-long-nic-name"], "team.members[1]: interface name"),
    (("routing_domains", 0, "subnets", 0, "mtu"), 1459, "routing_domains[0].subnets[0].mtu: tenant MTU 1459 does not fit the provider MTU 1500 after nvgre encapsulation (42 bytes); at most 1458"),
])
def test_refusal_names_field_and_reason(path, value, expected):
    problems = refusal(_set(path, value))
    assert any(expected in p for p in problems), problems


def test_tenant_mtu_limit_is_tighter_for_vxlan():
    def vxlan_1458(doc):
        doc["provider"]["encapsulation"] = "vxlan"
        doc["routing_domains"][0]["subnets"][0]["mtu"] = 1458
    problems = refusal(vxlan_1458)
    assert any("at most 1450" in p for p in problems), problems


def test_exactly_the_limit_is_accepted():
    doc = copy.deepcopy(BASE)
    doc["routing_domains"][0]["subnets"][0]["mtu"] = 1458
    assert parse_host_state(json.dumps(doc)).routing_domains[0].subnets[0].mtu == 1458


def test_unknown_field_is_refused():
    problems = refusal(lambda doc: doc["provider"].update(encap="gre"))
    assert any(p.startswith("provider.encap:") for p in problems), problems


def test_malformed_json_is_refused():
    with pytest.raises(StateError):
        parse_host_state("{not json")
