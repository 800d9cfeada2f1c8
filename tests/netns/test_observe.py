"""agent.observe against this kernel: what it reads back is what `ip` shows.

A bridge with per-device IPv4 forwarding on (as the agent makes every VSID bridge): the
link is read back under its own name, with its forwarding setting. (A read of the
per-device IPv4 settings once reused the link's name variable, so every bridge came back
named "forwarding" and the agent re-created bridges that were there.)
"""

from __future__ import annotations

from pyroute2 import IPRoute

from agent.netlink_batch import NeighbourSocket
from agent.observe import observe


def test_a_bridge_with_forwarding_is_read_back_under_its_own_name(make_netns):
    ns = make_netns()
    ns.ip("link", "add", "hnvb5001", "type", "bridge")
    ns.run("sysctl", "-qw", "net.ipv4.conf.hnvb5001.forwarding=1")
    with IPRoute(netns=ns.name) as ipr, NeighbourSocket(netns=ns.name) as records:
        have = observe(ipr, records)
    assert "hnvb5001" in have.links, sorted(have.links)
    assert "forwarding" not in have.links
    assert dict(have.links["hnvb5001"].settings).get("forwarding") == 1
