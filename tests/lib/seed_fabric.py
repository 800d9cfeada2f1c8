"""The seed walkthrough's fabric, built through the controller's REST API.

`build_seed_fabric(client)` makes, in the order the blog post does:
- host groups Virtualization and HostCluster under All Hosts, clusters VIRTUALCLUSTER
  and HOSTCLUSTER, hosts CON-HyperV3..7 with eth0/eth1 (management 10.0.0.1x/24);
- logical network Management (site 10.0.0.0/24, VLAN 0, on All Hosts) and its
  NoIsolation VM network; logical network Virtualization (network virtualisation, NVGRE)
  with site Virtualization 10.80.2.0/24 on VLAN 802 for host group Virtualization and
  the PA pool Default 10.80.2.20-10.80.2.250; the transport VM network Virtualization;
- logical network Tenants (site VLANs 100 and 101 on HostCluster) with VLAN VM networks
  TenantA (VLAN 100) and TenantB (VLAN 101) and their pools;
- uplink port profiles and logical switches Virtualization (both sites, NV,
  SwitchIndependent/HostDefault, Team) and HostCluster, set on each cluster's hosts
  with a management adapter on the Management VM network.

`add_tenants(client)` adds Fabrikam2 and Fabrikam3 (WindowsNetworkVirtualization,
IPv4/IPv4), each with VM subnet Default 192.168.0.0/24 (the same range on purpose) and a
CA pool 192.168.0.10-192.168.0.100 gateway 192.168.0.1, and TenantVM01..04, one per
host per VM network. `client` is anything with httpx.Client's post/put and a
base_url, authorised with the admin token; every call must succeed (raise_for_status).
"""

from __future__ import annotations

VIRTUAL_HOSTS = ("CON-HyperV6", "CON-HyperV7")
VLAN_HOSTS = ("CON-HyperV3", "CON-HyperV4")
MANAGEMENT_ADDRESS = {
    "CON-HyperV3": "10.0.0.13/24",
    "CON-HyperV4": "10.0.0.14/24",
    "CON-HyperV6": "10.0.0.16/24",
    "CON-HyperV7": "10.0.0.17/24",
}
TENANT_VMS = {  # VM: (VM network, host), one per host per network as in the seed
    "TenantVM01": ("Fabrikam2", "CON-HyperV6"),
    "TenantVM02": ("Fabrikam2", "CON-HyperV7"),
    "TenantVM03": ("Fabrikam3", "CON-HyperV6"),
    "TenantVM04": ("Fabrikam3", "CON-HyperV7"),
}


def _ok(response):
    if response.status_code >= 400:
        raise AssertionError(f"{response.request.method} {response.request.url}: {response.status_code} {response.text}")
    return response.json() if response.content else None


def post(client, collection: str, body: dict):
    return _ok(client.post(f"/v1/{collection}", json=body))


