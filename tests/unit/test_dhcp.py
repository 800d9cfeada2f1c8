"""DHCP on the host (agent.dhcp): the dnsmasq config rendered for a HostState, the plan
of start / reload / restart / stop against what the run directory shows, and the
refusal of bad DHCP fields in a state document. No root, no dnsmasq started."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

from agent import naming
from agent.dhcp import (
    DEFAULT_LEASE_TIME,
    DhcpServer,
    RunningServer,
    ServerFiles,
    desired_servers,
    guard_ruleset,
    observe_servers,
    plan_servers,
)
from agent.state import StateError, parse_host_state
from tests.lib.sample_states import VSID, host_state, ipv6_host_state

BRIDGE = naming.vsid_bridge(VSID)
MAC = "00:15:5d:00:00:01"


def document(**subnet_fields) -> dict:
    doc = host_state("CON-HyperV-A", 1)
    doc["routing_domains"][0]["subnets"][0].update(subnet_fields)
    return doc


def servers(doc: dict, tmp_path) -> dict[str, DhcpServer]:
    return desired_servers(parse_host_state(doc), tmp_path)


def config_lines(server: DhcpServer) -> list[str]:
    return server.config.splitlines()


def test_a_bridge_with_a_vm_gets_a_static_only_server_with_gateway_dns_mtu_and_lease(tmp_path):
    found = servers(document(dns_servers=["10.0.0.53", "10.0.0.54"], lease_time=600), tmp_path)
    assert list(found) == [BRIDGE]
    lines = config_lines(found[BRIDGE])
    assert f"interface={BRIDGE}" in lines and "bind-interfaces" in lines
    assert "dhcp-range=192.168.0.0,static,255.255.255.0,600" in lines  # no dynamic range
    assert "dhcp-ignore=tag:!known" in lines  # unknown MACs get nothing
    assert "dhcp-option=option:router,192.168.0.1" in lines
    assert "dhcp-option=option:dns-server,10.0.0.53,10.0.0.54" in lines
    assert "dhcp-option=option:mtu,1458" in lines  # provider 1500 - 42 of NVGRE over IPv4
    assert "dhcp-broadcast" in lines  # never SIOCSARP over the agent's permanent neighbour
    assert "port=0" in lines  # DHCP only, no DNS service on the tenant's bridge
    assert f"dhcp-hostsfile={ServerFiles(tmp_path, BRIDGE).hosts}" in lines
    assert found[BRIDGE].hosts == f"{MAC},192.168.0.10\n"


def test_the_subnet_mtu_and_the_default_lease_are_used_and_no_dns_option_without_servers(tmp_path):
    lines = config_lines(servers(document(mtu=1400), tmp_path)[BRIDGE])
    assert "dhcp-option=option:mtu,1400" in lines
    assert f"dhcp-range=192.168.0.0,static,255.255.255.0,{DEFAULT_LEASE_TIME}" in lines
    assert not any("dns-server" in line for line in lines)


def test_only_local_vms_with_a_ca_are_served(tmp_path):
    doc = host_state("CON-HyperV-A", 1, peers=(("Remote", "192.168.0.11", "00:15:5d:00:00:02", "10.80.2.21"),))
    doc["ports"].append({"name": "NoAddress", "mac": "00:15:5d:00:00:03", "vsid": VSID})
    hosts = servers(doc, tmp_path)[BRIDGE].hosts
    assert hosts == f"{MAC},192.168.0.10\n"  # neither the remote VM nor the one without a CA


def test_no_vm_no_server(tmp_path):
    doc = host_state("CON-HyperV-A", 1)
    doc["ports"] = []
    assert servers(doc, tmp_path) == {}


def test_an_ipv6_vm_network_gets_advertisements_and_static_dhcpv6_not_dhcpv4(tmp_path):
    found = servers(ipv6_host_state("CON-HyperV-A", 1, dns_servers=["fd00:53::53"], lease_time=600), tmp_path)
    assert list(found) == [BRIDGE]
    lines = config_lines(found[BRIDGE])
    assert "enable-ra" in lines
    # The tenant MTU in the advertisements: provider 1500 - 42 of NVGRE over IPv4 PAs.
    assert f"ra-param={BRIDGE},mtu:1458,10,1800" in lines
    assert "dhcp-range=fd00:1::,static,64,600" in lines  # the managed flag, no dynamic range, no SLAAC
    assert "dhcp-ignore=tag:!known" in lines
    assert "dhcp-option=option6:dns-server,[fd00:53::53]" in lines
    assert not [line for line in lines if line.startswith("dhcp-option=option:") or line == "dhcp-broadcast"]
    assert found[BRIDGE].hosts == f"{MAC},[fd00:1::10]\n"


def test_a_slaac_subnet_advertises_the_autonomous_flag_and_hands_out_no_address(tmp_path):
    found = servers(ipv6_host_state("CON-HyperV-A", 1, dns_servers=["fd00:53::53"], ipv6_assignment="SLAAC"),
                    tmp_path)
    lines = config_lines(found[BRIDGE])
    assert [line for line in lines if line.startswith("dhcp-range=")] == [
        f"dhcp-range=fd00:1::,ra-stateless,64,{DEFAULT_LEASE_TIME}"], lines
    assert "dhcp-option=option6:dns-server,[fd00:53::53]" in lines  # by stateless DHCPv6 (the O flag)
    assert found[BRIDGE].hosts == f"{MAC}\n", "known (for the DNS servers), with no address to hand out"


def observed(server: DhcpServer, pid: int | None = 4242, **changes) -> RunningServer:
    fields = dict(bridge=server.bridge, pid=pid, config_hash=server.config_hash, hosts_hash=server.hosts_hash)
    fields.update(changes)
    return RunningServer(**fields)


def test_plan_starts_a_new_or_killed_server_and_is_empty_when_in_sync(tmp_path):
    want = servers(document(), tmp_path)
    server = want[BRIDGE]
    assert [op.describe() for op in plan_servers(want, {})] == [f"start dhcp {BRIDGE} new"]
    killed = {BRIDGE: observed(server, pid=None)}
    assert [op.describe() for op in plan_servers(want, killed)] == [f"start dhcp {BRIDGE} not running"]
    assert plan_servers(want, {BRIDGE: observed(server)}) == []


def test_a_vm_arriving_is_a_reload_and_a_changed_subnet_a_restart(tmp_path):
    before = servers(document(), tmp_path)
    arrived = document()
    arrived["ports"].append({"name": "TenantVM02", "mac": "00:15:5d:00:00:02", "vsid": VSID, "ca": "192.168.0.12/24"})
    after = servers(arrived, tmp_path)
    assert after[BRIDGE].config == before[BRIDGE].config
    ops = plan_servers(after, {BRIDGE: observed(before[BRIDGE])})
    assert [(op.action, op.name) for op in ops] == [("reload", BRIDGE)]
    changed = servers(document(dns_servers=["10.0.0.53"]), tmp_path)
    ops = plan_servers(changed, {BRIDGE: observed(before[BRIDGE])})
    assert [(op.action, op.name) for op in ops] == [("restart", BRIDGE)]


def test_a_server_whose_bridge_has_no_vm_left_is_stopped(tmp_path):
    server = servers(document(), tmp_path)[BRIDGE]
    ops = plan_servers({}, {BRIDGE: observed(server)})
    assert [(op.action, op.name) for op in ops] == [("stop", BRIDGE)]


def test_a_pid_file_naming_a_process_that_is_not_our_dnsmasq_is_not_ours(tmp_path):
    """Never signal what the agent did not start: a pid reused by another program, or a
    dnsmasq running another config, reads as 'not running' (the plan starts ours)."""
    server = servers(document(), tmp_path)[BRIDGE]
    files = ServerFiles(tmp_path, BRIDGE)
    files.config.write_text(server.config)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files.pid.write_text(f"{stranger.pid}\n")
        found = observe_servers(tmp_path)
        assert found[BRIDGE].pid is None and found[BRIDGE].config_hash == server.config_hash
        files.pid.write_text(f"{os.getpid()}\n")
        assert observe_servers(tmp_path)[BRIDGE].pid is None
    finally:
        stranger.kill()
        stranger.wait()


def test_the_guard_drops_dhcp_arp_and_neighbour_discovery_leaving_through_every_tunnel_port_kind():
    rules = guard_ruleset()
    assert "table bridge openhnv_tunnel_guard" in rules
    for hook in ("output", "forward"):  # what the host sends, and what it forwards
        assert f"type filter hook {hook} priority 0; policy accept;" in rules
    for pattern in ("hnvt*", "hnvx*", "hnvq*"):  # gretap, VXLAN, flow mode's port
        assert f'oifname "{pattern}" udp dport {{ 67, 68, 546, 547 }} drop' in rules
        assert f'oifname "{pattern}" ether type arp drop' in rules
        assert (f'oifname "{pattern}" icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, '
                'nd-neighbor-advert, nd-redirect } drop') in rules


@pytest.mark.parametrize("fields, field, reason", [
    ({"dns_servers": ["fd00::53"]}, "dns_servers[0]", "is not IPv4"),
    ({"dns_servers": ["10.0.0.53", "10.0.0.53"]}, "dns_servers[1]", "given twice"),
    ({"dns_servers": ["224.0.0.53"]}, "dns_servers[0]", "not a unicast address"),
    ({"dns_servers": ["0.0.0.0"]}, "dns_servers[0]", "not a unicast address"),
    ({"dns_servers": ["not-an-address"]}, "dns_servers[0]", "not a valid IPv4 or IPv6 address"),
    ({"dns_servers": [f"10.0.0.{i}" for i in range(1, 10)]}, "dns_servers", "at most 8"),
    ({"lease_time": 30}, "lease_time", "greater than or equal to 120"),
    ({"lease_time": 10**9}, "lease_time", "less than or equal to"),
    ({"ipv6_assignment": "SLAAC"}, "ipv6_assignment", "is not IPv6"),
    ({"ipv6_assignment": "EUI"}, "ipv6_assignment", "Input should be 'DHCPv6' or 'SLAAC'"),
])
def test_bad_dhcp_fields_are_refused_naming_the_field(fields, field, reason):
    with pytest.raises(StateError) as refused:
        parse_host_state(document(**copy.deepcopy(fields)))
    problems = refused.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith("routing_domains[0].subnets[0]"), problems
    assert field in problems[0] and reason in problems[0], problems
