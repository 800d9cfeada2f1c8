"""A primary with a synchronous streaming standby (pg_basebackup -R); the primary is killed
(SIGKILL, a lost machine) and the standby promoted. A controller whose store is the
multi-host string `...@primary,standby/db?target_session_attrs=read-write` refuses
writes with 503 meanwhile and resumes them by itself on the promoted standby, with every
write it acknowledged before the kill."""

from __future__ import annotations

import time

import pytest

from tests.lib.controller import LiveController
from tests.lib.seed_fabric import VIRTUAL_HOSTS, add_tenant_network, build_seed_fabric


@pytest.fixture
def primary_and_standby(own_pg_cluster):
    import psycopg

    primary = own_pg_cluster
    database = primary.new_database().rsplit("/", 1)[1]
    standby = primary.standby()
    # Synchronous: a commit is acknowledged once the standby has it, so a promoted
    # standby holds every write the controller acknowledged.
    with psycopg.connect(primary.url(), autocommit=True) as db:
        db.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        db.execute("SELECT pg_reload_conf()")
    try:
        yield primary, standby, database
    finally:
        standby.stop("immediate")


def test_controller_follows_a_promoted_standby(primary_and_standby, tmp_path):
    primary, standby, database = primary_and_standby
    url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{database}"
           "?target_session_attrs=read-write")
    controller = LiveController(tmp_path / "state", hosts=list(VIRTUAL_HOSTS), process=True, store=url)
    with controller:
        admin = controller.admin
        build_seed_fabric(admin)
        add_tenant_network(admin, "Blue", "192.168.10.0/24")
        acknowledged = []
        for i in range(5):
            assert admin.post("/v1/vms", json={"name": f"before{i}", "vm_network": "Blue",
                                               "host": VIRTUAL_HOSTS[i % 2]}).status_code == 201
            acknowledged.append(f"before{i}")

        primary.kill()
        refused = admin.post("/v1/vms", json={"name": "during", "vm_network": "Blue", "host": VIRTUAL_HOSTS[0]})
        assert refused.status_code == 503, refused.text
        assert admin.get("/v1/vms").status_code == 200  # reads go on

        standby.promote()
        promoted = time.monotonic()
        deadline = promoted + 30
        while True:
            answer = admin.post("/v1/vms", json={"name": "after", "vm_network": "Blue", "host": VIRTUAL_HOSTS[1]})
            if answer.status_code == 201:
                break
            assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
            time.sleep(0.1)
        print(f"first write {time.monotonic() - promoted:.2f} s after the standby's promotion")
        names = {vm["name"] for vm in admin.get("/v1/vms").json()}
        assert set(acknowledged) | {"after"} <= names
        controller.restart()  # and the promoted standby is the record
        names = {vm["name"] for vm in controller.admin.get("/v1/vms").json()}
        assert set(acknowledged) | {"after"} <= names
