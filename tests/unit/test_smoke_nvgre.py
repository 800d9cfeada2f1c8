"""tests.lib.nvgre: the capture decoder used by the kernel tier."""

from __future__ import annotations

import pytest
from scapy.layers.inet import GRE, ICMP, IP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tests.lib.nvgre import ETH_P_TEB, decode_nvgre, encode_nvgre, read_nvgre

INNER = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b") / IP(src="192.168.0.10", dst="192.168.0.11") / ICMP()


def test_round_trip_through_bytes_keeps_vsid_flow_id_and_inner_frame():
    wire = Ether() / encode_nvgre("10.80.2.20", "10.80.2.21", 3535905, INNER, flow_id=0x2A)
    frame = decode_nvgre(Ether(bytes(wire)))
    assert frame is not None
    assert (frame.outer_src, frame.outer_dst) == ("10.80.2.20", "10.80.2.21")
    assert (frame.vsid, frame.flow_id) == (3535905, 0x2A)
    assert frame.inner[IP].dst == "192.168.0.11" and ICMP in frame.inner


def test_key_carries_vsid_in_its_upper_24_bits():
    packet = IP(bytes(encode_nvgre("10.0.0.1", "10.0.0.2", 0xABCDEF, INNER)))
    assert packet[GRE].key == 0xABCDEF00 and packet[GRE].proto == ETH_P_TEB


@pytest.mark.parametrize("packet", [
    IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(),  # not GRE
    IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / GRE(proto=ETH_P_TEB) / INNER,  # no key
    IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / GRE(key_present=1, key=1 << 8, proto=0x0800) / INNER[IP],  # not Ethernet
    IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / GRE(key_present=1, seqnum_present=1, key=1 << 8, proto=ETH_P_TEB) / INNER,
], ids=["icmp", "gre-without-key", "gre-ip-payload", "gre-with-sequence"])
def test_non_nvgre_is_not_decoded(packet):
    assert decode_nvgre(IP(bytes(packet))) is None


def test_read_nvgre_skips_other_packets_in_a_capture(tmp_path):
    pcap = tmp_path / "c.pcap"
    wrpcap(str(pcap), [
        Ether() / encode_nvgre("10.80.2.20", "10.80.2.21", 4096, INNER),
        Ether() / IP(src="10.80.2.20", dst="10.80.2.21") / ICMP(),
        Ether() / encode_nvgre("10.80.2.21", "10.80.2.20", 4097, INNER),
    ])
    assert [f.vsid for f in read_nvgre(pcap)] == [4096, 4097]


def test_vsid_out_of_range_is_refused():
    with pytest.raises(ValueError, match="VSID"):
        encode_nvgre("10.0.0.1", "10.0.0.2", 1 << 24, INNER)
