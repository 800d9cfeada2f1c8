"""The agent end to end on real kernel objects: two hosts, a trunked switch, tenant VMs.

One module-scoped lab (tests/kernel/agentlab.py): host A is configured with
``hnv-agent apply`` (the CLI's main, in process), host B with a Reconciler; then real pings between VM
namespaces, with captures on the switch's trunk ports decoded by scapy. The tests run in
file order and share the lab: the VXLAN test converts both hosts last.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from agent import cli, naming, show
from agent.netns import in_netns
from agent.reconcile import Reconciler
from agent.state import parse_host_state
from tests.kernel.agentlab import F2_VSID, F2B_VSID, F3_VSID, PA, PROVIDER_VLAN, VMS, AgentLab, without_record
from tests.lib.cli import CliResult, run_main
from tests.lib.netns import NamespaceFactory
from tests.lib.nvgre import IPPROTO_GRE, decode_nvgre
from tests.lib.wait import wait_until

def hnv_agent(*args: str) -> CliResult:
    """`hnv-agent ARGS` through its real entry point, in this process (tests/lib/cli.py)."""
    return run_main(cli.main, args)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = AgentLab(NamespaceFactory(prefix="ag"))
    try:
        lab.build()
        lab.reconcilers = {h: Reconciler(netns=lab.hosts[h].name) for h in lab.hosts}
        state_a = tmp_path_factory.mktemp("agent") / "host-a.json"
        state_a.write_text(json.dumps(lab.state("a")))
        lab.state_file_a = state_a
        proc = hnv_agent("apply", str(state_a), "--netns", lab.hosts["a"].name, "--verbose")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lab.apply_output = proc.stdout
        result = lab.reconcilers["b"].reconcile(parse_host_state(lab.state("b")))
        assert result.errors == [], result.errors
        yield lab
    finally:
        lab.close()


def tunnel_name(host: str, vsid: int, network: str) -> str:
    peer = "b" if host == "a" else "a"
    return naming.nvgre_tunnel(vsid, PA[(host, network)], PA[(peer, network)])


def icmp_in_echos(ns) -> int:
    lines = ns.run("cat", "/proc/net/snmp").stdout.splitlines()
    header, values = [l.split() for l in lines if l.startswith("Icmp:")][:2]
    return int(values[header.index("InEchos")])


def capture_trunks(lab, tmp_path, host: str, name: str):
    """Captures on both switch ports of `host` (the team may use either)."""
    stack = contextlib.ExitStack()
    pcaps = [stack.enter_context(lab.switch.capture(f"{host}{nic}", tmp_path / f"{name}{nic}.pcap"))
             for nic in (0, 1)]
    return stack, pcaps


def read_all(pcaps):
    return [p for pcap in pcaps for p in rdpcap(str(pcap))]


def test_nvgre_ping_crosses_trunk_with_vlan_802_and_vsid_key(lab, tmp_path):
    assert "add tunnel" in lab.apply_output and "vsid 5001 10.80.2.20 -> 10.80.2.21" in lab.apply_output
    vm_a = lab.vms["vmA2"]
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "nvgre")
    with stack:
        assert vm_a.ping("192.168.0.11", count=3), "vmA2 could not ping vmB2 over NVGRE"
    packets = read_all(pcaps)
    gre = [p for p in packets if IP in p and p[IP].proto == IPPROTO_GRE]
    assert gre, "no GRE packet crossed host A's trunk"
    for packet in gre:
        assert Dot1Q in packet and packet[Dot1Q].vlan == PROVIDER_VLAN, packet.summary()
        frame = decode_nvgre(packet)
        assert frame is not None, f"not NVGRE: {packet.summary()}"
        assert frame.vsid == F2_VSID and frame.flow_id == 0
        assert {frame.outer_src, frame.outer_dst} == {PA[("a", "Fabrikam2")], PA[("b", "Fabrikam2")]}
    inner = [decode_nvgre(p).inner for p in gre]
    assert any(ICMP in f and f[IP].dst == "192.168.0.11" and f[ICMP].type == 8 for f in inner)
    assert any(ICMP in f and f[IP].src == "192.168.0.11" and f[ICMP].type == 0 for f in inner)


def test_overlapping_tenants_reach_only_their_own_vm(lab, tmp_path):
    b2, b3 = lab.vms["vmB2"], lab.vms["vmB3"]
    before = icmp_in_echos(b2), icmp_in_echos(b3)
    assert lab.vms["vmA3"].ping("192.168.0.11", count=3), "Fabrikam3's pair cannot ping"
    after_f3 = icmp_in_echos(b2), icmp_in_echos(b3)
    assert after_f3[1] - before[1] >= 3 and after_f3[0] == before[0], (before, after_f3)
    assert lab.vms["vmA2"].ping("192.168.0.11", count=3), "Fabrikam2's pair cannot ping"
    after_f2 = icmp_in_echos(b2), icmp_in_echos(b3)
    assert after_f2[0] - after_f3[0] >= 3 and after_f2[1] == after_f3[1], (after_f3, after_f2)


def test_distributed_router_gateway_and_other_subnet_but_not_other_network(lab):
    vm_a = lab.vms["vmA2"]
    assert vm_a.ping("192.168.0.1"), "the gateway .1 does not answer on host A"
    assert vm_a.ping("192.168.1.11", count=2), "vmB2s (other subnet, host B) unreachable via the distributed router"
    assert lab.vms["vmA3"].ping("10.30.0.11", count=2), "Fabrikam3's own second subnet must work"
    assert not vm_a.ping("10.30.0.11", wait=0.5), "Fabrikam2 reached a subnet of Fabrikam3"
    assert not vm_a.ping("10.0.0.1", wait=0.5), "a tenant reached the management network"


def test_arp_for_remote_ca_is_answered_locally(lab, tmp_path):
    vm_a = lab.vms["vmA2"]
    vm_a.ip("neigh", "flush", "dev", "eth0")
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "arp")
    with stack:
        assert vm_a.ping("192.168.0.11", count=2)
    neigh = vm_a.ip("neigh", "show", "192.168.0.11", "dev", "eth0").stdout
    assert "00:15:5d:00:02:0b" in neigh, f"vmA2 did not learn vmB2's MAC by ARP: {neigh!r}"
    packets = read_all(pcaps)
    frames = [decode_nvgre(p) for p in packets]
    inner = [f.inner for f in frames if f is not None]
    assert inner, "no tenant traffic crossed: the negative check below would prove nothing"
    assert not [f for f in inner if ARP in f], "a tenant ARP crossed the provider network"
    assert not [f for f in inner if f[Ether].dst == "ff:ff:ff:ff:ff:ff"], "a tenant broadcast crossed"
    tenant_arp = [p for p in packets if ARP in p and p[ARP].pdst in ("192.168.0.11", "192.168.0.10")]
    assert not tenant_arp, "ARP for a CA reached the physical switch"


def revalidate(vm, ca: str, mac: str, family: str = "-4") -> None:
    """Make the VM's neighbour entry for `ca` stale and use it once: after the delay the
    VM's kernel probes it with a unicast ARP request (IPv6: neighbour solicitation) to
    `mac`; the entry is REACHABLE again only if the probe was answered. One echo, not a
    ping that goes on: ping confirms the neighbour itself (MSG_CONFIRM) once it has a reply,
    and a confirmed entry is never probed."""
    vm.ip(family, "neigh", "replace", ca, "lladdr", mac, "dev", "eth0", "nud", "stale")
    assert vm.ping(ca), f"{vm.name} lost {ca} while re-validating it"

    def reachable() -> bool:
        return "REACHABLE" in vm.ip(family, "neigh", "show", ca, "dev", "eth0").stdout

    wait_until(reachable, 15, f"{vm.name}'s stale entry for {ca} answered by a probe", interval=0.2)


def test_stale_neighbour_probes_and_the_hosts_own_arp_never_enter_a_tunnel(lab, tmp_path):
    """A VM re-validating a stale neighbour sends a unicast ARP request to the MAC it knows:
    the host answers it from the lookup records and the tunnel never carries it. The host's
    own ARP for a CA no record names (a ping the distributed router routes into the other
    subnet) reaches no tunnel either (the agent's nftables tunnel guard)."""
    vm_a, b2 = lab.vms["vmA2"], next(vm for vm in VMS if vm.name == "vmB2")
    vm_a.run("sysctl", "-qw", "net.ipv4.neigh.eth0.delay_first_probe_time=1")  # probe after 1 s, not 5
    unknown = "192.168.1.99"
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "stale")
    with stack, vm_a.capture("eth0", tmp_path / "vm.pcap") as vm_pcap, \
            lab.hosts["a"].capture(naming.vsid_bridge(F2B_VSID), tmp_path / "bridge.pcap") as bridge_pcap:
        for _ in range(2):
            revalidate(vm_a, "192.168.0.11", b2.mac)
        assert not vm_a.ping(unknown, wait=2), f"{unknown} has no VM, yet answered"
    seen_by_vm = rdpcap(str(vm_pcap))
    probes = [p for p in seen_by_vm if ARP in p and p[ARP].op == 1 and p[Ether].dst == b2.mac]
    answers = [p for p in seen_by_vm if ARP in p and p[ARP].op == 2 and p[ARP].hwsrc == b2.mac]
    assert probes and answers, "vmA2 sent no unicast probe, or none was answered: the check below proves nothing"
    host_arp = [p for p in rdpcap(str(bridge_pcap)) if ARP in p and p[ARP].op == 1 and p[ARP].pdst == unknown]
    assert host_arp, f"host A never asked for {unknown}: the check below proves nothing"
    packets = read_all(pcaps)
    inner = [f.inner for f in map(decode_nvgre, packets) if f is not None]
    assert not [f for f in inner if ARP in f], \
        f"ARP inside a tunnel: {[f.summary() for f in inner if ARP in f]}"
    assert not [p for p in packets if ARP in p and p[ARP].pdst in ("192.168.0.11", unknown)], \
        "a tenant ARP reached the physical switch"


