"""NVGRE header and packet codec (agent.nvgre): round trips and refusals, no kernel."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import GRE, Dot1Q, Ether

from agent.nvgre import (
    ETH_P_TEB,
    NotNvgre,
    decapsulate,
    decode_header,
    encapsulate,
    encode_header,
)

vsids = st.integers(min_value=0, max_value=0xFFFFFF)
flow_ids = st.integers(min_value=0, max_value=0xFF)


@given(vsids, flow_ids)
def test_header_round_trip(vsid, flow_id):
    header = decode_header(encode_header(vsid, flow_id))
    assert (header.vsid, header.flow_id) == (vsid, flow_id)
    assert header.key == (vsid << 8) | flow_id


def test_header_bytes_match_rfc_7637():
    # K bit only, protocol 0x6558, key = VSID 3535905 (0x35F421) << 8 | FlowID 0.
    assert encode_header(3535905).hex() == "2000655835f42100"


@settings(max_examples=25, deadline=None)  # scapy builds and parses each packet: slow
@given(vsids, flow_ids, st.binary(min_size=0, max_size=64))
def test_packet_round_trip_through_scapy_gre(vsid, flow_id, payload):
    inner = Ether(src="00:15:5d:00:00:01", dst="00:15:5d:00:00:02") / IP(src="192.168.0.10", dst="192.168.0.11") / ICMP() / payload
    wire = Ether() / Dot1Q(vlan=802) / encapsulate("10.80.2.20", "10.80.2.21", vsid, inner, flow_id)
    parsed = Ether(bytes(wire))
    # scapy's own GRE dissector agrees with our header...
    assert parsed[GRE].key_present == 1 and parsed[GRE].proto == ETH_P_TEB and parsed[GRE].key == (vsid << 8) | flow_id
    # ...and decapsulation gives the tenant frame back, byte for byte.
    frame = decapsulate(parsed)
    assert frame is not None
    assert (frame.outer_src, frame.outer_dst, frame.vsid, frame.flow_id) == ("10.80.2.20", "10.80.2.21", vsid, flow_id)
    assert bytes(frame.inner) == bytes(inner)


def test_ipv6_provider_addresses():
    inner = Ether() / IP()
    frame = decapsulate(Ether() / encapsulate("fd00::20", "fd00::21", 5001, inner))
    assert frame is not None and frame.vsid == 5001 and frame.outer_dst == "fd00::21"


@pytest.mark.parametrize("data, reason", [
    (bytes.fromhex("0000655800000000"), "key bit is clear"),
    (bytes.fromhex("a000655800000000"), "checksum or sequence"),
    (bytes.fromhex("3000655800000000"), "checksum or sequence"),
    (bytes.fromhex("2000080000000000"), "protocol type 0x0800"),
    (bytes.fromhex("2001655800000000"), "version 1"),
    (bytes.fromhex("20006558"), "shorter than"),
])
def test_not_nvgre_is_refused_with_reason(data, reason):
    with pytest.raises(NotNvgre, match=reason):
        decode_header(data)


def test_plain_gre_packet_is_not_decapsulated():
    packet = IP(src="10.80.2.20", dst="10.80.2.21") / GRE(proto=0x0800) / IP()
    assert decapsulate(packet) is None
    assert decapsulate(IP() / ICMP()) is None


@pytest.mark.parametrize("vsid, flow_id", [(-1, 0), (1 << 24, 0), (4096, 256)])
def test_encode_refuses_out_of_range(vsid, flow_id):
    with pytest.raises(ValueError, match="does not fit"):
        encode_header(vsid, flow_id)
