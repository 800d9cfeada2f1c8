"""Choosing values nobody else holds: VSIDs, routing-domain ids, MACs, pool addresses.

Pure functions over the sets of values already taken; the caller (`controller.fabric`)
holds the write lock and commits the choice in the same transaction as the object that
takes it, and the store's primary keys refuse a value taken twice. Nothing here touches
the store or keeps state of its own.

- VSIDs are drawn at random from 4096..16777214 (VMM hands out random-looking VSIDs such
  as 3535905; RFC 7637 reserves 0..0xFFF and 0xFFFFFF), retried on collision. With at
  most a few million subnets the expected number of draws stays near one.
- Routing-domain ids (a VRF table per VM network) are the smallest free in 1..65535.
- MACs come from VMM's default pool 00:1D:D8:B7:1C:00 - 00:1D:D8:F4:1F:FF, the lowest free
  at or after a hint (the last one handed out), wrapping once: amortised O(1) per VM.
- Addresses come from a pool's range, skipping its gateway and reserved addresses, the
  lowest free at or after a hint, wrapping once; in a SLAAC pool's /64 a VM's address is
  not chosen but formed, as the VM forms it: the modified EUI-64 of its MAC.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Collection, Iterable

from agent.state import VSID_MAX, VSID_MIN
from controller.models import Conflict

MAC_POOL_START = 0x001DD8B71C00
MAC_POOL_END = 0x001DD8F41FFF
ROUTING_DOMAIN_MAX = 65_535

_vsid_random = random.SystemRandom()


def allocate_vsid(taken: Collection[int]) -> int:
    if len(taken) >= VSID_MAX - VSID_MIN + 1:
        raise Conflict("no free VSID", "vsid", f"all of {VSID_MIN}..{VSID_MAX} are in use")
    while True:
        vsid = _vsid_random.randint(VSID_MIN, VSID_MAX)
        if vsid not in taken:
            return vsid


def allocate_routing_domain_id(taken: Collection[int]) -> int:
    for candidate in range(1, ROUTING_DOMAIN_MAX + 1):
        if candidate not in taken:
            return candidate
    raise Conflict(
        "no free routing domain id", "routing_domain_id", f"all of 1..{ROUTING_DOMAIN_MAX} are in use"
    )


def mac_text(value: int) -> str:
    raw = f"{value:012x}"
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


def mac_value(text: str) -> int:
    return int(text.replace(":", ""), 16)


def allocate_mac(taken: Collection[int], hint: int = MAC_POOL_START) -> int:
    """The lowest free MAC of the pool at or after `hint` (wrapping once)."""
    found = _first_free(MAC_POOL_START, MAC_POOL_END, hint, taken, ())
    if found is None:
        raise Conflict(
            "the MAC address pool is exhausted",
            "mac",
            f"all of {mac_text(MAC_POOL_START)} - {mac_text(MAC_POOL_END)} are in use",
        )
    return found


def allocate_address(
    pool_key: str,
    range_start: ipaddress.IPv4Address | ipaddress.IPv6Address,
    range_end: ipaddress.IPv4Address | ipaddress.IPv6Address,
    taken: Collection[int],
    skip: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    hint: int | None = None,
):
    """The lowest free address of a pool's range at or after `hint` (wrapping once)."""
    start, end = int(range_start), int(range_end)
    found = _first_free(start, end, start if hint is None else hint, taken, {int(a) for a in skip})
    if found is None:
        raise Conflict(
            f"IP pool {pool_key} is exhausted",
            "pool",
            f"every address of {range_start} - {range_end} is leased or reserved",
        )
    return ipaddress.IPv4Address(found) if range_start.version == 4 else ipaddress.IPv6Address(found)


def _first_free(start: int, end: int, hint: int, taken: Collection[int], skip: Collection[int]) -> int | None:
    if not start <= hint <= end:
        hint = start
    for low, high in ((hint, end), (start, hint - 1)):
        value = low
        while value <= high:
            if value not in taken and value not in skip:
                return value
            value += 1
    return None


def slaac_address(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The address a host with ``mac`` forms in the /64 ``prefix`` by SLAAC: the modified
    EUI-64 of RFC 4291 appendix A (the universal/local bit flipped, ff:fe in the middle)."""
    octets = bytes(int(part, 16) for part in mac.split(":"))
    interface_id = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return ipaddress.IPv6Address(int(prefix.network_address) | int.from_bytes(interface_id, "big"))
