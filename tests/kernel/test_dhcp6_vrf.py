"""Router advertisements and DHCPv6 from a VSID bridge inside its VM network's VRF, as
the agent builds it: tests/netns/test_dhcp6.py's checks on a kernel with VRF (the kernel
tier's VM here), so the advertisement and the DHCPv6 reply are shown to leave through an
interface enslaved to a VRF."""

from __future__ import annotations

import pytest

from agent import naming
from tests.netns.test_dhcp6 import (  # the checks, collected here too
    serve,
    test_dhcpv6_offers_exactly_the_allocated_ca_and_nothing_to_an_unknown_mac,
    test_the_vm_takes_the_distributed_router_and_the_tenant_mtu_from_the_advertisement,
)

__all__ = ["test_dhcpv6_offers_exactly_the_allocated_ca_and_nothing_to_an_unknown_mac",
           "test_the_vm_takes_the_distributed_router_and_the_tenant_mtu_from_the_advertisement"]


@pytest.fixture
def served(make_netns, tmp_path):
    yield from serve(make_netns, tmp_path, vrf=naming.vrf(1))
