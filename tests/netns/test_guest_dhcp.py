"""The lab guest's DHCP client (agent.guest, hnv-agent run --vm-dhcp) against the host's
real dnsmasq (agent.dhcp), on this kernel: a VM namespace behind a port of the VSID bridge
is left without an address, the guest's busybox udhcpc gets exactly the CA, the gateway
and the tenant MTU, and a client that finds no server is started again, then given up."""

from __future__ import annotations

import json
import logging

import pytest

from agent import naming
from agent.dhcp import DhcpManager
from agent.guest import CLIENT_ATTEMPTS, GuestDhcp, client_program
from agent.state import parse_host_state
from tests.lib.netns import veth_pair
from tests.lib.sample_states import VSID, host_state
from tests.lib.wait import wait_until

pytestmark = pytest.mark.skipif(client_program() is None, reason="busybox (udhcpc) is not installed")

BRIDGE = naming.vsid_bridge(VSID)
MAC, CA, GATEWAY = "00:15:5d:00:00:01", "192.168.0.10", "192.168.0.1"
TENANT_MTU = 1458  # provider 1500 - 42 of NVGRE over IPv4 PAs


def vm_behind_bridge(make_netns):
    host, vm = make_netns(), make_netns()
    host.ip("link", "add", BRIDGE, "address", naming.gateway_mac(VSID), "type", "bridge")
    host.ip("link", "set", BRIDGE, "up")
    host.ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    veth_pair(host, "vmport", vm, "eth0")
    host.ip("link", "set", "vmport", "master", BRIDGE)
    vm.ip("link", "set", "eth0", "address", MAC)
    vm.ip("link", "set", "eth0", "up")
    return host, vm


def reaped(guests: GuestDhcp) -> bool:
    guests.reap()
    return guests.running == 0


def test_the_guest_gets_exactly_its_ca_gateway_and_mtu(make_netns, tmp_path, caplog):
    host, vm = vm_behind_bridge(make_netns)
    manager = DhcpManager(host.name, tmp_path / "dhcp")
    state = parse_host_state(host_state("CON-HyperV-A", 1, mac=MAC, ca=CA))
    applied, errors = manager.apply(manager.plan(state))
    assert not errors and applied == 2, errors  # the guard, then the server
    guests = GuestDhcp(tmp_path / "dhcp" / "guests")
    try:
        with caplog.at_level(logging.INFO, logger="agent.guest"):
            guests.start("TenantVM01", vm.name, "eth0")
            wait_until(lambda: reaped(guests), 60, "the client to finish", interval=0.2)
        addresses = json.loads(vm.ip("-4", "-j", "addr", "show", "dev", "eth0").stdout)
        assert [(a["local"], a["prefixlen"]) for link in addresses for a in link["addr_info"]] == [(CA, 24)]
        assert addresses[0]["mtu"] == TENANT_MTU
        routes = json.loads(vm.ip("-4", "-j", "route", "show", "default").stdout)
        assert [r["gateway"] for r in routes] == [GATEWAY]
        bound = [r.getMessage() for r in caplog.records if "result=bound" in r.getMessage()]
        assert bound and f"ip={CA}/255.255.255.0 router={GATEWAY} mtu={TENANT_MTU}" in bound[0], bound
    finally:
        manager.apply(manager.plan(state.model_copy(update={"ports": ()})))


def test_a_client_without_a_server_is_started_again_then_given_up(make_netns, tmp_path, caplog, monkeypatch):
    host, vm = vm_behind_bridge(make_netns)
    monkeypatch.setattr("agent.guest.DISCOVER_TRIES", 1)  # no server: each attempt fails in about a second
    guests = GuestDhcp(tmp_path / "guests")
    with caplog.at_level(logging.INFO, logger="agent.guest"):
        guests.start("TenantVM01", vm.name, "eth0")
        wait_until(lambda: reaped(guests), 60, "every attempt to fail", interval=0.2)
    failed = [r.getMessage() for r in caplog.records if "result=failed" in r.getMessage()]
    assert [f"attempt={n} " in line for n, line in enumerate(failed, 1)] == [True] * CLIENT_ATTEMPTS, failed
    addresses = json.loads(vm.ip("-4", "-j", "addr", "show", "dev", "eth0").stdout)
    assert [a for link in addresses for a in link.get("addr_info", [])] == [], addresses