def build_seed_fabric(client) -> None:
    post(client, "host-groups", {"name": "Virtualization", "parent": "All Hosts"})
    post(client, "host-groups", {"name": "HostCluster"})
    post(client, "clusters", {"name": "VIRTUALCLUSTER", "host_group": "Virtualization"})
    post(client, "clusters", {"name": "HOSTCLUSTER", "host_group": "HostCluster"})
    for name in VLAN_HOSTS:
        post(client, "hosts", {"name": name, "cluster": "HOSTCLUSTER",
                               "management_address": MANAGEMENT_ADDRESS[name], "nics": ["eth0", "eth1"]})
    for name in VIRTUAL_HOSTS:
        post(client, "hosts", {"name": name, "cluster": "VIRTUALCLUSTER",
                               "management_address": MANAGEMENT_ADDRESS[name], "nics": ["eth0", "eth1"]})

    # Management: the native VLAN on every host.
    post(client, "logical-networks", {"name": "Management"})
    post(client, "network-sites", {"name": "Management", "logical_network": "Management",
                                   "host_groups": ["All Hosts"],
                                   "subnet_vlans": [{"subnet": "10.0.0.0/24", "vlan": 0}]})
    post(client, "vm-networks", {"name": "Management", "logical_network": "Management", "isolation": "NoIsolation"})

    # The network-virtualisation logical network and its transport site on VLAN 802.
    post(client, "logical-networks", {"name": "Virtualization", "network_virtualization": True,
                                      "encapsulation": "nvgre"})
    post(client, "network-sites", {"name": "Virtualization", "logical_network": "Virtualization",
                                   "host_groups": ["Virtualization"],
                                   "subnet_vlans": [{"subnet": "10.80.2.0/24", "vlan": 802}]})
    post(client, "uplink-port-profiles", {"name": "Virtualization",
                                          "network_sites": ["Management", "Virtualization"],
                                          "network_virtualization": True, "team_mode": "SwitchIndependent",
                                          "load_balancing": "HostDefault"})
    post(client, "logical-switches", {"name": "Virtualization", "uplink_mode": "Team",
                                      "uplink_port_profiles": ["Virtualization"]})
    post(client, "vm-networks", {"name": "Virtualization", "logical_network": "Virtualization",
                                 "isolation": "NoIsolation"})
    for name in VIRTUAL_HOSTS:
        _ok(client.put(f"/v1/hosts/{name}/virtual-switch",
                       json={"logical_switch": "Virtualization",
                             "management_adapter": {"name": "Management", "vm_network": "Management"}}))
    post(client, "ip-pools", {"name": "Default", "network_site": "Virtualization", "subnet": "10.80.2.0/24",
                              "range_start": "10.80.2.20", "range_end": "10.80.2.250"})

    # HOSTCLUSTER: VLAN-isolated tenants on VLANs 100 and 101.
    post(client, "logical-networks", {"name": "Tenants"})
    post(client, "network-sites", {"name": "Tenants", "logical_network": "Tenants", "host_groups": ["HostCluster"],
                                   "subnet_vlans": [{"subnet": "172.16.100.0/24", "vlan": 100},
                                                    {"subnet": "172.16.101.0/24", "vlan": 101}]})
    post(client, "uplink-port-profiles", {"name": "HostCluster", "network_sites": ["Management", "Tenants"]})
    post(client, "logical-switches", {"name": "HostCluster", "uplink_port_profiles": ["HostCluster"]})
    for name in VLAN_HOSTS:
        _ok(client.put(f"/v1/hosts/{name}/virtual-switch",
                       json={"logical_switch": "HostCluster", "management_adapter": {"vm_network": "Management"}}))
    for tenant, vlan in (("TenantA", 100), ("TenantB", 101)):
        post(client, "vm-networks", {"name": tenant, "logical_network": "Tenants", "isolation": "VLAN"})
        post(client, "vm-subnets", {"name": "Default", "vm_network": tenant, "prefix": f"172.16.{vlan}.0/24",
                                    "vlan": vlan})
        post(client, "ip-pools", {"name": "Default", "vm_network": tenant, "vm_subnet": "Default",
                                  "range_start": f"172.16.{vlan}.10", "range_end": f"172.16.{vlan}.100",
                                  "gateway": f"172.16.{vlan}.1"})


def add_tenant_network(client, name: str, prefix: str = "192.168.0.0/24") -> None:
    """A network-virtualised VM network with VM subnet Default and its CA pool (.10-.100, gw .1)."""
    base = prefix.rsplit(".", 1)[0]
    post(client, "vm-networks", {"name": name, "logical_network": "Virtualization",
                                 "isolation": "WindowsNetworkVirtualization", "ca_family": "IPv4",
                                 "pa_family": "IPv4"})
    post(client, "vm-subnets", {"name": "Default", "vm_network": name, "prefix": prefix})
    post(client, "ip-pools", {"name": "Default", "vm_network": name, "vm_subnet": "Default",
                              "range_start": f"{base}.10", "range_end": f"{base}.100", "gateway": f"{base}.1"})


def add_tenants(client) -> None:
    add_tenant_network(client, "Fabrikam2")
    add_tenant_network(client, "Fabrikam3")
    for vm, (network, host) in TENANT_VMS.items():
        post(client, "vms", {"name": vm, "vm_network": network, "host": host})
    post(client, "vms", {"name": "TenantVMA1", "vm_network": "TenantA", "host": "CON-HyperV3"})
    post(client, "vms", {"name": "TenantVMB1", "vm_network": "TenantB", "host": "CON-HyperV4"})
