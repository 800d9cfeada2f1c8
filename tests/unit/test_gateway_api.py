"""The HNV gateway over the real API and hnvctl (a controller on loopback).

One controller per module: the seed fabric and tenants applied with `hnvctl apply`,
then examples/seed-gateway.yaml (two gateway hosts, Fabrikam2 and Fabrikam3 NATed,
a port forward to TenantVM01). Checked as an administrator would: the cmdlet-like
verbs, the tables they print (GatewayWildcard records, "NAT address of Fabrikam2"),
refusals as HTTP status + field + reason and as one hnvctl line with exit 2, and
that applying the same documents again changes nothing.
"""

from __future__ import annotations

import pytest

from agent.state import RecordType, parse_host_state
from tests.lib.controller import CHECKOUT, LiveController
from tests.unit.test_hnvctl import SEED, TENANTS, Hnvctl, one_line

GATEWAY = CHECKOUT / "examples" / "seed-gateway.yaml"
DOCUMENTS = ("-f", str(SEED), "-f", str(TENANTS), "-f", str(GATEWAY))


@pytest.fixture(scope="module")
def ctl(tmp_path_factory):
    with LiveController(tmp_path_factory.mktemp("controller") / "state", hosts=["CON-GW1"]) as live:
        yield live


@pytest.fixture(scope="module")
def hnvctl(ctl):
    run = Hnvctl(ctl)
    out = run.ok("apply", *DOCUMENTS)
    for line in ("+ gateway service Gateway", "+ gateway Fabrikam2_Gateway", "+ NAT connection Fabrikam3_NAT",
                 "+ NAT rule Fabrikam2_Web", "+ host CON-GW2"):
        assert line in out.splitlines(), out
    return run


def test_apply_twice_reports_no_changes(hnvctl):
    before = hnvctl.snapshot()
    assert hnvctl.ok("apply", *DOCUMENTS).startswith("no changes")
    assert hnvctl.snapshot() == before


def test_prune_removes_the_gateway_objects_the_documents_omit(hnvctl):
    out = hnvctl.ok("apply", "-f", str(SEED), "-f", str(TENANTS), "--prune", "--dry-run")
    removed = [line for line in out.splitlines() if line.startswith("- ")]
    # Dependants first: rules before connections before gateways before the service and its hosts.
    order = [removed.index(f"- {what}") for what in (
        "NAT rule Fabrikam2_Web", "NAT connection Fabrikam2_NAT", "gateway Fabrikam2_Gateway",
        "gateway service Gateway", "host CON-GW1")]
    assert order == sorted(order), removed


def test_lookup_records_show_the_gateway_wildcard_on_the_active_gateway_pa(hnvctl):
    out = hnvctl.ok("lookup-records", "--host", "CON-HyperV6")
    wildcard_rows = [line.split() for line in out.splitlines() if "GatewayWildcard" in line]
    pas = {(lease["host"], lease["vm_network"]): lease["address"] for lease in hnvctl.json("ip", "list", "--kind", "PA")}
    assert {(row[3], row[5]) for row in wildcard_rows} == {
        (pas[("CON-GW1", "Fabrikam2")], "Fabrikam2_Gateway"), (pas[("CON-GW1", "Fabrikam3")], "Fabrikam3_Gateway")}


def test_ip_list_shows_the_external_addresses(hnvctl):
    out = hnvctl.ok("ip", "list", "--kind", "NAT")
    lines = out.splitlines()
    assert lines[0].split() == ["Address", "Pool", "Kind", "HeldBy", "Description"]
    rows = [line.split(None, 4) for line in lines[2:]]
    assert rows == [["203.0.113.10", "External/Default", "NAT", "Fabrikam2_NAT", "NAT address of Fabrikam2"],
                    ["203.0.113.11", "External/Default", "NAT", "Fabrikam3_NAT", "NAT address of Fabrikam3"]]


def test_the_verbs_mirror_the_cmdlets(hnvctl):
    table = hnvctl.ok("gateway", "list")
    assert table.splitlines()[0].split()[:4] == ["Name", "VMNetwork", "NetworkService", "Connectivity"]
    out = hnvctl.ok("customer-route", "create", "lab", "--vm-network", "Fabrikam2", "--prefix", "10.99.0.0/16",
                    "--next-hop", "192.168.0.11")
    assert out.strip() == "created customer route Fabrikam2/lab"
    shown = hnvctl.json("customer-route", "show", "Fabrikam2/lab")
    assert (shown["prefix"], shown["next_hop"]) == ("10.99.0.0/16", "192.168.0.11")
    state = parse_host_state(hnvctl.ok("host", "state", "CON-HyperV6"))
    [fabrikam2] = [rd for rd in state.routing_domains if rd.name == "Fabrikam2"]
    assert ("10.99.0.0/16", "192.168.0.11") in [(str(r.prefix), str(r.next_hop)) for r in fabrikam2.routes]
    out = hnvctl.ok("nat-rule", "create", "ssh", "--nat-connection", "Fabrikam3_NAT", "--protocol", "tcp",
                    "--external-port", "2222", "--vm", "TenantVM03", "--internal-port", "22")
    assert out.strip() == "created NAT rule ssh"
    gw1 = parse_host_state(hnvctl.ok("host", "state", "CON-GW1"))
    [leg] = [leg for leg in gw1.gateway.legs if leg.routing_domain == "Fabrikam3"]
    assert [(r.external_port, r.port) for r in leg.dnat] == [(2222, 22)]
    assert any(r.type is RecordType.GatewayWildcard for r in gw1.records)
    hnvctl.ok("nat-rule", "delete", "ssh")
    hnvctl.ok("customer-route", "delete", "Fabrikam2/lab")


