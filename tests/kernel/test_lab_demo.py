"""The lab's life cycle beyond the walkthrough: `down` after a crash during `up` removes
exactly what was built (a bystander namespace survives), and `up` refuses a namespace it
did not create. The walkthrough itself (`hnv-lab demo`), Prometheus, the token capture and
`down` of a whole lab run on one lab in tests/kernel/test_lab_seed.py; the helpers here
(what the machine held before, what a demo must report) serve it and the HA lab.

Runs on a kernel with gretap, 802.1Q, bonding, VRF and VLAN filtering (the kernel tier's
VM here).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


from netns_lab.build import LabRecord
from netns_lab.topology import load_topology
from tests.kernel.conftest import hnv_lab

TOPOLOGY = load_topology()
# `up` and `demo` start daemons (and a test kills `up`): a process of their own.
HNV_LAB = [sys.executable, "-m", "netns_lab.cli"]

# Every claim of the walkthrough the demo must have checked and passed.
REQUIRED_CHECKS = (
    "in-sync-part1",
    "vlan-100-ping",
    "vlan-100-tagged-on-the-wire",
    "vlan-101-cannot-reach-vlan-100",
    "management-address-moved-to-switch",
    "management-network-after-team",
    "dhcp-fabrikam2-vms",
    "fabrikam2-ping",
    "dhcp-fabrikam3-vms",
    "fabrikam3-ping",
    "overlapping-customer-addresses",
    "records-CON-HyperV6",
    "records-CON-HyperV7",
    "fabrikam2-reaches-its-own",
    "isolation-other-tenant-untouched",
    "pa-count",
    "dhcp-tenantvm05",
    "no-new-pa-for-another-vm",
    "gateway-ping",
    "dhcp-after-migration",
    "record-follows-migration",
    "ping-after-migration",
    "nvgre-on-the-wire",
    "in-sync-vm-delete",
    "vm-delete-removes-namespace",
    "fabrikam6-ping6",
    "fabrikam6-gateway-ping6",
    "fabrikam6-ipv6-in-nvgre-on-the-wire",
    "fabrikam6-neighbour-discovery-stays-on-the-host",
    "in-sync-gateway",
    "gateway-nat-fabrikam2",
    "gateway-nat-fabrikam3",
    "gateway-nat-on-the-wire",
    "gateway-port-forward",
    "gateway-no-rule-no-way-in",
    "gateway-no-path-between-tenants",
    "gateway-role-steady-while-hosts-came-up",
    "gateway-failover-role-moved",
    "gateway-failover-decision",
    "gateway-failover-new-connections",
    "gateway-failover-both-tenants-and-the-rule",
    "in-sync-gateway-host-back",
    "gateway-no-flapping",
)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _processes() -> dict[int, str]:
    """User-space processes (kernel threads have no command line), pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if cmdline:
                found[int(entry.name)] = cmdline
    return found


def _snapshot() -> tuple[set[str], set[str], dict[int, str]]:
    return _namespaces(), _root_links(), _processes()


def _assert_nothing_left(before: tuple[set[str], set[str], dict[int, str]]) -> None:
    namespaces, links, procs = before
    assert _namespaces() == namespaces, "namespaces left behind or removed"
    assert _root_links() == links, "links in the root namespace changed"
    me = os.getpid()
    left = {pid: cmd for pid, cmd in _processes().items() if pid not in procs and pid != me}
    assert not left, f"processes left behind: {left}"


def assert_walkthrough(output: str, returncode: int) -> None:
    """`hnv-lab demo`'s output reports every check of REQUIRED_CHECKS passed, none failed."""
    passed = set(re.findall(r"^\s+\[PASS\] ([\w.-]+):", output, re.M))
    failed = re.findall(r"^\s+\[FAIL\] .*$", output, re.M)
    assert not failed, "\n".join(failed)
    missing = [check for check in REQUIRED_CHECKS if check not in passed]
    assert not missing, f"checks never reported as passed: {missing}"
    summary = re.search(r"^demo: (\d+) checks passed, 0 failed", output, re.M)
    assert summary and int(summary.group(1)) >= len(REQUIRED_CHECKS), output[-2000:]
    assert returncode == 0, output[-2000:]


def test_down_after_a_crash_during_up_removes_exactly_what_was_built(clean_lab):
    # A namespace that is not the lab's, named like nothing the lab builds: must survive.
    bystander = "bystander-lab-test"
    subprocess.run(["ip", "netns", "add", bystander], check=True)
    try:
        before = _snapshot()
        record_path = LabRecord.path_for(TOPOLOGY.name)
        up = subprocess.Popen([*HNV_LAB, "up", "--no-daemons"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
        # Kill it as soon as it has started building: the record exists before anything else.
        deadline = time.monotonic() + 300
        while not record_path.exists() and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.01)
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        assert record_path.exists(), "up never wrote its record"

        down = hnv_lab("down")
        assert down.returncode == 0, down.stderr
        assert bystander in _namespaces()
        _assert_nothing_left(before)
        again = hnv_lab("down")
        assert again.returncode == 0 and "nothing to do" in again.stdout
    finally:
        subprocess.run(["ip", "netns", "del", bystander], check=False)


def test_up_refuses_a_namespace_it_did_not_create(clean_lab):
    squatter = TOPOLOGY.hosts[2].name  # CON-HyperV3, made by someone else
    subprocess.run(["ip", "netns", "add", squatter], check=True)
    try:
        up = hnv_lab("up", "--no-daemons")
        assert up.returncode == 1
        assert f"namespace {squatter} already exists and is not in the record" in up.stderr
        hnv_lab("down")
        assert squatter in _namespaces(), "down removed a namespace the lab did not create"
        assert not (set(TOPOLOGY.namespaces) - {squatter}) & _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", squatter], check=False)