def test_vlan_networks_isolated_on_the_trunk(lab, tmp_path):
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "vlan")
    with stack:
        assert lab.vms["vmA100"].ping("10.100.0.20", count=2), "VLAN 100 VMs cannot ping across hosts"
    tagged = [p for p in read_all(pcaps) if Dot1Q in p and ICMP in p]
    assert tagged and all(p[Dot1Q].vlan == 100 for p in tagged), [p.summary() for p in tagged]
    assert not lab.vms["vmA101"].ping("10.100.0.20", wait=0.5), "VLAN 101 reached VLAN 100"


def test_team_survives_a_member_nic_failure(lab):
    host = lab.hosts["a"]
    active = host.run("cat", "/sys/class/net/hnv-team/bonding/active_slave").stdout.strip()
    assert active in ("eth0", "eth1"), active
    try:
        lab.switch.ip("link", "set", f"a{active[-1]}", "down")  # the cable is pulled
        time.sleep(0.5)  # miimon 100 ms
        assert lab.vms["vmA2"].ping("192.168.0.11", count=3), "pings stopped after a member failed"
        now = host.run("cat", "/sys/class/net/hnv-team/bonding/active_slave").stdout.strip()
        assert now != active
    finally:
        lab.switch.ip("link", "set", f"a{active[-1]}", "up")


