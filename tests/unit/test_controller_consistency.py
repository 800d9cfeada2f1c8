"""What readers see while a write is under way, and a busy database.

- No reader ever sees state that is not committed: while a store commit is held (slow)
  and then fails, concurrent readers - through the real HTTP API and through the Fabric
  - never see the object it would have created, and never wait for the writer.
- Another process holding SQLite's write lock past the busy timeout is a 503 with
  Retry-After and the JSON error shape, and changes nothing.
"""

from __future__ import annotations

import sqlite3
import threading
import time


from controller.compiler import Compiler
from controller.models import HostGroupSpec, Kind, NotFound, VmSpec
from tests.lib.seed_fabric import add_tenants, build_seed_fabric
from tests.unit.test_controller_fabric import small_fabric

HELD_S = 30  # how long a held commit waits for the test to release it, at most


class HeldCommit:
    """The store's commit, made slow (it waits for `release`) and then failing."""

    def __init__(self, store, error: Exception):
        self.store, self.error = store, error
        self.entered, self.release = threading.Event(), threading.Event()
        self.real = store.commit

    def __call__(self, changes):
        self.entered.set()
        self.release.wait(HELD_S)
        raise self.error


class Readers:
    """Threads reading in a loop until stopped; each read returns what it saw or raises."""

    def __init__(self, reads: dict[str, callable]):
        self.reads, self.stop = reads, threading.Event()
        self.seen: list[str] = []  # violations
        self.count = 0
        self.threads = [threading.Thread(target=self._loop, args=(name, read), daemon=True)
                        for name, read in reads.items()]

    def _loop(self, name, read) -> None:
        while not self.stop.is_set():
            try:
                problem = read()
            except Exception as exc:  # noqa: BLE001 - a reader that fails is a finding
                problem = f"{type(exc).__name__}: {exc}"
            self.count += 1
            if problem and len(self.seen) < 100:
                self.seen.append(f"{name}: {problem}")

    def __enter__(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def test_api_readers_never_see_a_vm_whose_commit_is_slow_and_then_fails(live_controller):
    ctl = live_controller(hosts=["CON-HyperV6", "CON-HyperV7"])
    build_seed_fabric(ctl.admin)
    add_tenants(ctl.admin)
    admin = ctl.admin
    reader = ctl.client(ctl.admin_token, timeout=5)
    host_reader = ctl.client(ctl.host_token("CON-HyperV6"), timeout=5)
    vm = "TenantVM09"

    def everything() -> dict:
        return {
            "vms": reader.get("/v1/vms").json(),
            "leases": reader.get("/v1/ip-addresses").json(),
            "hosts": reader.get("/v1/hosts").json(),
            "state": host_reader.get("/v1/hosts/CON-HyperV6/state").json(),
        }

    before = everything()
    held = HeldCommit(ctl.fabric.store, sqlite3.IntegrityError("UNIQUE constraint failed: leases.pool (simulated)"))
    ctl.fabric.store.commit = held

    def one_vm() -> str | None:
        response = reader.get(f"/v1/vms/{vm}")
        return None if response.status_code == 404 else f"GET /v1/vms/{vm} answered {response.status_code}"

    def vm_list() -> str | None:
        names = [v["name"] for v in reader.get("/v1/vms").json()]
        return f"{vm} listed" if vm in names else None

    def leases() -> str | None:
        held_by = [lease for lease in reader.get("/v1/ip-addresses").json() if lease["holder"] == vm]
        return f"lease {held_by[0]['address']} held by {vm}" if held_by else None

    def host_state() -> str | None:
        state = host_reader.get("/v1/hosts/CON-HyperV6/state").json()
        ports = [port["name"] for port in state["ports"]]
        if vm in ports or state["generation"] != before["state"]["generation"]:
            return f"host state generation {state['generation']} with ports {ports}"
        return None

    reads = {"get": one_vm, "list": vm_list, "leases": leases, "state": host_state}
    created: dict = {}

    def create() -> None:
        created["response"] = admin.post("/v1/vms", json={
            "name": vm, "vm_network": "Fabrikam2", "host": "CON-HyperV6"})

    with Readers(reads) as readers:
        writer = threading.Thread(target=create)
        writer.start()
        assert held.entered.wait(HELD_S), "the write never reached the store's commit"
        # The commit is held: the transaction is built and trial-compiled. Every read now
        # must answer at once (readers do not wait for the writer) and show nothing of it.
        for name, read in reads.items():
            started = time.monotonic()
            problem = read()
            assert problem is None, f"{name} while the commit is held: {problem}"
            assert time.monotonic() - started < 2.5, f"{name} waited for the writer"
        counted = readers.count
        deadline = time.monotonic() + 5
        while readers.count < counted + 20 and time.monotonic() < deadline:
            time.sleep(0.01)  # let the reader threads read a few more times while it is held
        held.release.set()
        writer.join(HELD_S)
    response = created["response"]
    assert response.status_code == 409, response.text
    assert set(response.json()) == {"error", "field", "reason"}
    assert readers.count > 20
    assert readers.seen == [], readers.seen[:5]
    assert everything() == before

    # The compiler's caches kept nothing of the rolled-back change: the next real write
    # publishes exactly what a compiler starting from scratch makes.
    ctl.fabric.store.commit = held.real
    assert admin.post("/v1/vms", json={"name": vm, "vm_network": "Fabrikam2", "host": "CON-HyperV6"}
                      ).status_code == 201
    scratch = Compiler(ctl.fabric.inventory)
    for host in ("CON-HyperV6", "CON-HyperV7"):
        published = host_reader.get("/v1/hosts/CON-HyperV6/state").json() if host == "CON-HyperV6" else None
        expected = scratch.compile(host)
        entry = ctl.fabric.host_entry(host)
        assert scratch.serialise(expected)[0] == entry.digest
        if published is not None:
            assert vm in [port["name"] for port in published["ports"]]


def test_fabric_readers_never_see_a_transaction_whose_commit_fails(tmp_path):
    fabric = small_fabric(tmp_path)
    generations = {name: entry.generation for name, entry in fabric.entries.items()}

    def group() -> str | None:
        names = [g.name for g in fabric.list(Kind.host_group)]
        return "host group Ghost listed" if "Ghost" in names else None

    def vm() -> str | None:
        try:
            fabric.get(Kind.vm, "Ghost1")
        except NotFound:
            return None
        return "VM Ghost1 found"

    def leases() -> str | None:
        return "a lease of Ghost1" if any(lease.holder == "Ghost1" for lease in fabric.leases()) else None

    def entries() -> str | None:
        now = {name: fabric.host_entry(name).generation for name in generations}
        return f"generations moved: {now}" if now != generations else None

    reads = {"group": group, "vm": vm, "leases": leases, "entries": entries}
    writes = [
        lambda: fabric.create_many(Kind.host_group, [HostGroupSpec(name="Ghost")]),
        lambda: fabric.create(Kind.vm, VmSpec(name="Ghost1", vm_network="Red", host="A")),
    ]
    with Readers(reads) as readers:
        for write in writes:
            held = HeldCommit(fabric.store, sqlite3.OperationalError("disk I/O error (simulated)"))
            fabric.store.commit = held
            failure: list[Exception] = []
            writer = threading.Thread(target=lambda: _catch(write, failure))
            writer.start()
            assert held.entered.wait(HELD_S)
            for name, read in reads.items():
                assert read() is None, name
            held.release.set()
            writer.join(HELD_S)
            assert [type(exc) for exc in failure] == [sqlite3.OperationalError]
    assert readers.seen == [], readers.seen[:5]
    assert fabric.inventory.get(Kind.vm, "Ghost1") is None  # the writer's working state was undone too


def _catch(call, into: list) -> None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test asserts what it was
        into.append(exc)


def test_a_busy_database_answers_503_with_retry_after_and_changes_nothing(live_controller):
    ctl = live_controller(hosts=["H"])
    assert ctl.admin.post("/v1/hosts", json={"name": "H", "nics": ["eth0"]}).status_code == 201
    ctl.fabric.store.set_busy_timeout(0.2)
    host = ctl.client_for("H")
    other = sqlite3.connect(ctl.state_dir / "controller.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process takes the write lock and keeps it
        refusals = [
            ctl.admin.post("/v1/host-groups", json={"name": "Busy"}),
            host.put("/v1/hosts/H/status", json={"generation": 1, "errors": [], "agent": "test"}),
        ]
        for response in refusals:
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "1"
            body = response.json()
            assert set(body) == {"error", "field", "reason"}, body
            assert "database is busy" in body["error"] and "write lock" in body["reason"]
        assert ctl.admin.get("/v1/host-groups/Busy").status_code == 404
        assert ctl.admin.get("/v1/hosts/H").json()["applied_generation"] is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ctl.admin.post("/v1/host-groups", json={"name": "Busy"}).status_code == 201
    assert host.put("/v1/hosts/H/status", json={"generation": 1, "errors": [], "agent": "test"}).status_code == 200
