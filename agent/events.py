"""Kernel change notifications that should trigger a reconcile: links and static neighbours.

Owns one netlink socket subscribed to the rtnetlink link and neighbour groups of the
agent's namespace, read in its own thread. It only *notices*: every relevant message is
turned into a one-line description and handed to a callback, which records it and wakes
the reconcile loop (the loop debounces a burst into one reconcile). It never writes to
the kernel and never decides what the kernel should hold; the periodic reconcile remains
the safety net for anything missed here (a full socket buffer drops notifications).
In the agent ``run`` is supervised (agent.supervision): a failed subscription or read
is logged, counted and subscribed again, and the daemon reconciles once for whatever
changed while no one was listening.

What counts as relevant, and why:
- every link deletion (RTM_DELLINK), and every RTM_NEWLINK that changes something about
  the link other than its operational state (`LinkChanges`): a port pulled off the
  bridge, a device taken down, its MTU or address changed, a link that is new. Not the
  messages that say only that a carrier came or went, a bridge port moved through its
  STP states, counters moved, an IPv6 router advertisement arrived or a capture made a
  link promiscuous: the kernel raises those by itself, seconds after the agent's own
  writes, and each woke a whole-host reconcile that found nothing to do (in the seed
  lab, as much agent CPU as the generations themselves). A link's first message is
  always an event (nothing to compare it with).
- neighbour deletions (RTM_DELNEIGH) that may be of an entry the agent installs: a
  static or permanent one (bridge FDB entries keep their state in the deletion
  message), and for ARP/ND also NUD_FAILED, because the kernel reports an `ip neigh del`
  of a permanent entry as NUD_FAILED, not NUD_PERMANENT. Not the deletions of dynamic
  entries (a learnt FDB entry ageing out, REACHABLE or STALE; an ARP/ND entry garbage
  collected while STALE, DELAY, PROBE or INCOMPLETE) nor of the kernel's own multicast
  neighbours (ff02::16, NOARP): the agent installs neither, and in the seed lab each such
  deletion, ten or more per host in a walkthrough, woke a reconcile of seconds of
  emulated CPU that found nothing to do.
- neighbour additions and changes (RTM_NEWNEIGH) only for permanent or static
  (NUD_PERMANENT / NUD_NOARP) entries, the ones the agent installs. Dynamic entries
  (learnt FDB entries, ARP cache churn between REACHABLE and STALE) change all the time
  under traffic and say nothing about drift; waking on them would turn every ping into a
  reconcile.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK, RTMGRP_NEIGH
from pyroute2.netlink import nlmsg_base
from pyroute2.netlink.rtnl.ndmsg import NUD_FAILED, NUD_NOARP, NUD_PERMANENT

from agent.logfmt import quote
from agent.netns import in_netns

log = logging.getLogger(__name__)

LINK_EVENTS = frozenset({"RTM_NEWLINK", "RTM_DELLINK"})
NEIGH_EVENTS = frozenset({"RTM_NEWNEIGH", "RTM_DELNEIGH"})
MANAGED_NEIGH_STATES = NUD_PERMANENT | NUD_NOARP

# What the kernel changes on a link by itself (LinkChanges): the operational bits of
# ifi_flags (IFF_PROMISC 0x100, IFF_ALLMULTI 0x200, IFF_RUNNING 0x40, IFF_LOWER_UP
# 0x10000, IFF_DORMANT 0x20000; IFF_UP, the administrative state, stays), and these
# attributes, at any depth (bridge and bond port data, the address families' data).
OPERATIONAL_FLAGS = 0x100 | 0x200 | 0x40 | 0x10000 | 0x20000
OPERATIONAL_WORDS = ("STATS", "TIMER", "CACHEINFO", "CARRIER")  # IFLA_STATS64, IFLA_BR_GC_TIMER, ...
OPERATIONAL_ATTRS = frozenset({
    "IFLA_OPERSTATE", "IFLA_PROMISCUITY", "IFLA_ALLMULTI", "IFLA_EVENT",
    "IFLA_QDISC",  # noop until the carrier is up, then the default qdisc: the kernel's doing
    "IFLA_BRPORT_STATE", "IFLA_BRPORT_CONFIG_PENDING", "IFLA_BRPORT_TOPOLOGY_CHANGE_ACK",
    "IFLA_BRPORT_DESIGNATED_ROOT", "IFLA_BRPORT_DESIGNATED_BRIDGE", "IFLA_BRPORT_DESIGNATED_PORT",
    "IFLA_BRPORT_DESIGNATED_COST",
    "IFLA_BR_TOPOLOGY_CHANGE", "IFLA_BR_TOPOLOGY_CHANGE_DETECTED", "IFLA_BR_ROOT_ID",
    "IFLA_BR_ROOT_PORT", "IFLA_BR_ROOT_PATH_COST",
    "IFLA_BOND_ACTIVE_SLAVE", "IFLA_BOND_AD_INFO", "IFLA_BOND_SLAVE_STATE", "IFLA_BOND_SLAVE_MII_STATUS",
    "IFLA_BOND_SLAVE_LINK_FAILURE_COUNT", "IFLA_BOND_SLAVE_AD_AGGREGATOR_ID",
    "IFLA_BOND_SLAVE_AD_ACTOR_OPER_PORT_STATE", "IFLA_BOND_SLAVE_AD_PARTNER_OPER_PORT_STATE",
    "IFLA_INET6_FLAGS", "IFLA_INET6_RA_MTU", "IFLA_TUN_NUM_QUEUES", "IFLA_TUN_NUM_DISABLED_QUEUES",
})

# Fields of a structure attribute that follow another change late: the IPv6 MTU is set
# from the link's MTU, but only reported with the link's next message (its carrier, say).
OPERATIONAL_FIELDS = {"IFLA_INET6_CONF": frozenset({"mtu"})}


def _operational(name: str) -> bool:
    return name in OPERATIONAL_ATTRS or any(word in name for word in OPERATIONAL_WORDS)


def _lasting(attrs: Any) -> tuple:
    """A link's attributes without the operational ones, nested ones flattened (pure)."""
    out = []
    for name, value in attrs or ():
        if _operational(name):
            continue
        nested = value.get("attrs") if isinstance(value, (nlmsg_base, dict)) else None
        if nested is not None:
            out.append((name, _lasting(nested)))
        elif name in OPERATIONAL_FIELDS and isinstance(value, dict):
            drop = OPERATIONAL_FIELDS[name]
            out.append((name, repr(sorted((k, v) for k, v in value.items() if k not in drop))))
        else:
            out.append((name, repr(value)))
    return tuple(out)


