"""The multi-kernel lab's plan and its reading of ping: pure, no VM booted."""

from __future__ import annotations

import pytest

from netns_lab.multivm import LabPlan, MultiVMError, ping_summary, plan_lab


def test_plan_gives_every_nic_a_unique_mac_and_a_tap_name_the_kernel_accepts(tmp_path):
    plan = plan_lab(tmp_path, ("CON-HyperV1", "CON-HyperV6", "CON-HyperV7"))
    macs = [mac for guest in plan.guests for mac in guest.macs]
    taps = [tap for guest in plan.guests for tap in guest.taps]
    assert len(set(macs)) == len(macs) == 6
    assert len(set(taps)) == len(taps) and all(len(tap.encode()) <= 15 for tap in taps)
    # The topology's controller host is booted, so the controller runs there.
    assert plan.controller_host == "CON-HyperV1"
    assert plan.controller_url == "https://10.0.0.11:8080"
    assert [g.name for g in plan.guests if g.virtualization] == ["CON-HyperV6", "CON-HyperV7"]
    assert plan.restart_host == "CON-HyperV7"


def test_without_the_management_host_the_first_host_runs_the_controller(tmp_path):
    plan = plan_lab(tmp_path, ("CON-HyperV6", "CON-HyperV7"))
    assert plan.controller_host == "CON-HyperV6"
    assert plan.controller_listen == "10.0.0.16:8080"


def test_plan_survives_the_round_trip_through_the_shared_directory(tmp_path):
    plan = plan_lab(tmp_path, ("CON-HyperV6", "CON-HyperV7"))
    plan.save()
    assert LabPlan.load(tmp_path) == plan


@pytest.mark.parametrize(("hosts", "reason"), [
    (("CON-HyperV6", "CON-HyperV99"), "hosts: CON-HyperV99 is not a host of topology seed"),
    (("CON-HyperV1", "CON-HyperV6"), "at least two VIRTUALCLUSTER hosts"),
])
def test_a_plan_that_cannot_show_tenant_pings_is_refused(tmp_path, hosts, reason):
    with pytest.raises(MultiVMError, match=reason):
        plan_lab(tmp_path, hosts)


def testping_summary_is_read_from_pings_own_statistics():
    output = ("64 bytes from 192.168.0.10: icmp_seq=461 ttl=64 time=1.2 ms\n\n"
              "--- 192.168.0.10 ping statistics ---\n"
              "461 packets transmitted, 458 received, 0.65% packet loss, time 92150ms\n"
              "rtt min/avg/max/mdev = 0.4/2.1/40.2/3.0 ms\n")
    summary = ping_summary(output)
    assert (summary["transmitted"], summary["received"], summary["lost"]) == (461, 458, 3)
    assert ping_summary("ping: connect: Network is unreachable")["received"] == 0
