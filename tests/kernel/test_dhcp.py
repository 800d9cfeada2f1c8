"""DHCP answered on the host, in the kernel tier: a standard client in a VM namespace.

The agent lab of tests/kernel/agentlab.py (two hosts, a trunked switch, tenant VMs in
namespaces), both hosts reconciled with a Reconciler; Fabrikam2's first subnet carries
DNS servers and a lease time. The VMs run busybox udhcpc (-B: the broadcast flag, as
Windows sets it; the servers broadcast their replies anyway, which a bridge would flood
into the tunnels without the guard) with a script that configures eth0 as a real client
does and logs what it was given. The tests run in file
order and share the lab.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.utils import rdpcap

from agent import naming
from agent.dhcp import ServerFiles
from agent.reconcile import Reconciler
from agent.state import parse_host_state
from tests.kernel.agentlab import F2_VSID, F3_VSID, AgentLab
from tests.kernel.test_agent_e2e import capture_trunks, read_all
from tests.lib.netns import NamespaceFactory
from tests.lib.wait import wait_until
from tests.lib.nvgre import IPPROTO_GRE, decode_nvgre

DNS_SERVERS = ["10.0.0.53", "10.0.0.54"]
LEASE_TIME = 600
TENANT_MTU = 1458  # provider MTU 1500 - 42 (NVGRE over IPv4)
DHCP_PORTS = {67, 68}
UNKNOWN_MAC = "00:15:5d:99:99:99"
NEW_VM = ("vmA2new", "00:15:5d:00:02:2a", "192.168.0.20")
WAIT_S = 60  # for a condition under TCG emulation on a loaded machine


def state_a(lab: AgentLab, generation: int, extra_ports: tuple[dict, ...] = (), without: tuple[str, ...] = ()):
    doc = lab.state("a", generation=generation)
    doc["routing_domains"][0]["subnets"][0].update(dns_servers=DNS_SERVERS, lease_time=LEASE_TIME)
    doc["ports"] = [p for p in doc["ports"] if p["name"] not in without] + list(extra_ports)
    return parse_host_state(doc)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = AgentLab(NamespaceFactory(prefix="dh"))
    try:
        lab.build()
        run_dir = tmp_path_factory.mktemp("dhcp-run")
        lab.reconcilers = {h: Reconciler(netns=lab.hosts[h].name, run_dir=run_dir / h) for h in lab.hosts}
        lab.generation = 1
        result = lab.reconcilers["a"].reconcile(state_a(lab, 1))
        assert result.errors == [], result.errors
        result = lab.reconcilers["b"].reconcile(parse_host_state(lab.state("b")))
        assert result.errors == [], result.errors
        yield lab
    finally:
        lab.close()  # kills every process left in the lab's namespaces, dnsmasq too


def reconcile_a(lab, **kwargs):
    lab.generation += 1
    result = lab.reconcilers["a"].reconcile(state_a(lab, lab.generation, **kwargs))
    assert result.errors == [], result.errors
    return result


def server_files(lab, vsid: int) -> ServerFiles:
    return ServerFiles(lab.reconcilers["a"].dhcp.run_dir, naming.vsid_bridge(vsid))


def server_pid(lab, vsid: int) -> int:
    return int(server_files(lab, vsid).pid.read_text())


def alive(pid: int) -> bool:
    """Running: there and not a zombie (a daemon reparented to an init that reaps late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def client_script(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A udhcpc script that configures eth0 like a real client and logs each event once the
    event is applied (a test waiting for "renew" then finds the address back in place:
    the script flushes it first, as busybox's own script does)."""
    log, script = tmp_path / f"{name}.log", tmp_path / f"{name}.sh"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in bound|renew)\n'
        '  ip addr flush dev "$interface"\n'
        '  ip addr add "$ip/$subnet" dev "$interface"\n'
        '  ip route replace default via "$router" dev "$interface"\n'
        "esac\n"
        f'echo "$1 ip=$ip mask=$subnet router=$router dns=$dns mtu=$mtu lease=$lease" >> {log}\n'
    )
    script.chmod(0o755)
    return script, log


def udhcpc(vm, script: Path, *extra: str, tries: int = 5):
    """One DHCP exchange (exit when bound or after `tries` discovers)."""
    return vm.run("busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-B", "-O", "mtu",
                  "-t", str(tries), "-T", "2", "-s", str(script), *extra, check=False, timeout=WAIT_S + 30)


def events(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def dhcp_frames(packets) -> list[str]:
    """Every DHCP frame on the wire, plain or inside an NVGRE packet."""
    found = []
    for packet in packets:
        frames = [packet]
        if IP in packet and packet[IP].proto == IPPROTO_GRE:
            decoded = decode_nvgre(packet)
            if decoded is not None:
                frames.append(decoded.inner)
        for frame in frames:
            if UDP in frame and {frame[UDP].sport, frame[UDP].dport} & DHCP_PORTS:
                found.append(frame.summary())
    return found


def test_a_vm_gets_exactly_its_address_gateway_dns_and_mtu_and_no_dhcp_crosses_the_trunk(lab, tmp_path):
    vm = lab.vms["vmA2"]
    vm.ip("addr", "flush", "dev", "eth0")  # as a VM boots: no address until DHCP
    script, log = client_script(tmp_path, "vmA2")
    stack, pcaps = capture_trunks(lab, tmp_path, "a", "dhcp")
    with stack:
        proc = udhcpc(vm, script)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The lease works: the gateway and the peer VM behind the NVGRE tunnel answer.
        assert vm.ping("192.168.0.1", count=2), "the gateway does not answer the DHCP-configured VM"
        assert vm.ping("192.168.0.11", count=2), "vmB2 (host B) unreachable from the DHCP-configured VM"
    bound = [line for line in events(log) if line.startswith("bound ")]
    assert bound == [f"bound ip=192.168.0.10 mask=255.255.255.0 router=192.168.0.1 "
                     f"dns={' '.join(DNS_SERVERS)} mtu={TENANT_MTU} lease={LEASE_TIME}"], events(log)
    assert "192.168.0.10/24" in vm.ip("-4", "addr", "show", "dev", "eth0").stdout
    packets = read_all(pcaps)
    assert any(IP in p and p[IP].proto == IPPROTO_GRE for p in packets), "the capture saw no tunnel traffic"
    assert dhcp_frames(packets) == [], "DHCP crossed host A's trunk"


def test_a_vm_with_an_unknown_mac_gets_no_offer(lab, tmp_path):
    host = lab.hosts["a"]
    rogue = lab.factory.create("rogue")
    host.ip("link", "add", "rogue0", "type", "veth", "peer", "name", "eth0", "netns", rogue.name)
    try:
        host.ip("link", "set", "rogue0", "master", naming.vsid_bridge(F2_VSID), "up")
        rogue.ip("link", "set", "eth0", "address", UNKNOWN_MAC)
        rogue.ip("link", "set", "eth0", "up")
        script, log = client_script(tmp_path, "rogue")
        with rogue.capture("eth0", tmp_path / "rogue.pcap", "udp port 67 or udp port 68") as pcap:
            proc = udhcpc(rogue, script, tries=3)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert not any(line.startswith("bound") for line in events(log)), events(log)
        sent_by_server = [p.summary() for p in rdpcap(str(pcap)) if UDP in p and p[UDP].sport == 67]
        assert sent_by_server == [], "the host answered a MAC it has no VM for"
        assert rogue.ip("-4", "addr", "show", "dev", "eth0").stdout.count("inet ") == 0
        assert alive(server_pid(lab, F2_VSID)), "dnsmasq died on an unknown client"
    finally:
        host.ip("link", "del", "rogue0", check=False)


def test_a_vm_arriving_is_served_after_a_reload_not_a_restart(lab, tmp_path):
    pid = server_pid(lab, F2_VSID)
    name, mac, ca = NEW_VM
    netns = lab.factory.create(name.lower())
    port = {"name": name, "mac": mac, "vsid": F2_VSID, "ca": f"{ca}/24", "netns": netns.name}
    result = reconcile_a(lab, extra_ports=(port,))
    assert f"reload dhcp {naming.vsid_bridge(F2_VSID)}" in result.plan.describe(), result.plan.describe()
    assert server_pid(lab, F2_VSID) == pid and alive(pid), "the server was restarted for a hosts change"
    netns.ip("addr", "flush", "dev", "eth0")
    script, log = client_script(tmp_path, name)
    proc = udhcpc(netns, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(line.startswith(f"bound ip={ca} ") for line in events(log)), events(log)
    # And it leaves: a reload again, and it is no longer answered.
    result = reconcile_a(lab)
    assert f"reload dhcp {naming.vsid_bridge(F2_VSID)}" in result.plan.describe(), result.plan.describe()
    assert f"{mac}," not in server_files(lab, F2_VSID).hosts.read_text()


def test_a_killed_server_is_restarted_and_a_running_client_renews_its_address(lab, tmp_path):
    """The restarted server knows no lease (as the host a VM migrated to): the VM's
    renewal is answered from its static entry and it keeps its address."""
    vm = lab.vms["vmA2"]
    script, log = client_script(tmp_path, "renew")
    client = vm.popen("busybox", "udhcpc", "-i", "eth0", "-f", "-B", "-O", "mtu", "-T", "2",
                      "-s", str(script))
    try:
        wait_until(lambda: any(line.startswith("bound ip=192.168.0.10 ") for line in events(log)),
                   WAIT_S, "the first lease", interval=1)
        old = server_pid(lab, F2_VSID)
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not alive(old), WAIT_S, "dnsmasq to die", interval=1)
        result = lab.reconcilers["a"].reconcile(state_a(lab, lab.generation))  # the periodic drift repair
        assert result.errors == [], result.errors
        assert f"start dhcp {naming.vsid_bridge(F2_VSID)} not running" in result.plan.describe()
        new = server_pid(lab, F2_VSID)
        assert new != old and alive(new)
        client.send_signal(signal.SIGUSR1)  # renew now
        wait_until(lambda: any(line.startswith("renew ip=192.168.0.10 ") for line in events(log)),
                   WAIT_S, "the renewal at the restarted server", interval=1)
        assert vm.ping("192.168.0.11", count=2), "the renewed VM lost its network"
    finally:
        client.terminate()
        client.wait(timeout=30)


def test_a_bridge_without_vm_loses_its_server(lab):
    pid = server_pid(lab, F3_VSID)
    result = reconcile_a(lab, without=("vmA3",))
    assert f"stop dhcp {naming.vsid_bridge(F3_VSID)}" in result.plan.describe(), result.plan.describe()
    wait_until(lambda: not alive(pid), WAIT_S, "Fabrikam3's dnsmasq to exit", interval=1)
    assert not server_files(lab, F3_VSID).config.exists()
    assert alive(server_pid(lab, F2_VSID)), "Fabrikam2's server must keep running"
    # Still in sync: nothing more to do.
    assert lab.reconcilers["a"].reconcile(state_a(lab, lab.generation, without=("vmA3",))).planned == 0
