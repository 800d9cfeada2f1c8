"""The PostgreSQL tier's fixtures: one throw-away cluster per session (tests.lib.postgres),
a fresh database per test. Skipped, with the reason, only when PostgreSQL's binaries
are missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lib import postgres


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[postgres.PgCluster]:
    reason = postgres.missing()
    if reason:
        pytest.skip(reason)
    cluster = postgres.PgCluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: postgres.PgCluster) -> str:
    """A new, empty database on the session's cluster."""
    return pg_cluster.new_database()
