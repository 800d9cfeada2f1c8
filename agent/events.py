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
- every link message (RTM_NEWLINK / RTM_DELLINK): a deleted tunnel, a port pulled off the
  bridge, a device taken down. Links change rarely, so no filtering is worth its risk.
- every neighbour deletion (RTM_DELNEIGH, ARP/ND and bridge FDB entries): the kernel
  reports an `ip neigh del` of a permanent entry as NUD_FAILED, not NUD_PERMANENT, so the
  state cannot tell ours from others'. Deletions of dynamic entries are rare (garbage
  collection, FDB ageing), so taking them all costs little.
- neighbour additions and changes (RTM_NEWNEIGH) only for permanent or static
  (NUD_PERMANENT / NUD_NOARP) entries, the ones the agent installs. Dynamic entries
  (learnt FDB entries, ARP cache churn between REACHABLE and STALE) change all the time
  under traffic and say nothing about drift; waking on them would turn every ping into a
  reconcile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK, RTMGRP_NEIGH
from pyroute2.netlink.rtnl.ndmsg import NUD_NOARP, NUD_PERMANENT

from agent.logfmt import quote
from agent.netns import in_netns

log = logging.getLogger(__name__)

LINK_EVENTS = frozenset({"RTM_NEWLINK", "RTM_DELLINK"})
NEIGH_EVENTS = frozenset({"RTM_NEWNEIGH", "RTM_DELNEIGH"})
MANAGED_NEIGH_STATES = NUD_PERMANENT | NUD_NOARP


def describe_relevant(message: Mapping[str, Any]) -> str | None:
    """'RTM_DELLINK hnvt1a2b' for a message worth a reconcile, None for noise (pure)."""
    # pyroute2 messages answer .get() for header fields and for NLAs by short name
    # ("ifname" for IFLA_IFNAME), like a plain mapping; tests pass plain dicts.
    event = message.get("event")
    if event in LINK_EVENTS:
        return f"{event} {message.get('ifname')}"
    if event in NEIGH_EVENTS:
        if event == "RTM_NEWNEIGH" and not (message.get("state") or 0) & MANAGED_NEIGH_STATES:
            return None
        target = message.get("dst") or message.get("lladdr")
        return f"{event} ifindex={message.get('ifindex')} {target}"
    return None


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
            while not self._stop.is_set():
                try:
                    messages = await asyncio.wait_for(self._next_batch(ipr), self.POLL_INTERVAL)
                except asyncio.TimeoutError:
                    continue
                for message in messages:
                    description = describe_relevant(message)
                    if description is not None:
                        self.on_event(description)
        finally:
            ipr.close()

    @staticmethod
    async def _next_batch(ipr: AsyncIPRoute) -> list[Any]:
        return [message async for message in ipr.get()]
