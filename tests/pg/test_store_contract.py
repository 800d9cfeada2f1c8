"""The store contract, on both backends: what the fabric engine relies on from any store.

Parametrised over SQLite (a file) and PostgreSQL (a real server from tests.lib.postgres):
all-or-nothing commits, unique keys as the last line of defence, load order, tokens and
their revocation, the schema version check, dump/restore.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from controller.store import (
    SCHEMA_VERSION,
    ChangeSet,
    HostRow,
    SchemaTooNew,
    SchemaTooOld,
    StoreConflict,
    open_store,
)
from tests.lib.controller import CHECKOUT, _env


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'controller.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url):
    opened = open_store(store_url)
    yield opened
    opened.close()


def _conflict(exc: BaseException) -> bool:
    import sqlite3

    return isinstance(exc, (sqlite3.IntegrityError, StoreConflict))


def test_commit_is_all_or_nothing(store):
    store.commit(ChangeSet(put_allocations={("mac", "00:1d:d8:b7:1c:00"): "vm:a"}))
    clash = ChangeSet(
        put_objects={("vms", "b"): ("uuid-b", "{}")},
        put_allocations={("mac", "00:1d:d8:b7:1c:00"): "vm:b"},  # taken: the whole change set fails
    )
    with pytest.raises(Exception) as refused:
        store.commit(clash)
    assert _conflict(refused.value), refused.value
    snapshot = store.load()
    assert snapshot.objects == [] and snapshot.allocations == [("mac", "00:1d:d8:b7:1c:00", "vm:a")]


def test_load_keeps_insertion_order_and_upserts_in_place(store):
    for name in ("zeta", "alpha", "mid"):
        store.commit(ChangeSet(put_objects={("vms", name): (f"u-{name}", f'{{"n":"{name}"}}')}))
    store.commit(ChangeSet(put_objects={("vms", "zeta"): ("u-zeta", '{"n":"zeta2"}')}))
    objects = store.load().objects
    assert [key for _, key, _, _ in objects] == ["zeta", "alpha", "mid"]
    assert objects[0][3] == '{"n":"zeta2"}'


def test_seen_times_keep_the_latest_mark_of_each_host_and_touch_nothing_else(store):
    assert store.seen_times() == {}
    store.save_seen(["CON-GW1", "CON-GW2"], 100.5)
    store.save_seen(["CON-GW1"], 101.25)
    store.save_seen([], 102.0)
    assert store.seen_times() == {"CON-GW1": 101.25, "CON-GW2": 100.5}
    snapshot = store.load()  # the marks are no fabric object, host row or schema change
    assert snapshot.hosts == {} and store.schema_version == SCHEMA_VERSION


def test_host_rows_and_status_are_separate_writes(store):
    store.commit(ChangeSet(put_hosts=[HostRow("h1", 1, "d1")]))
    store.save_status("h1", 1, {"errors": []})
    # A bump moves generation and digest; what the agent applied stays its own.
    store.commit(ChangeSet(put_hosts=[HostRow("h1", 2, "d2")]))
    row = store.load().hosts["h1"]
    assert (row.generation, row.digest, row.applied_generation, row.status) == (2, "d2", 1, {"errors": []})


def test_tokens_revoke_and_die_with_their_host(store):
    admin = store.add_token("hash-admin", "admin", None)
    host = store.add_token("hash-h1", "host", "h1")
    assert store.find_token("hash-admin") == ("admin", None)
    assert store.find_token("hash-h1") == ("host", "h1")
    assert store.revoke_tokens([admin]) == [admin]
    assert store.find_token("hash-admin") is None
    store.commit(ChangeSet(put_objects={("hosts", "h1"): ("u-h1", "{}")}))
    store.commit(ChangeSet(delete_objects={("hosts", "h1")}))
    assert store.find_token("hash-h1") is None
    assert [row.id for row in store.list_tokens() if row.revoked is not None] == [admin, host]


def test_expired_token_is_refused(store):
    store.add_token("hash-old", "admin", None, expires=1.0)
    assert store.find_token("hash-old") is None


def test_dump_restore_round_trip(store_url, tmp_path, pg_cluster):
    source = open_store(store_url)
    source.commit(ChangeSet(put_objects={("vms", "b"): ("u-b", "{}"), ("vms", "a"): ("u-a", "{}")},
                            put_allocations={("vsid", "5001"): "vm-network:x"},
                            put_leases={("pool", "10.0.0.5"): '{"x":1}'},
                            put_hosts=[HostRow("h1", 3, "d3")]))
    token = source.add_token("hash-x", "host", "h1")
    other = (pg_cluster.new_database() if store_url.startswith("sqlite")
             else f"sqlite:///{tmp_path / 'copy.db'}")
    target = open_store(other)
    assert target.is_empty()
    target.restore(source.dump())
    assert target.load().objects == source.load().objects
    assert target.load().hosts == source.load().hosts
    assert [row.id for row in target.list_tokens()] == [token]
    assert target.find_token("hash-x") == ("host", "h1")
    # New tokens continue after the copied ids.
    assert target.add_token("hash-y", "admin", None) > token
    source.close()
    target.close()


def _set_version(url: str, version: int) -> None:
    if url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite://"):]) as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as db:
            db.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(version),))


def test_a_newer_schema_is_refused_naming_both_versions(store_url, tmp_path):
    open_store(store_url).close()
    _set_version(store_url, SCHEMA_VERSION + 1)
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}, newer than .* \\(version "
                                           f"{SCHEMA_VERSION}\\)"):
        open_store(store_url)
    # The command line says it in one line and exits 2 (run, and migrate alike).
    for command in (["run", "--insecure-http"], ["migrate"]):
        done = subprocess.run([sys.executable, "-m", "controller.cli", *command, "--state-dir", str(tmp_path),
                               "--store", store_url], cwd=CHECKOUT, env=_env(), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, done
        assert f"schema is version {SCHEMA_VERSION + 1}, newer than this controller knows" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_older_schema_is_upgraded_only_by_migrate(store_url):
    open_store(store_url).close()
    _set_version(store_url, 1)
    _drop_revisions(store_url)
    with pytest.raises(SchemaTooOld, match="hnv-controller migrate"):
        open_store(store_url)
    done = subprocess.run([sys.executable, "-m", "controller.cli", "migrate", "--state-dir", "/nonexistent",
                           "--store", store_url], cwd=CHECKOUT, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done
    assert f"version {SCHEMA_VERSION}" in done.stdout
    store = open_store(store_url)
    assert store.schema_version == SCHEMA_VERSION
    store.close()


def _drop_revisions(url: str) -> None:
    """Make the database really version 1 (the revision log came with version 2)."""
    if url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite://"):]) as db:
            db.execute("DROP TABLE revisions")
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as db:
            db.execute("DROP TABLE revisions")


def test_a_bad_store_url_is_one_line_without_its_password(tmp_path):
    for url, expected in (("mysql://admin:hunter2@db/hnv", "is not a store URL"),
                          (f"sqlite:///{tmp_path}", "Is a directory"),
                          ("postgresql://admin:hunter2@127.0.0.1:1/hnv", "the database is unreachable")):
        done = subprocess.run([sys.executable, "-m", "controller.cli", "migrate-store", "--from", url,
                               "--to", f"sqlite:///{tmp_path / 'copy.db'}"], cwd=CHECKOUT, env=_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done
        assert expected in done.stderr and "hunter2" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_store_url_comes_from_the_environment_as_the_unit_gives_it(tmp_path):
    """HNV_STORE_URL (the unit's env file) is --store's default; --store still wins."""
    env = {**_env(), "HNV_STORE_URL": "mysql://admin:hunter2@db/hnv"}
    done = subprocess.run([sys.executable, "-m", "controller.cli", "migrate", "--state-dir", str(tmp_path)],
                          cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "is not a store URL" in done.stderr and "hunter2" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "controller.cli", "migrate", "--state-dir", str(tmp_path),
                           "--store", f"sqlite:///{tmp_path / 'controller.db'}"],
                          cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no database at sqlite:///" in done.stderr, done  # --store, not the env


def test_a_store_keeps_its_fabric_id_and_another_store_has_its_own(store_url, tmp_path):
    """The id every host state carries (agents compare generations within one fabric):
    made with the database, the same after a reopen, different for another database."""
    store = open_store(store_url)
    first = store.load().fabric_id
    store.close()
    assert first is not None and len(first) == 32
    store = open_store(store_url)
    assert store.load().fabric_id == first
    store.close()
    other = open_store(f"sqlite:///{tmp_path / 'another.db'}")
    assert other.load().fabric_id not in (None, first)
    other.close()