def test_reapply_is_empty_and_one_record_removal_is_exact(lab):
    rec = lab.reconcilers["a"]
    state = parse_host_state(lab.state("a"))
    again = rec.reconcile(state)  # the state hnv-agent apply applied, a second time
    assert again.planned == 0 and again.applied == 0 and again.errors == [], again.plan.describe()
    assert rec.plan(state).describe() == "nothing to do"

    smaller = parse_host_state(without_record(lab.state("a"), "vmB2"))
    plan = rec.plan(smaller)
    described = plan.describe().splitlines()
    # The tunnel stays: host B is still a peer of Fabrikam2 (vmB2s, other subnet).
    assert described == [
        f"delete neighbour 192.168.0.11 on hnvb{F2_VSID} -> 00:15:5d:00:02:0b",
        f"delete fdb 00:15:5d:00:02:0b on hnvb{F2_VSID} -> {tunnel_name('a', F2_VSID, 'Fabrikam2')}",
    ], plan.describe()
    result = rec.reconcile(smaller)
    assert result.errors == [] and result.applied == 2
    have = rec.observe()
    assert (f"hnvb{F2_VSID}", "192.168.0.11") not in have.neighbours
    assert (f"hnvb{F3_VSID}", "192.168.0.11") in have.neighbours, "the other tenant's record went too"
    assert not lab.vms["vmA2"].ping("192.168.0.11", wait=0.5)
    assert rec.reconcile(state).errors == []
    assert lab.vms["vmA2"].ping("192.168.0.11", count=2)


