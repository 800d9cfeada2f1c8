"""NVGRE (RFC 7637) on the wire: the 8-byte header, and whole packets with scapy.

Owns the byte layout of an NVGRE header and its checks, for the tests and for
``hnv-lab capture`` (which prints each captured provider packet as the tenant frame it
carries):

     0                   1                   2                   3
    |0|x|1|0|   reserved0   | ver |  protocol type 0x6558           |
    |            Virtual Subnet ID (VSID)           |    FlowID     |

C (checksum) = 0, K (key present) = 1, S (sequence) = 0, version 0, protocol
Transparent Ethernet Bridging; the 32-bit GRE key is ``VSID << 8 | FlowID``. Linux's
gretap with ``key VSID<<8`` sends exactly this (FlowID 0), which is how the agent's
device-mode tunnels (agent.tunnels) speak NVGRE; flow mode's tc program sets the key per
packet with a per-flow FlowID (agent/bpf/hnv_flow.c).

Pure functions; scapy only for whole packets. No kernel access.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

IPPROTO_GRE = 47
ETH_P_TEB = 0x6558
HEADER_LEN = 8
VSID_MIN, VSID_MAX = 4096, 0xFFFFFE  # RFC 7637 reserves 0..0xFFF and 0xFFFFFF
GRE_C, GRE_K, GRE_S = 0x8000, 0x2000, 0x1000
_HEADER = struct.Struct("!HHI")


class NotNvgre(ValueError):
    """Bytes that are not an NVGRE header; the message says which rule failed."""


@dataclass(frozen=True)
class NvgreHeader:
    vsid: int
    flow_id: int = 0

    @property
    def key(self) -> int:
        return (self.vsid << 8) | self.flow_id


def encode_header(vsid: int, flow_id: int = 0) -> bytes:
    """The 8 header bytes for `vsid` (24 bits) and `flow_id` (8 bits)."""
    if not 0 <= vsid <= 0xFFFFFF:
        raise ValueError(f"VSID {vsid} does not fit 24 bits")
    if not 0 <= flow_id <= 0xFF:
        raise ValueError(f"FlowID {flow_id} does not fit 8 bits")
    return _HEADER.pack(GRE_K, ETH_P_TEB, (vsid << 8) | flow_id)


def decode_header(data: bytes) -> NvgreHeader:
    """Parse the first 8 bytes of a GRE payload as NVGRE; NotNvgre says why not."""
    if len(data) < HEADER_LEN:
        raise NotNvgre(f"{len(data)} bytes is shorter than the {HEADER_LEN}-byte NVGRE header")
    flags, protocol, key = _HEADER.unpack_from(data)
    if not flags & GRE_K:
        raise NotNvgre("the GRE key bit is clear: NVGRE always carries VSID and FlowID")
    if flags & (GRE_C | GRE_S):
        raise NotNvgre("checksum or sequence bit set: RFC 7637 forbids both")
    if flags & 0x7:
        raise NotNvgre(f"GRE version {flags & 0x7}, NVGRE uses version 0")
    if protocol != ETH_P_TEB:
        raise NotNvgre(f"protocol type {protocol:#06x}, NVGRE carries Ethernet (0x6558)")
    return NvgreHeader(key >> 8, key & 0xFF)


@dataclass(frozen=True)
class Decapsulated:
    """One NVGRE packet: provider (outer) addresses, VSID, FlowID, the tenant frame."""

    outer_src: str
    outer_dst: str
    vsid: int
    flow_id: int
    inner: Ether

    def summary(self) -> str:
        return (f"NVGRE {self.outer_src} > {self.outer_dst} VSID {self.vsid} "
                f"FlowID {self.flow_id}: {self.inner.summary()}")


def encapsulate(outer_src: str, outer_dst: str, vsid: int, inner: Packet, flow_id: int = 0) -> Packet:
    """An IPv4 or IPv6 provider packet carrying `inner` (an Ethernet frame) as NVGRE."""
    payload = Raw(encode_header(vsid, flow_id) + bytes(inner))
    if ":" in outer_src:
        return IPv6(src=outer_src, dst=outer_dst, nh=IPPROTO_GRE) / payload
    return IP(src=outer_src, dst=outer_dst, proto=IPPROTO_GRE) / payload


def decapsulate(packet: Packet) -> Decapsulated | None:
    """The tenant frame inside `packet` (with or without an outer Ethernet/802.1Q
    header), or None when it is not NVGRE."""
    if IP in packet and packet[IP].proto == IPPROTO_GRE:
        outer = packet[IP]
    elif IPv6 in packet and packet[IPv6].nh == IPPROTO_GRE:
        outer = packet[IPv6]
    else:
        return None
    gre = bytes(outer.payload)
    try:
        header = decode_header(gre)
    except NotNvgre:
        return None
    return Decapsulated(outer.src, outer.dst, header.vsid, header.flow_id, Ether(gre[HEADER_LEN:]))
