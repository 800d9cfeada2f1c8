"""The Vagrant lab's fabric: the seed's fabric and tenants, resized to the VMs booted.

The Vagrantfile boots a management node and HNV_HOSTCLUSTER_COUNT / HNV_VIRTUALCLUSTER_COUNT
hosts; examples/seed-fabric.yaml and examples/seed-tenants.yaml describe the seed's seven
hosts and four tenant VMs. This script keeps everything of the seed (logical networks,
sites, pools, port profiles, logical switches, VM networks) and replaces only:

- ``hosts``: the hosts Vagrant made, each with its cluster's virtual switch as the seed
  gives it, its management address and its two trunk NICs (``trunk0``, ``trunk1``: the
  provisioning names them by MAC);
- ``vms``: one VM per network-virtualised VM network on each VIRTUALCLUSTER host,
  numbered TenantVM01.. in the seed's order (with two hosts: exactly the seed's four).

Plain data in, YAML out: it never talks to the controller (hnvctl apply does).

    python vagrant/lab_fabric.py fabric  --hosts CON-HyperV1=MANAGEMENT=10.0.0.11,...
    python vagrant/lab_fabric.py tenants --hosts ...
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

CHECKOUT = Path(__file__).resolve().parent.parent
SEED_FABRIC = CHECKOUT / "examples" / "seed-fabric.yaml"
SEED_TENANTS = CHECKOUT / "examples" / "seed-tenants.yaml"
TRUNK_NICS = ("trunk0", "trunk1")
VIRTUALIZATION_CLUSTER = "VIRTUALCLUSTER"


class HostTableError(ValueError):
    """A malformed --hosts table; the message names the entry and the reason."""


def parse_host_table(text: str) -> list[dict[str, str]]:
    """``name=cluster=address,...`` (as the Vagrantfile passes it) -> host dicts."""
    hosts = []
    for i, entry in enumerate(filter(None, (e.strip() for e in text.split(",")))):
        parts = entry.split("=")
        if len(parts) != 3 or not all(parts):
            raise HostTableError(f"hosts[{i}]: {entry!r} is not name=cluster=address")
        name, cluster, address = parts
        hosts.append({"name": name, "cluster": cluster, "address": address})
    names = [h["name"] for h in hosts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise HostTableError(f"hosts: {twice[0]} is listed twice")
    if not hosts:
        raise HostTableError("hosts: the table is empty")
    return hosts


def lab_fabric(seed: dict, hosts: list[dict[str, str]], prefix_length: int = 24) -> dict:
    """The seed fabric with ``hosts`` replaced by the Vagrant lab's hosts."""
    switch_of_cluster = {}
    for host in seed.get("hosts", []):
        switch_of_cluster.setdefault(host["cluster"], host["virtualSwitch"])
    fabric = copy.deepcopy(seed)
    fabric["hosts"] = []
    for i, host in enumerate(hosts):
        if host["cluster"] not in switch_of_cluster:
            raise HostTableError(
                f"hosts[{i}].cluster: {host['cluster']} has no host in the seed fabric to take "
                f"its virtual switch from (clusters: {', '.join(sorted(switch_of_cluster))})")
        fabric["hosts"].append({
            "name": host["name"],
            "cluster": host["cluster"],
            "managementAddress": f"{host['address']}/{prefix_length}",
            "nics": list(TRUNK_NICS),
            "virtualSwitch": copy.deepcopy(switch_of_cluster[host["cluster"]]),
        })
    return fabric


def lab_tenants(seed: dict, hosts: list[dict[str, str]]) -> dict:
    """The seed tenants with one VM per VM network on every VIRTUALCLUSTER host."""
    tenants = copy.deepcopy(seed)
    virtualization_hosts = [h["name"] for h in hosts if h["cluster"] == VIRTUALIZATION_CLUSTER]
    vms = []
    for network in tenants.get("vmNetworks", []):
        for host in virtualization_hosts:
            vms.append({"name": f"TenantVM{len(vms) + 1:02d}", "vmNetwork": network["name"],
                        "host": host})
    tenants["vms"] = vms
    return tenants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document", choices=("fabric", "tenants"))
    parser.add_argument("--hosts", required=True, help="name=cluster=address,...")
    args = parser.parse_args(argv)
    try:
        hosts = parse_host_table(args.hosts)
        if args.document == "fabric":
            document = lab_fabric(yaml.safe_load(SEED_FABRIC.read_text()), hosts)
        else:
            document = lab_tenants(yaml.safe_load(SEED_TENANTS.read_text()), hosts)
    except HostTableError as exc:
        print(f"lab_fabric: {exc}", file=sys.stderr)
        return 2
    yaml.safe_dump(document, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