def test_drift_deleted_tunnel_and_fdb_entry_are_repaired(lab):
    host, rec = lab.hosts["a"], lab.reconcilers["a"]
    state = parse_host_state(lab.state("a"))
    tunnel = tunnel_name("a", F3_VSID, "Fabrikam3")
    host.ip("link", "del", tunnel)
    host.run("bridge", "fdb", "del", "00:15:5d:00:02:0b", "dev", tunnel_name("a", F2_VSID, "Fabrikam2"), "master")
    assert not lab.vms["vmA3"].ping("192.168.0.11", wait=0.5)
    result = rec.reconcile(state)
    assert result.errors == []
    described = result.plan.describe()
    assert f"add tunnel {tunnel}" in described and "add fdb 00:15:5d:00:02:0b" in described, described
    assert rec.plan(state).is_empty
    assert lab.vms["vmA3"].ping("192.168.0.11", count=2) and lab.vms["vmA2"].ping("192.168.0.11", count=2)


def moved_to_b(document: dict, vm_name: str, *, keep_port: bool) -> dict:
    """Host A's document once `vm_name` (one of A's VMs) lives on host B: its record on
    B's PA; with `keep_port` its port still here, as on a migration's source between
    its FDB entry moving to the tunnel and its port going (one apply of stage `peers`)."""
    doc = copy.deepcopy(document)
    vm = next(v for v in VMS if v.name == vm_name)
    for record in doc["records"]:
        if record.get("vm_name") == vm_name:
            record["pa"] = PA[("b", vm.network)]
    if not keep_port:
        doc["ports"] = [p for p in doc["ports"] if p["name"] != vm_name]
    doc["generation"] += 1
    return doc


