"""HostState documents for tests: one Fabrikam2-style VM network per host, as plain JSON.

Documents are dicts (what the controller sends on the wire), so tests can also break them
on purpose. Addresses follow the lab plan: transport 10.80.2.0/24 on VLAN 802, tenant
192.168.0.0/24 with gateway .1.
"""

from __future__ import annotations

import copy
from typing import Any

VSID = 3535905
PROVIDER_SUBNET = "10.80.2.0/24"
TENANT_PREFIX = "192.168.0.0/24"


def host_state(
    host: str,
    generation: int,
    *,
    pa: str = "10.80.2.20",
    vm: str = "TenantVM01",
    ca: str = "192.168.0.10",
    mac: str = "00:15:5d:00:00:01",
    peers: tuple[tuple[str, str, str, str], ...] = (),
    members: tuple[str, ...] = ("eth1",),
    vsid: int = VSID,
    netns: str | None = None,
) -> dict[str, Any]:
    """A valid document: team, switch, provider PA, one VM subnet, one VM port, records.

    ``peers`` are (vm name, CA, MAC, PA) of VMs on other hosts of the same VM subnet;
    ``netns`` is the namespace of the local VM (default: its name).
    """
    port = {"name": vm, "mac": mac, "vsid": vsid, "ca": f"{ca}/24"}
    if netns is not None:
        port["netns"] = netns
    records = [
        {"vsid": vsid, "ca": ca, "mac": mac, "pa": pa, "type": "Static", "vm_name": vm},
        *(
            {"vsid": vsid, "ca": p_ca, "mac": p_mac, "pa": p_pa, "type": "Static", "vm_name": p_vm}
            for p_vm, p_ca, p_mac, p_pa in peers
        ),
    ]
    return {
        "host": host,
        "generation": generation,
        "team": {"name": "hnv-team", "members": list(members), "mode": "SwitchIndependent"},
        "switch": {"name": "hnv-sw", "logical_switch": "Virtualization"},
        "provider": {
            "logical_network": "Virtualization",
            "vlan": 802,
            "subnet": PROVIDER_SUBNET,
            "addresses": [{"routing_domain": "Fabrikam2", "address": pa}],
        },
        "routing_domains": [
            {
                "id": 1,
                "name": "Fabrikam2",
                "subnets": [{"name": "Default", "vsid": vsid, "prefix": TENANT_PREFIX, "gateway": "192.168.0.1"}],
            }
        ],
        "ports": [port],
        "records": records,
    }


IPV6_TENANT_PREFIX, IPV6_GATEWAY, IPV6_CA = "fd00:1::/64", "fd00:1::1", "fd00:1::10"


def ipv6_host_state(host: str, generation: int, *, mac: str = "00:15:5d:00:00:01",
                    **subnet_fields: Any) -> dict[str, Any]:
    """`host_state` with an IPv6 VM subnet (IPV6_TENANT_PREFIX, its gateway IPV6_GATEWAY)
    and the local VM (``mac``) at IPV6_CA; ``subnet_fields`` are set on the subnet too."""
    doc = host_state(host, generation, mac=mac)
    doc["routing_domains"][0]["subnets"][0].update(prefix=IPV6_TENANT_PREFIX, gateway=IPV6_GATEWAY,
                                                   **subnet_fields)
    doc["ports"][0]["ca"] = f"{IPV6_CA}/64"
    doc["records"][0]["ca"] = IPV6_CA
    return doc


def with_bad_record_ca(document: dict[str, Any], generation: int) -> dict[str, Any]:
    """A newer generation whose first lookup record's CA lies outside the VM subnet."""
    bad = copy.deepcopy(document)
    bad["generation"] = generation
    bad["records"][0]["ca"] = "172.16.0.9"
    return bad
