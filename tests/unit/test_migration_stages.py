"""Make-before-break migration as the controller stages it (controller.fabric.migrations):
the destination first (the source keeps the VM's port, every host receives from both
ends), the peers and the forwarding source once every host reports InSync (or the bound
passes), the source's removal last; every stage visible in the generations and documents
served. A second move and a delete during a migration."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent.state import parse_host_state
from controller.fabric import Fabric
from controller.models import Conflict, Kind, VmSpec
from tests.lib.nv_fabric import populate as populate_fabric

HOSTS = ("A", "B", "C")
NEVER = 3600.0  # a bound no test waits for: only InSync reports move the stages


def populate(fabric: Fabric) -> Fabric:
    """Three NV hosts; VM network Red with VM m on A (the migrating one) and p on C (a peer)."""
    return populate_fabric(fabric, HOSTS, {"m": "A", "p": "C"})


def generations(fabric: Fabric) -> dict[str, int]:
    return {host: fabric.entries[host].generation for host in HOSTS}


def served(fabric: Fabric, host: str):
    """The document a watcher of `host` is served, parsed as its agent parses it."""
    return parse_host_state(fabric.entries[host].state_json)


def pa_of(fabric: Fabric, host: str) -> str | None:
    found = fabric.leases(kind="PA", host=host, vm_network="Red")
    return str(found[0].address) if found else None


def record_pa(fabric: Fabric, host: str, vm: str = "m") -> str | None:
    return next((str(r.pa) for r in served(fabric, host).records if r.vm_name == vm), None)


def report_in_sync(fabric: Fabric, host: str) -> None:
    fabric.report_status(host, fabric.entries[host].generation, [], "test")


def wait_for(predicate, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def transit(fabric: Fabric, host: str) -> list[str]:
    """The PAs the host's routing domain Red names as a migration's ends."""
    return [str(pa) for rd in served(fabric, host).routing_domains if rd.name == "Red" for pa in rd.transit]


def report_all_in_sync(fabric: Fabric) -> None:
    for host in HOSTS:
        report_in_sync(fabric, host)


def test_each_stage_is_visible_in_the_generations_of_destination_peer_and_source(tmp_path):
    fabric = populate(Fabric.open(tmp_path, synchronous="NORMAL", migration_bound=NEVER))
    before = generations(fabric)
    pa_a = pa_of(fabric, "A")
    assert record_pa(fabric, "C") == pa_a and transit(fabric, "C") == []

    moved = fabric.migrate("m", "B")
    assert moved.host == "B" and moved.migration.source == "A" and moved.migration.stage == "destination"
    pa_b = pa_of(fabric, "B")
    ends = sorted([pa_a, pa_b])
    # Stage 1: the destination gets the port and the records; the source keeps its port
    # and the VM on its own PA; the peer still sends to the source; every host receives
    # from both ends (transit), so every generation moves.
    stage1 = generations(fabric)
    assert stage1 == {host: before[host] + 1 for host in HOSTS}
    assert [port.name for port in served(fabric, "B").ports] == ["m"]
    assert record_pa(fabric, "B") == pa_b
    source = served(fabric, "A")
    assert [port.name for port in source.ports] == ["m"] and record_pa(fabric, "A") == pa_a
    assert [str(pa.address) for pa in source.provider.addresses] == [pa_a]
    assert record_pa(fabric, "C") == pa_a
    assert transit(fabric, "A") == transit(fabric, "B") == transit(fabric, "C") == ends
    # Nothing moves while one host (here the destination) has not applied its generation.
    report_in_sync(fabric, "A")
    report_in_sync(fabric, "C")
    fabric.report_status("B", stage1["B"] - 1, [], "test")
    time.sleep(0.5)  # a negative check: the stepper looks every 0.25 s
    assert generations(fabric) == stage1

    # Stage 2: the destination reports InSync too; the peer switches to it, the source
    # lets the VM's port go and forwards to the destination.
    report_in_sync(fabric, "B")
    wait_for(lambda: generations(fabric)["C"] != stage1["C"], "the peer's generation to move")
    stage2 = generations(fabric)
    assert stage2 == {**stage1, "A": stage1["A"] + 1, "C": stage1["C"] + 1}
    assert record_pa(fabric, "C") == record_pa(fabric, "A") == pa_b
    assert served(fabric, "A").ports == ()
    assert fabric.get(Kind.vm, "m").migration.stage == "peers"
    assert pa_of(fabric, "A") == pa_a and transit(fabric, "C") == ends  # the source still holds Red

    # Stage 3: the peer reports InSync, but the source has not: nothing moves yet.
    report_in_sync(fabric, "C")
    time.sleep(0.5)
    assert generations(fabric) == stage2
    # Every host of Red reports InSync: the source lets Red go, transit goes everywhere.
    report_in_sync(fabric, "A")
    wait_for(lambda: generations(fabric)["A"] != stage2["A"], "the source's generation to move")
    assert generations(fabric) == {host: stage2[host] + 1 for host in HOSTS}
    assert fabric.get(Kind.vm, "m").migration is None
    assert served(fabric, "A").routing_domains == () and pa_of(fabric, "A") is None
    assert record_pa(fabric, "B") == record_pa(fabric, "C") == pa_b
    assert transit(fabric, "B") == transit(fabric, "C") == []
    fabric.close()

    # A restart serves the same generations: the stages were committed.
    fabric.store.close()
    reopened = Fabric.open(tmp_path, synchronous="NORMAL")
    assert generations(reopened) == generations(fabric)
    reopened.close()


def test_the_bound_moves_the_stages_when_no_host_reports(tmp_path):
    bound = 0.5
    fabric = populate(Fabric.open(tmp_path, synchronous="NORMAL", migration_bound=bound))
    before = generations(fabric)
    started = time.monotonic()
    fabric.migrate("m", "B")
    assert generations(fabric) == {host: before[host] + 1 for host in HOSTS}
    wait_for(lambda: generations(fabric)["C"] != before["C"] + 1, "the peer's generation to move")
    peers_at = time.monotonic()
    assert generations(fabric)["B"] == before["B"] + 1  # transit's removal comes after
    wait_for(lambda: fabric.get(Kind.vm, "m").migration is None, "the migration to end")
    done_at = time.monotonic()
    assert peers_at - started >= bound and done_at - started >= 2 * bound
    assert generations(fabric) == {"A": before["A"] + 3, "B": before["B"] + 2, "C": before["C"] + 3}
    assert pa_of(fabric, "A") is None and record_pa(fabric, "C") == pa_of(fabric, "B")
    fabric.close()


def test_a_second_move_during_a_migration_starts_from_where_the_vm_is(tmp_path):
    fabric = populate(Fabric.open(tmp_path, synchronous="NORMAL", migration_bound=NEVER))
    fabric.migrate("m", "B")
    moved = fabric.migrate("m", "C")
    # The new migration leaves B; A's hold ends with it (A has no other VM of Red).
    assert moved.migration.source == "B" and moved.migration.stage == "destination"
    assert pa_of(fabric, "A") is None and served(fabric, "A").routing_domains == ()
    assert [port.name for port in served(fabric, "B").ports] == ["m"]
    assert record_pa(fabric, "B") == pa_of(fabric, "B")
    assert sorted(port.name for port in served(fabric, "C").ports) == ["m", "p"]
    # B and C, the source and the destination, are Red's only hosts: their InSync
    # reports move both stages.
    wait_for(lambda: report_all_in_sync(fabric) or fabric.get(Kind.vm, "m").migration is None,
             "the migration to end")
    assert pa_of(fabric, "B") is None and served(fabric, "B").routing_domains == ()
    assert record_pa(fabric, "C") == pa_of(fabric, "C")

    # Moving back to the source while it still forwards: it keeps its PA, now as destination.
    pa_c = pa_of(fabric, "C")
    fabric.migrate("m", "A")
    back = fabric.migrate("m", "C")
    assert back.migration.source == "A" and pa_of(fabric, "C") == pa_c
    assert record_pa(fabric, "C") == pa_c and record_pa(fabric, "A") == pa_of(fabric, "A")
    fabric.close()


def test_deleting_a_migrating_vm_lets_its_source_go(tmp_path):
    fabric = populate(Fabric.open(tmp_path, synchronous="NORMAL", migration_bound=NEVER))
    fabric.migrate("m", "B")
    assert pa_of(fabric, "A") is not None
    fabric.delete(Kind.vm, "m")
    assert pa_of(fabric, "A") is None and pa_of(fabric, "B") is None
    assert served(fabric, "A").routing_domains == () and served(fabric, "B").routing_domains == ()
    assert [r.vm_name for r in served(fabric, "C").records if r.type == "Static"] == ["p"]
    assert fabric.advance_migrations() == []
    fabric.close()


def test_a_peer_vm_deleted_on_the_source_does_not_take_the_forwarding_pa(tmp_path):
    fabric = populate(Fabric.open(tmp_path, synchronous="NORMAL", migration_bound=NEVER))
    fabric.create(Kind.vm, VmSpec(name="q", vm_network="Red", host="A"))
    fabric.migrate("m", "B")
    fabric.delete(Kind.vm, "q")  # A's last VM of Red goes, but A still holds m's port and Red
    assert pa_of(fabric, "A") is not None and [port.name for port in served(fabric, "A").ports] == ["m"]
    assert record_pa(fabric, "A") == pa_of(fabric, "A")
    fabric.close()


def test_a_host_forwarding_for_a_migration_is_not_deleted_until_it_ends(tmp_path):
    fabric = populate(Fabric.open(tmp_path, synchronous="NORMAL", migration_bound=NEVER))
    fabric.migrate("m", "B")
    for attempt in (lambda: fabric.delete(Kind.host, "A"), lambda: fabric.delete_virtual_switch("A")):
        with pytest.raises(Conflict) as refused:
            attempt()
        assert refused.value.field in ("name", "host") and "the migration of VM m to B" in refused.value.reason
    assert pa_of(fabric, "A") is not None
    fabric.close()


def test_every_host_has_a_tunnel_to_both_ends_before_the_vm_can_send_from_the_destination(tmp_path):
    """The kernel accepts a GRE packet only on a tunnel matching its remote PA: in stage 1
    the peer's document, as its agent plans it, holds a tunnel to the destination (no
    record names that PA yet) and the destination's one to the source; once the
    migration ends, the tunnels follow the records again."""
    from agent.plan import desired_kernel_state

    def gretap_remotes(host: str) -> set[str]:
        links = desired_kernel_state(served(fabric, host)).links.values()
        return {link.option("remote") for link in links if link.kind == "gretap"}

    fabric = populate(Fabric.open(tmp_path, synchronous="NORMAL", migration_bound=NEVER))
    pa_a = pa_of(fabric, "A")
    assert gretap_remotes("C") == {pa_a}
    fabric.migrate("m", "B")
    pa_b, pa_c = pa_of(fabric, "B"), pa_of(fabric, "C")
    assert record_pa(fabric, "C") == pa_a
    assert gretap_remotes("C") == {pa_a, pa_b}
    assert gretap_remotes("B") == {pa_a, pa_c}
    assert gretap_remotes("A") == {pa_b, pa_c}
    wait_for(lambda: report_all_in_sync(fabric) or fabric.get(Kind.vm, "m").migration is None,
             "the migration to end")
    assert gretap_remotes("C") == {pa_b} and gretap_remotes("B") == {pa_c}
    fabric.close()
