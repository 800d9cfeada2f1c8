"""NVGRE (RFC 7637) decoding for captured test traffic, with scapy.

Owns the reading side only: given outer frames captured on an underlay device, find the
NVGRE packets and say which VSID and FlowID they carry and what Ethernet frame is inside.
NVGRE is GRE (IP protocol 47) with the key bit set, no checksum, no sequence number,
protocol type 0x6558 (Transparent Ethernet Bridging) and a 32-bit key that is
``VSID << 8 | FlowID``. Linux's gretap with ``key VSID<<8`` produces exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Packet
from scapy.utils import rdpcap

IPPROTO_GRE = 47
ETH_P_TEB = 0x6558  # Transparent Ethernet Bridging: the GRE payload is an Ethernet frame


@dataclass(frozen=True)
class NvgreFrame:
    """One NVGRE packet: outer (provider) addresses, VSID, FlowID and the inner frame."""

    outer_src: str
    outer_dst: str
    vsid: int
    flow_id: int
    inner: Ether


def decode_nvgre(packet: Packet) -> NvgreFrame | None:
    """The NVGRE view of ``packet``, or None if it is not NVGRE over IPv4.

    Not NVGRE: another IP protocol, GRE without a key, GRE carrying something other
    than Ethernet, or with the checksum or sequence bits set (RFC 7637 section 3.2).
    """
    if IP not in packet or packet[IP].proto != IPPROTO_GRE or GRE not in packet:
        return None
    gre = packet[GRE]
    if gre.proto != ETH_P_TEB or not gre.key_present or gre.chksum_present or gre.seqnum_present:
        return None
    inner = gre.payload
    if not isinstance(inner, Ether):
        inner = Ether(bytes(inner))
    key = int(gre.key)
    return NvgreFrame(packet[IP].src, packet[IP].dst, key >> 8, key & 0xFF, inner)


def read_nvgre(pcap: Path) -> list[NvgreFrame]:
    """Every NVGRE packet in a pcap file, in capture order."""
    frames = (decode_nvgre(p) for p in rdpcap(str(pcap)))
    return [f for f in frames if f is not None]


def encode_nvgre(outer_src: str, outer_dst: str, vsid: int, inner: Packet, flow_id: int = 0) -> IP:
    """An outer IPv4 NVGRE packet around ``inner`` (for tests of the decoder and of receivers)."""
    if not 0 <= vsid <= 0xFFFFFF or not 0 <= flow_id <= 0xFF:
        raise ValueError(f"VSID {vsid} / FlowID {flow_id} out of range (24 / 8 bits)")
    return IP(src=outer_src, dst=outer_dst, proto=IPPROTO_GRE) / GRE(
        key_present=1, key=(vsid << 8) | flow_id, proto=ETH_P_TEB) / inner
