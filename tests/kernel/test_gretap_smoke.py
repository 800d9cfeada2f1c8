"""NVGRE smoke: gretap keyed by VSID<<8 between two namespaces over a veth underlay.

Inner (customer) addresses on the gretap devices ping each other; a capture on the
underlay shows that every frame crossed it as NVGRE: IP protocol 47, GRE protocol
0x6558, key >> 8 == the VSID.
"""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import GRE
from scapy.utils import rdpcap

from tests.lib.netns import Namespace, veth_pair
from tests.lib.nvgre import ETH_P_TEB, IPPROTO_GRE, read_nvgre

VSID = 3535905  # Fabrikam2's VM subnet in the seed walkthrough
PA_A, PA_B = "10.80.2.20", "10.80.2.21"  # provider addresses (transport site 10.80.2.0/24)
CA_A, CA_B = "192.168.0.10", "192.168.0.11"  # customer addresses (VM subnet 192.168.0.0/24)


def _nvgre_host(ns: Namespace, underlay: str, pa: str, peer_pa: str, ca: str, vsid: int) -> None:
    """PA on the underlay, then a gretap from that PA to the peer's, keyed VSID<<8."""
    ns.ip("addr", "add", f"{pa}/24", "dev", underlay)
    # `key` sets both the input and output key: frames with another key are dropped.
    ns.ip("link", "add", "nvgre0", "type", "gretap", "local", pa, "remote", peer_pa,
          "key", str(vsid << 8))
    ns.ip("addr", "add", f"{ca}/24", "dev", "nvgre0")
    ns.ip("link", "set", "nvgre0", "up")


def test_gretap_carries_ping_as_nvgre_with_vsid(make_netns, tmp_path):
    a, b = make_netns(), make_netns()
    veth_pair(a, "ul-a", b, "ul-b")
    _nvgre_host(a, "ul-a", PA_A, PA_B, CA_A, VSID)
    _nvgre_host(b, "ul-b", PA_B, PA_A, CA_B, VSID)

    with a.capture("ul-a", tmp_path / "underlay.pcap") as pcap:
        assert a.ping(CA_B, count=3), f"{CA_B} did not answer through the NVGRE tunnel"

    outer = [p for p in rdpcap(str(pcap)) if IP in p]
    assert outer, "nothing captured on the underlay"
    for packet in outer:
        assert packet[IP].proto == IPPROTO_GRE, packet.summary()
        assert packet[GRE].proto == ETH_P_TEB, packet.summary()
        assert packet[GRE].key >> 8 == VSID, packet.summary()

    frames = read_nvgre(pcap)
    assert len(frames) == len(outer)
    assert {(f.outer_src, f.outer_dst) for f in frames} == {(PA_A, PA_B), (PA_B, PA_A)}
    icmp = [(f.inner[IP].src, f.inner[IP].dst, f.inner[ICMP].type)
            for f in frames if ICMP in f.inner]
    assert (CA_A, CA_B, 8) in icmp, "no echo request inside NVGRE"
    assert (CA_B, CA_A, 0) in icmp, "no echo reply inside NVGRE"


def test_gretap_with_another_vsid_does_not_answer(make_netns):
    a, b = make_netns(), make_netns()
    veth_pair(a, "ul-a", b, "ul-b")
    _nvgre_host(a, "ul-a", PA_A, PA_B, CA_A, VSID)
    _nvgre_host(b, "ul-b", PA_B, PA_A, CA_B, VSID + 1)

    # The underlay itself works...
    assert a.ping(PA_B), "the PA network must work, or the negative below proves nothing"
    # ...but b's tunnel drops frames keyed for another VSID: tenant isolation.
    assert not a.ping(CA_B, wait=0.5), "a gretap keyed for another VSID answered"