def test_a_moved_vms_frames_by_its_old_port_never_pull_its_fdb_entry_off_the_tunnel(lab):
    """A migration's source (stage `peers`) moves the VM's FDB entry to the tunnel towards
    the destination, then deletes the VM's port; until then the VM still sends by that
    port. The entry is the agent's (a lookup record): the bridge must not learn it back
    onto the port, or deleting the port flushes it and what the peers still send the
    source for the VM is flooded, which tunnel ports refuse: lost until the next
    reconcile (the cause of a 0.5-0.8 s gap of echoes in the migration-under-ping test)."""
    host, rec, vm_a = lab.hosts["a"], lab.reconcilers["a"], lab.vms["vmA2"]
    mac, bridge = "00:15:5d:00:02:0a", naming.vsid_bridge(F2_VSID)
    tunnel = tunnel_name("a", F2_VSID, "Fabrikam2")
    original = parse_host_state(lab.state("a"))

    def entry() -> str:
        """The VM MAC's line of the bridge's table ('' if none): `<mac> dev <port> ... master <bridge> static'."""
        lines = host.run("bridge", "fdb", "show", "br", bridge).stdout.splitlines()
        return next((line for line in lines if line.startswith(f"{mac} dev ")), "")

    try:
        moving = parse_host_state(moved_to_b(lab.state("a"), "vmA2", keep_port=True))
        assert rec.reconcile(moving).errors == []
        assert entry().startswith(f"{mac} dev {tunnel} ") and "sticky" in entry(), entry()
        vm_a.ip("neigh", "flush", "dev", "eth0")
        vm_a.ping("192.168.0.1", count=2, wait=0.5)  # ARP and echoes from its MAC, answered or not
        assert entry().startswith(f"{mac} dev {tunnel} "), f"learnt back onto the port: {entry()}"
        gone = parse_host_state(moved_to_b(lab.state("a"), "vmA2", keep_port=False))
        assert rec.reconcile(gone).errors == []
        assert entry().startswith(f"{mac} dev {tunnel} "), f"lost with the port: {entry()!r}"
        assert rec.plan(gone).is_empty, rec.plan(gone).describe()
    finally:
        assert rec.reconcile(original).errors == []
    assert vm_a.ping("192.168.0.11", count=2)


STREAM_BYTES = 4 << 20


def tenant_stream_packets(lab, tunnels: tuple[str, ...]) -> tuple[int, int]:
    """Send STREAM_BYTES over TCP from vmA2 to vmB2; (packets out of host A's tunnel
    devices, packets out of its NICs) while it ran. A TCP super-packet the tunnel
    encapsulates leaves the NIC whole unless a device on the way segments it."""
    server = in_netns(lab.vms["vmB2"].name, lambda: socket.create_server(("192.168.0.11", 5202)))
    server.settimeout(60)
    host = lab.hosts["a"]
    with server:
        before = host.tx_packets(*tunnels), host.tx_packets("eth0", "eth1")
        client = in_netns(lab.vms["vmA2"].name, lambda: socket.create_connection(("192.168.0.11", 5202), 60))
        accepted = server.accept()[0]
        received = 0
        with client, accepted:
            accepted.settimeout(60)
            sender = threading.Thread(target=client.sendall, args=(b"x" * STREAM_BYTES,))
            sender.start()
            while received < STREAM_BYTES and (chunk := accepted.recv(1 << 16)):
                received += len(chunk)
            sender.join(60)
        assert received == STREAM_BYTES, f"{received} of {STREAM_BYTES} bytes arrived"
        return host.tx_packets(*tunnels) - before[0], host.tx_packets("eth0", "eth1") - before[1]


def offloaded(ns, device: str, feature: str) -> bool:
    """Whether `device` offers segmentation `feature` (``ethtool -k``: on, not fixed off)."""
    shown = dict(line.strip().split(": ", 1) for line in ns.run("ethtool", "-k", device).stdout.splitlines()
                 if ": " in line)
    return shown[feature].startswith("on")


