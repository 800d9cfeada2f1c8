"""Which netlink notifications wake the reconcile loop (agent.events, pure part)."""

from __future__ import annotations

import pytest

from agent.events import describe_relevant
from pyroute2.netlink.rtnl.ndmsg import NUD_FAILED, NUD_NOARP, NUD_PERMANENT, NUD_REACHABLE, NUD_STALE


def test_a_deleted_link_is_relevant():
    assert describe_relevant({"event": "RTM_DELLINK", "ifname": "hnvt35f4210a"}) == "RTM_DELLINK hnvt35f4210a"


@pytest.mark.parametrize("state", [NUD_PERMANENT, NUD_NOARP, NUD_NOARP | NUD_PERMANENT])
def test_static_neighbour_and_fdb_changes_are_relevant(state):
    message = {"event": "RTM_NEWNEIGH", "state": state, "ifindex": 7, "lladdr": "00:15:5d:00:00:02"}
    assert describe_relevant(message) == "RTM_NEWNEIGH ifindex=7 00:15:5d:00:00:02"


@pytest.mark.parametrize("state", [NUD_PERMANENT, NUD_FAILED, NUD_STALE])
def test_every_neighbour_deletion_is_relevant(state):
    # `ip neigh del` of a permanent entry is reported as NUD_FAILED: the state cannot
    # tell whose entry went.
    message = {"event": "RTM_DELNEIGH", "state": state, "ifindex": 7, "dst": "192.168.0.11"}
    assert describe_relevant(message) == "RTM_DELNEIGH ifindex=7 192.168.0.11"


@pytest.mark.parametrize("state", [NUD_REACHABLE, NUD_STALE, 0])
def test_learnt_entries_and_arp_churn_are_noise(state):
    assert describe_relevant({"event": "RTM_NEWNEIGH", "state": state, "dst": "192.168.0.11"}) is None


def test_other_messages_are_noise():
    assert describe_relevant({"event": "RTM_NEWADDR"}) is None
