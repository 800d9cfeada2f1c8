"""Capture on any lab link and decode what crossed it: VLAN tags, NVGRE, VXLAN.

Owns where a lab link is (``switch:CON-HyperV6-eth0``, ``switch:h6-eth0``,
``CON-HyperV6:eth0``, or any ``NAMESPACE:IFNAME``), running tcpdump there, and the
decoding a network engineer reads on the wire: the 802.1Q tag, for NVGRE (RFC 7637:
IP protocol 47, GRE key bit set, protocol 0x6558, key = VSID << 8 | FlowID) the VSID,
FlowID and outer provider addresses, for VXLAN (UDP 4789) the VNI, and inside either the
tenant frame's customer addresses. libpcap puts the VLAN tag that the kernel keeps out
of band (hardware-offload style, as veth does) back into the captured frame, so a tag
that was on the wire is in the pcap.

It changes nothing in the lab.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet
from scapy.utils import PcapReader

from agent.nvgre import decapsulate
from agent.netns import netns_exec_argv
from netns_lab.build import LabError, namespace_exists
from netns_lab.processes import stop_process
from netns_lab.tcpdump import tcpdump_argv
from netns_lab.topology import Topology

VXLAN_PORT = 4789


def resolve_link(spec: str, topology: Topology) -> tuple[str, str]:
    """``NODE:LINK`` -> (namespace, interface); ``switch:<host>-<nic>`` names a switch port."""
    node, sep, link = spec.partition(":")
    if not sep or not node or not link:
        raise LabError(f"link {spec!r}: expected NODE:LINK, e.g. switch:CON-HyperV6-eth0 or CON-HyperV6:eth0")
    if node in ("switch", topology.switch.namespace):
        for host in topology.hosts:
            for nic in host.nics:
                if link in (f"{host.name}-{nic}", topology.switch_port(host, nic)):
                    return topology.switch.namespace, topology.switch_port(host, nic)
        if link == topology.switch.bridge:
            return topology.switch.namespace, link
        raise LabError(f"link {spec!r}: the switch has no port {link} "
                       f"(ports are <host>-<nic>, e.g. {topology.hosts[-1].name}-{topology.hosts[-1].nics[0]})")
    if not namespace_exists(node):
        raise LabError(f"link {spec!r}: no namespace {node} (is the lab up? is {node} a host or VM?)")
    return node, link


ICMPV6_TYPES = {1: "unreachable", 128: "echo-request", 129: "echo-reply", 133: "router-solicitation",
                134: "router-advertisement", 135: "neighbour-solicitation", 136: "neighbour-advertisement"}


@dataclass(frozen=True)
class DecodedFrame:
    """One captured frame, as the walkthrough reads it."""

    vlans: tuple[int, ...]
    encapsulation: str | None  # "nvgre", "vxlan" or None
    vsid: int | None  # NVGRE VSID or VXLAN VNI
    flow_id: int | None
    outer_src: str | None
    outer_dst: str | None
    inner_src: str | None  # customer addresses (or the plain frame's IPs)
    inner_dst: str | None
    what: str  # "ICMP echo-request", "ARP who-has", ...

    def line(self) -> str:
        vlan = f"802.1Q VLAN {','.join(map(str, self.vlans))} " if self.vlans else "untagged "
        if self.encapsulation == "nvgre":
            return (f"{vlan}NVGRE VSID {self.vsid} FlowID {self.flow_id} "
                    f"PA {self.outer_src} -> {self.outer_dst} | CA {self.inner_src} -> {self.inner_dst} {self.what}")
        if self.encapsulation == "vxlan":
            return (f"{vlan}VXLAN VNI {self.vsid} PA {self.outer_src} -> {self.outer_dst} "
                    f"| CA {self.inner_src} -> {self.inner_dst} {self.what}")
        return f"{vlan}{self.inner_src} -> {self.inner_dst} {self.what}"


def _what(frame: Packet) -> tuple[str | None, str | None, str]:
    # Only the outermost IP header counts: a GRE packet that is not NVGRE still holds
    # an ICMP layer deeper inside, which is not what this frame is.
    if IP in frame and frame[IP].proto == 1 and ICMP in frame:
        icmp = frame[ICMP]
        kind = {0: "echo-reply", 8: "echo-request", 3: "unreachable"}.get(int(icmp.type), f"type {icmp.type}")
        return frame[IP].src, frame[IP].dst, f"ICMP {kind}"
    if ARP in frame:
        arp = frame[ARP]
        return arp.psrc, arp.pdst, "ARP " + ("who-has" if arp.op == 1 else "is-at")
    if IP in frame and frame[IP].proto == 6 and TCP in frame:
        tcp = frame[TCP]
        return frame[IP].src, frame[IP].dst, f"TCP {tcp.sport} > {tcp.dport} [{tcp.flags}]"
    if IP in frame:
        return frame[IP].src, frame[IP].dst, f"IP proto {frame[IP].proto}"
    if IPv6 in frame and frame[IPv6].nh == 58:  # ICMPv6: the type is its first byte
        kind = ICMPV6_TYPES.get(int(frame[IPv6].payload.type), f"type {frame[IPv6].payload.type}")
        return frame[IPv6].src, frame[IPv6].dst, f"ICMPv6 {kind}"
    if IPv6 in frame:
        return frame[IPv6].src, frame[IPv6].dst, f"IPv6 next header {frame[IPv6].nh}"
    if Ether in frame:
        return frame[Ether].src, frame[Ether].dst, f"ethertype 0x{frame[Ether].type:04x}"
    return None, None, frame.summary()


def decode(packet: Packet) -> DecodedFrame:
    vlans = []
    layer = packet
    while Dot1Q in layer:
        layer = layer[Dot1Q]
        vlans.append(int(layer.vlan))
        layer = layer.payload
    nvgre = decapsulate(packet)  # agent.nvgre: the RFC 7637 rules, IPv4 or IPv6 outside
    if nvgre is not None:
        src, dst, what = _what(nvgre.inner)
        return DecodedFrame(tuple(vlans), "nvgre", nvgre.vsid, nvgre.flow_id,
                            nvgre.outer_src, nvgre.outer_dst, src, dst, what)
    if UDP in packet and packet[UDP].dport == VXLAN_PORT:
        vxlan = packet[UDP].payload
        if not isinstance(vxlan, VXLAN):
            vxlan = VXLAN(bytes(vxlan))
        inner = vxlan.payload if isinstance(vxlan.payload, Ether) else Ether(bytes(vxlan.payload))
        src, dst, what = _what(inner)
        outer = packet[IP] if IP in packet else packet[IPv6]
        return DecodedFrame(tuple(vlans), "vxlan", int(vxlan.vni), None,
                            outer.src, outer.dst, src, dst, what)
    src, dst, what = _what(packet)
    return DecodedFrame(tuple(vlans), None, None, None, None, None, src, dst, what)


def read_pcap(pcap: Path) -> list[DecodedFrame]:
    with PcapReader(str(pcap)) as reader:
        return [decode(packet) for packet in reader]


class Capture:
    """tcpdump on ``netns``/``interface`` into ``pcap`` while running; start, stop, read.

    ``start`` returns once tcpdump says it is listening, so nothing sent afterwards is
    missed (netns_lab.tcpdump says why the flags keep every packet), and SIGINT makes
    tcpdump flush and close the file.
    """

    def __init__(self, netns: str, interface: str, pcap: Path, *, count: int | None = None,
                 bpf_filter: str = ""):
        self.netns, self.interface, self.pcap = netns, interface, pcap
        count_args = ("-c", str(count)) if count else ()
        self.argv = netns_exec_argv(netns, tcpdump_argv(interface, pcap, bpf_filter, *count_args))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Capture:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        banner = self.proc.stderr.readline()  # "tcpdump: listening on <if>, ..." once bound
        if "listening on" not in banner:
            self.proc.kill()
            rest = self.proc.communicate()[1]
            raise LabError(f"capture on {self.netns}:{self.interface} failed: {(banner + rest).strip()}")
        return self

    def wait(self, timeout: float | None) -> None:
        """Until ``count`` packets were captured or ``timeout`` seconds passed."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.stop()

    def stop(self) -> list[DecodedFrame]:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)  # SIGINT: tcpdump flushes the file first
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        return read_pcap(self.pcap) if self.pcap.exists() and self.pcap.stat().st_size else []

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def capture_link(spec: str, topology: Topology, *, write: Path | None, count: int | None,
                 timeout: float | None, bpf_filter: str = "") -> tuple[Path, list[DecodedFrame]]:
    """``hnv-lab capture``: capture until ``count`` frames or ``timeout``, then decode."""
    netns, interface = resolve_link(spec, topology)
    pcap = write or Path(tempfile.mkdtemp(prefix="hnv-lab-capture-")) / "capture.pcap"
    capture = Capture(netns, interface, pcap, count=count, bpf_filter=bpf_filter).start()
    capture.wait(timeout)
    return pcap, read_pcap(pcap) if pcap.exists() and pcap.stat().st_size else []
