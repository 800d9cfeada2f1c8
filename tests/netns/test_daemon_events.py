"""agent.events on the running kernel: what wakes the reconcile loop, in its namespace only."""

from __future__ import annotations

import time

from agent.events import KernelEventWatch
from tests.lib.wait import wait_until


def watch(namespace_name: str) -> tuple[KernelEventWatch, list[str]]:
    seen: list[str] = []
    events = KernelEventWatch(seen.append, netns=namespace_name)
    events.start()
    assert events.ready.wait(10) and events.failed is None, events.failed
    return events, seen


def watched_host_with_veth(make_netns):
    """A namespace holding veth hnvt0 (up) / hnvt1, and a watch begun after both exist."""
    host = make_netns()
    host.ip("link", "add", "hnvt0", "type", "veth", "peer", "name", "hnvt1")
    host.ip("link", "set", "hnvt0", "up")
    events, seen = watch(host.name)
    return host, events, seen


def settle(seen: list[str], timeout: float = 3.0) -> list[str]:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline and count != len(seen):
        count = len(seen)
        time.sleep(0.3)
    return list(seen)


def test_link_and_static_neighbour_changes_in_the_namespace_are_seen(make_netns):
    host, elsewhere = make_netns(), make_netns()
    events, seen = watch(host.name)
    try:
        elsewhere.ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
        host.ip("link", "add", "hnvt0", "type", "veth", "peer", "name", "hnvt1")
        host.ip("link", "set", "hnvt0", "up")
        host.ip("neigh", "add", "192.168.0.11", "lladdr", "00:15:5d:00:00:02", "dev", "hnvt0", "nud", "permanent")
        host.ip("neigh", "del", "192.168.0.11", "dev", "hnvt0")
        host.ip("link", "del", "hnvt0")
        got = settle(seen)
    finally:
        events.stop(5)
    assert "RTM_NEWLINK hnvt0" in got and "RTM_DELLINK hnvt0" in got
    assert any(e.startswith("RTM_NEWNEIGH") and "192.168.0.11" in e for e in got)
    assert any(e.startswith("RTM_DELNEIGH") and "192.168.0.11" in e for e in got)
    assert not any("other" in e for e in got), "another namespace's links must not wake this agent"


def test_a_static_fdb_entry_deleted_is_an_event_a_learnt_one_ageing_out_is_not(make_netns):
    host, events, seen = watched_host_with_veth(make_netns)
    try:
        host.ip("link", "add", "hnvb0", "type", "bridge", "ageing_time", "100")  # 1 s
        host.ip("link", "set", "hnvt0", "master", "hnvb0")
        host.ip("link", "set", "hnvb0", "up")
        first = settle(seen)
        host.run("bridge", "fdb", "add", "00:15:5d:00:00:0a", "dev", "hnvt0", "master", "static")
        host.run("bridge", "fdb", "del", "00:15:5d:00:00:0a", "dev", "hnvt0", "master")
        # The bridge learns hnvt1's MAC from one ARP request it sends, then forgets it.
        host.run("sysctl", "-qw", "net.ipv6.conf.hnvt1.disable_ipv6=1")
        host.ip("link", "set", "hnvt1", "address", "00:15:5d:00:00:09", "up")
        host.ip("addr", "add", "192.0.2.2/24", "dev", "hnvt1")
        host.run("ping", "-c", "1", "-W", "1", "-I", "hnvt1", "192.0.2.1", check=False)

        def fdb() -> str:
            return host.run("bridge", "fdb", "show", "dev", "hnvt0").stdout

        wait_until(lambda: "00:15:5d:00:00:09" in fdb(), 10, "the bridge to learn hnvt1's MAC")
        wait_until(lambda: "00:15:5d:00:00:09" not in fdb(), 30, "the learnt entry to age out")
        got = settle(seen)[len(first):]
    finally:
        events.stop(5)
    assert any(e.startswith("RTM_DELNEIGH") and "00:15:5d:00:00:0a" in e for e in got), got
    assert not any("00:15:5d:00:00:09" in e for e in got), got


def test_arp_cache_churn_is_not_an_event(make_netns):
    host, events, seen = watched_host_with_veth(make_netns)
    try:
        host.ip("neigh", "add", "192.168.0.12", "lladdr", "00:15:5d:00:00:03", "dev", "hnvt0", "nud", "reachable")
        host.ip("neigh", "change", "192.168.0.12", "lladdr", "00:15:5d:00:00:03", "dev", "hnvt0", "nud", "stale")
        got = settle(seen)
    finally:
        events.stop(5)
    assert not any("192.168.0.12" in e for e in got), got


def test_a_carrier_coming_and_going_is_not_an_event_but_a_lasting_change_is(make_netns):
    host, events, seen = watched_host_with_veth(make_netns)
    try:
        host.ip("link", "set", "hnvt0", "mtu", "1400")  # its first message since the watch began
        first = settle(seen)
        host.ip("link", "set", "hnvt1", "up")  # hnvt0's carrier comes, then goes: the kernel's doing
        host.ip("link", "set", "hnvt1", "down")
        host.ip("link", "set", "hnvt1", "up")
        carrier = settle(seen)[len(first):]
        host.ip("link", "set", "hnvt0", "mtu", "1450")
        host.ip("link", "set", "hnvt0", "down")
        lasting = settle(seen)[len(first) + len(carrier):]
    finally:
        events.stop(5)
    assert "RTM_NEWLINK hnvt0" in first
    assert "RTM_NEWLINK hnvt1" in carrier, "the peer's own change is an event"
    assert "RTM_NEWLINK hnvt0" not in carrier, carrier
    assert lasting.count("RTM_NEWLINK hnvt0") >= 2, lasting
