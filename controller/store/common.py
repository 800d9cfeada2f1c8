"""What every store backend shares: the rows, the change set, the revision log's
records, the errors, and the versioned schema (one schema, written once per dialect).

A backend (`controller.store.sqlite`, `controller.store.postgres`) offers:

- `load()` -> `Snapshot`: everything, read in one consistent transaction, with the
  revision it is current as of;
- `write_session()`: a context manager for one fabric write. On entering it the
  backend serialises the write (SQLite: the controller is the only writer; PostgreSQL:
  a transaction-scoped advisory lock shared by every replica); `revisions_since(n)`
  returns what other replicas committed after revision n (to catch up before building
  on the fabric); `commit(changes)` writes a `ChangeSet` and, on a shared store, appends
  it to the revision log in the same transaction and returns its revision number. It
  commits, so it is the session's last step; an exception before or in it rolls
  everything back, and leaving the block without it writes nothing;
- `revisions_since(n)` outside a session and `wait_for_change(timeout)`: what a
  replica's follower reads (shared stores only);
- `save_status(host, applied_generation, status)` and `host_statuses()`: agents' reports;
- `save_seen(hosts, when)` and `seen_times()`: when an agent was last heard from (its
  watch stream open on a controller); in memory on SQLite (one process), rows every
  replica reads on PostgreSQL;
- tokens (`add_token`, `find_token`, `list_tokens`, `revoke_tokens`), `check()`,
  `close()`, and `dump()`/`restore()` for `hnv-controller migrate-store`.

Errors: `StoreBusy` (the write lock was held past its timeout; nothing was written),
`StoreUnavailable` (the database cannot be reached; a `StoreBusy` too, so every caller
that answers 503 for one answers 503 for the other), `StoreConflict` (a unique key
refused the change), `SchemaError` (the database's schema is not this code's).

This module knows tables and JSON, not fabric rules; it must not import the compiler or
the API.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

HOST_KIND = "hosts"  # the objects table's kind of a host (controller.models.Kind.host)
REVISIONS_CHANNEL = "hnv_revisions"  # the NOTIFY channel a shared store wakes followers on
SEEN_PREFIX = "seen:"  # meta keys of a shared store's last-heard-from times (`save_seen`)


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


# The schema, one version per step. A database records the version it is at in
# meta.schema_version; `hnv-controller migrate` runs the steps it lacks, in order, each in
# one transaction. Never edit a released step: add the next one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "the fabric (objects, allocations, leases), host generations and token hashes",
        sqlite=(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE objects (kind TEXT NOT NULL, key TEXT NOT NULL, uuid TEXT NOT NULL UNIQUE, "
            "doc TEXT NOT NULL, PRIMARY KEY (kind, key))",
            "CREATE TABLE allocations (space TEXT NOT NULL, value TEXT NOT NULL, holder TEXT NOT NULL, "
            "PRIMARY KEY (space, value))",
            "CREATE TABLE leases (pool TEXT NOT NULL, address TEXT NOT NULL, doc TEXT NOT NULL, "
            "PRIMARY KEY (pool, address))",
            "CREATE TABLE hosts_sync (host TEXT PRIMARY KEY, generation INTEGER NOT NULL, digest TEXT NOT NULL, "
            "applied_generation INTEGER, status TEXT)",
            "CREATE TABLE tokens (hash TEXT PRIMARY KEY, role TEXT NOT NULL CHECK (role IN ('admin', 'host')), "
            "host TEXT, created REAL NOT NULL, expires REAL, revoked REAL)",
        ),
        # `seq` keeps insertion order (SQLite's rowid): the fabric loads in that order.
        postgresql=(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE objects (seq BIGSERIAL NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, "
            "uuid TEXT NOT NULL UNIQUE, doc TEXT NOT NULL, PRIMARY KEY (kind, key))",
            "CREATE TABLE allocations (space TEXT NOT NULL, value TEXT NOT NULL, holder TEXT NOT NULL, "
            "PRIMARY KEY (space, value))",
            "CREATE TABLE leases (seq BIGSERIAL NOT NULL, pool TEXT NOT NULL, address TEXT NOT NULL, "
            "doc TEXT NOT NULL, PRIMARY KEY (pool, address))",
            "CREATE TABLE hosts_sync (host TEXT PRIMARY KEY, generation BIGINT NOT NULL, digest TEXT NOT NULL, "
            "applied_generation BIGINT, status TEXT)",
            "CREATE TABLE tokens (id BIGSERIAL NOT NULL UNIQUE, hash TEXT PRIMARY KEY, "
            "role TEXT NOT NULL CHECK (role IN ('admin', 'host')), host TEXT, "
            "created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION, revoked DOUBLE PRECISION)",
        ),
    ),
    Migration(
        2,
        "the revision log: every committed change, numbered without gaps, for replicas to follow",
        sqlite=(
            "CREATE TABLE revisions (revision INTEGER PRIMARY KEY, replica TEXT NOT NULL, "
            "created REAL NOT NULL, changes TEXT NOT NULL)",
        ),
        postgresql=(
            "CREATE TABLE revisions (revision BIGINT PRIMARY KEY, replica TEXT NOT NULL, "
            "created DOUBLE PRECISION NOT NULL, changes TEXT NOT NULL)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def upgrade_statements(found: int, dialect: str) -> list[str]:
    """What takes a database from schema version `found` (0: empty) to SCHEMA_VERSION in
    `dialect` ('sqlite' or 'postgresql'), the version row last; run in one transaction."""
    statements = [statement for step in MIGRATIONS if step.version > found for statement in getattr(step, dialect)]
    return statements + [f"INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}') "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         # Once per database, never replaced (a data row, not schema: stores
                         # made before it existed get theirs on their next start).
                         f"INSERT INTO meta (key, value) VALUES ('fabric_id', '{uuid.uuid4().hex}') "
                         "ON CONFLICT (key) DO NOTHING"]


# The fabric's identity: made with the database, kept by `migrate-store`, stamped on
# every host state (agent.state's `fabric`) so that agents compare generations only
# within one fabric. A controller rebuilt on a new store starts again at generation 1.
FABRIC_ID_QUERY = "SELECT value FROM meta WHERE key = 'fabric_id'"
FABRIC_ID_UPDATE = "UPDATE meta SET value = {param} WHERE key = 'fabric_id'"


def redacted(url: str) -> str:
    """A store URL fit for a message: any password replaced, in a URL or a keyword string."""
    text = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url, flags=re.IGNORECASE)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


class SchemaError(Exception):
    """The database's schema is not the one this code knows; nothing was changed."""


