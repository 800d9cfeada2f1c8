"""NVGRE in captures: read a pcap taken on an underlay device and keep the NVGRE packets.

The codec itself (header layout and checks, encapsulate/decapsulate with scapy) is
``agent.nvgre``; this module only adds reading captures, and keeps the names the
kernel tests use. NVGRE is GRE (IP protocol 47) with the key bit set, no checksum, no
sequence number, protocol type 0x6558 and a key ``VSID << 8 | FlowID``: what Linux's
gretap with ``key VSID<<8`` sends.
"""

from __future__ import annotations

from pathlib import Path

from scapy.layers.l2 import GRE, Dot1Q
from scapy.utils import rdpcap

from agent.nvgre import ETH_P_TEB, IPPROTO_GRE, Decapsulated, decapsulate, encapsulate

__all__ = ["ETH_P_TEB", "IPPROTO_GRE", "NvgreFrame", "decode_nvgre", "encode_nvgre", "read_nvgre",
           "tenant_flows_on_trunk"]

NvgreFrame = Decapsulated  # outer_src, outer_dst, vsid, flow_id, inner (Ether)
decode_nvgre = decapsulate  # packet -> NvgreFrame, or None when it is not NVGRE
encode_nvgre = encapsulate  # (outer_src, outer_dst, vsid, inner, flow_id=0) -> outer IP packet


def read_nvgre(pcap: Path) -> list[NvgreFrame]:
    """Every NVGRE packet in a pcap file, in capture order; other packets are skipped."""
    frames = (decode_nvgre(p) for p in rdpcap(str(pcap)))
    return [f for f in frames if f is not None]


def tenant_flows_on_trunk(pcaps: list[Path], vlan: int) -> dict[int, set[tuple[str, str]]]:
    """VSID -> the (inner source, inner destination) IPv4 pairs of the NVGRE frames in
    captures taken on a trunk (802.1Q-tagged frames); asserts that every one travels on
    ``vlan`` with the key VSID << 8 | FlowID."""
    seen: dict[int, set[tuple[str, str]]] = {}
    for pcap in pcaps:
        for frame in rdpcap(str(pcap)):
            nvgre = decode_nvgre(frame)
            if nvgre is None or Dot1Q not in frame:
                continue
            assert frame[Dot1Q].vlan == vlan, frame.summary()
            assert frame[GRE].key == nvgre.vsid << 8 | nvgre.flow_id, frame.summary()
            if nvgre.inner.haslayer("IP"):
                seen.setdefault(nvgre.vsid, set()).add((nvgre.inner["IP"].src, nvgre.inner["IP"].dst))
    return seen
