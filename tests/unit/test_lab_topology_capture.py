"""hnv-lab capture without a kernel: naming a lab link, and decoding what a capture holds."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import wrpcap

from agent.nvgre import encapsulate
from netns_lab.build import LabError
from netns_lab.capture import decode, read_pcap, resolve_link
from netns_lab.topology import load_topology

TOPOLOGY = load_topology()
VSID = 3535905
INNER = Ether(src="00:1d:d8:b7:1c:02", dst="00:1d:d8:b7:1c:03") / IP(src="192.168.0.10", dst="192.168.0.11") / ICMP()


@pytest.mark.parametrize("spec", ["switch:CON-HyperV6-eth0", "switch:h6-eth0", "lab-switch:CON-HyperV6-eth0"])
def test_switch_port_of_a_host_nic(spec):
    assert resolve_link(spec, TOPOLOGY) == ("lab-switch", "h6-eth0")


@pytest.mark.parametrize(("spec", "reason"), [
    ("CON-HyperV6", "expected NODE:LINK"),
    ("switch:CON-HyperV9-eth0", "the switch has no port CON-HyperV9-eth0"),
    ("CON-HyperV9:eth0", "no namespace CON-HyperV9"),
])
def test_bad_link_names_the_reason(spec, reason):
    with pytest.raises(LabError, match=reason):
        resolve_link(spec, TOPOLOGY)


def test_nvgre_on_vlan_802_decodes_vsid_flow_pas_and_cas(tmp_path):
    outer = Ether() / Dot1Q(vlan=802) / encapsulate("10.80.2.20", "10.80.2.21", VSID, INNER, flow_id=7)
    pcap = tmp_path / "wire.pcap"
    wrpcap(str(pcap), [Ether(bytes(outer))])
    [frame] = read_pcap(pcap)
    assert (frame.vlans, frame.encapsulation, frame.vsid, frame.flow_id) == ((802,), "nvgre", VSID, 7)
    assert (frame.outer_src, frame.outer_dst) == ("10.80.2.20", "10.80.2.21")
    assert (frame.inner_src, frame.inner_dst, frame.what) == ("192.168.0.10", "192.168.0.11", "ICMP echo-request")
    assert frame.line() == ("802.1Q VLAN 802 NVGRE VSID 3535905 FlowID 7 PA 10.80.2.20 -> 10.80.2.21 "
                            "| CA 192.168.0.10 -> 192.168.0.11 ICMP echo-request")


def test_vxlan_decodes_vni():
    packet = Ether(bytes(Ether() / IP(src="10.80.2.20", dst="10.80.2.21") / UDP(sport=40000, dport=4789)
                         / VXLAN(vni=VSID) / INNER))
    frame = decode(packet)
    assert (frame.encapsulation, frame.vsid, frame.outer_src, frame.inner_dst) == ("vxlan", VSID, "10.80.2.20", "192.168.0.11")


def test_plain_tagged_frame_and_arp():
    frame = decode(Ether(bytes(Ether() / Dot1Q(vlan=100) / IP(src="172.16.100.10", dst="172.16.100.11") / ICMP(type=0))))
    assert (frame.vlans, frame.encapsulation, frame.what) == ((100,), None, "ICMP echo-reply")
    arp = decode(Ether(bytes(Ether() / ARP(psrc="10.0.0.16", pdst="10.0.0.11"))))
    assert arp.line() == "untagged 10.0.0.16 -> 10.0.0.11 ARP who-has"


def test_gre_without_key_is_not_nvgre():
    from scapy.layers.l2 import GRE

    frame = decode(Ether(bytes(Ether() / IP(src="10.80.2.20", dst="10.80.2.21") / GRE(proto=0x6558) / INNER)))
    assert frame.encapsulation is None and frame.what == "IP proto 47"


def test_ipv6_echoes_and_neighbour_discovery_inside_nvgre_are_named():
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6ND_NS, IPv6

    echo = Ether(src="00:1d:d8:b7:1c:02", dst="00:1d:d8:b7:1c:03") / IPv6(src="fd00:6::10", dst="fd00:6::11") / ICMPv6EchoReply()
    frame = decode(Ether(bytes(Ether() / Dot1Q(vlan=802) / encapsulate("10.80.2.20", "10.80.2.21", VSID, echo))))
    assert (frame.encapsulation, frame.inner_src, frame.inner_dst, frame.what) == (
        "nvgre", "fd00:6::10", "fd00:6::11", "ICMPv6 echo-reply")
    solicit = Ether() / IPv6(src="fd00:6::10", dst="ff02::1:ff00:11") / ICMPv6ND_NS(tgt="fd00:6::11")
    assert decode(Ether(bytes(solicit))).what == "ICMPv6 neighbour-solicitation"
