"""Flow mode (tunnel_mode flow) end to end: one collect-metadata gretap per host, eBPF at tc.

The lab of test_agent_e2e.py (tests/kernel/agentlab.py), both hosts reconciled with
``provider.tunnel_mode: flow``: tenant pings carry NVGRE with the key VSID << 8 | FlowID,
overlapping tenants stay apart, frames a foreign NVGRE peer sends with FlowIDs 1, 127 and
255 are delivered, parallel TCP flows carry different FlowIDs and each flow one, a frame
for a MAC held at another PA is sent on there and never back to its sender, an upgraded
agent replaces its predecessor's programs in place, a deleted tc filter or map entry is
put back and a restarted agent finds nothing to do.
The tests run in file order and share the lab.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections import defaultdict

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Dot1Q, Ether

from agent import naming
from agent.flowmode import REMOTES, FlowDatapath, remote_key
from agent.netns import in_netns
from agent.reconcile import Reconciler
from agent.state import parse_host_state
from tests.kernel.agentlab import F2_VSID, F3_VSID, PA, PROVIDER_VLAN, AgentLab
from tests.kernel.test_agent_e2e import (
    assert_super_packets_reach_the_nic, capture_trunks, icmp_in_echos, read_all,
)
from tests.lib.netns import NamespaceFactory
from tests.lib.nvgre import IPPROTO_GRE, decode_nvgre, encode_nvgre
from tests.lib.wait import wait_until

VM_A2_MAC, VM_B2_MAC = "00:15:5d:00:02:0a", "00:15:5d:00:02:0b"


def flow_state(lab, host: str, generation: int = 1):
    doc = lab.state(host, generation=generation)
    doc["provider"]["tunnel_mode"] = "flow"
    return parse_host_state(doc)


@pytest.fixture(scope="module")
def lab():
    lab = AgentLab(NamespaceFactory(prefix="fl"))
    try:
        lab.build()
        lab.reconcilers = {h: Reconciler(netns=lab.hosts[h].name) for h in lab.hosts}
        for host in lab.hosts:
            result = lab.reconcilers[host].reconcile(flow_state(lab, host))
            assert result.errors == [], result.errors
        yield lab
    finally:
        lab.close()


def test_one_flow_tunnel_per_host_and_ping_carries_vsid_key(lab, tmp_path):
    links = lab.reconcilers["a"].observe().links.values()
    assert not [l for l in links if l.role == naming.TUNNEL], "flow mode built per-peer gretaps"
    assert [l.name for l in links if l.role == naming.FLOW_TUNNEL] == [naming.flow_tunnel(4)]
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "flow")
    with stack:
        assert lab.vms["vmA2"].ping("192.168.0.11", count=3), "vmA2 could not ping vmB2 in flow mode"
    gre = [p for p in read_all(pcaps) if IP in p and p[IP].proto == IPPROTO_GRE]
    assert gre, "no GRE packet crossed host A's trunk"
    frames = [decode_nvgre(p) for p in gre]
    for packet, frame in zip(gre, frames):
        assert packet[Dot1Q].vlan == PROVIDER_VLAN, packet.summary()
        assert frame is not None, f"not NVGRE (checksum bit? no key?): {packet.summary()}"
        assert frame.vsid == F2_VSID, frame.summary()
        assert {frame.outer_src, frame.outer_dst} == {PA[("a", "Fabrikam2")], PA[("b", "Fabrikam2")]}
    assert any(ICMP in f.inner and f.inner[ICMP].type == 8 for f in frames)
    assert any(ICMP in f.inner and f.inner[ICMP].type == 0 for f in frames)


def test_overlapping_tenants_reach_only_their_own_vm(lab):
    b2, b3 = lab.vms["vmB2"], lab.vms["vmB3"]
    before = icmp_in_echos(b2), icmp_in_echos(b3)
    assert lab.vms["vmA3"].ping("192.168.0.11", count=3), "Fabrikam3's pair cannot ping"
    after = icmp_in_echos(b2), icmp_in_echos(b3)
    assert after[1] - before[1] >= 3 and after[0] == before[0], (before, after)


def test_distributed_router_in_flow_mode(lab):
    assert lab.vms["vmA2"].ping("192.168.1.11", count=2), "vmB2s (other subnet, host B) unreachable"
    assert not lab.vms["vmA2"].ping("10.30.0.11", wait=0.5), "Fabrikam2 reached a subnet of Fabrikam3"


def _send_on_switch_port(lab, port: str, frames: list[bytes]) -> None:
    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((port, 0))
            for frame in frames:
                raw.send(frame)
    in_netns(lab.switch.name, send)


def send_echo_as_nvgre_peer(lab, flow_id: int, *, outer_src: str = PA[("a", "Fabrikam2")],
                            to_vm_a2: bool = False, seq: int | None = None) -> None:
    """vmA2's echo to vmB2 as a foreign NVGRE endpoint would send it: FlowID `flow_id`,
    from PA `outer_src`, put on the wire of host B's active team member by the switch.
    `to_vm_a2`: vmB2's echo to vmA2 instead, which host B's record sends on to host A."""
    host_b = lab.hosts["b"]
    active = host_b.run("cat", "/sys/class/net/hnv-team/bonding/active_slave").stdout.strip()
    addresses = json.loads(host_b.ip("-j", "addr", "show").stdout)
    provider_dev = next(a["ifname"] for a in addresses
                        if any(i.get("local") == PA[("b", "Fabrikam2")] for i in a.get("addr_info", [])))
    provider_mac = host_b.run("cat", f"/sys/class/net/{provider_dev}/address").stdout.strip()
    (src_mac, src_ip), (dst_mac, dst_ip) = (VM_A2_MAC, "192.168.0.10"), (VM_B2_MAC, "192.168.0.11")
    if to_vm_a2:
        (src_mac, src_ip), (dst_mac, dst_ip) = (dst_mac, dst_ip), (src_mac, src_ip)
    inner = (Ether(src=src_mac, dst=dst_mac) / IP(src=src_ip, dst=dst_ip)
             / ICMP(id=0x4e56, seq=flow_id if seq is None else seq))
    outer = encode_nvgre(outer_src, PA[("b", "Fabrikam2")], F2_VSID, inner, flow_id=flow_id)
    frame = Ether(src="02:00:00:00:00:99", dst=provider_mac) / Dot1Q(vlan=PROVIDER_VLAN) / outer
    _send_on_switch_port(lab, f"b{active[-1]}", [bytes(frame)])


def test_frames_with_any_flow_id_are_delivered(lab):
    """A foreign NVGRE endpoint spreads its flows over FlowIDs: each must arrive."""
    b2 = lab.vms["vmB2"]
    for flow_id in (1, 127, 255):
        before = icmp_in_echos(b2)
        send_echo_as_nvgre_peer(lab, flow_id)
        wait_until(lambda: icmp_in_echos(b2) > before, 60, f"vmB2 to receive the echo with FlowID {flow_id}")


def test_parallel_tcp_flows_spread_over_flow_ids(lab, tmp_path):
    server = in_netns(lab.vms["vmB2"].name, lambda: socket.create_server(("192.168.0.11", 5201)))
    server.settimeout(60)
    clients = []
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "tcp")
    with stack, server:
        for _ in range(8):
            client = in_netns(lab.vms["vmA2"].name, lambda: socket.socket())
            client.settimeout(60)
            client.connect(("192.168.0.11", 5201))
            clients.append((client, server.accept()[0]))
        for _round in range(3):
            for client, accepted in clients:
                client.sendall(b"x" * 512)
                assert accepted.recv(4096)
        for client, accepted in clients:
            client.close()
            accepted.close()
    flow_ids: dict[int, set[int]] = defaultdict(set)
    for frame in (decode_nvgre(p) for p in read_all(pcaps)):
        if frame is not None and TCP in frame.inner and frame.inner[IP].src == "192.168.0.10":
            flow_ids[frame.inner[TCP].sport].add(frame.flow_id)
    assert len(flow_ids) == 8, f"captured {len(flow_ids)} of the 8 flows"
    assert all(len(ids) == 1 for ids in flow_ids.values()), f"a flow changed FlowID: {dict(flow_ids)}"
    assert len({next(iter(ids)) for ids in flow_ids.values()}) > 1, f"one FlowID for all: {dict(flow_ids)}"


def test_tenant_tcp_leaves_the_host_as_super_packets(lab):
    assert_super_packets_reach_the_nic(lab, (naming.flow_tunnel(4),))


def test_a_frame_for_a_remote_mac_is_sent_on_to_its_pa_and_never_back(lab, tmp_path):
    """What a migration's source does for what peers still send it (the VM gone to another
    host): host B holds vmA2 at host A's PA, so an echo for vmA2 that a third PA sends to
    B goes on to A, with the key it came with; the same frame from A's own PA is dropped
    (the two disagree about where vmA2 is: no ping-pong). The bridge could not forward it
    (in and out by the VSID's one tunnel port): the receive program does."""
    a2 = lab.vms["vmA2"]
    third_pa = "10.80.2.99"  # an NVGRE endpoint neither host has a record of
    stack, pcaps = capture_trunks(lab, tmp_path, "b", "forward")
    with stack:
        before = icmp_in_echos(a2)
        send_echo_as_nvgre_peer(lab, 0, outer_src=PA[("a", "Fabrikam2")], to_vm_a2=True, seq=7001)
        send_echo_as_nvgre_peer(lab, 42, outer_src=third_pa, to_vm_a2=True, seq=7002)
        wait_until(lambda: icmp_in_echos(a2) > before, 60, "vmA2 to receive the echo host B sent on")
    assert icmp_in_echos(a2) == before + 1, "the frame from host A's own PA went back to it"
    onward = [f for f in (decode_nvgre(p) for p in read_all(pcaps) if IP in p and p[IP].proto == IPPROTO_GRE)
              if f is not None and ICMP in f.inner and f.inner[ICMP].type == 8
              and (f.outer_src, f.outer_dst) == (PA[("b", "Fabrikam2")], PA[("a", "Fabrikam2")])]
    assert [(f.inner[ICMP].seq, f.vsid, f.flow_id) for f in onward] == [(7002, F2_VSID, 42)], \
        [f.summary() for f in onward]


def test_an_upgraded_agent_replaces_its_predecessors_programs_and_forwarding_goes_on(lab):
    """Programs pinned from another object (an older agent's) are replaced in place, each
    filter atomically; the maps, and so forwarding, stay."""
    host = lab.hosts["a"]
    flow = FlowDatapath(host.name)
    old_ids = flow.program_ids()
    programs = flow.programs_dir()
    assert programs.is_dir(), f"no programs pinned under {programs}"
    programs.rename(programs.with_name("0" * 16))  # pinned from another build, as a predecessor's are
    with contextlib.closing(Reconciler(netns=host.name)) as upgraded:
        state = flow_state(lab, "a")
        plan = upgraded.plan(state)
        replaced = [op for op in plan.ops if op.kind == "tcprogram"]
        assert replaced and all(op.action == "replace" for op in replaced), plan.describe()
        assert len(plan.ops) == len(replaced), plan.describe()
        result = upgraded.reconcile(state)
        assert result.errors == [], result.errors
        assert upgraded.plan(state).is_empty, upgraded.plan(state).describe()
    new_ids = flow.program_ids()
    assert all(new_ids.values()) and not set(new_ids.values()) & set(old_ids.values()), (old_ids, new_ids)
    assert lab.vms["vmA2"].ping("192.168.0.11", count=2), "no forwarding after the programs were replaced"


def test_drift_deleted_filter_and_map_entry_are_repaired(lab):
    host, rec = lab.hosts["a"], lab.reconcilers["a"]
    state = flow_state(lab, "a")
    port = naming.flow_port(F3_VSID)
    host.run("tc", "filter", "del", "dev", port, "egress")
    key = " ".join(f"{b:02x}" for b in remote_key(F2_VSID, VM_B2_MAC))
    pinned = FlowDatapath(host.name).pins / "maps" / REMOTES
    # Not in the host's namespace: `ip netns exec` remounts /sys, hiding bpffs; maps are
    # not per namespace anyway.
    subprocess.run(["bpftool", "map", "delete", "pinned", str(pinned), "key", "hex", *key.split()],
                   check=True, capture_output=True, timeout=120)
    assert not lab.vms["vmA3"].ping("192.168.0.11", wait=0.5)
    assert not lab.vms["vmA2"].ping("192.168.0.11", wait=0.5)
    result = rec.reconcile(state)
    assert result.errors == []
    described = result.plan.describe()
    assert f"add tcprogram hnv_encap on {port} egress" in described, described
    assert f"add flowremote vsid {F2_VSID} {VM_B2_MAC}" in described, described
    assert rec.plan(state).is_empty, rec.plan(state).describe()
    assert lab.vms["vmA3"].ping("192.168.0.11", count=2) and lab.vms["vmA2"].ping("192.168.0.11", count=2)


def test_restarted_agent_finds_nothing_to_do_and_forwarding_goes_on(lab):
    with contextlib.closing(Reconciler(netns=lab.hosts["a"].name)) as fresh:
        assert fresh.plan(flow_state(lab, "a")).is_empty, fresh.plan(flow_state(lab, "a")).describe()
    assert lab.vms["vmA2"].ping("192.168.0.11", count=2)


def test_back_to_device_mode_removes_the_flow_objects(lab):
    for host in ("a", "b"):
        result = lab.reconcilers[host].reconcile(parse_host_state(lab.state(host, generation=9)))
        assert result.errors == [], result.errors
        have = lab.reconcilers[host].observe()
        assert not have.flow_remotes and not have.flow_ports and not have.tc_programs
        assert not [l for l in have.links.values() if l.role in (naming.FLOW_TUNNEL, naming.FLOW_PORT)]
    assert lab.vms["vmA2"].ping("192.168.0.11", count=2), "device mode does not forward after flow mode"


def test_device_mode_receives_flow_id_0_only(lab):
    """The documented limit of device mode: the kernel matches the whole key to a
    gretap's ikey. FlowID 1 is sent first and FlowID 0 after it on the same path, so once
    the second has arrived the first would have too."""
    b2 = lab.vms["vmB2"]
    before = icmp_in_echos(b2)
    send_echo_as_nvgre_peer(lab, 1)
    send_echo_as_nvgre_peer(lab, 0)
    wait_until(lambda: icmp_in_echos(b2) > before, 60, "vmB2 to receive the echo with FlowID 0")
    assert icmp_in_echos(b2) == before + 1, "device mode delivered a frame with FlowID 1"
