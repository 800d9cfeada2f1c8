"""The shared store: PostgreSQL, for any number of controller replicas (psycopg 3).

Every replica keeps the fabric in memory, as with SQLite; the database is the record and
the meeting point:

- writes are serialised across replicas by a transaction-scoped advisory lock
  (`pg_advisory_xact_lock(FABRIC_LOCK)`), taken first in every write session. Inside
  it the replica reads the revisions it has not seen and applies them before it builds
  anything on the fabric, so allocations stay exactly-once (the unique keys remain the
  last line of defence, as `StoreConflict`);
- each commit appends its change set, with the host generations and digests it bumps,
  to `revisions` in the same transaction. Revision numbers are max + 1 under the lock,
  so the log has no gaps and its order is the commit order (the writer of every
  `PRUNE_EVERY`-th revision drops all but the last `KEEP_REVISIONS`: a replica that
  finds a gap reloads the whole fabric instead); `pg_notify` on
  `REVISIONS_CHANNEL` wakes the other replicas' followers when it commits. A follower
  also polls the log, so a lost notification costs one poll interval, never a change;
- a write costs two round trips (`_PgWriteSession`: the lock and the log's head; then
  the changes, the log entry, NOTIFY and COMMIT as one pipeline), and one more only
  when another replica committed since this one's last revision;
- tokens, revocations and agents' statuses are rows every replica reads, and so are
  the times a replica last heard from a host's agent (`save_seen`: `seen:<host>` rows of
  `meta`, no schema change; what gateway failover asks of every replica).

Connections: one per role (writes, token checks, LISTEN, the follower's reads, agents'
statuses, the rest), each used
under its own lock and opened again on the next use after any connection error, so a
controller recovers by itself when the database returns or a standby is promoted. Why
not a pool: six fixed connections each serialised by its owner's lock are the whole
need (the LISTEN one waits up to a poll interval holding its lock: nothing else uses it),
and reconnecting on the next use keeps a failure's cost and timing obvious.
Errors: an unreachable or read-only database is `StoreUnavailable`; the advisory lock
not granted within `lock_timeout` is `StoreBusy`; a unique key is `StoreConflict`.

Token checks read the database on every request (a revocation on any replica bites on
the next request). While this replica cannot reach the database, a token it verified
within the last `TOKEN_GRACE_S` seconds is still accepted (reads and watches go on
during an outage; no write can succeed then anyway); any other token answers 503.

The connection string is any libpq one: a URL (`postgresql://user@host/db`) or
keywords, multi-host ones included (`host=a,b target_session_attrs=read-write`).
This module knows tables and JSON, not fabric rules; it must not import the compiler or
the API.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any, Iterable, Iterator

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from controller.store.common import (
    FABRIC_ID_QUERY,
    FABRIC_ID_UPDATE,
    REVISIONS_CHANNEL,
    SCHEMA_VERSION,
    SEEN_PREFIX,
    ChangeSet,
    Dump,
    HostRow,
    Revision,
    Snapshot,
    StoreBusy,
    StoreConflict,
    StoreUnavailable,
    TokenRow,
    check_schema_version,
    redacted,
    upgrade_statements,
)
from controller.store.sqlite import deleted_hosts

FABRIC_LOCK = 0x68_6E_76_01  # the advisory lock every fabric write takes ("hnv" 1)
SCHEMA_LOCK = 0x68_6E_76_02  # ... and every schema change
TOKEN_GRACE_S = 60.0  # how long a verified token is accepted while the database is unreachable
RETRY_CONNECT_S = 1.0  # after a failed connection, token checks use the cache this long before retrying
CONNECT_TIMEOUT_S = 3
LOCK_TIMEOUT_MS = 5000  # the advisory lock not granted within this is StoreBusy
KEEP_REVISIONS = 10_000  # the revision log keeps this many; a replica further behind reloads
PRUNE_EVERY = 100  # ... pruned by the writer of every PRUNE_EVERY-th revision


class PostgresStore:
    shared = True  # other replicas write this database: follow its revision log

    def __init__(self, conninfo: str, migrate: bool = False, replica: str | None = None):
        self.url = conninfo
        self.keep_revisions = KEEP_REVISIONS
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self._connections = {role: _Connection(conninfo, role) for role in ("write", "tokens", "listen", "follow", "misc")}
        # Agents' status reports: hundreds at once when agents move to this replica, and
        # each is reported again by its agent; so no wait for the WAL flush per report
        # (a crash may lose the last few, never a fabric change: those commit on "write").
        self._connections["status"] = _Connection(conninfo, "status", setup="SET synchronous_commit = off")
        self._token_cache: dict[str, tuple[str, str | None, float | None, float]] = {}
        self._token_retry_at = 0.0
        self.schema_version = self._prepare_schema(migrate)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()

    # --- schema ---------------------------------------------------------------------

    def _prepare_schema(self, upgrading: bool) -> int:
        with self._connections["misc"].use() as db, _transaction(db):
            # Two controllers starting on a new database at once: one creates, one waits.
            db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            found = 0
            if db.execute("SELECT to_regclass('meta')").fetchone()[0] is not None:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                found = int(row[0]) if row else 0
                check_schema_version(found, redacted(self.url), upgrading)
            for statement in upgrade_statements(found, "postgresql"):
                db.execute(statement)
        return SCHEMA_VERSION

    # --- fabric ---------------------------------------------------------------------

    def load(self) -> Snapshot:
        """Everything, and the revision it is current as of, from one snapshot."""
        with self._connections["misc"].use() as db, _transaction(db, "ISOLATION LEVEL REPEATABLE READ READ ONLY"):
            objects = db.execute("SELECT kind, key, uuid, doc FROM objects ORDER BY seq").fetchall()
            allocations = db.execute("SELECT space, value, holder FROM allocations").fetchall()
            leases = db.execute("SELECT pool, address, doc FROM leases ORDER BY seq").fetchall()
            hosts = {
                row[0]: HostRow(row[0], row[1], row[2], row[3], json.loads(row[4]) if row[4] else None)
                for row in db.execute(
                    "SELECT host, generation, digest, applied_generation, status FROM hosts_sync ORDER BY host")
            }
            revision = db.execute("SELECT COALESCE(MAX(revision), 0) FROM revisions").fetchone()[0]
            fabric_id = db.execute(FABRIC_ID_QUERY).fetchone()
        return Snapshot(objects, allocations, leases, hosts, revision, fabric_id[0] if fabric_id else None)

    def write_session(self) -> _PgWriteSession:
        return _PgWriteSession(self)

    def commit(self, changes: ChangeSet) -> int | None:
        """One change set in its own write session (outside the fabric's engine)."""
        with self.write_session() as session:
            return session.commit(changes)

    def revisions_since(self, revision: int) -> list[Revision]:
        with self._connections["follow"].use() as db:
            return _revisions_since(db, revision)

    def wait_for_change(self, timeout: float) -> bool:
        """Block until another replica's commit is notified (True) or `timeout` passes.

        This replica's own commits notify too (the NOTIFY is in every commit); they are
        skipped by the sending backend's pid: this replica applied them as it made them,
        and waking its follower for each (a catch-up query, a status read, the fabric's
        lock) would cost every write of a single busy replica."""
        connection = self._connections["listen"]
        own = self._connections["write"].backend_pid
        with connection.use() as db:
            if connection.listening is not db:
                db.execute(f"LISTEN {REVISIONS_CHANNEL}")
                connection.listening = db
            for notification in db.notifies(timeout=timeout):
                if notification.pid != own:
                    return True
        return False

    def save_status(self, host: str, applied_generation: int, status: dict[str, Any]) -> None:
        with self._connections["status"].use() as db:
            db.execute("UPDATE hosts_sync SET applied_generation = %s, status = %s WHERE host = %s",
                       (applied_generation, json.dumps(status), host))

    def host_statuses(self) -> dict[str, tuple[int | None, str | None]]:
        with self._connections["follow"].use() as db:
            return {row[0]: (row[1], row[2]) for row in
                    db.execute("SELECT host, applied_generation, status FROM hosts_sync")}

    def save_seen(self, hosts: Iterable[str], when: float) -> None:
        """Hosts whose agent this replica heard from at `when` (its watch stream open
        here): one row each in `meta` (`seen:<host>`), so every replica reads when any
        replica last heard from a host. On the statuses' connection (no wait for the
        WAL flush: a crash loses a mark the next interval writes again)."""
        rows = [(SEEN_PREFIX + host, repr(when)) for host in hosts]
        if not rows:
            return
        with self._connections["status"].use() as db:
            db.cursor().executemany(
                "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = "
                "excluded.value", rows)

    def seen_times(self) -> dict[str, float]:
        """Host -> the latest `save_seen` time any replica wrote for it."""
        with self._connections["status"].use() as db:
            rows = db.execute("SELECT key, value FROM meta WHERE starts_with(key, %s)", (SEEN_PREFIX,)).fetchall()
        return {key.removeprefix(SEEN_PREFIX): float(value) for key, value in rows}

    def check(self) -> None:
        with self._connections["misc"].use() as db:
            db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()

    # --- tokens ---------------------------------------------------------------------

    def add_token(self, token_hash: str, role: str, host: str | None, expires: float | None = None) -> int:
        with self._connections["misc"].use() as db:
            return db.execute(
                "INSERT INTO tokens (hash, role, host, created, expires) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (token_hash, role, host, time.time(), expires)).fetchone()[0]

    def find_token(self, token_hash: str, now: float | None = None) -> tuple[str, str | None] | None:
        """(role, host) of a token that is neither revoked nor expired, else None."""
        now = time.time() if now is None else now
        if time.monotonic() >= self._token_retry_at:
            try:
                with self._connections["tokens"].use() as db:
                    row = db.execute("SELECT role, host, expires FROM tokens WHERE hash = %s AND revoked IS NULL",
                                     (token_hash,)).fetchone()
            except StoreUnavailable:
                self._token_retry_at = time.monotonic() + RETRY_CONNECT_S
            else:
                if row is None:
                    self._token_cache.pop(token_hash, None)
                    return None
                self._token_cache[token_hash] = (row[0], row[1], row[2], time.monotonic())
                return (row[0], row[1]) if row[2] is None or row[2] > now else None
        cached = self._token_cache.get(token_hash)
        if cached is None or time.monotonic() - cached[3] > TOKEN_GRACE_S:
            raise StoreUnavailable("the database is unreachable and this token was not verified in the last "
                                   f"{TOKEN_GRACE_S:.0f} s")
        role, host, expires, _ = cached
        return (role, host) if expires is None or expires > now else None

    def list_tokens(self) -> list[TokenRow]:
        with self._connections["misc"].use() as db:
            rows = db.execute("SELECT id, role, host, created, expires, revoked FROM tokens ORDER BY id").fetchall()
        return [TokenRow(*row) for row in rows]

    def revoke_tokens(self, ids: list[int] | None = None, role: str | None = None) -> list[int]:
        with self._connections["misc"].use() as db:
            if ids is not None:
                rows = db.execute("UPDATE tokens SET revoked = %s WHERE revoked IS NULL AND id = ANY(%s) "
                                  "RETURNING id", (time.time(), list(ids))).fetchall()
            else:
                rows = db.execute("UPDATE tokens SET revoked = %s WHERE revoked IS NULL AND role = %s "
                                  "RETURNING id", (time.time(), role)).fetchall()
        return sorted(row[0] for row in rows)

    # --- migrate-store --------------------------------------------------------------

    def dump(self) -> Dump:
        snapshot = self.load()
        with self._connections["misc"].use() as db:
            tokens = db.execute(
                "SELECT id, hash, role, host, created, expires, revoked FROM tokens ORDER BY id").fetchall()
        return Dump(snapshot, tokens)

    def restore(self, dump: Dump) -> None:
        """Write a whole dump into this (empty) store in one transaction, in its order."""
        snapshot = dump.snapshot
        with self._connections["misc"].use() as db, _transaction(db), db.cursor() as cursor:
            cursor.executemany("INSERT INTO objects (kind, key, uuid, doc) VALUES (%s, %s, %s, %s)",
                               snapshot.objects)
            cursor.executemany("INSERT INTO allocations (space, value, holder) VALUES (%s, %s, %s)",
                               snapshot.allocations)
            cursor.executemany("INSERT INTO leases (pool, address, doc) VALUES (%s, %s, %s)", snapshot.leases)
            cursor.executemany(
                "INSERT INTO hosts_sync (host, generation, digest, applied_generation, status) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(row.host, row.generation, row.digest, row.applied_generation,
                  json.dumps(row.status) if row.status is not None else None) for row in snapshot.hosts.values()])
            cursor.executemany("INSERT INTO tokens (id, hash, role, host, created, expires, revoked) "
                               "VALUES (%s, %s, %s, %s, %s, %s, %s)", dump.tokens)
            cursor.execute("SELECT setval(pg_get_serial_sequence('tokens', 'id'), "
                           "GREATEST((SELECT MAX(id) FROM tokens), 1))")
            if snapshot.fabric_id is not None:  # the same fabric, moved: agents keep counting
                cursor.execute(FABRIC_ID_UPDATE.format(param="%s"), (snapshot.fabric_id,))

    def is_empty(self) -> bool:
        with self._connections["misc"].use() as db:
            return all(db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None
                       for table in ("objects", "tokens"))

    def drop_everything(self) -> None:
        """Tests only: an empty database again (every table of the schema dropped)."""
        with self._connections["misc"].use() as db:
            db.execute("DROP TABLE IF EXISTS meta, objects, allocations, leases, hosts_sync, tokens, revisions")


