"""Fixtures shared by all tiers.

``make_netns`` is the one way tests get network namespaces: call it for each namespace
you need; all of them, and every process started in them, are gone after the test::

    def test_something(make_netns):
        a, b = make_netns(), make_netns()
        veth_pair(a, "veth-a", b, "veth-b")        # from tests.lib.netns
        ...

Needs root; only the netns and kernel tiers use it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lib.netns import NamespaceFactory


@pytest.fixture
def make_netns() -> Iterator[NamespaceFactory]:
    """A factory of uniquely named namespaces (``t-<8 hex>``), deleted at teardown."""
    factory = NamespaceFactory()
    try:
        yield factory
    finally:
        factory.close()
