"""The HNV gateway's kernel side, end to end: VM hosts, a gateway host, an external host.

One module-scoped lab (tests/kernel/gatewaylab.py on tests/kernel/agentlab.py): hosts A
and B hold the tenants' VMs (Fabrikam2 and Fabrikam3, the same CAs), host G is the
gateway with one NAT leg per tenant, the external host sits on the front-end VLAN. Every
host is configured by its own Reconciler from a hand-written HostState. Real TCP and
pings; captures on the external host's switch port decoded by scapy. The tests run in
file order and share the lab: the forwarding test turns Fabrikam3's leg into a
forwarding one, the last test removes the gateway.
"""

from __future__ import annotations

import json

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP
from scapy.utils import rdpcap

from agent import naming
from agent.dhcp import GUARD_TABLE
from agent.reconcile import Reconciler
from agent.state import parse_host_state
from netns_lab.tcp import TcpService, tcp_exchange
from tests.kernel.agentlab import AgentLab
from tests.kernel.gatewaylab import (
    FORWARDED_PREFIX,
    NAT_ADDRESS,
    SERVICE_PORT,
    UPSTREAM,
    build_gateway_lab,
    gateway_host_state,
    with_gateway,
)
from tests.lib.netns import NamespaceFactory
from tests.lib.wait import wait_until

EXTERNAL_PORT = 80  # the external host's service, and the NAT rules' external port
TIMEOUT = 60  # first packets wait for ARP and, under emulation, for everything else
NFT_TIMEOUT = 300  # the first nft loads nf_tables: minutes on an emulated, loaded CPU


@pytest.fixture(scope="module")
def lab():
    lab = AgentLab(NamespaceFactory(prefix="gw"))
    services: list[TcpService] = []
    try:
        build_gateway_lab(lab.build())
        lab.reconcilers = {h: Reconciler(netns=lab.hosts[h].name) for h in lab.hosts}
        # Someone else's table on the gateway host: the agent must never touch it.
        lab.hosts["g"].run("nft", "add table inet someone_else; add chain inet someone_else keep",
                           timeout=NFT_TIMEOUT)
        # The gateway host before it has a gateway: what removing the gateway returns to.
        apply(lab, "g", gateway_host_state(lab, 1, gateway=False))
        lab.before_gateway = lab.reconcilers["g"].observe()
        for host in ("a", "b"):
            apply(lab, host, with_gateway(lab.state(host)))
        apply(lab, "g", gateway_host_state(lab, 2))
        lab.web = TcpService(lab.external.name, UPSTREAM, EXTERNAL_PORT, "external")
        services.append(lab.web)
        for vm, reply in (("vmB2", "Fabrikam2 vmB2"), ("vmB3", "Fabrikam3 vmB3")):
            services.append(TcpService(lab.vms[vm].name, "192.168.0.11", SERVICE_PORT, reply))
        yield lab
    finally:
        for service in services:
            service.close()
        lab.close()


def apply(lab, host: str, document: dict) -> None:
    result = lab.reconcilers[host].reconcile(parse_host_state(document))
    assert result.errors == [], result.errors


def reach(lab, vm: str, address: str, port: int) -> str:
    """The answer of a TCP service, waited for (the first connection waits on ARP)."""
    return wait_until(lambda: tcp_exchange(lab.vms[vm].name, address, port),
                      TIMEOUT, f"{vm} reaching {address}:{port}")


def test_overlapping_tenants_leave_through_their_own_nat_address(lab, tmp_path):
    pcap = tmp_path / "front.pcap"
    lab.web.peers.clear()
    with lab.switch.capture("x0", pcap):
        assert reach(lab, "vmA2", UPSTREAM, EXTERNAL_PORT) == "external"
        assert reach(lab, "vmA3", UPSTREAM, EXTERNAL_PORT) == "external"
    # The same CA 192.168.0.10 in both tenants: the external host sees two addresses.
    assert set(lab.web.peers) == {NAT_ADDRESS["Fabrikam2"], NAT_ADDRESS["Fabrikam3"]}, lab.web.peers
    syns = [p for p in rdpcap(str(pcap)) if TCP in p and p[TCP].dport == EXTERNAL_PORT and p[TCP].flags.S]
    sources = {p[IP].src for p in syns}
    assert sources == {NAT_ADDRESS["Fabrikam2"], NAT_ADDRESS["Fabrikam3"]}, sources
    assert not [p for p in rdpcap(str(pcap)) if IP in p and p[IP].src.startswith("192.168.")], \
        "a tenant CA reached the front-end"


