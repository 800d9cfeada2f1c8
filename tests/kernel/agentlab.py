"""The agent's kernel-tier topology and its hand-written HostState documents.

Owns a small physical lab, built with plain ``ip``/``bridge`` commands (the agent is
what is under test, so the "physical" side must not use it):

    switch namespace: bridge ``sw`` with VLAN filtering; every host port is a trunk
    (VLAN 1 native/untagged = management 10.0.0.0/24, 802 provider, 100 and 101 tagged)
    host namespaces A, B: two NICs each (eth0, eth1, veth to the switch); the
    management address starts on eth0, as on a freshly racked host
    VM namespaces: made empty here (so the test fixture removes them); the agent, as
    hypervisor, builds each VM's eth0

and the HostState documents the tests feed the agent: the seed's tenants Fabrikam2
(VM subnets 192.168.0.0/24 and 192.168.1.0/24) and Fabrikam3 (192.168.0.0/24 again,
overlapping on purpose, and 10.30.0.0/24), plus HOSTCLUSTER-style VLAN networks 100 and
101. Pure data builders + a topology class; no assertions here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from tests.lib.netns import Namespace, NamespaceFactory

PROVIDER_VLAN = 802
PROVIDER_SUBNET = "10.80.2.0/24"
F2_VSID, F2B_VSID, F3_VSID, F3B_VSID = 5001, 5002, 6001, 6002
HOSTS = ("a", "b")
MANAGEMENT = {"a": "10.0.0.11", "b": "10.0.0.12"}
PA = {("a", "Fabrikam2"): "10.80.2.20", ("b", "Fabrikam2"): "10.80.2.21",
      ("a", "Fabrikam3"): "10.80.2.22", ("b", "Fabrikam3"): "10.80.2.23"}


@dataclass(frozen=True)
class Vm:
    name: str
    host: str
    mac: str
    ca: str  # with prefix length
    vsid: int | None = None
    vlan: int | None = None
    network: str = ""  # routing domain name, for the PA of its records


# One VM per host per network, as in the seed; the same CA in Fabrikam2 and Fabrikam3.
VMS = (
    Vm("vmA2", "a", "00:15:5d:00:02:0a", "192.168.0.10/24", F2_VSID, network="Fabrikam2"),
    Vm("vmB2", "b", "00:15:5d:00:02:0b", "192.168.0.11/24", F2_VSID, network="Fabrikam2"),
    Vm("vmB2s", "b", "00:15:5d:00:02:1b", "192.168.1.11/24", F2B_VSID, network="Fabrikam2"),
    Vm("vmA3", "a", "00:15:5d:00:03:0a", "192.168.0.10/24", F3_VSID, network="Fabrikam3"),
    Vm("vmB3", "b", "00:15:5d:00:03:0b", "192.168.0.11/24", F3_VSID, network="Fabrikam3"),
    Vm("vmB3s", "b", "00:15:5d:00:03:1b", "10.30.0.11/24", F3B_VSID, network="Fabrikam3"),
    Vm("vmA100", "a", "00:15:5d:01:00:0a", "10.100.0.10/24", vlan=100),
    Vm("vmB100", "b", "00:15:5d:01:00:0b", "10.100.0.20/24", vlan=100),
    Vm("vmA101", "a", "00:15:5d:01:01:0a", "10.100.0.11/24", vlan=101),
)
GATEWAY_MAC = {F2_VSID: "00:15:5d:ff:50:01", F2B_VSID: "00:15:5d:ff:50:02",
               F3_VSID: "00:15:5d:ff:60:01", F3B_VSID: "00:15:5d:ff:60:02"}


def routing_domains() -> list[dict[str, Any]]:
    return [
        {"id": 2, "name": "Fabrikam2", "subnets": [
            {"vsid": F2_VSID, "prefix": "192.168.0.0/24", "gateway": "192.168.0.1"},
            {"name": "Second", "vsid": F2B_VSID, "prefix": "192.168.1.0/24", "gateway": "192.168.1.1"},
        ]},
        {"id": 3, "name": "Fabrikam3", "subnets": [
            {"vsid": F3_VSID, "prefix": "192.168.0.0/24", "gateway": "192.168.0.1"},
            {"name": "Second", "vsid": F3B_VSID, "prefix": "10.30.0.0/24", "gateway": "10.30.0.1"},
        ]},
    ]


def host_state(host: str, vm_netns: dict[str, str], generation: int = 1,
               encapsulation: str = "nvgre") -> dict[str, Any]:
    """The HostState document (a dict, as JSON decodes it) for host "a" or "b"."""
    records = []
    for vm in VMS:
        if vm.vsid is None:
            continue
        records.append({"vsid": vm.vsid, "ca": vm.ca.split("/")[0], "mac": vm.mac,
                        "pa": PA[(vm.host, vm.network)], "vm_name": vm.name})
    for vsid, mac in GATEWAY_MAC.items():
        gateway = {F2_VSID: "192.168.0.1", F2B_VSID: "192.168.1.1",
                   F3_VSID: "192.168.0.1", F3B_VSID: "10.30.0.1"}[vsid]
        records.append({"vsid": vsid, "ca": gateway, "mac": mac, "pa": "10.80.2.1", "type": "Gateway"})
    ports = []
    for vm in VMS:
        if vm.host != host:
            continue
        port = {"name": vm.name, "mac": vm.mac, "ca": vm.ca, "netns": vm_netns[vm.name]}
        port.update({"vsid": vm.vsid} if vm.vsid is not None else {"vlan": vm.vlan})
        ports.append(port)
    return {
        "host": f"CON-HyperV-{host.upper()}",
        "generation": generation,
        "team": {"members": ["eth0", "eth1"], "mode": "SwitchIndependent"},
        "switch": {"logical_switch": "Virtualization"},
        "management": {"address": f"{MANAGEMENT[host]}/24"},
        "provider": {
            "logical_network": "Virtualization", "vlan": PROVIDER_VLAN, "subnet": PROVIDER_SUBNET,
            "encapsulation": encapsulation,
            "addresses": [{"routing_domain": rd, "address": PA[(host, rd)]}
                          for rd in ("Fabrikam2", "Fabrikam3")],
        },
        "vlan_networks": [{"name": "Tenant100", "vlan": 100}, {"name": "Tenant101", "vlan": 101}],
        "routing_domains": routing_domains(),
        "ports": ports,
        "records": records,
    }


def without_record(document: dict[str, Any], vm_name: str) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    doc["records"] = [r for r in doc["records"] if r.get("vm_name") != vm_name]
    doc["generation"] += 1
    return doc


@dataclass
class AgentLab:
    """The physical lab: a switch, two hosts with two NICs each, empty VM namespaces."""

    factory: NamespaceFactory
    switch: Namespace = field(init=False)
    hosts: dict[str, Namespace] = field(default_factory=dict)
    vms: dict[str, Namespace] = field(default_factory=dict)

    def build(self) -> AgentLab:
        self.switch = self.factory.create("sw")
        sw = self.switch
        sw.ip("link", "add", "sw", "type", "bridge", "vlan_filtering", "1")
        sw.ip("addr", "add", "10.0.0.1/24", "dev", "sw")
        sw.ip("link", "set", "sw", "up")
        for host in HOSTS:
            self.add_host(host, MANAGEMENT[host], (PROVIDER_VLAN, 100, 101))
        for vm in VMS:
            self.vms[vm.name] = self.factory.create(vm.name.lower())
        return self

    def add_host(self, host: str, management: str, vlans: tuple[int, ...]) -> Namespace:
        """A host namespace with two NICs on trunk ports of the switch carrying `vlans`
        tagged (and the management VLAN 1 native)."""
        sw = self.switch
        ns = self.hosts[host] = self.factory.create(f"h{host}")
        for nic in (0, 1):
            port = f"{host}{nic}"
            sw.ip("link", "add", port, "type", "veth", "peer", "name", f"eth{nic}", "netns", ns.name)
            sw.ip("link", "set", port, "master", "sw")
            for vid in vlans:
                sw.run("bridge", "vlan", "add", "dev", port, "vid", str(vid))
            sw.ip("link", "set", port, "up")
            ns.ip("link", "set", f"eth{nic}", "up")
        # A freshly racked host: its management address on its first NIC.
        ns.ip("addr", "add", f"{management}/24", "dev", "eth0")
        return ns

    @property
    def vm_netns(self) -> dict[str, str]:
        return {name: ns.name for name, ns in self.vms.items()}

    def state(self, host: str, **kwargs: Any) -> dict[str, Any]:
        return host_state(host, self.vm_netns, **kwargs)