def test_hnvctl_refusals_are_one_line_and_change_nothing(hnvctl):
    before = hnvctl.snapshot()
    code, out, err = hnvctl("nat-rule", "create", "again", "--nat-connection", "Fabrikam2_NAT",
                            "--external-port", "80", "--vm", "TenantVM02")
    assert code == 2 and out == ""
    line = one_line(err)
    assert "external_port" in line and "NAT rule Fabrikam2_Web already forwards tcp 203.0.113.10:80" in line
    code, _, err = hnvctl("customer-route", "create", "x", "--vm-network", "Fabrikam2", "--prefix", "0.0.0.0/0",
                          "--next-hop", "10.1.2.3")
    assert code == 2 and "next_hop" in one_line(err) and "outside VM network Fabrikam2" in err
    code, _, err = hnvctl("vm", "create", "Stray", "--vm-network", "Fabrikam2", "--host", "CON-GW2")
    assert code == 2 and "host CON-GW2 is a gateway host; placement never puts a VM there" in one_line(err)
    code, _, err = hnvctl("host", "set", "CON-HyperV6", "--role", "gateway")
    assert code == 2 and "it holds VMs TenantVM01, TenantVM03; migrate them first" in one_line(err)
    code, _, err = hnvctl("nat-rule", "create", "bad", "--nat-connection", "Fabrikam2_NAT", "--external-port", "0",
                          "--vm", "TenantVM01")
    assert code == 2 and one_line(err).startswith("hnvctl: NAT rule bad: --external-port:")
    assert hnvctl.snapshot() == before


@pytest.mark.parametrize("path, body, status, field, reason", [
    ("/v1/nat-rules", {"name": "r", "nat_connection": "Fabrikam2_NAT", "external_port": 80, "vm": "TenantVM02"},
     409, "external_port", "NAT rule Fabrikam2_Web already forwards tcp 203.0.113.10:80"),
    ("/v1/nat-rules", {"name": "r", "nat_connection": "Fabrikam2_NAT", "external_port": 81, "vm": "TenantVM03"},
     422, "vm", "VM TenantVM03 is in VM network Fabrikam3; NAT connection Fabrikam2_NAT serves Fabrikam2"),
    ("/v1/nat-rules", {"name": "r", "nat_connection": "Fabrikam2_NAT", "external_port": 70000, "vm": "TenantVM01"},
     422, "external_port", "less than or equal to 65535"),
    ("/v1/customer-routes", {"name": "r", "vm_network": "Fabrikam2", "prefix": "10.0.0.0/8", "next_hop": "10.0.0.1"},
     422, "next_hop", "a next hop is a customer address inside one of the VM network's subnets"),
    ("/v1/nat-connections", {"name": "n", "gateway": "Fabrikam2_Gateway"},
     409, "gateway", "a VM network has one external address"),
    ("/v1/gateways", {"name": "g", "vm_network": "TenantA", "gateway_service": "Gateway"},
     422, "vm_network", "a gateway serves network-virtualised VM networks"),
    ("/v1/gateway-services", {"name": "s", "front_end_logical_network": "External", "front_end_site": "External",
                              "external_ip_pool": "Default", "back_end_logical_network": "Virtualization",
                              "hosts": ["CON-HyperV6"]},
     422, "hosts[0]", "host CON-HyperV6 has role compute; set its role to gateway first"),
    ("/v1/vms", {"name": "Stray", "vm_network": "Fabrikam2", "host": "CON-GW1"},
     409, "host", "host CON-GW1 is a gateway host; placement never puts a VM there"),
])
def test_api_refusals_name_the_field_and_the_reason(hnvctl, ctl, path, body, status, field, reason):
    answer = ctl.admin.post(path, json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and reason in answer.json()["reason"], answer.json()


def test_api_patches_the_active_host_and_the_records_and_metrics_follow(hnvctl, ctl):
    pas = {(lease["host"], lease["vm_network"]): lease["address"]
           for lease in ctl.admin.get("/v1/ip-addresses", params={"kind": "PA"}).json()}
    answer = ctl.admin.patch("/v1/gateway-services/Gateway", json={"active": "CON-GW2"})
    assert answer.status_code == 200 and answer.json()["active"] == "CON-GW2"
    records = ctl.admin.get("/v1/hosts/CON-HyperV7/lookup-records").json()
    assert {r["pa"] for r in records if r["type"] == "GatewayWildcard"} == {
        pas[("CON-GW2", "Fabrikam2")], pas[("CON-GW2", "Fabrikam3")]}
    metrics = ctl.admin.get("/metrics").text
    assert 'hnv_controller_gateway_active{host="CON-GW2",service="Gateway"} 1.0' in metrics
    assert 'hnv_controller_gateway_active{host="CON-GW1",service="Gateway"} 0.0' in metrics
    answer = ctl.admin.patch("/v1/gateway-services/Gateway", json={"active": "CON-HyperV6"})
    assert answer.status_code == 422 and answer.json()["field"] == "active"
    assert ctl.admin.patch("/v1/gateway-services/Gateway", json={"active": "CON-GW1"}).status_code == 200
