"""A lab VM (port kind ``namespace``) and its namespace: made by the agent, removed with it.

Kernel tier: the real Reconciler on the kernel-tier lab (tests/kernel/agentlab.py). The
agent, as hypervisor, creates a VM's namespace when it is missing and marks it as its
own; when the VM leaves the HostState, the port goes and a namespace the agent made goes
with it. A namespace the agent found already there (someone else's) loses only the VM's
``eth0`` and is never removed. A migrating VM gets the destination's NIC beside the
source's, which goes with the source's port.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
from typing import Any

import pytest

from agent import naming
from agent.netns import ensure_vm_netns
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


# Devices the kernel itself puts in every new namespace once ip_gre, ip6_gre and
# ip6_tunnel are loaded (their fallback tunnels; an ip6gretap loads the IPv6 two):
# not the VM's, not the agent's.
KERNEL_FALLBACK_DEVICES = {"gre0", "gretap0", "erspan0", "ip6gre0", "ip6tnl0"}


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
        assert set(links(foreign)) - KERNEL_FALLBACK_DEVICES == {"lo"}, "the foreign namespace still holds the VM's eth0"
        host_links = links(host.name)
        assert naming.vm_port("vmA2") not in host_links and naming.vm_port("vmA3") not in host_links
        assert naming.vm_port("vmA100") in host_links  # the other VMs are untouched

        again = reconciler.reconcile(parse_host_state(later))
        assert again.errors == [] and again.planned == 0


def moved(document: dict[str, Any], vm_name: str, to: dict[str, Any]) -> dict[str, Any]:
    """``to`` (the other host's document) with ``vm_name``'s port taken from ``document``."""
    doc = copy.deepcopy(to)
    doc["ports"].append(next(p for p in document["ports"] if p["name"] == vm_name))
    doc["generation"] += 1
    return doc


@pytest.mark.parametrize("first", ["destination", "source"])
def test_a_vm_migrated_then_deleted_leaves_no_namespace(lab, first):
    """The lab's live migration: the namespace the source made moves to the destination
    (whichever host hears of the move first), which adds the VM's NIC beside the source's
    and removes the namespace when the VM is deleted."""
    a, b = lab.hosts["a"], lab.hosts["b"]
    vm_netns = {**lab.vm_netns, "vmA2": lab.agent_made}
    on_a = host_state("a", vm_netns)
    on_b = host_state("b", vm_netns)
    with Reconciler(netns=a.name) as source, Reconciler(netns=b.name) as destination:
        assert source.reconcile(parse_host_state(on_a)).errors == []
        assert destination.reconcile(parse_host_state(on_b)).errors == []
        assert lab.agent_made in namespaces()

        a_without, b_with = without_vms(on_a, {"vmA2"}), moved(on_a, "vmA2", on_b)
        steps = [(destination, b_with), (source, a_without)]
        for reconciler, document in steps if first == "destination" else reversed(steps):
            result = reconciler.reconcile(parse_host_state(document))
            assert result.errors == [], result.errors
            if first == "destination" and reconciler is destination:
                # Make-before-break: the destination's NIC beside the source's, not instead.
                assert sorted(set(links(lab.agent_made)) & set(naming.VM_IFNAMES)) == ["eth0", "eth1"]
                assert naming.vm_port("vmA2") in links(a.name)
        # Drift repair on both, as the agents' periodic reconciles do.
        assert destination.reconcile(parse_host_state(b_with)).errors == []
        assert source.reconcile(parse_host_state(a_without)).errors == []
        assert lab.agent_made in namespaces()
        # One NIC left, the destination's, with the VM's MAC (named eth1 when it was added
        # beside the source's eth0).
        nics = [link for name, link in links(lab.agent_made).items() if name in naming.VM_IFNAMES]
        assert [nic["address"] for nic in nics] == ["00:15:5d:00:02:0a"]
        assert naming.vm_port("vmA2") in links(b.name) and naming.vm_port("vmA2") not in links(a.name)

        result = destination.reconcile(parse_host_state(without_vms(b_with, {"vmA2"})))
        assert result.errors == [], result.errors
        assert lab.agent_made not in namespaces(), "the migrated VM's namespace was left behind"


def test_the_source_keeps_a_namespace_its_destination_took_over(lab):
    """The race of the lab's live migration: the destination has marked the namespace as
    its own while the source's port still exists; the source removes its port, not the
    namespace (it did, and the destination's VM lost its namespace)."""
    a = lab.hosts["a"]
    vm_netns = {**lab.vm_netns, "vmA2": lab.agent_made}
    on_a, on_b = host_state("a", vm_netns), host_state("b", vm_netns)
    with Reconciler(netns=a.name) as source:
        assert source.reconcile(parse_host_state(on_a)).errors == []
        ensure_vm_netns(lab.agent_made, naming.vm_netns_marker(naming.vm_port("vmA2"), on_b["host"]))
        result = source.reconcile(parse_host_state(without_vms(on_a, {"vmA2"})))
        assert result.errors == [], result.errors
        assert naming.vm_port("vmA2") not in links(a.name)
        assert lab.agent_made in namespaces(), "the source removed the namespace its destination took over"
