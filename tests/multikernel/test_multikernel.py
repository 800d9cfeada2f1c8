"""multikernel tier: the seed's tenants across separate kernels (``netns_lab.multivm``).

One lab run per session, on THIS machine (not inside the kernel tier's VM: nested
software emulation would be far too slow): two virtme-ng VMs, each booting the
distribution kernel as one VIRTUALCLUSTER host with two virtio NICs on one bridge, the
controller in the first, ``hnv-agent run`` in both. The guests write what they saw
(ping summaries, neighbour entries, the agent's accepted state); this side also captured
the wire between them. Every test reads that record: nothing here is mocked.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import GRE, Dot1Q
from scapy.utils import rdpcap

from agent.state import parse_host_state
from netns_lab import vm
from netns_lab.multivm import LabOutcome, format_outcome, run_lab

# Generous: on a quiet machine the lab takes minutes; sharing two cores with other VMs, ~16.
LAB_TIMEOUT = float(os.environ.get("OPENHNV_MULTIVM_TIMEOUT", "1500"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabOutcome:
    if os.geteuid() != 0:
        pytest.fail("the multi-kernel lab needs root (a namespace, taps, qemu): sudo make test",
                    pytrace=False)
    if vm.in_vm():
        pytest.fail("the multi-kernel lab runs on the host, not inside a lab VM", pytrace=False)
    outcome = run_lab(tmp_path_factory.mktemp("multivm"), timeout=LAB_TIMEOUT)
    print("\n" + format_outcome(outcome))
    if not outcome.ok:
        pytest.fail("the multi-kernel lab failed:\n" + "\n".join(outcome.problems()), pytrace=False)
    return outcome


def _virtualization_results(lab: LabOutcome) -> dict[str, dict]:
    return {g.name: lab.guests[g.name].result for g in lab.plan.guests if g.virtualization}


def _vsids(lab: LabOutcome) -> dict[str, int]:
    """VM network -> VSID, from the states the agents accepted."""
    vsids = {}
    for guest in lab.plan.guests:
        state_file = Path(lab.plan.run_dir, guest.name, "agent-state.json")
        if state_file.exists():
            state = parse_host_state(state_file.read_bytes())
            for domain in state.routing_domains:
                vsids[domain.name] = domain.subnets[0].vsid
    return vsids


def test_each_host_runs_its_own_kernel(lab):
    for name, outcome in lab.guests.items():
        assert outcome.result["host"] == name
        assert outcome.result["boot_seconds"] > 0  # the guest's own /proc/uptime


def test_tenant_pings_cross_between_kernels_in_both_vm_networks(lab):
    for host, result in _virtualization_results(lab).items():
        pings = result["pings"]
        assert {p["network"] for p in pings} == {"Fabrikam2", "Fabrikam3"}, host
        for p in pings:
            # ping -c 3 -w 30: three replies within 30 s. An early request may go unanswered
            # while the peer's agent is still installing its side; loss in steady state is
            # the restart test's business.
            assert p["received"] >= 3, (host, p)


def test_overlapping_customer_addresses_stay_in_their_vm_network(lab):
    results = _virtualization_results(lab)
    # The two VM networks share one CA range on purpose; without an overlap the check
    # below would prove nothing.
    cas = defaultdict(set)
    for result in results.values():
        for facts in result["vms"].values():
            cas[facts["network"]].add(facts["ca"])
    assert cas["Fabrikam2"] & cas["Fabrikam3"], dict(cas)
    # Each VM resolved its peer's CA to the MAC of the peer in ITS network.
    for host, result in results.items():
        for p in result["pings"]:
            assert p["learnt_mac"] == p["peer_mac"], (host, p)


def test_the_wire_between_kernels_carries_nvgre_keyed_by_vsid_in_vlan_802(lab):
    vsids = _vsids(lab)
    assert set(vsids) == {"Fabrikam2", "Fabrikam3"}
    seen_keys, outer = set(), set()
    for pcap in lab.captures.values():
        if not pcap.exists():
            continue
        for frame in rdpcap(str(pcap)):
            if Dot1Q in frame and frame[Dot1Q].vlan == 802 and GRE in frame:
                seen_keys.add(frame[GRE].key)
                outer.add(frame[IP].src)
    # NVGRE: GRE key = VSID << 8 (FlowID 0), one tunnel key per VM network.
    assert {vsid << 8 for vsid in vsids.values()} <= seen_keys, (vsids, seen_keys)
    assert outer and all(src.startswith("10.80.2.") for src in outer), outer


def test_killing_and_restarting_an_agent_loses_no_ping(lab):
    restart = lab.guests[lab.plan.restart_host].result["restart"]
    assert restart["new_pid"] != restart["old_pid"]
    assert restart["health"]["applied_generation"] == restart["health"]["desired_generation"]
    assert restart["transmitted"] >= 10, restart  # the ping spanned the whole restart
    assert restart["lost"] == 0, restart["summary"]
