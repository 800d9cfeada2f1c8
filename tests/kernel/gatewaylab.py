"""The gateway's kernel-tier topology: the agent lab (tests/kernel/agentlab.py) plus a
gateway host and an external host, and the HostState documents with a gateway.

    gateway host G: two NICs on trunk ports of the switch carrying the provider VLAN 802
    and the front-end VLAN 30 tagged; its PAs 10.80.2.30 (Fabrikam2), 10.80.2.31
    (Fabrikam3); no VM
    external host: one NIC on an access port of VLAN 30, 203.0.113.1/24 (the front-end's
    upstream router, and the "Internet" the tenants reach)

Both tenants leave through NAT: Fabrikam2 as 203.0.113.10, Fabrikam3 as 203.0.113.11,
and TCP 80 of each address is forwarded to 192.168.0.11:8080 of that tenant (the same CA
in both, on purpose). Both back-end ports are 192.168.0.12 (again the same CA). Every
host's VM networks get the customer route 0.0.0.0/0 via the back-end, and Fabrikam2
also 10.99.0.0/16 via its VM 192.168.0.11 (a next hop other than the gateway).

The tests' TCP service and client are netns_lab.tcp's (the lab demo uses them too).
Pure builders and helpers; no assertions here.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.kernel.agentlab import F2_VSID, F3_VSID, PROVIDER_VLAN, AgentLab

FRONT_VLAN = 30
FRONT_SUBNET = "203.0.113.0/24"
UPSTREAM = "203.0.113.1"
NAT_ADDRESS = {"Fabrikam2": "203.0.113.10", "Fabrikam3": "203.0.113.11"}
GATEWAY_PA = {"Fabrikam2": "10.80.2.30", "Fabrikam3": "10.80.2.31"}
BACK_END = "192.168.0.12"
BACK_END_VSID = {"Fabrikam2": F2_VSID, "Fabrikam3": F3_VSID}
BACK_END_MAC = {"Fabrikam2": "00:1d:d8:b7:1c:f2", "Fabrikam3": "00:1d:d8:b7:1c:f3"}
SERVICE_PORT = 8080  # the tenant VMs' service, behind the NAT rules' port 80
CUSTOMER_PREFIX = "10.99.0.0/16"  # Fabrikam2's customer route via its VM 192.168.0.11
FORWARDED_PREFIX = "10.30.0.0/24"  # Fabrikam3's second subnet, when its leg is forwarding


def customer_routes(network: str) -> list[dict[str, str]]:
    routes = [{"prefix": "0.0.0.0/0", "next_hop": BACK_END}]
    if network == "Fabrikam2":
        routes.append({"prefix": CUSTOMER_PREFIX, "next_hop": "192.168.0.11"})
    return routes


def with_gateway(document: dict[str, Any]) -> dict[str, Any]:
    """A host's document with the gateway's customer routes and GatewayWildcard records
    (on the gateway host's PA), as the controller compiles them."""
    doc = copy.deepcopy(document)
    for rd in doc["routing_domains"]:
        rd["routes"] = customer_routes(rd["name"])
    for network, vsid in BACK_END_VSID.items():
        doc["records"].append({"vsid": vsid, "ca": BACK_END, "mac": BACK_END_MAC[network],
                               "pa": GATEWAY_PA[network], "type": "GatewayWildcard"})
    return doc


def leg(network: str, connectivity: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "routing_domain": network, "connectivity": connectivity,
        "back_end": {"vsid": BACK_END_VSID[network], "address": f"{BACK_END}/24",
                     "mac": BACK_END_MAC[network]},
        "address": f"{NAT_ADDRESS[network]}/24",
    }
    if connectivity == "nat":
        doc["dnat"] = [{"protocol": "tcp", "external_port": 80, "address": "192.168.0.11",
                        "port": SERVICE_PORT, "name": f"{network}_Web"}]
    else:
        doc["forwarded"] = [FORWARDED_PREFIX] if network == "Fabrikam3" else []
    return doc


def gateway_host_state(lab: AgentLab, generation: int, *, gateway: bool = True, active: bool = True,
                       fabrikam3: str = "nat") -> dict[str, Any]:
    """The gateway host's document: the VM networks' VRFs and bridges (no port), its
    PAs, and (with `gateway`) the gateway role with one leg per VM network."""
    doc = lab.state("a", generation=generation)
    doc.update(host="CON-GW1", ports=[], vlan_networks=[],
               management={"address": "10.0.0.13/24"})
    doc["provider"]["addresses"] = [{"routing_domain": rd, "address": pa} for rd, pa in GATEWAY_PA.items()]
    if not gateway:
        return doc
    doc = with_gateway(doc)
    doc["gateway"] = {
        "service": "Gateway", "active": active,
        "front_end": {"logical_network": "External", "vlan": FRONT_VLAN, "subnet": FRONT_SUBNET,
                      "gateway": UPSTREAM},
        "legs": [leg("Fabrikam2", "nat"), leg("Fabrikam3", fabrikam3)],
    }
    return doc


def build_gateway_lab(lab: AgentLab) -> AgentLab:
    """Adds the gateway host "g" and the external host (lab.external) to a built lab."""
    lab.add_host("g", "10.0.0.13", (PROVIDER_VLAN, FRONT_VLAN))
    external = lab.external = lab.factory.create("ext")
    sw = lab.switch
    sw.ip("link", "add", "x0", "type", "veth", "peer", "name", "eth0", "netns", external.name)
    sw.ip("link", "set", "x0", "master", "sw")
    # An access port of the front-end VLAN: untagged, and nothing else.
    sw.run("bridge", "vlan", "add", "dev", "x0", "vid", str(FRONT_VLAN), "pvid", "untagged")
    sw.run("bridge", "vlan", "del", "dev", "x0", "vid", "1")
    sw.ip("link", "set", "x0", "up")
    external.ip("addr", "add", f"{UPSTREAM}/24", "dev", "eth0")
    external.ip("link", "set", "eth0", "up")
    return lab
