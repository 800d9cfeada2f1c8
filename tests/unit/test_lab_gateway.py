"""The lab's gateway part, checked without a kernel: the seed topology's gateway cluster
and external network, the refusals of a bad `external:` section, the walkthrough's
gateway document and verbs accepted by a real controller (the same objects as
examples/seed-gateway.yaml), and the external web server's page.

The part itself (NAT on the wire, the port forward, failover) runs in the kernel tier's
seed lab (tests/kernel/test_lab_seed.py, checks gateway-*)."""

from __future__ import annotations

import yaml
import pytest

from agent.state import RecordType, parse_host_state
from netns_lab.demo import gateway_document, gateway_verbs
from netns_lab.topology import ClusterRole, TopologyError, load_topology, parse_topology, seed_topology_text
from netns_lab.webserver import answer, came_from, main as webserver_main
from tests.lib.controller import LiveController
from tests.unit.test_hnvctl import SEED, TENANTS, Hnvctl

TOPOLOGY = load_topology()
GATEWAYS = [h.name for c in TOPOLOGY.clusters_with_role(ClusterRole.gateway) for h in c.hosts]


def test_the_seed_has_a_gateway_cluster_and_an_external_network():
    assert GATEWAYS == ["CON-GW1", "CON-GW2"]
    external = TOPOLOGY.external
    assert external is not None and external.vlan in TOPOLOGY.switch.trunk_vlans
    assert str(external.address) == "203.0.113.1/24"
    assert TOPOLOGY.namespaces[-1] == external.namespace
    # The lab moves the role sooner than the product's default 10 s (docs/lab.md).
    assert TOPOLOGY.controller.gateway_failover_after < 10


def _refusal(edit) -> list[str]:
    document = yaml.safe_load(seed_topology_text())
    edit(document)
    with pytest.raises(TopologyError) as caught:
        parse_topology(yaml.safe_dump(document), "lab.yaml")
    return caught.value.problems


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d["external"].update(vlan=40),
     "external.vlan: VLAN 40 is not in switch.trunk_vlans, so no host's trunk carries it"),
    (lambda d: d["external"].update(vlan=1), "external.vlan: VLAN 1 is the switch's native VLAN"),
    (lambda d: d["external"].update(namespace="CON-GW1"),
     "external.namespace: CON-GW1 is already used by clusters[3].hosts[0].name"),
    (lambda d: d["external"].update(address="10.0.0.99/24"),
     "external.address: 10.0.0.99 is inside the management subnet 10.0.0.0/24"),
    (lambda d: d["external"].update(address="203.0.113.0/24"),
     "external.address: 203.0.113.0 is not a host address of 203.0.113.0/24"),
    (lambda d: d["external"].update(port="h6-eth0"), "external.port: h6-eth0 is already a switch port"),
    (lambda d: d["controller"].update(gateway_failover_after=-1), "controller.gateway_failover_after"),
])
def test_a_bad_external_section_is_refused_naming_the_field(edit, expected):
    problems = _refusal(edit)
    assert any(expected in problem for problem in problems), problems


@pytest.fixture(scope="module")
def hnvctl(tmp_path_factory):
    with LiveController(tmp_path_factory.mktemp("controller") / "state") as live:
        run = Hnvctl(live)
        run.ok("apply", "-f", str(SEED), "-f", str(TENANTS))
        yield run


def test_the_walkthroughs_gateway_is_accepted_and_compiles_for_the_gateway_hosts(hnvctl, tmp_path):
    document = tmp_path / "gateway-fabric.yaml"
    document.write_text(yaml.safe_dump(gateway_document(TOPOLOGY), sort_keys=False))
    out = hnvctl.ok("apply", "-f", str(document))
    assert "+ host CON-GW2" in out.splitlines(), out
    ca = hnvctl.json("vm", "show", "TenantVM01")["ca"].split("/")[0]
    for _cmdlet, argv in gateway_verbs(GATEWAYS, ca):
        hnvctl.ok(*argv)
    nat = {lease["vm_network"]: lease["address"] for lease in hnvctl.json("ip", "list", "--kind", "NAT")}
    assert nat == {"Fabrikam2": "203.0.113.10", "Fabrikam3": "203.0.113.11"}
    service = hnvctl.json("gateway-service", "show", "Gateway")
    assert service["active"] == "CON-GW1" and service["hosts"] == GATEWAYS

    active, standby = (parse_host_state(hnvctl.ok("host", "state", host)) for host in GATEWAYS)
    assert active.gateway.active and not standby.gateway.active
    assert active.gateway.front_end.vlan == TOPOLOGY.external.vlan
    assert str(active.gateway.front_end.gateway) == str(TOPOLOGY.external.address.ip)
    legs = {leg.routing_domain: leg for leg in active.gateway.legs}
    assert {name: str(leg.address.ip) for name, leg in legs.items()} == nat
    assert [(r.external_port, str(r.address), r.port) for r in legs["Fabrikam2"].dnat] == [(80, ca, 8080)]
    assert not legs["Fabrikam3"].dnat
    # Every host of the VM networks reaches the gateway through the active host's PA.
    hv6 = parse_host_state(hnvctl.ok("host", "state", "CON-HyperV6"))
    wildcard_pas = {str(r.pa) for r in hv6.records if r.type is RecordType.GatewayWildcard}
    active_pas = {str(pa.address) for pa in active.provider.addresses}
    assert wildcard_pas and wildcard_pas <= active_pas


def test_the_external_web_server_says_where_the_caller_came_from():
    page = answer("203.0.113.1", "203.0.113.10")
    assert came_from(page) == "203.0.113.10"
    assert came_from("<html>something else</html>") is None


@pytest.mark.parametrize("listen", ["203.0.113.1", "nowhere:80", "203.0.113.1:0", "203.0.113.1:70000"])
def test_the_web_server_refuses_a_bad_listen_address(listen, capsys):
    with pytest.raises(SystemExit) as exited:
        webserver_main(["--listen", listen])
    assert exited.value.code == 2
    assert "--listen" in capsys.readouterr().err
