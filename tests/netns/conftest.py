"""netns tier: root and the running kernel's own features, checked once per session.

A missing prerequisite errors every test of the tier with the reason; nothing is
silently skipped.
"""

from __future__ import annotations

import os

import pytest

from netns_lab import features

NETNS_TIER_FEATURES = ("netns", "veth", "bridge", "vxlan")


@pytest.fixture(scope="session")
def netns_tier_problem() -> str | None:
    if os.geteuid() != 0:
        return "the netns tier needs root (it creates network namespaces): run `sudo make test`"
    results = features.probe_details()
    lacking = [results[f] for f in NETNS_TIER_FEATURES if not results[f].present]
    if lacking:
        return "the running kernel lacks " + ", ".join(f"{r.name} ({r.reason})" for r in lacking)
    return None


@pytest.fixture(autouse=True)
def _require_netns_tier(netns_tier_problem: str | None) -> None:
    if netns_tier_problem:
        pytest.fail(netns_tier_problem, pytrace=False)
