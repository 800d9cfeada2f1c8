"""kernel tier: needs gretap, 802.1Q, bonding, VRF and VLAN-filtering bridges.

When the running kernel lacks any of them, every test of the tier fails with a message
saying so and how to run the tier in a VM (``python -m tests.run_tiers kernel`` or
``make test`` do that by themselves). Never skipped: a skipped kernel tier would look
like a passing one.
"""

from __future__ import annotations

import os

import pytest

from netns_lab import cli as lab_cli
from netns_lab import features, vm
from tests.lib.cli import CliResult, run_main


@pytest.fixture(scope="session")
def kernel_tier_problem() -> str | None:
    if os.geteuid() != 0:
        return "the kernel tier needs root: run `sudo make test`"
    results = features.probe_details()
    lacking = [r for r in results.values() if not r.present]
    if not lacking:
        return None
    what = ", ".join(f"{r.name} ({r.reason})" for r in lacking)
    if vm.in_vm():
        return f"even the VM's kernel lacks: {what}"
    return (f"the running kernel ({os.uname().release}) lacks: {what}. "
            "Run this tier in a VM with the distribution kernel: "
            "`python -m tests.run_tiers kernel` (or `make test`)")


@pytest.fixture(autouse=True)
def _require_kernel_tier(kernel_tier_problem: str | None) -> None:
    if kernel_tier_problem:
        pytest.fail(kernel_tier_problem, pytrace=False)


def hnv_lab(*args: str) -> CliResult:
    """`hnv-lab ARGS` through its real entry point, in this process (tests/lib/cli.py).
    For `down`, `status`, and `demo` on a lab whose daemons all run; `up` (and `demo` on
    a lab it must complete) fork daemons from the calling process: run as subprocesses."""
    return run_main(lab_cli.main, args)


@pytest.fixture
def clean_lab():
    """The seed lab is down before and after the test, whatever the test did."""
    hnv_lab("down")
    yield
    hnv_lab("down")
