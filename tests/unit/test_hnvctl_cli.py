"""hnvctl without a controller: argument refusals, flag parsing, table layout.

Everything here is refused or computed before any request, so these tests need no
server; `main` is pointed at a port nothing listens on, and a test that reached it
would see exit 1 instead of the 2 it asserts.
"""

from __future__ import annotations

import io

import pytest

from controller.hnvctl.cli import main
from controller.hnvctl.flags import subnet_vlan as _subnet_vlan
from controller.hnvctl.output import format_table
from tests.lib.controller import free_port


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    environ = {"HNV_CONTROLLER": f"http://127.0.0.1:{free_port()}", "HNV_TOKEN": "unused"}
    return main(list(argv), stdout=out, stderr=err, environ=environ), out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["vm", "create"], "hnvctl: vm create: the following arguments are required: name"),
        (["vm", "create", "V", "--vm-network", "F", "--mac", "01:00:5e:00:00:01"], "hnvctl: VM V: --mac: MAC address 01:00:5e:00:00:01 is multicast"),
        (["vm", "create", "V", "--vm-network", "F", "--ca", "192.168.0.300"], "hnvctl: VM V: --ca: '192.168.0.300'"),
        (["vm-subnet", "create", "S", "--vm-network", "F", "--prefix", "192.168.0.5/24"], "hnvctl: VM subnet S: --prefix: 192.168.0.5/24 has host bits set (the prefix is 192.168.0.0/24)"),
        (["vm-subnet", "create", "S", "--vm-network", "T", "--prefix", "10.0.0.0/24", "--vlan", "0"], "hnvctl: VM subnet S: --vlan: 0 is out of range"),
        (["network-site", "create", "S", "--logical-network", "L", "--host-group", "G", "--subnet-vlan", "10.80.2.0/24:4095"], "hnvctl: network site S: --subnet-vlan #1 (vlan): 4095 is out of range"),
        (["network-site", "create", "S", "--logical-network", "L", "--host-group", "G", "--subnet-vlan", "10.80.2.0/24:x"], "hnvctl: --subnet-vlan: '10.80.2.0/24:x': VLAN 'x' is not a number"),
        (["ip-pool", "create", "P", "--network-site", "S", "--range-start", "10.0.0.9", "--range-end", "10.0.0.1"], "hnvctl: IP pool P: --range-end: 10.0.0.1 is before range_start 10.0.0.9"),
        (["logical-network", "create", "L", "--encapsulation", "gre"], "hnvctl: logical network L: --encapsulation: 'gre': Input should be 'nvgre' or 'vxlan'"),
        (["host", "create", "H", "--nic", "eth0", "--nic", "eth0"], "hnvctl: host H: --nic: a NIC is listed twice"),
        (["host", "create", "H", "--nic", "a-name-longer-than-15"], "hnvctl: host H: --nic #1: interface name 'a-name-longer-than-15' is 21 bytes"),
        (["lookup-records", "--host", "H", "--vsid", "16777215"], "hnvctl: lookup-records: argument --vsid: VSID '16777215' is not a number in 4096..16777214"),
        (["vm", "set", "V", "--host", "H"], "hnvctl: VM V: --host: a VM changes host by migration: hnvctl vm migrate V --host HOST"),
        (["logical-network", "set", "L"], "hnvctl: logical network L: nothing to set"),
        (["hosts", "--wait", "-1"], "hnvctl: hosts: argument --wait: -1 is outside 0..86400 seconds"),
        (["-o", "yaml", "hosts"], "hnvctl: argument -o/--output: invalid choice: 'yaml'"),
        (["apply", "-f", "/nonexistent/fabric.yaml"], "hnvctl: /nonexistent/fabric.yaml: No such file or directory"),
    ],
)
def test_bad_arguments_are_one_line_exit_2_before_any_request(argv, expected):
    code, out, err = run(*argv)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(expected), err


def test_bad_controller_url_and_token_file_are_exit_2(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert main(["hosts"], stdout=out, stderr=err, environ={"HNV_CONTROLLER": "127.0.0.1:8080"}) == 2
    assert err.getvalue() == "hnvctl: --controller: controller URL '127.0.0.1:8080' must start with http:// or https://\n"
    out, err = io.StringIO(), io.StringIO()
    missing = tmp_path / "admin.token"
    assert main(["--token-file", str(missing), "hosts"], stdout=out, stderr=err, environ={}) == 2
    assert err.getvalue() == f"hnvctl: token file {missing}: No such file or directory\n"


def test_unreachable_controller_is_one_line_exit_1():
    code, out, err = run("vm", "list")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "connection refused" in err


@pytest.mark.parametrize(
    "text, subnet, vlan",
    [
        ("10.80.2.0/24:802", "10.80.2.0/24", 802),
        ("10.0.0.0/24", "10.0.0.0/24", 0),
        ("2001:db8::/64", "2001:db8::/64", 0),
        ("2001:db8::/64:100", "2001:db8::/64", 100),
    ],
)
def test_subnet_vlan_short_form(text, subnet, vlan):
    assert _subnet_vlan(text) == {"subnet": subnet, "vlan": vlan}


def test_table_columns_line_up_under_their_headers():
    rows = [
        {"address": "192.168.0.10", "kind": "CA", "holder": "TenantVM01", "nics": ["eth0", "eth1"]},
        {"address": "10.80.2.20", "kind": "PA", "holder": None, "nics": []},
    ]
    text = format_table(rows, [("address", "Address"), ("kind", "Kind"), ("holder", "HeldBy"), ("nics", "NICs")])
    assert text.splitlines() == [
        "Address      Kind HeldBy     NICs",
        "-------      ---- ------     ----",
        "192.168.0.10 CA   TenantVM01 eth0, eth1",
        "10.80.2.20   PA",
    ]