def assert_super_packets_reach_the_nic(lab, tunnels: tuple[str, ...], feature: str = "tx-gre-segmentation") -> None:
    """The provider VLAN device sits on the team, not on the switch's bridge (a bridge
    offers no segmentation offload for encapsulated packets). When the kernel lets the
    VLAN device on the bond offer encapsulated segmentation (bonding's vlan_features with
    NETIF_F_GSO_ENCAP_ALL, in kernels from late 2024), the NICs send about as many packets
    as the tunnel; when it does not (Debian's 6.1: "off [requested on]"), the VLAN device
    segments in software and the NICs send one packet per segment: what docs/benchmarks.md
    says, checked so that a kernel that changes either way is noticed."""
    tunnel_sent, nic_sent = tenant_stream_packets(lab, tunnels)
    segments = STREAM_BYTES // 1400
    assert tunnel_sent < segments / 4, f"the tunnel sent {tunnel_sent} packets: no super-packets to keep"
    device = naming.provider_vlan("hnv-sw", PROVIDER_VLAN)
    assert lab.reconcilers["a"].observe().links[device].option("link") == "hnv-team"
    offers = offloaded(lab.hosts["a"], device, feature)
    if offers:
        assert nic_sent < 2 * tunnel_sent + 20, (
            f"the NICs sent {nic_sent} packets for the tunnel's {tunnel_sent}: segmented on the way")
    else:
        assert nic_sent >= segments * 0.9, (
            f"{device} offers no {feature}, yet the NICs sent {nic_sent} packets for {segments} segments")
    print(f"{feature} on {device}: {offers}; tunnel {tunnel_sent} packets, NICs {nic_sent}")


def test_tenant_tcp_leaves_the_host_as_super_packets(lab):
    assert_super_packets_reach_the_nic(lab, (tunnel_name("a", F2_VSID, "Fabrikam2"),))


def test_bad_document_is_refused_and_kernel_untouched(lab, tmp_path):
    rec = lab.reconcilers["a"]
    before = rec.observe()
    doc = lab.state("a")
    doc["records"][0]["vsid"] = 42
    doc["routing_domains"][0]["subnets"][0]["mtu"] = 1500
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    proc = hnv_agent("apply", str(bad), "--netns", lab.hosts["a"].name)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "records[0].vsid: VSID 42 is outside 4096..16777214" in proc.stderr, proc.stderr
    assert "nothing was changed" in proc.stderr
    assert rec.observe() == before


def test_show_reads_records_and_provider_addresses_from_the_kernel(lab):
    proc = hnv_agent("show", "records", "--netns", lab.hosts["a"].name, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {"CustomerAddress": "192.168.0.11", "VirtualSubnetID": F2_VSID, "MACAddress": "00:15:5d:00:02:0b",
            "ProviderAddress": "10.80.2.21", "Type": "Static", "VMName": ""} in rows
    local = [r for r in rows if r["VMName"] == "vmA2"]
    assert local and local[0]["CustomerAddress"] == "192.168.0.10"
    pas = {r["ProviderAddress"]: r for r in show.provider_addresses(lab.reconcilers["a"].observe())}
    assert set(pas) == {PA[("a", "Fabrikam2")], PA[("a", "Fabrikam3")]}
    assert all(r["VlanID"] == PROVIDER_VLAN and r["AddressState"] == "Preferred" for r in pas.values())


def test_vxlan_mode_carries_vni_equal_vsid_on_udp_4789(lab, tmp_path):
    for host in ("a", "b"):
        result = lab.reconcilers[host].reconcile(parse_host_state(lab.state(host, generation=5, encapsulation="vxlan")))
        assert result.errors == [], result.errors
        assert not any(l.role == naming.TUNNEL for l in lab.reconcilers[host].observe().links.values())
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "vxlan")
    with stack:
        assert lab.vms["vmA2"].ping("192.168.0.11", count=3), "no ping over VXLAN"
    udp = [p for p in read_all(pcaps) if UDP in p and p[UDP].dport == 4789]
    assert udp, "no VXLAN packet crossed the trunk"
    for packet in udp:
        assert packet[Dot1Q].vlan == PROVIDER_VLAN
        assert packet[VXLAN].vni == F2_VSID, packet.summary()
        assert {packet[IP].src, packet[IP].dst} == {PA[("a", "Fabrikam2")], PA[("b", "Fabrikam2")]}
    assert not [p for p in read_all(pcaps) if IP in p and p[IP].proto == IPPROTO_GRE]
    assert_super_packets_reach_the_nic(lab, (naming.vxlan_device(F2_VSID),), "tx-udp_tnl-segmentation")
