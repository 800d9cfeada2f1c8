"""The lab with three controller replicas on PostgreSQL: `hnv-lab demo --ha` (three
replicas, PostgreSQL) builds the walkthrough's fabric up to Fabrikam2's two VMs on them,
then kills (-9) the replica
the Virtualization hosts watch while a tenant VM pings another 10 times a second. The
hosts must move to another replica, a VM created through a third replica must reach both
hosts, no echo may be lost, every host must be InSync; `down` leaves nothing behind,
PostgreSQL and its cluster directory included.

Runs in the kernel tier's VM (gretap, 802.1Q, bonding, VRF, VLAN filtering), with
Debian's PostgreSQL from /usr/lib/postgresql.
"""

from __future__ import annotations

import re
import subprocess
import time

from netns_lab.build import RECORD_DIR, LabRecord
from tests.kernel.test_lab_demo import HNV_LAB, TOPOLOGY, _assert_nothing_left, _snapshot

# What the failover step stands on (demo --ha walks only that part of the seed walkthrough).
FABRIC_CHECKS = ("in-sync-part1", "management-address-moved-to-switch", "management-network-after-team",
                 "dhcp-fabrikam2-vms", "fabrikam2-ping")
HA_CHECKS = ("ha-hosts-moved", "in-sync-ha-vm-create", "dhcp-ha-vm-create", "ha-vm-through-another-replica",
             "ha-no-ping-lost", "in-sync-ha-all-hosts")


def test_kill_9_of_the_watched_replica_loses_no_ping_and_hosts_stay_in_sync(clean_lab, tmp_path):
    before = _snapshot()
    started = time.monotonic()
    proc = subprocess.run([*HNV_LAB, "demo", "--ha"],
                          capture_output=True, text=True, timeout=2700, check=False)
    output = proc.stdout + proc.stderr
    (tmp_path / "demo-ha.txt").write_text(output)
    print(output[-6000:])
    print(f"demo --ha took {time.monotonic() - started:.0f} s")

    assert "3 controller replicas at https://10.0.0.11:8080, https://10.0.0.12:8081, https://10.0.0.11:8082" \
        in output, output[:3000]
    passed = set(re.findall(r"^\s+\[PASS\] ([\w.-]+):", output, re.M))
    failed = re.findall(r"^\s+\[FAIL\] .*$", output, re.M)
    assert not failed, "\n".join(failed)
    missing = [check for check in (*FABRIC_CHECKS, *HA_CHECKS) if check not in passed]
    assert not missing, f"checks never reported as passed: {missing}"
    moved = re.findall(r"moved from (https://\S+) to (https://\S+)", output)
    assert moved and all(old != new for old, new in moved), moved
    lost = re.search(r"\[PASS\] ha-no-ping-lost: .*: (\d+) sent, (\d+) answered, lost none", output)
    assert lost and int(lost.group(1)) >= 50, "the ping did not run throughout at 10/s"
    assert proc.returncode == 0, output[-2000:]
    # down stopped PostgreSQL and the replicas and removed the cluster: nothing is left.
    assert LabRecord.load(TOPOLOGY.name) is None
    assert not (RECORD_DIR / TOPOLOGY.name / "postgresql").exists(), "the PostgreSQL cluster is left"
    _assert_nothing_left(before)
