"""Reconcile when netlink itself fails: a reconcile error in the result, never a crash.

The fault is injected at the netlink boundary (the reconciler's two sockets) with the
errors pyroute2 raises there; everything above it, observe, plan and the error report,
is the real code. The kernel tier runs the same reconciler against a real kernel.
"""

from __future__ import annotations

import errno

from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from agent.reconcile import DUMP_ATTEMPTS, Reconciler
from agent.state import parse_host_state


class FaultyRoute:
    """Stands in for pyroute2's IPRoute: every dump raises the next prepared fault, then
    answers with an empty table."""

    def __init__(self, *faults: Exception):
        self.faults = list(faults)
        self.dumps = 0
        self.closed = False

    def _dump(self):
        self.dumps += 1
        if self.faults:
            raise self.faults.pop(0)
        return []

    def get_links(self):
        return self._dump()

    def get_vlans(self):
        return []

    def get_addr(self):
        return []

    def get_routes(self):
        return []

    def close(self):
        self.closed = True


class EmptyRecords:
    closed = False

    def dump_fdb(self, owned):
        return []

    def dump_neigh(self, owned):
        return []

    def close(self):
        self.closed = True


def reconciler_with(ipr: FaultyRoute, records: EmptyRecords) -> Reconciler:
    reconciler = Reconciler(netns="hnv-host1")
    reconciler._ipr, reconciler._records = ipr, records  # the sockets it would have opened
    return reconciler


EMPTY = parse_host_state({"host": "CON-HyperV6", "generation": 4})


def test_a_netlink_error_in_a_dump_is_a_reconcile_error_and_the_sockets_are_reset():
    ipr, records = FaultyRoute(NetlinkError(errno.EBUSY, "Device or resource busy")), EmptyRecords()
    reconciler = reconciler_with(ipr, records)
    result = reconciler.reconcile(EMPTY)
    assert result.generation == 4 and result.planned == 0 and result.applied == 0
    [error] = result.errors
    assert (error.kind, error.object, error.errno) == ("host", "hnv-host1", errno.EBUSY)
    assert error.message.startswith("reading the kernel back: NetlinkError")
    # Fresh sockets next time: the failed ones are closed and forgotten.
    assert ipr.closed and records.closed
    assert reconciler._ipr is None and reconciler._records is None


def test_an_interrupted_dump_is_taken_again():
    ipr = FaultyRoute(*[NetlinkDumpInterrupted()] * (DUMP_ATTEMPTS - 1))
    result = reconciler_with(ipr, EmptyRecords()).reconcile(EMPTY)
    assert result.errors == [] and result.planned == 0
    assert ipr.dumps == DUMP_ATTEMPTS


def test_a_dump_interrupted_every_time_is_a_reconcile_error():
    ipr = FaultyRoute(*[NetlinkDumpInterrupted()] * DUMP_ATTEMPTS)
    result = reconciler_with(ipr, EmptyRecords()).reconcile(EMPTY)
    [error] = result.errors
    assert error.kind == "host" and "kept changing" in error.message
    assert ipr.dumps == DUMP_ATTEMPTS and ipr.closed
