"""The revision log between two replicas (two `Fabric`s on one PostgreSQL database, in
this process): a follower applies what the other committed with the same generations
and documents; one that finds the log pruned past its revision reloads the fabric and
serves the same; a replica's write after others' catches up first (no value taken twice)."""

from __future__ import annotations

from controller.fabric import Fabric
from controller.models import Kind, VmSpec
from controller.store import open_store
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