def link_signature(message: Mapping[str, Any]) -> tuple:
    """What a RTM_NEWLINK says about its link that the kernel does not change by itself."""
    flags = (message.get("flags") or 0) & ~OPERATIONAL_FLAGS
    return (message.get("ifi_type"), flags, _lasting(message.get("attrs")))


class LinkChanges:
    """Remembers each link's last signature; says whether a link message changes it.

    Keyed by (family, index): a bridge port's AF_BRIDGE messages (its VLANs and port
    flags) are compared with their own kind. Used by the event thread alone."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, Any], tuple] = {}

    def changed(self, message: Mapping[str, Any]) -> bool:
        key = (message.get("family"), message.get("index"))
        if message.get("event") == "RTM_DELLINK":
            self._seen.pop(key, None)
            return True
        signature = link_signature(message)
        if self._seen.get(key) == signature:
            return False
        self._seen[key] = signature
        return True


def describe_relevant(message: Mapping[str, Any]) -> str | None:
    """'RTM_DELLINK hnvt1a2b' for a message worth a reconcile, None for noise (pure)."""
    # pyroute2 messages answer .get() for header fields and for NLAs by short name
    # ("ifname" for IFLA_IFNAME), like a plain mapping; tests pass plain dicts.
    event = message.get("event")
    if event in LINK_EVENTS:
        return f"{event} {message.get('ifname')}"
    if event in NEIGH_EVENTS:
        if not _may_be_ours(event, message):
            return None
        target = message.get("dst") or message.get("lladdr")
        return f"{event} ifindex={message.get('ifindex')} {target}"
    return None


def _may_be_ours(event: str, message: Mapping[str, Any]) -> bool:
    """Whether a neighbour message may concern an entry the agent installs (see the
    module's docstring): static or permanent ones, and a deleted ARP/ND entry reported
    as NUD_FAILED; never a multicast neighbour."""
    state = message.get("state") or 0
    dst = message.get("dst")
    if dst is not None:
        try:
            if ipaddress.ip_address(dst).is_multicast:
                return False
        except ValueError:
            pass
    if state & MANAGED_NEIGH_STATES:
        return True
    return event == "RTM_DELNEIGH" and state == NUD_FAILED and message.get("family") != socket.AF_BRIDGE


class KernelEventWatch:
    """Reads link and neighbour notifications in a thread; calls ``on_event(description)``."""

    # How often the reader looks up from the socket to check for stop (seconds).
    POLL_INTERVAL = 0.5

    def __init__(self, on_event: Callable[[str], None], *, netns: str | None = None):
        self.on_event = on_event
        self.netns = netns
        self.ready = threading.Event()  # set once subscribed: changes after it are seen
        self.failed: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a thread of its own, unsupervised: a failure is only recorded in ``failed``
        (the agent supervises ``run`` instead, which restarts it)."""
        self._thread = threading.Thread(target=self._run_unsupervised, name="hnv-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None and timeout:
            self._thread.join(timeout)

    def run(self) -> None:
        """Read notifications until ``stop``; a failure is recorded in ``failed`` and raised."""
        self.failed = None
        try:
            # The reader's thread itself enters the namespace (setns moves one thread),
            # so the socket is opened there without pyroute2 forking a helper process:
            # a fork of a threaded daemon is fragile, and slow under emulation.
            in_netns(self.netns, lambda: asyncio.run(self._follow()))
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.ready.set()

    def _run_unsupervised(self) -> None:
        try:
            self.run()
        except Exception:  # the periodic reconcile still covers drift
            log.error("event=kernel_events_failed netns=%s reason=%s", self.netns, quote(self.failed))

    async def _follow(self) -> None:
        ipr = AsyncIPRoute()
        try:
            await ipr.setup_endpoint()
            await ipr.bind(groups=RTMGRP_LINK | RTMGRP_NEIGH)
            self.ready.set()
            log.info("event=kernel_events_subscribed netns=%s", self.netns)
            links = LinkChanges()  # new at each subscription: what was missed is unknown
            while not self._stop.is_set():
                try:
                    messages = await asyncio.wait_for(self._next_batch(ipr), self.POLL_INTERVAL)
                except asyncio.TimeoutError:
                    continue
                for message in messages:
                    description = describe_relevant(message)
                    if description is None:
                        continue
                    if message.get("event") in LINK_EVENTS and not links.changed(message):
                        continue
                    self.on_event(description)
        finally:
            ipr.close()

    @staticmethod
    async def _next_batch(ipr: AsyncIPRoute) -> list[Any]:
        return [message async for message in ipr.get()]
