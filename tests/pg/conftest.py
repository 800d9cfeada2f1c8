"""The PostgreSQL tier's fixtures: one throw-away cluster per session (tests.lib.postgres),
a fresh database per test, and a cluster of a test's own for the tests that stop, kill or
promote one. Skipped, with the reason, only when PostgreSQL's binaries are missing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.lib import postgres


@contextlib.contextmanager
def _cluster() -> Iterator[postgres.PgCluster]:
    reason = postgres.missing()
    if reason:
        pytest.skip(reason)
    cluster = postgres.PgCluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[postgres.PgCluster]:
    with _cluster() as cluster:
        yield cluster


@pytest.fixture
def own_pg_cluster() -> Iterator[postgres.PgCluster]:
    """A cluster of this test's own: the test stops, kills or promotes it."""
    with _cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: postgres.PgCluster) -> str:
    """A new, empty database on the session's cluster."""
    return pg_cluster.new_database()
