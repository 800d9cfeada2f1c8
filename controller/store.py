"""The repository: the only code that touches the controller's database.

SQLite by default: one file, WAL (readers never wait for the writer), synchronous=FULL
(a committed allocation survives a power cut, so no address is ever handed out twice).
The interface is narrow on purpose, so a distributed store can replace it:

- `load()` returns everything at start-up (the controller keeps the fabric in memory and
  answers reads from there);
- `commit(changes)` writes one `ChangeSet` (objects, allocations, leases) in one
  BEGIN IMMEDIATE transaction: all of it or nothing. The primary keys are the last line
  of defence against double allocation: (space, value) for VSIDs, MACs and routing-domain
  ids, (pool, address) for leases;
- `save_host_rows()` keeps generations, digests and applied status;
- tokens are kept as SHA-256 hashes only.

This module knows tables and JSON, not fabric rules; it must not import the compiler or
the API.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    uuid TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS allocations (
    space TEXT NOT NULL,          -- 'vsid', 'mac', 'routing_domain'
    value TEXT NOT NULL,
    holder TEXT NOT NULL,
    PRIMARY KEY (space, value)
);
CREATE TABLE IF NOT EXISTS leases (
    pool TEXT NOT NULL,
    address TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (pool, address)
);
CREATE TABLE IF NOT EXISTS hosts_sync (
    host TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    digest TEXT NOT NULL,
    applied_generation INTEGER,
    status TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'host')),
    host TEXT,
    created REAL NOT NULL
);
"""


@dataclass
class ChangeSet:
    """What one fabric operation writes; built in memory, committed at once."""

    put_objects: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (kind,key) -> (uuid, doc)
    delete_objects: set[tuple[str, str]] = field(default_factory=set)
    put_allocations: dict[tuple[str, str], str] = field(default_factory=dict)  # (space,value) -> holder
    delete_allocations: set[tuple[str, str]] = field(default_factory=set)
    put_leases: dict[tuple[str, str], str] = field(default_factory=dict)  # (pool,address) -> doc
    delete_leases: set[tuple[str, str]] = field(default_factory=set)

    def empty(self) -> bool:
        return not (
            self.put_objects
            or self.delete_objects
            or self.put_allocations
            or self.delete_allocations
            or self.put_leases
            or self.delete_leases
        )


@dataclass
class HostRow:
    host: str
    generation: int
    digest: str
    applied_generation: int | None = None
    status: dict[str, Any] | None = None


@dataclass
class Snapshot:
    objects: list[tuple[str, str, str, str]]  # kind, key, uuid, doc
    allocations: list[tuple[str, str, str]]  # space, value, holder
    leases: list[tuple[str, str, str]]  # pool, address, doc
    hosts: dict[str, HostRow]


class Store:
    """One SQLite connection, serialised by a lock (the controller is one process)."""

    def __init__(self, path: str | Path, synchronous: str = "FULL"):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- fabric ---------------------------------------------------------------------

    def load(self) -> Snapshot:
        with self._lock:
            objects = self._db.execute("SELECT kind, key, uuid, doc FROM objects ORDER BY rowid").fetchall()
            allocations = self._db.execute("SELECT space, value, holder FROM allocations").fetchall()
            leases = self._db.execute("SELECT pool, address, doc FROM leases ORDER BY rowid").fetchall()
            hosts = {
                row[0]: HostRow(row[0], row[1], row[2], row[3], json.loads(row[4]) if row[4] else None)
                for row in self._db.execute(
                    "SELECT host, generation, digest, applied_generation, status FROM hosts_sync"
                )
            }
        return Snapshot(objects, allocations, leases, hosts)

    def commit(self, changes: ChangeSet) -> None:
        """Write a change set in one transaction; on any error nothing is written."""
        if changes.empty():
            return
        with self._lock, self._transaction() as db:
            # Deletes first: an operation that frees and retakes the same key in one
            # change set (a lease moved) must not trip over its own primary key.
            db.executemany("DELETE FROM objects WHERE kind = ? AND key = ?", list(changes.delete_objects))
            db.executemany(
                "DELETE FROM allocations WHERE space = ? AND value = ?", list(changes.delete_allocations)
            )
            db.executemany("DELETE FROM leases WHERE pool = ? AND address = ?", list(changes.delete_leases))
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

    def save_host_rows(self, rows: list[HostRow], deleted: list[str] = ()) -> None:
        if not rows and not deleted:
            return
        with self._lock, self._transaction() as db:
            db.executemany("DELETE FROM hosts_sync WHERE host = ?", [(host,) for host in deleted])
            db.executemany(
                "INSERT INTO hosts_sync (host, generation, digest, applied_generation, status) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (host) DO UPDATE SET "
                "generation = excluded.generation, digest = excluded.digest, "
                "applied_generation = excluded.applied_generation, status = excluded.status",
                [
                    (
                        row.host,
                        row.generation,
                        row.digest,
                        row.applied_generation,
                        json.dumps(row.status) if row.status is not None else None,
                    )
                    for row in rows
                ],
            )

    def check(self) -> None:
        """Read one row from the database file; raises (sqlite3.Error) when it cannot.

        What ``hnv_controller_database_up`` and the controller's systemd watchdog ask.
        """
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise sqlite3.DatabaseError("the meta table has no schema_version row")

    # --- tokens ---------------------------------------------------------------------

    def add_token(self, token_hash: str, role: str, host: str | None) -> None:
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT INTO tokens (hash, role, host, created) VALUES (?, ?, ?, ?)",
                (token_hash, role, host, time.time()),
            )

    def find_token(self, token_hash: str) -> tuple[str, str | None] | None:
        with self._lock:
            row = self._db.execute("SELECT role, host FROM tokens WHERE hash = ?", (token_hash,)).fetchone()
        return (row[0], row[1]) if row else None

    # --- helpers --------------------------------------------------------------------

    def _transaction(self):
        return _Transaction(self._db)


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