class _PgWriteSession:
    """One fabric write in two round trips: BEGIN, the fabric's advisory lock and the log's
    head on entering; the change set, its revision log entry, NOTIFY and COMMIT in `commit`.

    Why two: every round trip of a transaction that holds the fabric's lock is time every
    replica's writers wait, and under CPU load each one costs a wake-up of the database
    backend and of this thread. So each step sends its statements as one pipeline (psycopg
    3's pipeline mode: one network exchange, the server running them in order, the first
    error skipping the rest). The log's head (MAX(revision), read under the lock) tells
    `revisions_since` whether another replica committed since this one's revision: most
    writes find it did not and read nothing more; one that finds it did reads the new
    revisions (one more round trip). With the head known, `commit` numbers its revision
    itself (head + 1: no gaps, commit order, as the lock holder is the only writer).
    """

    def __init__(self, store: PostgresStore):
        self.store = store
        self._use = store._connections["write"].use()
        self.db: psycopg.Connection | None = None
        self.head = 0  # the log's last revision when the lock was granted
        self.ended = False  # COMMIT sent with the change set (see `commit`)

    def __enter__(self) -> _PgWriteSession:
        self.db = self._use.__enter__()
        try:
            with _mapped("the fabric's write lock"), self.db.cursor() as head:
                with self.db.pipeline():
                    head.execute("BEGIN")
                    head.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                    head.execute("SELECT pg_advisory_xact_lock(%s)", (FABRIC_LOCK,))
                    # Read after the lock is granted (read committed: a snapshot per
                    # statement), so it sees every revision the lock's previous holders committed.
                    head.execute("SELECT COALESCE(MAX(revision), 0) FROM revisions")
                self.head = head.fetchone()[0]
        except BaseException as exc:
            self._end(type(exc), exc)
            raise
        return self

    def revisions_since(self, revision: int) -> list[Revision]:
        if revision >= self.head:
            return []  # nobody committed since: no round trip
        with _mapped("catching up"):
            return _revisions_since(self.db, revision)

    def commit(self, changes: ChangeSet) -> int | None:
        """Write the change set, append it to the revision log and COMMIT, in one round
        trip; the revision it got. Call it last in the session (as the SQLite session's
        commit, it commits: nothing after it in the block can undo it). On any error
        nothing is committed and leaving the block rolls back."""
        if changes.empty():
            return None
        db = self.db
        revision = self.head + 1
        with _mapped("commit"), db.pipeline(), db.cursor() as cursor:
            def many(statement: str, rows: list) -> None:
                if rows:  # an empty list sends nothing; inside a pipeline, executemany rides it
                    cursor.executemany(statement, rows)

            # Deletes first: a change that frees and retakes one key must not trip on it.
            many("DELETE FROM objects WHERE kind = %s AND key = %s", list(changes.delete_objects))
            many("DELETE FROM allocations WHERE space = %s AND value = %s", list(changes.delete_allocations))
            many("DELETE FROM leases WHERE pool = %s AND address = %s", list(changes.delete_leases))
            many("UPDATE tokens SET revoked = %s WHERE role = 'host' AND host = %s AND revoked IS NULL",
                 [(time.time(), host) for host in deleted_hosts(changes)])
            many("INSERT INTO objects (kind, key, uuid, doc) VALUES (%s, %s, %s, %s) "
                 "ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc",
                 [(kind, key, uuid, doc) for (kind, key), (uuid, doc) in changes.put_objects.items()])
            # Plain INSERT: a value already taken is a conflict, never overwritten.
            many("INSERT INTO allocations (space, value, holder) VALUES (%s, %s, %s)",
                 [(s, v, h) for (s, v), h in changes.put_allocations.items()])
            many("INSERT INTO leases (pool, address, doc) VALUES (%s, %s, %s) "
                 "ON CONFLICT (pool, address) DO UPDATE SET doc = excluded.doc",
                 [(pool, address, doc) for (pool, address), doc in changes.put_leases.items()])
            many("DELETE FROM hosts_sync WHERE host = %s", [(host,) for host in changes.delete_hosts])
            many("INSERT INTO hosts_sync (host, generation, digest) VALUES (%s, %s, %s) "
                 "ON CONFLICT (host) DO UPDATE SET generation = excluded.generation, digest = excluded.digest",
                 [(row.host, row.generation, row.digest) for row in changes.put_hosts])
            # Head + 1 under the fabric's lock: no gaps, numbered in commit order (the
            # primary key refuses a number taken twice, should anything write outside it).
            cursor.execute("INSERT INTO revisions (revision, replica, created, changes) VALUES (%s, %s, %s, %s)",
                           (revision, self.store.replica, time.time(), changes.to_json()))
            cursor.execute("SELECT pg_notify(%s, %s)", (REVISIONS_CHANNEL, str(revision)))
            if revision % PRUNE_EVERY == 0:
                # The log's head is all a follower needs; one further behind reloads.
                cursor.execute("DELETE FROM revisions WHERE revision <= %s", (revision - self.store.keep_revisions,))
            # In the same pipeline: after any error above the server skips this COMMIT,
            # and the failed transaction is rolled back when the session ends.
            cursor.execute("COMMIT")
        self.ended = True
        return revision

    def __exit__(self, exc_type, exc, tb) -> None:
        self._end(exc_type, exc)

    def _end(self, exc_type, exc) -> None:
        failure = exc
        try:
            if exc_type is None and not self.ended:
                with _mapped("commit"):
                    self.db.execute("COMMIT")  # nothing written: ends the transaction, frees the lock
            elif exc_type is not None:
                with contextlib.suppress(psycopg.Error, StoreBusy):
                    with _mapped("rollback"):
                        self.db.execute("ROLLBACK")
        except StoreUnavailable as lost:
            failure = lost
            raise
        finally:
            # An unreachable (or read-only) database: the connection is dropped, and the
            # next write connects again (to the new primary, with a multi-host string).
            if isinstance(failure, StoreUnavailable):
                self._use.__exit__(type(failure), failure, None)
            else:
                self._use.__exit__(None, None, None)


