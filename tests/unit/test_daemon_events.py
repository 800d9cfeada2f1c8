"""Which netlink notifications wake the reconcile loop (agent.events, pure part)."""

from __future__ import annotations

import socket

import pytest

from agent.events import LinkChanges, describe_relevant
from pyroute2.netlink.rtnl.ndmsg import (
    NUD_DELAY,
    NUD_FAILED,
    NUD_INCOMPLETE,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_REACHABLE,
    NUD_STALE,
)


def test_a_deleted_link_is_relevant():
    assert describe_relevant({"event": "RTM_DELLINK", "ifname": "hnvt35f4210a"}) == "RTM_DELLINK hnvt35f4210a"


@pytest.mark.parametrize("state", [NUD_PERMANENT, NUD_NOARP, NUD_NOARP | NUD_PERMANENT])
def test_static_neighbour_and_fdb_changes_are_relevant(state):
    message = {"event": "RTM_NEWNEIGH", "state": state, "ifindex": 7, "lladdr": "00:15:5d:00:00:02"}
    assert describe_relevant(message) == "RTM_NEWNEIGH ifindex=7 00:15:5d:00:00:02"


@pytest.mark.parametrize("state", [NUD_PERMANENT, NUD_FAILED, NUD_NOARP])
def test_a_deleted_neighbour_that_may_be_ours_is_relevant(state):
    # `ip neigh del` of a permanent entry is reported as NUD_FAILED: that state cannot
    # tell whose entry went.
    message = {"event": "RTM_DELNEIGH", "family": socket.AF_INET, "state": state, "ifindex": 7,
               "dst": "192.168.0.11"}
    assert describe_relevant(message) == "RTM_DELNEIGH ifindex=7 192.168.0.11"


@pytest.mark.parametrize("state", [NUD_NOARP, NUD_PERMANENT])
def test_a_deleted_static_fdb_entry_is_relevant(state):
    message = {"event": "RTM_DELNEIGH", "family": socket.AF_BRIDGE, "state": state, "ifindex": 7,
               "lladdr": "00:1d:d8:b7:1c:02"}
    assert describe_relevant(message) == "RTM_DELNEIGH ifindex=7 00:1d:d8:b7:1c:02"


@pytest.mark.parametrize(("family", "state", "target"), [
    (socket.AF_BRIDGE, NUD_REACHABLE, {"lladdr": "02:4c:00:00:07:01"}),  # a learnt FDB entry ageing out
    (socket.AF_BRIDGE, NUD_STALE, {"lladdr": "02:4c:00:00:07:01"}),
    (socket.AF_BRIDGE, NUD_FAILED, {"lladdr": "02:4c:00:00:07:01"}),
    (socket.AF_INET, NUD_STALE, {"dst": "10.0.0.12"}),  # garbage collected ARP entries
    (socket.AF_INET, NUD_DELAY, {"dst": "10.0.0.12"}),
    (socket.AF_INET, NUD_INCOMPLETE, {"dst": "10.0.0.12"}),
    (socket.AF_INET6, NUD_NOARP, {"dst": "ff02::16"}),  # the kernel's multicast neighbours
])
def test_deleted_dynamic_and_multicast_neighbours_are_noise(family, state, target):
    assert describe_relevant({"event": "RTM_DELNEIGH", "family": family, "state": state, "ifindex": 8,
                              **target}) is None


@pytest.mark.parametrize("state", [NUD_REACHABLE, NUD_STALE, 0])
def test_learnt_entries_and_arp_churn_are_noise(state):
    assert describe_relevant({"event": "RTM_NEWNEIGH", "state": state, "dst": "192.168.0.11"}) is None


def test_other_messages_are_noise():
    assert describe_relevant({"event": "RTM_NEWADDR"}) is None


def link(**changes):
    message = {"event": "RTM_NEWLINK", "family": 0, "index": 7, "ifi_type": 1, "flags": 0x1 | 0x40 | 0x10000,
               "attrs": [("IFLA_IFNAME", "hnvt35f4210a"), ("IFLA_MTU", 1500), ("IFLA_MASTER", 5),
                         ("IFLA_OPERSTATE", "UP"), ("IFLA_CARRIER", 1), ("IFLA_STATS64", {"rx_packets": 1}),
                         ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "gretap"), ("IFLA_INFO_SLAVE_DATA", {
                             "attrs": [("IFLA_BRPORT_STATE", 3), ("IFLA_BRPORT_LEARNING", 0)]})]})]}
    for name, value in changes.items():
        if name == "flags":
            message["flags"] = value
            continue
        message["attrs"] = [(n, value if n == name else v) for n, v in message["attrs"]]
    return message


def test_a_links_first_message_and_its_lasting_changes_are_events():
    links = LinkChanges()
    assert links.changed(link())
    for change in ({"IFLA_MTU": 1400}, {"IFLA_MASTER": 6}, {"flags": 0x40 | 0x10000}):  # flags: taken down
        assert links.changed(link(**change)), change
        assert not links.changed(link(**change)), "the same message twice is one change"


def test_carrier_operstate_counters_and_port_states_are_not_events():
    links = LinkChanges()
    links.changed(link())
    assert not links.changed(link(IFLA_OPERSTATE="DOWN", IFLA_CARRIER=0, flags=0x1))
    assert not links.changed(link(IFLA_STATS64={"rx_packets": 99}))
    slave = {"attrs": [("IFLA_BRPORT_STATE", 0), ("IFLA_BRPORT_LEARNING", 0)]}
    assert not links.changed(link(IFLA_LINKINFO={"attrs": [("IFLA_INFO_KIND", "gretap"), ("IFLA_INFO_SLAVE_DATA", slave)]}))
    learning = {"attrs": [("IFLA_BRPORT_STATE", 0), ("IFLA_BRPORT_LEARNING", 1)]}
    assert links.changed(link(IFLA_LINKINFO={"attrs": [("IFLA_INFO_KIND", "gretap"), ("IFLA_INFO_SLAVE_DATA", learning)]}))


def test_a_deleted_link_made_again_is_an_event():
    links = LinkChanges()
    links.changed(link())
    assert links.changed({**link(), "event": "RTM_DELLINK"})
    assert links.changed(link())
