"""agent.show over a KernelState shaped like a realised plan: the HNV tables, no kernel."""

from __future__ import annotations

from agent import naming, show
from agent.plan import desired_kernel_state
from tests.unit.test_plan import VSID, as_observed, state


def test_lookup_records_join_neighbour_fdb_and_tunnel():
    rows = show.lookup_records(as_observed(desired_kernel_state(state())))
    assert {"CustomerAddress": "192.168.0.11", "VirtualSubnetID": VSID, "MACAddress": "00:15:5d:01:02:04",
            "ProviderAddress": "10.80.2.21", "Type": "Static", "VMName": ""} in rows
    assert {"CustomerAddress": "192.168.0.10", "VirtualSubnetID": VSID, "MACAddress": "00:15:5d:01:02:03",
            "ProviderAddress": "10.80.2.20", "Type": "Static", "VMName": "TenantVM01"} in rows
    assert {"CustomerAddress": "192.168.0.1", "VirtualSubnetID": VSID, "MACAddress": naming.gateway_mac(VSID),
            "ProviderAddress": "", "Type": "Gateway", "VMName": ""} in rows


def test_table_format_has_header_and_one_line_per_row():
    have = as_observed(desired_kernel_state(state()))
    text = show.render("records", show.lookup_records(have))
    lines = text.splitlines()
    assert lines[0].split() == ["CustomerAddress", "VirtualSubnetID", "MACAddress", "ProviderAddress", "Type", "VMName"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + 3
    assert show.ports(have)[0]["Port"] == naming.vm_port("TenantVM01")
    assert show.render("ports", []) == "(none)"