class SchemaTooNew(SchemaError):
    pass


class SchemaTooOld(SchemaError):
    pass


def check_schema_version(found: int, where: str, upgrading: bool) -> None:
    """Refuse a schema newer than this code, and an older one unless upgrading."""
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{where}: the database's schema is version {found}, newer than this controller knows "
            f"(version {SCHEMA_VERSION}); run the controller version that upgraded it, or a newer one")
    if found < SCHEMA_VERSION and not upgrading:
        raise SchemaTooOld(
            f"{where}: the database's schema is version {found}, older than this controller's "
            f"(version {SCHEMA_VERSION}); upgrade it first: hnv-controller migrate --store URL")


class StoreBusy(Exception):
    """The write lock was held past the timeout; nothing was written. Worth retrying
    (the API answers 503 with Retry-After)."""


class StoreUnavailable(StoreBusy):
    """The database cannot be reached (stopped, restarting, failing over, read-only);
    nothing was written. The controller reconnects by itself on the next use."""


class StoreConflict(Exception):
    """A unique key refused the change (a value taken twice); nothing was written."""


@dataclass
class HostRow:
    host: str
    generation: int
    digest: str
    applied_generation: int | None = None
    status: dict[str, Any] | None = None


@dataclass
class ChangeSet:
    """What one fabric operation writes; built in memory, committed at once."""

    put_objects: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (kind,key) -> (uuid, doc)
    delete_objects: set[tuple[str, str]] = field(default_factory=set)
    put_allocations: dict[tuple[str, str], str] = field(default_factory=dict)  # (space,value) -> holder
    delete_allocations: set[tuple[str, str]] = field(default_factory=set)
    put_leases: dict[tuple[str, str], str] = field(default_factory=dict)  # (pool,address) -> doc
    delete_leases: set[tuple[str, str]] = field(default_factory=set)
    # The generations this change bumps, committed with it (never one without the other).
    put_hosts: list[HostRow] = field(default_factory=list)
    delete_hosts: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (
            self.put_objects
            or self.delete_objects
            or self.put_allocations
            or self.delete_allocations
            or self.put_leases
            or self.delete_leases
            or self.put_hosts
            or self.delete_hosts
        )

    def to_json(self) -> str:
        """The revision log's record of this change (generations and digests included,
        so a follower serves exactly the numbers the writer committed)."""
        return json.dumps({
            "put_objects": [[kind, key, uuid, doc] for (kind, key), (uuid, doc) in self.put_objects.items()],
            "delete_objects": sorted(self.delete_objects),
            "put_allocations": [[space, value, holder] for (space, value), holder in self.put_allocations.items()],
            "delete_allocations": sorted(self.delete_allocations),
            "put_leases": [[pool, address, doc] for (pool, address), doc in self.put_leases.items()],
            "delete_leases": sorted(self.delete_leases),
            "put_hosts": [[row.host, row.generation, row.digest] for row in self.put_hosts],
            "delete_hosts": list(self.delete_hosts),
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ChangeSet:
        data = json.loads(text)
        return cls(
            put_objects={(kind, key): (uuid, doc) for kind, key, uuid, doc in data["put_objects"]},
            delete_objects={(kind, key) for kind, key in data["delete_objects"]},
            put_allocations={(space, value): holder for space, value, holder in data["put_allocations"]},
            delete_allocations={(space, value) for space, value in data["delete_allocations"]},
            put_leases={(pool, address): doc for pool, address, doc in data["put_leases"]},
            delete_leases={(pool, address) for pool, address in data["delete_leases"]},
            put_hosts=[HostRow(host, generation, digest) for host, generation, digest in data["put_hosts"]],
            delete_hosts=list(data["delete_hosts"]),
        )


@dataclass(frozen=True)
class Revision:
    """One entry of the revision log: a committed change and the replica that made it."""

    revision: int
    replica: str
    changes: ChangeSet


@dataclass
class Snapshot:
    objects: list[tuple[str, str, str, str]]  # kind, key, uuid, doc
    allocations: list[tuple[str, str, str]]  # space, value, holder
    leases: list[tuple[str, str, str]]  # pool, address, doc
    hosts: dict[str, HostRow]
    revision: int = 0  # the last revision this snapshot includes (0: none, or not a shared store)
    fabric_id: str | None = None  # meta.fabric_id (FABRIC_ID_QUERY)


@dataclass(frozen=True)
class TokenRow:
    """One token as `hnv-controller token list` shows it: never the token, nor its hash."""

    id: int
    role: str
    host: str | None
    created: float
    expires: float | None
    revoked: float | None

    def valid_at(self, now: float) -> bool:
        return self.revoked is None and (self.expires is None or now < self.expires)


@dataclass
class Dump:
    """A whole store, table by table, in insertion order: what `migrate-store` copies."""

    snapshot: Snapshot
    tokens: list[tuple[int, str, str, str | None, float, float | None, float | None]]
    # id, hash, role, host, created, expires, revoked
