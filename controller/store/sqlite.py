"""The embedded store: one SQLite file, for a single controller (the default).

WAL (readers never wait for the writer), synchronous=FULL (a committed allocation
survives a power cut, so no address is ever handed out twice). One process writes it
(`hnv-controller run` holds a lock on the state directory), so a write session is one
BEGIN IMMEDIATE transaction at commit time and there is no revision log to append to
(the table exists: the schema is the same as PostgreSQL's; nobody follows a single
controller).

- `commit(changes)` writes one `ChangeSet` (objects, allocations, leases, and the host
  generations the change bumps) in one BEGIN IMMEDIATE transaction: all of it or
  nothing. The primary keys are the last line of defence against double allocation:
  (space, value) for VSIDs, MACs and routing-domain ids, (pool, address) for leases;
- tokens are kept as SHA-256 hashes only, each with an id (the rowid), a role, a host
  name, an optional expiry and a revocation time; deleting a host revokes its tokens in
  the same transaction, so a later host of the same name does not inherit them.

The database and its -wal/-shm files are created owner-only (0600): the token hashes and
the fabric are nobody else's business.

Another process holding the write lock past the busy timeout (`busy_timeout` seconds,
5 by default) is raised as `StoreBusy`, never as a bare `sqlite3.OperationalError`, so
the API can answer 503 with Retry-After; nothing was written when it is raised. A unique
key refusing a change is `sqlite3.IntegrityError`.

The schema is `controller.store.common.MIGRATIONS`: a new file gets the latest version;
an older one is refused until `migrate=True` (`hnv-controller migrate`), a newer one
always. This module knows tables and JSON, not fabric rules; it must not import the
compiler or the API.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from controller.store.common import (
    FABRIC_ID_QUERY,
    FABRIC_ID_UPDATE,
    HOST_KIND,
    SCHEMA_VERSION,
    ChangeSet,
    Dump,
    HostRow,
    Revision,
    Snapshot,
    StoreBusy,
    TokenRow,
    check_schema_version,
    upgrade_statements,
)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    # SQLITE_BUSY and SQLITE_LOCKED: "database is locked", "database table is locked",
    # "database is busy" (the message is all sqlite3 gives before Python 3.11's
    # sqlite_errorname, which older builds lack).
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc) or "busy" in str(exc)


@contextlib.contextmanager
def _busy_as_store_busy(what: str):
    try:
        yield
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            raise StoreBusy(f"the database is busy ({what}): {exc}") from None
        raise


class SqliteStore:
    """One SQLite connection, serialised by a lock (the controller is one process)."""

    shared = False  # no other controller writes this database

    def __init__(self, path: str | Path, synchronous: str = "FULL", busy_timeout: float = 5.0,
                 migrate: bool = False):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # host -> when its agent was last heard from (save_seen)
        _create_owner_only(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self.schema_version = self._prepare_schema(migrate)
        except BaseException:
            self._db.close()
            raise
        # Token checks run on every request: they get their own connection, so (WAL) they
        # never wait behind a commit's fsync on the main one.
        self._token_lock = threading.Lock()
        self._token_db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        _restrict_db_files(self.path)

    def close(self) -> None:
        with self._lock, self._token_lock:
            self._db.close()
            self._token_db.close()

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another connection's write lock before `StoreBusy`."""
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    # --- schema ---------------------------------------------------------------------

    def _prepare_schema(self, upgrading: bool) -> int:
        """The schema version after opening: a new file gets every step; an existing one
        is checked (`check_schema_version`) and upgraded only when `upgrading`."""
        has_meta = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        found = 0
        if has_meta:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = int(row[0]) if row else 1
            check_schema_version(found, str(self.path), upgrading)
            self._add_token_columns()
        with _busy_as_store_busy("schema"), self._transaction() as db:
            for statement in upgrade_statements(found, "sqlite"):
                db.execute(statement)
        return SCHEMA_VERSION

    def _add_token_columns(self) -> None:
        """Databases made before expiry and revocation existed get the two columns."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(tokens)")}
        for column in ("expires", "revoked"):
            if column not in have:
                self._db.execute(f"ALTER TABLE tokens ADD COLUMN {column} REAL")

    # --- fabric ---------------------------------------------------------------------

    def load(self) -> Snapshot:
        with self._lock:
            objects = self._db.execute("SELECT kind, key, uuid, doc FROM objects ORDER BY rowid").fetchall()
            allocations = self._db.execute("SELECT space, value, holder FROM allocations ORDER BY rowid").fetchall()
            leases = self._db.execute("SELECT pool, address, doc FROM leases ORDER BY rowid").fetchall()
            hosts = {
                row[0]: HostRow(row[0], row[1], row[2], row[3], json.loads(row[4]) if row[4] else None)
                for row in self._db.execute(
                    "SELECT host, generation, digest, applied_generation, status FROM hosts_sync ORDER BY rowid"
                )
            }
            fabric_id = self._db.execute(FABRIC_ID_QUERY).fetchone()
        return Snapshot(objects, allocations, leases, hosts, fabric_id=fabric_id[0] if fabric_id else None)

    def write_session(self) -> _SqliteWriteSession:
        return _SqliteWriteSession(self)

    def revisions_since(self, revision: int) -> list[Revision]:
        return []  # one writer: nothing to catch up with

    def commit(self, changes: ChangeSet) -> None:
        """Write a change set in one transaction; on any error nothing is written."""
        if changes.empty():
            return
        with self._lock, _busy_as_store_busy("commit"), self._transaction() as db:
            # Deletes first: an operation that frees and retakes the same key in one
            # change set (a lease moved) must not trip over its own primary key.
            db.executemany("DELETE FROM objects WHERE kind = ? AND key = ?", list(changes.delete_objects))
            db.executemany(
                "DELETE FROM allocations WHERE space = ? AND value = ?", list(changes.delete_allocations)
            )
            db.executemany("DELETE FROM leases WHERE pool = ? AND address = ?", list(changes.delete_leases))
            gone = [(time.time(), host) for host in deleted_hosts(changes)]
            db.executemany("UPDATE tokens SET revoked = ? WHERE role = 'host' AND host = ? AND revoked IS NULL",
                           gone)
            db.executemany(
                "INSERT INTO objects (kind, key, uuid, doc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc",
                [(kind, key, uuid, doc) for (kind, key), (uuid, doc) in changes.put_objects.items()],
            )
            # Plain INSERT: a value already taken is an IntegrityError, never overwritten.
            db.executemany(
                "INSERT INTO allocations (space, value, holder) VALUES (?, ?, ?)",
                [(space, value, holder) for (space, value), holder in changes.put_allocations.items()],
            )
            db.executemany(
                "INSERT INTO leases (pool, address, doc) VALUES (?, ?, ?) "
                "ON CONFLICT (pool, address) DO UPDATE SET doc = excluded.doc",
                [(pool, address, doc) for (pool, address), doc in changes.put_leases.items()],
            )
            db.executemany("DELETE FROM hosts_sync WHERE host = ?", [(host,) for host in changes.delete_hosts])
            # A bump moves the generation and digest only; what the agent applied is its own.
            db.executemany(
                "INSERT INTO hosts_sync (host, generation, digest, applied_generation, status) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (host) DO UPDATE SET "
                "generation = excluded.generation, digest = excluded.digest",
                [_host_values(row) for row in changes.put_hosts],
            )

    def save_status(self, host: str, applied_generation: int, status: dict[str, Any]) -> None:
        """An agent's report: the generation it applied and its errors."""
        with self._lock, _busy_as_store_busy("host status"), self._transaction() as db:
            db.execute("UPDATE hosts_sync SET applied_generation = ?, status = ? WHERE host = ?",
                       (applied_generation, json.dumps(status), host))

    def host_statuses(self) -> dict[str, tuple[int | None, str | None]]:
        with self._lock:
            return {row[0]: (row[1], row[2]) for row in
                    self._db.execute("SELECT host, applied_generation, status FROM hosts_sync")}

    def save_seen(self, hosts: Iterable[str], when: float) -> None:
        """Hosts whose agent this controller heard from at `when`. Kept in memory: one
        process serves a SQLite file, so there is nobody to share it with, and a restart
        forgetting it costs nothing (gateway failover waits out agents' reconnects after
        a start anyway); it saves a disk write every second."""
        with self._lock:
            for host in hosts:
                self._seen[host] = max(when, self._seen.get(host, when))

    def seen_times(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seen)

    def check(self) -> None:
        """Read one row from the database file; raises (sqlite3.Error) when it cannot.

        What ``hnv_controller_database_up`` and the controller's systemd watchdog ask.
        """
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise sqlite3.DatabaseError("the meta table has no schema_version row")

    # --- tokens ---------------------------------------------------------------------

    def add_token(self, token_hash: str, role: str, host: str | None, expires: float | None = None) -> int:
        """Store a token's hash; its id (what `token list` and `token revoke` use)."""
        with self._lock, self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO tokens (hash, role, host, created, expires) VALUES (?, ?, ?, ?, ?)",
                (token_hash, role, host, time.time(), expires),
            )
            return cursor.lastrowid

    def find_token(self, token_hash: str, now: float | None = None) -> tuple[str, str | None] | None:
        """(role, host) of a token that is neither revoked nor expired, else None."""
        now = time.time() if now is None else now
        with self._token_lock:
            row = self._token_db.execute(
                "SELECT role, host FROM tokens WHERE hash = ? AND revoked IS NULL "
                "AND (expires IS NULL OR expires > ?)",
                (token_hash, now),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def list_tokens(self) -> list[TokenRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, role, host, created, expires, revoked FROM tokens ORDER BY rowid"
            ).fetchall()
        return [TokenRow(*row) for row in rows]

    def revoke_tokens(self, ids: list[int] | None = None, role: str | None = None) -> list[int]:
        """Revoke the tokens with these ids, or every live token of a role; the ids revoked."""
        with self._lock, self._transaction() as db:
            if ids is not None:
                marks = ",".join("?" * len(ids))
                found = [row[0] for row in db.execute(
                    f"SELECT rowid FROM tokens WHERE revoked IS NULL AND rowid IN ({marks})", ids)]
            else:
                found = [row[0] for row in db.execute(
                    "SELECT rowid FROM tokens WHERE revoked IS NULL AND role = ?", (role,))]
            db.executemany("UPDATE tokens SET revoked = ? WHERE rowid = ?", [(time.time(), i) for i in found])
        return found

    # --- migrate-store --------------------------------------------------------------

    def dump(self) -> Dump:
        with self._lock:
            tokens = self._db.execute(
                "SELECT rowid, hash, role, host, created, expires, revoked FROM tokens ORDER BY rowid").fetchall()
        return Dump(self.load(), tokens)

    def restore(self, dump: Dump) -> None:
        """Write a whole dump into this (empty) store in one transaction."""
        snapshot = dump.snapshot
        with self._lock, self._transaction() as db:
            db.executemany("INSERT INTO objects (kind, key, uuid, doc) VALUES (?, ?, ?, ?)", snapshot.objects)
            db.executemany("INSERT INTO allocations (space, value, holder) VALUES (?, ?, ?)", snapshot.allocations)
            db.executemany("INSERT INTO leases (pool, address, doc) VALUES (?, ?, ?)", snapshot.leases)
            db.executemany("INSERT INTO hosts_sync (host, generation, digest, applied_generation, status) "
                           "VALUES (?, ?, ?, ?, ?)", [_host_values(row) for row in snapshot.hosts.values()])
            db.executemany("INSERT INTO tokens (rowid, hash, role, host, created, expires, revoked) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", dump.tokens)
            if snapshot.fabric_id is not None:  # the same fabric, moved: agents keep counting
                db.execute(FABRIC_ID_UPDATE.format(param="?"), (snapshot.fabric_id,))

    def is_empty(self) -> bool:
        with self._lock:
            return all(self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None
                       for table in ("objects", "tokens"))

    # --- helpers --------------------------------------------------------------------

    def _transaction(self):
        return _Transaction(self._db)


class _SqliteWriteSession:
    """One fabric write on the embedded store: the commit is the only database step."""

    def __init__(self, store: SqliteStore):
        self.store = store

    def __enter__(self) -> _SqliteWriteSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def revisions_since(self, revision: int) -> list[Revision]:
        return []

    def commit(self, changes: ChangeSet) -> int | None:
        self.store.commit(changes)
        return None


def deleted_hosts(changes: ChangeSet) -> list[str]:
    """Hosts a change set deletes (their tokens die in the same transaction: a new host
    of the same name gets new tokens, never the old host's)."""
    return [key for (kind, key) in changes.delete_objects
            if kind == HOST_KIND and (kind, key) not in changes.put_objects]


def _host_values(row: HostRow) -> tuple:
    return (row.host, row.generation, row.digest, row.applied_generation,
            json.dumps(row.status) if row.status is not None else None)


def _create_owner_only(path: Path) -> None:
    """Create the database file 0600 before SQLite does (SQLite would make it 0644 under a
    usual umask); its -wal and -shm files take the database file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def _restrict_db_files(path: Path) -> None:
    """0600 for the database and its -wal/-shm, also when they were made by an older
    version that left them 0644."""
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        try:
            os.chmod(path.with_name(name), 0o600)
        except FileNotFoundError:
            pass


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception.

    IMMEDIATE takes the write lock at BEGIN, so two writers (even two processes on one
    file) never both read-then-insert the same free value.
    """

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
