"""A lab VM (port kind ``namespace``) and its namespace: made by the agent, removed with it.

Kernel tier: the real Reconciler on the kernel-tier lab (tests/kernel/agentlab.py). The
agent, as hypervisor, creates a VM's namespace when it is missing and marks it as its
own; when the VM leaves the HostState, the port goes and a namespace the agent made goes
with it. A namespace the agent found already there (someone else's) loses only the VM's
``eth0`` and is never removed.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
from typing import Any

import pytest

from agent import naming
from agent.reconcile import Reconciler
from agent.state import parse_host_state
from tests.kernel.agentlab import AgentLab, host_state
from tests.lib.netns import NamespaceFactory


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {entry["name"] for entry in json.loads(out or "[]")}


def links(netns: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def without_vms(document: dict[str, Any], names: set[str]) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    doc["ports"] = [p for p in doc["ports"] if p["name"] not in names]
    doc["records"] = [r for r in doc["records"] if r.get("vm_name") not in names]
    doc["generation"] += 1
    return doc


@pytest.fixture
def lab():
    factory = NamespaceFactory(prefix="vn")
    lab = AgentLab(factory)
    lab.agent_made = f"vn-vm-{secrets.token_hex(4)}"  # no one creates it: the agent must
    try:
        yield lab.build()
    finally:
        subprocess.run(["ip", "netns", "del", lab.agent_made], capture_output=True, check=False)
        factory.close()


def test_a_deleted_namespace_vm_leaves_no_namespace_and_a_foreign_one_is_kept(lab):
    host = lab.hosts["a"]
    vm_netns = {**lab.vm_netns, "vmA2": lab.agent_made}
    document = host_state("a", vm_netns)
    foreign = lab.vms["vmA3"].name  # made by the test before the agent ran: not the agent's
    with Reconciler(netns=host.name) as reconciler:
        result = reconciler.reconcile(parse_host_state(document))
        assert result.errors == [], result.errors
        assert lab.agent_made in namespaces()
        vm_end = links(lab.agent_made)
        assert vm_end["eth0"]["address"] == "00:15:5d:00:02:0a"
        assert vm_end["lo"].get("ifalias") == naming.vm_netns_marker(naming.vm_port("vmA2"), document["host"])
        assert "ifalias" not in links(foreign)["lo"], "the agent marked a namespace it did not make"
        assert lab.vms["vmA2"].name in namespaces()  # an unused namespace of the fixture, untouched

        # Both VMs are deleted: vmA2 (namespace made by the agent) and vmA3 (foreign one).
        later = without_vms(document, {"vmA2", "vmA3"})
        result = reconciler.reconcile(parse_host_state(later))
        assert result.errors == [], result.errors
        assert lab.agent_made not in namespaces(), "the deleted VM's namespace was left behind"
        assert foreign in namespaces(), "the agent removed a namespace it did not create"
        assert set(links(foreign)) == {"lo"}, "the foreign namespace still holds the VM's eth0"
        host_links = links(host.name)
        assert naming.vm_port("vmA2") not in host_links and naming.vm_port("vmA3") not in host_links
        assert naming.vm_port("vmA100") in host_links  # the other VMs are untouched

        again = reconciler.reconcile(parse_host_state(later))
        assert again.errors == [] and again.planned == 0