def test_nat_rule_reaches_the_right_tenants_vm_only(lab):
    # 192.168.0.11:8080 exists in both tenants; each NAT address leads to its own.
    got = wait_until(lambda: tcp_exchange(lab.external.name, NAT_ADDRESS["Fabrikam2"], EXTERNAL_PORT),
                     TIMEOUT, "the external host reaching Fabrikam2's NAT rule")
    assert got == "Fabrikam2 vmB2"
    for _ in range(3):
        assert tcp_exchange(lab.external.name, NAT_ADDRESS["Fabrikam2"], EXTERNAL_PORT) == "Fabrikam2 vmB2"
    got = wait_until(lambda: tcp_exchange(lab.external.name, NAT_ADDRESS["Fabrikam3"], EXTERNAL_PORT),
                     TIMEOUT, "the external host reaching Fabrikam3's NAT rule")
    assert got == "Fabrikam3 vmB3"
    # No rule for another port: nothing answers.
    assert tcp_exchange(lab.external.name, NAT_ADDRESS["Fabrikam2"], 81) is None


def test_no_path_between_tenants_through_the_gateway(lab):
    # The external host reaches Fabrikam3's forwarded port (previous test); Fabrikam2's
    # VM, whose packets do reach the front-end (first test), does not.
    assert reach(lab, "vmA2", UPSTREAM, EXTERNAL_PORT) == "external"
    assert tcp_exchange(lab.vms["vmA2"].name, NAT_ADDRESS["Fabrikam3"], EXTERNAL_PORT) is None
    assert not lab.vms["vmA2"].ping("10.30.0.11", wait=1), "Fabrikam2 reached Fabrikam3's subnet"
    assert not lab.vms["vmA2"].ping(NAT_ADDRESS["Fabrikam3"], wait=1), "Fabrikam2 reached Fabrikam3's leg"
    # And the gateway host's back-end ports answer only inside their own tenant.
    assert lab.vms["vmA2"].ping("192.168.0.12", count=2) and lab.vms["vmA3"].ping("192.168.0.12", count=2)


def test_customer_route_to_a_next_hop_other_than_the_gateway(lab):
    # Fabrikam2: 10.99.0.0/16 via its VM 192.168.0.11 (vmB2, on host B), which holds 10.99.0.1.
    lab.vms["vmB2"].ip("addr", "add", "10.99.0.1/32", "dev", "lo")
    assert lab.vms["vmA2"].ping("10.99.0.1", count=2, wait=2), "the customer route did not lead to vmB2"
    table = naming.vrf_table(2)
    route = lab.hosts["a"].ip("route", "show", "table", str(table), "10.99.0.0/16").stdout
    assert "via 192.168.0.11" in route and f"hnvb{5001}" in route, route
    # Fabrikam3 has no such route: its default goes to the gateway, which has nowhere to send it.
    assert not lab.vms["vmA3"].ping("10.99.0.1", wait=1)


def test_after_traffic_every_host_plans_nothing(lab):
    """Applied once, the gateway's documents stay applied: after the tenants' traffic
    through the gateway (the tests above), no host plans a change. A repair that never
    sticks would be a reconcile, and a drift alert, every resync on every host."""
    documents = {"a": with_gateway(lab.state("a")), "b": with_gateway(lab.state("b")),
                 "g": gateway_host_state(lab, 2)}
    for host, document in documents.items():
        plan = lab.reconcilers[host].plan(parse_host_state(document))
        assert plan.is_empty, f"host {host}: {plan.describe()}"


def test_drift_deleted_nft_table_and_route_are_repaired(lab):
    host, rec = lab.hosts["g"], lab.reconcilers["g"]
    state = parse_host_state(gateway_host_state(lab, 2))
    host.run("nft", "delete table inet openhnv", timeout=NFT_TIMEOUT)
    lab.hosts["a"].ip("route", "del", "default", "via", "192.168.0.12", "table", str(naming.vrf_table(2)))
    result = rec.reconcile(state)
    assert result.errors == [] and "add nat inet openhnv" in result.plan.describe(), result.plan.describe()
    fixed = lab.reconcilers["a"].reconcile(parse_host_state(with_gateway(lab.state("a"))))
    assert fixed.errors == [] and fixed.plan.describe().startswith("add route default via 192.168.0.12")
    assert rec.plan(state).is_empty
    assert tcp_exchange(lab.external.name, NAT_ADDRESS["Fabrikam2"], EXTERNAL_PORT) == "Fabrikam2 vmB2"


