"""agent.events on the running kernel: what wakes the reconcile loop, in its namespace only."""

from __future__ import annotations

import time

from agent.events import KernelEventWatch


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
