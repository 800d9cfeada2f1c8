"""The repository: the only code that touches the controller's database.

Two backends behind one interface (`controller.store.common` describes it):

- `SqliteStore` (`sqlite:///path`, the default: the state directory's controller.db),
  embedded, for one controller;
- `PostgresStore` (`postgresql://...` or any libpq keyword string), shared by any number
  of controller replicas.

`open_store(url)` picks one from a store URL; `Store` is the SQLite backend (what the
single-controller code and its tests open by path). The schema is one, versioned
(`MIGRATIONS`): a store refuses a schema newer than the code, and upgrades an older one
only when opened with `migrate=True` (`hnv-controller migrate`).

This package knows tables and JSON, not fabric rules; it must not import the compiler or
the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controller.store.common import (
    HOST_KIND,
    MIGRATIONS,
    SCHEMA_VERSION,
    ChangeSet,
    Dump,
    HostRow,
    Revision,
    SchemaError,
    SchemaTooNew,
    SchemaTooOld,
    Snapshot,
    StoreBusy,
    StoreConflict,
    StoreUnavailable,
    TokenRow,
    redacted,
)
from controller.store.sqlite import SqliteStore

Store = SqliteStore  # the embedded default, opened by path

SQLITE_PREFIX = "sqlite:///"


class StoreUrlError(ValueError):
    """A store URL this controller cannot use; the message says why and what would do."""


def is_postgresql(url: str) -> bool:
    """A libpq connection string: a postgresql:// or postgres:// URL, or keywords (host=...)."""
    return url.startswith(("postgresql://", "postgres://")) or ("=" in url and "://" not in url)


def sqlite_path(url: str) -> Path:
    if not url.startswith(SQLITE_PREFIX) or len(url) == len(SQLITE_PREFIX):
        raise StoreUrlError(f"{redacted(url)!r} is not a store URL: expected sqlite:///PATH (absolute), "
                            "postgresql://USER@HOST/DB or a libpq string such as "
                            "'host=a,b dbname=hnv target_session_attrs=read-write'")
    return Path("/" + url[len(SQLITE_PREFIX):].lstrip("/"))


def open_store(url: str, migrate: bool = False, **sqlite_options: Any) -> SqliteStore | Any:
    """The store a URL names (raises `StoreUrlError`, `SchemaError`, `StoreUnavailable`)."""
    if is_postgresql(url):
        from controller.store.postgres import PostgresStore

        return PostgresStore(url, migrate=migrate)
    return SqliteStore(sqlite_path(url), migrate=migrate, **sqlite_options)


__all__ = [
    "HOST_KIND", "MIGRATIONS", "SCHEMA_VERSION", "ChangeSet", "Dump", "HostRow", "Revision", "SchemaError",
    "SchemaTooNew", "SchemaTooOld", "Snapshot", "Store", "StoreBusy", "StoreConflict", "StoreUnavailable",
    "StoreUrlError", "SqliteStore", "TokenRow", "is_postgresql", "open_store", "sqlite_path",
]