def test_standby_holds_the_leg_down_and_taking_over_announces_it(lab, tmp_path):
    rec = lab.reconcilers["g"]
    apply(lab, "g", gateway_host_state(lab, 3, active=False))
    have = rec.observe()
    assert not have.links[naming.gateway_leg(2)].up
    assert not any(r.gateway == UPSTREAM for r in have.routes.values())
    assert tcp_exchange(lab.vms["vmA2"].name, UPSTREAM, EXTERNAL_PORT, timeout=2) is None
    pcap = tmp_path / "garp.pcap"
    with lab.switch.capture("x0", pcap, "arp"):
        apply(lab, "g", gateway_host_state(lab, 4, active=True))
        assert reach(lab, "vmA2", UPSTREAM, EXTERNAL_PORT) == "external"
    garps = [p for p in rdpcap(str(pcap)) if ARP in p and p[ARP].psrc == p[ARP].pdst]
    assert {p[ARP].psrc for p in garps} >= set(NAT_ADDRESS.values()), [p.summary() for p in garps]


def test_forwarding_leg_routes_without_nat(lab):
    apply(lab, "g", gateway_host_state(lab, 5, fabrikam3="forwarding"))
    # The upstream learns the VM network's prefix from a static route to the leg.
    lab.external.ip("route", "add", FORWARDED_PREFIX, "via", NAT_ADDRESS["Fabrikam3"])
    lab.web.peers.clear()
    # vmB3s lives in Fabrikam3's second subnet, 10.30.0.11.
    assert reach(lab, "vmB3s", UPSTREAM, EXTERNAL_PORT) == "external"
    assert lab.web.peers[-1] == "10.30.0.11", lab.web.peers
    # Fabrikam2 is still NATed.
    assert reach(lab, "vmA2", UPSTREAM, EXTERNAL_PORT) == "external"
    assert lab.web.peers[-1] == NAT_ADDRESS["Fabrikam2"]
    rules = lab.hosts["g"].run("nft", "list", "table", "inet", "openhnv", timeout=NFT_TIMEOUT).stdout
    assert NAT_ADDRESS["Fabrikam3"] not in rules and NAT_ADDRESS["Fabrikam2"] in rules, rules


def test_removing_the_gateway_removes_exactly_its_objects(lab):
    for host in ("a", "b"):
        rec = lab.reconcilers[host]
        plan = rec.plan(parse_host_state(lab.state(host, generation=9)))
        described = plan.describe().splitlines()
        # The customer routes and the GatewayWildcard records (and the tunnel to the
        # gateway host's PAs, which only they needed), nothing else.
        assert all(line.startswith("delete ") for line in described), described
        assert sum("route" in line for line in described) == 3, described
        assert {line.split()[1] for line in described} <= {"route", "neighbour", "fdb", "tunnel"}, described
        apply(lab, host, lab.state(host, generation=9))
    rec = lab.reconcilers["g"]
    apply(lab, "g", gateway_host_state(lab, 9, gateway=False))
    after = rec.observe()
    assert after == lab.before_gateway, rec.plan(parse_host_state(gateway_host_state(lab, 9, gateway=True))).describe()
    tables = json.loads(lab.hosts["g"].run("nft", "-j", "list", "tables", timeout=NFT_TIMEOUT).stdout)["nftables"]
    names = {t["table"]["name"] for t in tables if "table" in t}
    # The gateway's NAT table is gone; someone else's stays, and so does the tunnel guard
    # of the VM networks the host still holds (agent.dhcp), which is not the gateway's.
    assert names == {"someone_else", GUARD_TABLE}, names
    # The tenants still reach each other; nothing leaves any more.
    assert lab.vms["vmA2"].ping("192.168.0.11", count=2)
    assert tcp_exchange(lab.vms["vmA2"].name, UPSTREAM, EXTERNAL_PORT, timeout=2) is None