def _revisions_since(db: psycopg.Connection, revision: int) -> list[Revision]:
    rows = db.execute("SELECT revision, replica, changes FROM revisions WHERE revision > %s ORDER BY revision",
                      (revision,)).fetchall()
    return [Revision(number, replica, ChangeSet.from_json(changes)) for number, replica, changes in rows]


# A database host that vanishes without a FIN or RST (a lost machine, a cut link) must not
# hold a write, and the fabric's lock with it, for the kernel's default two hours: TCP
# keepalives and a user timeout end such a connection in about ten seconds. Settings in
# the store URL win over these.
_TCP_DEFAULTS = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2", "keepalives_count": "3",
                 "tcp_user_timeout": "10000"}


def _with_tcp_defaults(conninfo: str) -> str:
    given = conninfo_to_dict(conninfo)
    return make_conninfo(conninfo, **{key: value for key, value in _TCP_DEFAULTS.items() if key not in given})


class _Connection:
    """One connection for one role, opened on first use and again after any error."""

    def __init__(self, conninfo: str, role: str, setup: str | None = None):
        self.conninfo, self.role, self.setup = _with_tcp_defaults(conninfo), role, setup
        self.lock = threading.Lock()
        self.db: psycopg.Connection | None = None
        self.listening: psycopg.Connection | None = None  # the connection that ran LISTEN
        self.backend_pid = 0  # the server process of the current connection (0: none yet)

    @contextlib.contextmanager
    def use(self) -> Iterator[psycopg.Connection]:
        with self.lock:
            try:
                with _mapped(f"{self.role} connection"):
                    if self.db is None or self.db.closed or self.db.broken:
                        self.db = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                                  application_name=f"openhnv-controller ({self.role})")
                        if self.setup:
                            self.db.execute(self.setup)
                        self.backend_pid = self.db.info.backend_pid
                    yield self.db
            except StoreUnavailable:
                self._drop()
                raise

    def _drop(self) -> None:
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
        self.db = None

    def close(self) -> None:
        with self.lock:
            self._drop()


# Errors that mean "this connection cannot write now": lost, refused, shutting down, or
# a standby (read-only) where a multi-host string will find the new primary on reconnect.
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, pg_errors.ReadOnlySqlTransaction,
                pg_errors.AdminShutdown, pg_errors.CannotConnectNow)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except pg_errors.LockNotAvailable as exc:
        raise StoreBusy(f"another replica held the fabric's write lock past {LOCK_TIMEOUT_MS} ms ({what})") from exc
    except psycopg.IntegrityError as exc:
        raise StoreConflict(str(exc).strip()) from exc
    except _UNREACHABLE as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailable(f"the database is unreachable ({what}): {detail}") from exc


@contextlib.contextmanager
def _transaction(db: psycopg.Connection, mode: str = "") -> Iterator[None]:
    with _mapped("transaction"):
        db.execute(f"BEGIN {mode}".strip())
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        raise
    with _mapped("commit"):
        db.execute("COMMIT")
