"""A staged migration with two controller replicas on one PostgreSQL database: each stage
is one committed write, so both replicas serve every host the same generation and the
same document at every stage, and replicas racing to advance a stage advance it once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from controller.fabric import Fabric
from controller.models import Kind
from controller.store import open_store
from tests.lib.nv_fabric import populate

HOSTS = ("A", "B", "C")
NEVER = 3600.0  # only InSync reports move the stages


def wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def served(replica: Fabric) -> dict[str, tuple[int, str]]:
    """host -> (generation, digest) as this replica serves it."""
    return {host: (replica.entries[host].generation, replica.entries[host].digest) for host in HOSTS}


def same_everywhere(replicas: list[Fabric]) -> dict[str, tuple[int, str]] | None:
    for replica in replicas:
        replica.catch_up()
    views = [served(replica) for replica in replicas]
    return views[0] if all(view == views[0] for view in views) else None


def stage_of(replica: Fabric) -> str | None:
    migration = replica.get(Kind.vm, "m").migration
    return migration.stage.value if migration is not None else None


def test_every_stage_is_served_alike_by_both_replicas_and_advanced_once(pg_url):
    replicas: list[Fabric] = []
    try:
        replicas.append(populate(Fabric(open_store(pg_url), migration_bound=NEVER), HOSTS, {"m": "A", "p": "C"}))
        replicas.append(Fabric(open_store(pg_url), migration_bound=NEVER))
        first, second = replicas
        before = wait_for(lambda: same_everywhere(replicas), "both replicas to serve the fabric")

        first.migrate("m", "B")
        stage1 = wait_for(lambda: same_everywhere(replicas) if stage_of(second) == "destination" else None,
                          "the second replica to serve stage 1")
        # Every host of Red changes: the destination's port, and both ends as transit.
        assert {h for h in HOSTS if stage1[h] != before[h]} == {"A", "B", "C"}
        revision = first.catch_up()

        # Every host reports InSync, A and C through the first replica and B, last, through
        # the second; both replicas try to advance at once.
        first.report_status("A", stage1["A"][0], [], "test")
        first.report_status("C", stage1["C"][0], [], "test")
        second.report_status("B", stage1["B"][0], [], "test")
        for replica in replicas:
            replica.refresh_statuses()
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda replica: replica.advance_migrations(), replicas))
        stage2 = wait_for(lambda: same_everywhere(replicas) if stage_of(second) == "peers" else None,
                          "both replicas to serve stage 2")
        # The peer switches to B, the source lets the VM's port go and forwards.
        assert {h for h in HOSTS if stage2[h] != stage1[h]} == {"A", "C"}
        assert stage2["C"][0] == stage1["C"][0] + 1
        assert first.catch_up() == second.catch_up() == revision + 1, "stage 2 was committed more than once"

        # A and C report through the second replica: the source lets Red go, transit goes.
        second.report_status("A", stage2["A"][0], [], "test")
        second.report_status("C", stage2["C"][0], [], "test")
        done = wait_for(lambda: same_everywhere(replicas) if stage_of(first) is None and stage_of(second) is None
                        else None, "both replicas to serve the end of the migration")
        assert {h for h in HOSTS if done[h] != stage2[h]} == {"A", "B", "C"}
        for replica in replicas:
            assert replica.leases(kind="PA", host="A", vm_network="Red") == []
            assert replica.entries["A"].state.routing_domains == ()
        assert first.catch_up() == second.catch_up() == revision + 2
    finally:
        for replica in replicas:
            replica.close()
            replica.store.close()
