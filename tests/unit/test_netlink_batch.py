"""agent.netlink_batch's hand-packed messages, decoded by pyroute2's own ndmsg parser.

No socket, no root: what is checked is that every message says to the kernel what
`bridge fdb replace` / `ip neigh replace` would say (family, ifindex, state, flags,
attributes, sequence number, length).
"""

from __future__ import annotations

import socket

import pytest
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from agent.netlink_batch import (
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    RTM_DELNEIGH,
    RTM_NEWNEIGH,
    FdbEntry,
    NeighEntry,
    _encode_fdb,
    _encode_neigh,
    describe_entry,
)

REPLACE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE


def _decode(raw: bytes) -> ndmsg:
    message = ndmsg(raw)
    message.decode()
    assert message["header"]["length"] == len(raw), "nlmsg_len must cover the whole message"
    assert len(raw) % 4 == 0, "netlink messages are 4-byte aligned"
    return message


def test_static_bridge_entry_is_master_noarp_with_its_mac():
    msg = _decode(_encode_fdb(FdbEntry(7, "00:15:5d:01:02:03"), RTM_NEWNEIGH, REPLACE, 41))
    assert msg["header"]["type"] == RTM_NEWNEIGH and msg["header"]["sequence_number"] == 41
    assert msg["header"]["flags"] == REPLACE
    assert (msg["family"], msg["ifindex"]) == (7, 7)  # AF_BRIDGE, the port
    assert msg["flags"] == 0x04  # NTF_MASTER: the bridge's table, not the port's own
    assert msg["state"] & 0x40 and not msg["state"] & 0x80  # NOARP (static), not PERMANENT (local)
    assert msg.get_attr("NDA_LLADDR") == "00:15:5d:01:02:03"
    assert msg.get_attr("NDA_DST") is None and msg.get_attr("NDA_VLAN") is None


def test_sticky_bridge_entry_carries_ntf_sticky():
    """What `bridge fdb replace ... master static sticky` sends: learning never moves it."""
    msg = _decode(_encode_fdb(FdbEntry(7, "00:15:5d:01:02:03", sticky=True), RTM_NEWNEIGH, REPLACE, 1))
    assert msg["flags"] == 0x04 | 0x40  # NTF_MASTER | NTF_STICKY
    assert msg["state"] & 0x40 and not msg["state"] & 0x80  # static: the kernel refuses sticky + PERMANENT
    assert describe_entry(FdbEntry(7, "00:15:5d:01:02:03", sticky=True)).endswith(" sticky")


def test_vxlan_entry_is_self_with_remote_and_vlan():
    entry = FdbEntry(9, "02:00:00:00:00:01", master=False, dst="fd00::20", vlan=100)
    msg = _decode(_encode_fdb(entry, RTM_NEWNEIGH, REPLACE, 1))
    assert msg["flags"] == 0x02  # NTF_SELF
    assert msg.get_attr("NDA_DST") == "fd00::20"
    assert msg.get_attr("NDA_VLAN") == 100


def test_flood_list_entry_appends_instead_of_replacing():
    entry = FdbEntry(9, "00:00:00:00:00:00", master=False, dst="10.80.2.21")
    flags = _decode(_encode_fdb(entry, RTM_NEWNEIGH, REPLACE, 1))["header"]["flags"]
    assert flags & NLM_F_APPEND and not flags & NLM_F_REPLACE
    # A bridge entry for the zero MAC is not a flood list: replace stays replace.
    flags = _decode(_encode_fdb(FdbEntry(9, "00:00:00:00:00:00"), RTM_NEWNEIGH, REPLACE, 1))["header"]["flags"]
    assert flags & NLM_F_REPLACE


def test_permanent_entry_when_not_static():
    msg = _decode(_encode_fdb(FdbEntry(3, "02:00:00:00:00:01", static=False), RTM_NEWNEIGH, REPLACE, 1))
    assert msg["state"] == 0x80


@pytest.mark.parametrize("ip, family", [("192.168.0.3", socket.AF_INET), ("fd00::3", socket.AF_INET6)])
def test_neighbour_is_permanent_on_its_device(ip, family):
    msg = _decode(_encode_neigh(NeighEntry(5, ip, "00:15:5d:01:02:03"), RTM_NEWNEIGH, REPLACE, 2))
    assert (msg["family"], msg["ifindex"], msg["state"]) == (family, 5, 0x80)
    assert msg.get_attr("NDA_DST") == ip
    assert msg.get_attr("NDA_LLADDR") == "00:15:5d:01:02:03"


def test_neighbour_delete_names_the_address_only():
    msg = _decode(_encode_neigh(NeighEntry(5, "192.168.0.3", "00:15:5d:01:02:03"), RTM_DELNEIGH,
                                NLM_F_REQUEST | NLM_F_ACK, 3))
    assert msg["header"]["type"] == RTM_DELNEIGH
    assert msg.get_attr("NDA_DST") == "192.168.0.3" and msg.get_attr("NDA_LLADDR") is None


@pytest.mark.parametrize("mac", ["02:00:00:00:01", "02:00:00:00:00:zz", ""])
def test_malformed_mac_is_refused(mac):
    with pytest.raises(ValueError):
        _encode_fdb(FdbEntry(3, mac), RTM_NEWNEIGH, REPLACE, 1)


def test_malformed_address_is_refused():
    with pytest.raises(OSError):
        _encode_neigh(NeighEntry(3, "192.168.0.300", "02:00:00:00:00:01"), RTM_NEWNEIGH, REPLACE, 1)


def test_description_names_every_field_a_person_needs():
    text = describe_entry(FdbEntry(9, "02:00:00:00:00:01", master=False, dst="10.80.2.21", vlan=7))
    assert text == "fdb 02:00:00:00:00:01 dev #9 self dst 10.80.2.21 vlan 7"
    assert describe_entry(NeighEntry(5, "192.168.0.3", "02:00:00:00:00:01")) == (
        "neighbour 192.168.0.3 lladdr 02:00:00:00:00:01 dev #5"
    )
