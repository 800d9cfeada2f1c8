"""Two namespaces joined by a veth pair reach each other, and only each other."""

from __future__ import annotations

from tests.lib.netns import veth_pair


def test_veth_pair_pings_both_ways(make_netns):
    a, b = make_netns(), make_netns()
    veth_pair(a, "veth-a", b, "veth-b")
    a.ip("addr", "add", "10.99.0.1/24", "dev", "veth-a")
    b.ip("addr", "add", "10.99.0.2/24", "dev", "veth-b")

    sent_before = a.tx_packets("veth-a")
    assert a.ping("10.99.0.2", count=2), "10.99.0.2 (namespace b) did not answer over the veth"
    assert b.ping("10.99.0.1"), "10.99.0.1 (namespace a) did not answer over the veth"
    # The echo requests (and ARP) really left through veth-a, not some other path.
    assert a.tx_packets("veth-a") >= sent_before + 2


def test_unassigned_address_and_unconnected_namespace_do_not_answer(make_netns):
    a, b, c = make_netns(), make_netns(), make_netns()
    veth_pair(a, "veth-a", b, "veth-b")
    a.ip("addr", "add", "10.99.0.1/24", "dev", "veth-a")
    b.ip("addr", "add", "10.99.0.2/24", "dev", "veth-b")
    # c holds an address of the same subnet but has no link to a or b.
    c.ip("link", "add", "veth-c", "type", "veth", "peer", "name", "veth-c-peer")
    c.ip("addr", "add", "10.99.0.3/24", "dev", "veth-c")
    c.ip("link", "set", "veth-c", "up")
    c.ip("link", "set", "veth-c-peer", "up")

    assert a.ping("10.99.0.2"), "the connected peer must answer, or the negatives below prove nothing"
    assert not a.ping("10.99.0.3", wait=0.5), "an address in an unconnected namespace answered"
    assert not a.ping("10.99.0.4", wait=0.5), "an address nobody holds answered"
