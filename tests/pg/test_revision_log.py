"""The revision log between two replicas (two `Fabric`s on one PostgreSQL database, in
this process): a follower applies what the other committed with the same generations
and documents; one that finds the log pruned past its revision reloads the fabric and
serves the same; a replica's write after others' catches up first (no value taken twice);
a write costs two round trips and a refused one leaves no gap in the log; a replica's
follower is woken by the others' commits, not by its own."""

from __future__ import annotations

import time

import pytest

from controller.fabric import Fabric
from controller.models import Kind, VmSpec
from controller.store import ChangeSet, HostRow, StoreConflict, open_store
from tests.unit.test_controller_fabric import populate_small_fabric


def _served(fabric: Fabric) -> dict[str, tuple[int, str, bytes]]:
    return {name: (entry.generation, entry.digest, entry.state_json) for name, entry in fabric.entries.items()}


def _replica(url: str) -> Fabric:
    return Fabric(open_store(url), follow_interval=3600)  # the tests call catch_up themselves


def test_follower_serves_what_the_writer_committed(pg_url):
    writer = populate_small_fabric(_replica(pg_url))
    follower = _replica(pg_url)
    try:
        assert _served(follower) == _served(writer)
        writer.create(Kind.vm, VmSpec(name="r1", vm_network="Red", host="A"))
        writer.delete(Kind.vm, "r1")
        writer.create(Kind.vm, VmSpec(name="r2", vm_network="Red", host="B"))
        assert follower.catch_up() == writer.revision
        assert _served(follower) == _served(writer)
        # A write through the follower builds on what it caught up with.
        follower.create(Kind.vm, VmSpec(name="b1", vm_network="Blue", host="A"))
        writer.catch_up()
        assert _served(follower) == _served(writer)
        vms = [vm for vm in writer.list(Kind.vm)]
        assert len({vm.mac for vm in vms}) == len(vms) == 2
    finally:
        for fabric in (writer, follower):
            fabric.close()
            fabric.store.close()


def test_a_replica_behind_the_pruned_log_reloads(pg_url):
    writer = populate_small_fabric(_replica(pg_url))
    follower = _replica(pg_url)
    try:
        start = follower.revision
        writer.store.keep_revisions = 1
        from controller.store import postgres

        # Enough commits that the writer prunes everything the follower has not seen.
        names = [f"vm{i}" for i in range(postgres.PRUNE_EVERY + 1)]
        writer.create_many(Kind.vm, [VmSpec(name=names[0], vm_network="Red", host="A")])
        for name in names[1:]:
            writer.create(Kind.vm, VmSpec(name=name, vm_network="Red", host="A")) if len(writer.list(Kind.vm)) < 50 \
                else writer.delete(Kind.vm, writer.list(Kind.vm)[0].name)
        oldest = writer.store.revisions_since(0)[0].revision
        assert oldest > start + 1, "the log was not pruned"
        follower.catch_up()
        assert follower.revision == writer.revision
        assert _served(follower) == _served(writer)
        assert [vm.model_dump() for vm in follower.list(Kind.vm)] == [vm.model_dump() for vm in writer.list(Kind.vm)]
    finally:
        for fabric in (writer, follower):
            fabric.close()
            fabric.store.close()


def _exchanges(trace: str) -> int:
    """Round trips in a libpq trace: each ends with the client's Sync (extended protocol,
    one per pipeline) or is one simple-protocol Query."""
    sent = [line.split("\t") for line in trace.splitlines()]
    return sum(1 for fields in sent if len(fields) > 2 and fields[0] == "F" and fields[2].split(" ")[0] in
               ("Sync", "Query"))


def test_a_write_is_two_round_trips_and_a_refused_one_leaves_no_gap_in_the_log(pg_url, tmp_path):
    from psycopg import pq

    store = open_store(pg_url)
    try:
        first = store.commit(ChangeSet(put_objects={("vms", "a"): ("u-a", "{}")}))
        write = store._connections["write"].db
        trace = tmp_path / "libpq.trace"
        with open(trace, "w") as out:
            write.pgconn.trace(out.fileno())
            write.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                second = store.commit(ChangeSet(
                    put_objects={("vms", "b"): ("u-b", "{}")}, put_allocations={("mac", "m1"): "vm:b"},
                    put_leases={("pool", "10.0.0.2"): "{}"}, put_hosts=[HostRow("h1", 1, "d1")]))
            finally:
                write.pgconn.untrace()
        # The lock and the log's head; then the changes, the log entry, NOTIFY and COMMIT.
        assert _exchanges(trace.read_text()) == 2, trace.read_text()
        assert second == first + 1

        with pytest.raises(StoreConflict):  # the MAC is taken: nothing of it is written
            store.commit(ChangeSet(put_objects={("vms", "c"): ("u-c", "{}")}, put_allocations={("mac", "m1"): "vm:c"}))
        third = store.commit(ChangeSet(put_objects={("vms", "d"): ("u-d", "{}")}))
        assert third == second + 1
        assert [r.revision for r in store.revisions_since(0)] == [first, second, third]
        assert [row[1] for row in store.load().objects] == ["a", "b", "d"]
    finally:
        store.close()


def test_a_replica_is_woken_by_other_replicas_commits_not_by_its_own(pg_url):
    mine, other = open_store(pg_url), open_store(pg_url)
    try:
        assert mine.wait_for_change(0.1) is False  # listening from here on
        mine.commit(ChangeSet(put_objects={("vms", "a"): ("u-a", "{}")}))
        assert mine.wait_for_change(0.5) is False
        other.commit(ChangeSet(put_objects={("vms", "b"): ("u-b", "{}")}))
        started = time.monotonic()
        assert mine.wait_for_change(5.0) is True
        assert time.monotonic() - started < 1.0
    finally:
        mine.close()
        other.close()
