"""Tunnel counters for /metrics on this kernel: read from any thread, beside the loop.

The agent's /metrics server serves every scrape on a new thread. pyroute2 keeps a
socket's transport per calling thread, so reading the counters on the reconciler's
socket opened a netlink socket per scrape that was never closed (one descriptor a scrape:
a 15 s scrape interval exhausts a service's 1,024 in four hours). The counters now come
from a raw link dump that reads five attributes of each link: they must be what `ip -s`
shows.
"""

from __future__ import annotations

import json
import os
import threading

from agent import naming
from agent.netlink_batch import NeighbourSocket
from agent.reconcile import Reconciler

VSID = 5001
TUNNEL = f"{naming.PREFIX}x{VSID}"


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _scrape_on_a_new_thread(reconciler: Reconciler) -> list:
    got: list = []
    thread = threading.Thread(target=lambda: got.append(reconciler.tunnel_stats()))
    thread.start()
    thread.join(30)
    assert got, "the read never returned"
    return got[0]


def _vxlan_with_traffic(ns) -> None:
    """An owned VXLAN device (marker in its ifalias) that has sent packets to a peer."""
    ns.ip("link", "add", "under0", "type", "veth", "peer", "name", "under1")
    ns.ip("addr", "add", "10.80.0.1/24", "dev", "under0")
    for dev in ("under0", "under1"):
        ns.ip("link", "set", dev, "up")
    ns.ip("link", "add", TUNNEL, "type", "vxlan", "id", str(VSID), "local", "10.80.0.1", "dstport", "4789",
          "dev", "under0")
    ns.ip("link", "set", TUNNEL, "alias", naming.marker(naming.VXLAN, str(VSID)))
    ns.ip("addr", "add", "192.168.50.1/24", "dev", TUNNEL)
    ns.ip("link", "set", TUNNEL, "up")
    ns.run("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", TUNNEL, "dst", "10.80.0.2")
    ns.run("ping", "-c", "2", "-W", "1", "-i", "0.2", "192.168.50.2", check=False)


def test_counters_are_what_ip_shows_and_only_owned_tunnels_are_counted(make_netns):
    ns = make_netns()
    _vxlan_with_traffic(ns)
    with Reconciler(netns=ns.name) as reconciler:
        stats = reconciler.tunnel_stats(timeout=10)
    shown = {link["ifname"]: link for link in json.loads(ns.run("ip", "-s", "-j", "link", "show").stdout)}
    assert [(t.name, t.vsid, t.local, t.remote) for t in stats] == [(TUNNEL, VSID, "10.80.0.1", "")]
    tx = shown[TUNNEL]["stats64"]["tx"]
    assert stats[0].tx_packets == tx["packets"] > 0 and stats[0].tx_bytes == tx["bytes"]
    # Every link of the namespace, with its kind, as `ip -d` names them.
    with NeighbourSocket(ns.name) as sock:
        links = {link.name: link for link in sock.dump_link_counters()}
    detailed = json.loads(ns.run("ip", "-d", "-j", "link", "show").stdout)
    assert {name: link.kind for name, link in links.items()} == {
        link["ifname"]: link.get("linkinfo", {}).get("info_kind") for link in detailed}
    assert links["under0"].tx_packets == shown["under0"]["stats64"]["tx"]["packets"]


def test_scrapes_on_new_threads_keep_no_descriptor(make_netns):
    ns = make_netns()
    _vxlan_with_traffic(ns)
    reconciler = Reconciler(netns=ns.name)
    try:
        first = _scrape_on_a_new_thread(reconciler)
        assert [t.vsid for t in first] == [VSID]
        before = _open_descriptors()
        for _ in range(30):
            assert [t.vsid for t in _scrape_on_a_new_thread(reconciler)] == [VSID]
        assert _open_descriptors() <= before, "a scrape left a descriptor open"
    finally:
        reconciler.close()
