"""hnvctl against a real controller on loopback (tests/lib/controller.py).

One controller per module, built from examples/seed-fabric.yaml by `hnvctl apply`; tests
run hnvctl through `main(argv)` with captured output (one through the installed console
script as a real process) and check what an administrator would: tables, JSON, exit
codes, one-line refusals, and that a refused command changed nothing.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from agent import naming
from agent.state import parse_host_state
from controller.client import ControllerClient
from controller.hnvctl import apply_fabric, main, read_documents
from controller.models import Kind
from tests.lib.controller import CHECKOUT, LiveController, free_port
from tests.lib.seed_fabric import add_tenants, build_seed_fabric

SEED = CHECKOUT / "examples" / "seed-fabric.yaml"
TENANTS = CHECKOUT / "examples" / "seed-tenants.yaml"
VIRTUALISATION_HOSTS = {"CON-HyperV6", "CON-HyperV7"}


class Hnvctl:
    def __init__(self, ctl: LiveController):
        self.ctl = ctl
        self.token_file = ctl.state_dir / "admin.token"

    def __call__(self, *argv: str, controller: str | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        environ = {"HNV_CONTROLLER": controller or self.ctl.base_url, "HNV_TOKEN_FILE": str(self.token_file)}
        code = main(list(argv), stdout=out, stderr=err, environ=environ)
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        assert err == ""
        return out

    def json(self, *argv: str):
        return json.loads(self.ok("-o", "json", *argv))

    def snapshot(self, generations: bool = True) -> dict:
        """Every object and every lease: what 'nothing changed' compares."""
        with ControllerClient(self.ctl.base_url, self.ctl.admin_token) as client:
            fabric = {kind.value: sorted(client.list_json(kind), key=json.dumps) for kind, _ in client.live_fabric()}
            fabric["leases"] = sorted(json.dumps(lease.model_dump(mode="json")) for lease in client.ip_addresses())
        for host in fabric["hosts"]:  # sync status moves with agents, not with hnvctl
            for name in ("sync", "reason", "applied_generation", *(() if generations else ("desired_generation",))):
                host.pop(name, None)
        return fabric


@pytest.fixture(scope="module")
def ctl(tmp_path_factory):
    with LiveController(tmp_path_factory.mktemp("controller") / "state", hosts=["CON-HyperV6"]) as live:
        yield live


@pytest.fixture(scope="module")
def hnvctl(ctl):
    run = Hnvctl(ctl)
    out = run.ok("apply", "-f", str(SEED))
    assert "+ host group Virtualization" in out and "+ host CON-HyperV7" in out
    assert out.strip().endswith(f"applied 34 changes from {SEED}")
    out = run.ok("apply", "-f", str(SEED), "-f", str(TENANTS))
    assert out.splitlines()[-1] == f"applied 10 changes from {SEED}, {TENANTS}"
    return run


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not one line: {err!r}"
    return err.strip()


# --- apply ------------------------------------------------------------------------------


def test_second_apply_reports_no_changes(hnvctl):
    before = hnvctl.snapshot()
    out = hnvctl.ok("apply", "-f", str(SEED), "-f", str(TENANTS))
    assert out == f"no changes: the fabric already matches {SEED}, {TENANTS}\n"
    assert hnvctl.snapshot() == before


def test_seed_fabric_is_built(hnvctl):
    hosts = {h["name"]: h for h in hnvctl.json("host", "list")}
    assert len(hosts) == 7
    assert hosts["CON-HyperV6"]["cluster"] == "VIRTUALCLUSTER"
    assert hosts["CON-HyperV6"]["host_group"] == "Virtualization"
    assert hosts["CON-HyperV6"]["management_address"] == "10.0.0.16/24"
    switch = hosts["CON-HyperV6"]["virtual_switch"]
    assert switch["logical_switch"] == "Virtualization" and switch["nics"] == ["eth0", "eth1"]
    assert switch["management_adapter"]["vm_network"] == "Management"
    site = hnvctl.json("network-site", "show", "Virtualization")
    assert site["subnet_vlans"] == [{"subnet": "10.80.2.0/24", "vlan": 802}]
    assert site["host_groups"] == ["Virtualization"]
    subnets = {s["vm_network"]: s for s in hnvctl.json("vm-subnet", "list")}
    assert subnets["Fabrikam2"]["prefix"] == subnets["Fabrikam3"]["prefix"] == "192.168.0.0/24"
    assert subnets["Fabrikam2"]["vsid"] != subnets["Fabrikam3"]["vsid"]
    assert 4096 <= subnets["Fabrikam2"]["vsid"] <= 16_777_214
    assert subnets["TenantA"]["vlan"] == 100 and subnets["TenantB"]["vlan"] == 101


def test_dry_run_prints_exactly_the_change_and_changes_nothing(hnvctl, tmp_path):
    modified = tmp_path / "fabric.yaml"
    text = SEED.read_text()
    assert text.count("    encapsulation: nvgre\n") == 1
    modified.write_text(text.replace("    encapsulation: nvgre\n", "    encapsulation: nvgre\n    mtu: 1600\n"))
    before, settled = hnvctl.snapshot(), hnvctl.snapshot(generations=False)
    out = hnvctl.ok("apply", "-f", str(modified), "--dry-run")
    assert out.splitlines() == [
        "~ logical network Virtualization (mtu: 1500 -> 1600)",
        "dry run: 0 to create, 1 to update, 0 to delete; nothing changed",
    ]
    assert hnvctl.snapshot() == before
    # The real apply makes exactly that change. The seed does not state the MTU, so it
    # leaves 1600 alone; a document stating 1500 puts it back.
    assert hnvctl.ok("apply", "-f", str(modified)).splitlines()[0] == "~ logical network Virtualization (mtu: 1500 -> 1600)"
    assert hnvctl.json("logical-network", "show", "Virtualization")["mtu"] == 1600
    assert hnvctl.ok("apply", "-f", str(SEED)).startswith("no changes")
    modified.write_text(text.replace("    encapsulation: nvgre\n", "    encapsulation: nvgre\n    mtu: 1500\n"))
    assert hnvctl.ok("apply", "-f", str(modified)).splitlines()[0] == "~ logical network Virtualization (mtu: 1600 -> 1500)"
    assert hnvctl.snapshot(generations=False) == settled  # the hosts' generations moved on, as they must


def test_apply_fabric_in_process_for_the_lab(hnvctl, ctl, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("hostGroups: [{name: InProcess}]\n")
    documents = read_documents([str(SEED), str(TENANTS), str(extra)])
    sent = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            sent.append(f"{request.method} {request.url.path}")
            return super().handle_request(request)

    with ControllerClient(ctl.base_url, ctl.admin_token, transport=Counting()) as client:
        planned = apply_fabric(client, documents, dry_run=True)
        assert sent == ["POST /v1/fabric/apply"]  # three files, one request
        assert [c["summary"] for c in planned] == ["+ host group InProcess"]
        assert planned[0]["path"] == f"{extra}: hostGroups[0]"  # back in the file that states it
        assert apply_fabric(client, documents) == planned
        assert apply_fabric(client, documents) == []
        client.delete(Kind.host_group, "InProcess")


def test_prune_dry_run_lists_what_the_documents_omit(hnvctl):
    out = hnvctl.ok("apply", "-f", str(SEED), "--prune", "--dry-run")
    lines = out.splitlines()
    assert lines[:4] == ["- VM TenantVM01", "- VM TenantVM02", "- VM TenantVM03", "- VM TenantVM04"]
    assert "- VM network Fabrikam2" in lines and "- VM subnet Fabrikam3/Default" in lines
    assert lines.index("- IP pool Fabrikam2/Default/Default") < lines.index("- VM subnet Fabrikam2/Default")
    assert lines[-1] == "dry run: 0 to create, 0 to update, 10 to delete; nothing changed"


# --- leases, records, hosts ---------------------------------------------------------------


def test_ip_list_shows_ca_and_pa_leases_with_descriptions(hnvctl):
    out = hnvctl.ok("ip", "list")
    header, dashes, *rows = out.splitlines()
    assert header.split() == ["Address", "Pool", "Kind", "HeldBy", "Description"]
    assert dashes.split() == ["-------", "----", "----", "------", "-----------"]
    leases = hnvctl.json("ip", "list")
    pas = {(l["holder"], l["description"]) for l in leases if l["kind"] == "PA"}
    assert pas == {
        (host, f"PA of {host} for {network}") for host in VIRTUALISATION_HOSTS for network in ("Fabrikam2", "Fabrikam3")
    }
    cas = {l["holder"]: l["address"] for l in leases if l["kind"] == "CA" and l["holder"].startswith("TenantVM0")}
    assert cas["TenantVM01"] == cas["TenantVM03"]  # the same CA in two VM networks
    assert any("PA of CON-HyperV6 for Fabrikam2" in row and "10.80.2." in row for row in rows)
    only_pa = hnvctl.json("ip", "list", "--kind", "PA", "--host", "CON-HyperV7")
    assert {l["description"] for l in only_pa} == {"PA of CON-HyperV7 for Fabrikam2", "PA of CON-HyperV7 for Fabrikam3"}


def test_lookup_records_map_every_vm_of_the_hosts_networks(hnvctl):
    records = hnvctl.json("lookup-records", "--host", "CON-HyperV6")
    static = {(r["vm_name"], r["ca"]) for r in records if r["type"] == "Static"}
    vms = {vm["name"]: vm for vm in hnvctl.json("vm", "list")}
    assert static >= {(name, vms[name]["ca"]) for name in ("TenantVM01", "TenantVM02", "TenantVM03", "TenantVM04")}
    pa_of = {(l["holder"], l["vm_network"]): l["address"] for l in hnvctl.json("ip", "list", "--kind", "PA")}
    record = next(r for r in records if r["vm_name"] == "TenantVM02")
    assert record["pa"] == pa_of[("CON-HyperV7", "Fabrikam2")]
    gateways = [r for r in records if r["type"] == "Gateway"]
    assert {g["ca"] for g in gateways} == {"192.168.0.1"} and len(gateways) == 2
    table = hnvctl.ok("lookup-records", "--host", "CON-HyperV6", "--vsid", str(record["vsid"]))
    assert table.splitlines()[0].split() == [
        "CustomerAddress", "VirtualSubnetID", "MACAddress", "ProviderAddress", "Type", "VMName"
    ]
    assert "TenantVM02" in table and "TenantVM03" not in table


def test_hosts_show_sync_status_moving_with_the_agents_report(hnvctl, ctl):
    rows = {h["name"]: h for h in hnvctl.json("hosts")}
    assert set(rows) == {f"CON-HyperV{i}" for i in range(1, 8)}
    host = rows["CON-HyperV6"]
    assert host["sync"] == "Pending" and host["applied_generation"] is None
    desired = host["desired_generation"]
    answer = ctl.client_for("CON-HyperV6").put(
        "/v1/hosts/CON-HyperV6/status", json={"generation": desired, "errors": [], "agent": "test"}
    )
    assert answer.status_code == 200, answer.text
    out = hnvctl.ok("hosts")
    line = next(l for l in out.splitlines() if l.startswith("CON-HyperV6 "))
    assert line.split()[:5] == ["CON-HyperV6", "VIRTUALCLUSTER", "InSync", str(desired), str(desired)]
    assert out.splitlines()[0].split() == ["Name", "Cluster", "Sync", "Desired", "Applied", "Reason"]
    assert hnvctl.json("hosts", "--wait", "10", "--host", "CON-HyperV6")[0]["sync"] == "InSync"
    code, out, err = hnvctl("hosts", "--wait", "0.3", "--host", "CON-HyperV6", "--host", "CON-HyperV7")
    assert code == 1 and "CON-HyperV7" in out
    assert one_line(err).startswith("hnvctl: not in sync after 0.3 s: CON-HyperV7 (Pending: ")


def test_host_state_is_the_compiled_host_state(hnvctl):
    state = parse_host_state(hnvctl.ok("host", "state", "CON-HyperV7"))
    assert state.host == "CON-HyperV7" and state.provider.vlan == 802
    assert {rd.name for rd in state.routing_domains} == {"Fabrikam2", "Fabrikam3"}
    assert {port.name for port in state.ports} >= {"TenantVM02", "TenantVM04"}


# --- VMs ----------------------------------------------------------------------------------


def wait_for_migrations(hnvctl) -> None:
    """Until no VM is migrating. No agent reports here: each stage of a migration waits
    for its bound (5 s)."""
    deadline = time.monotonic() + 60
    while any(vm["migration"] is not None for vm in hnvctl.json("vm", "list")):
        assert time.monotonic() < deadline, "a migration never finished"
        time.sleep(0.5)


def test_vm_create_with_placement_migrate_delete(hnvctl):
    before = {l["address"] for l in hnvctl.json("ip", "list", "--kind", "CA")}
    out = hnvctl.ok("vm", "create", "PlacedVM", "--vm-network", "Fabrikam2")
    placed = hnvctl.json("vm", "show", "PlacedVM")
    assert placed["host"] in VIRTUALISATION_HOSTS
    assert out == f"created VM PlacedVM placed on {placed['host']} (CA {placed['ca']}, MAC {placed['mac']})\n"
    other = (VIRTUALISATION_HOSTS - {placed["host"]}).pop()

    out = hnvctl.ok("vm", "migrate", "PlacedVM", "--host", other)
    assert out.startswith(f"VM PlacedVM now on {other}")
    wait_for_migrations(hnvctl)
    pa_of = {(l["holder"], l["vm_network"]): l["address"] for l in hnvctl.json("ip", "list", "--kind", "PA")}
    for host in VIRTUALISATION_HOSTS:  # every host of the VM network follows the move
        record = next(r for r in hnvctl.json("lookup-records", "--host", host) if r["vm_name"] == "PlacedVM")
        assert record["pa"] == pa_of[(other, "Fabrikam2")]

    hnvctl.ok("vm", "create", "PinnedVM", "--vm-network", "Fabrikam3", "--host", "CON-HyperV7", "--mac", "00-15-5D-01-02-03")
    pinned = hnvctl.json("vm", "show", "PinnedVM")
    assert pinned["host"] == "CON-HyperV7" and pinned["mac"] == "00:15:5d:01:02:03"

    for name in ("PlacedVM", "PinnedVM"):
        assert hnvctl.ok("vm", "delete", name) == f"deleted VM {name}\n"
    assert {vm["name"] for vm in hnvctl.json("vm", "list")} == {"TenantVM01", "TenantVM02", "TenantVM03", "TenantVM04"}
    assert {l["address"] for l in hnvctl.json("ip", "list", "--kind", "CA")} == before


def test_a_tap_vm_shows_the_tap_to_give_the_hypervisor(hnvctl, ctl):
    """A real VM: --nic-kind tap and no --device; hnvctl says which tap the hypervisor
    must create (libvirt's <target dev/>, qemu's ifname=) and the host's state names it."""
    tap = naming.vm_tap("RealVM")
    out = hnvctl.ok("vm", "create", "RealVM", "--vm-network", "Fabrikam2", "--host", "CON-HyperV6",
                    "--nic-kind", "tap")
    assert out.rstrip().endswith(f", tap {tap}"), out
    assert f"TapDevice   : {tap}" in hnvctl.ok("vm", "show", "RealVM").splitlines()
    table = hnvctl.ok("vm", "list").splitlines()
    assert "TapDevice" in table[0].split() and [row for row in table if row.startswith("RealVM") and tap in row]
    state = parse_host_state(ctl.client_for("CON-HyperV6").get("/v1/hosts/CON-HyperV6/state").content)
    port = next(p for p in state.ports if p.name == "RealVM")
    assert (port.kind, port.device) == ("tap", tap)
    hnvctl.ok("vm", "set", "RealVM", "--device", "vnet-real")  # a name given wins
    assert hnvctl.json("vm", "show", "RealVM")["tap_device"] == "vnet-real"
    before = hnvctl.snapshot()
    code, out, err = hnvctl("vm", "set", "RealVM", "--device", "hnvb4242")
    assert code == 2 and out == "" and "device: hnvb4242 begins with hnv, which names openhnv's own devices" in err
    assert hnvctl.snapshot() == before
    assert hnvctl.ok("vm", "delete", "RealVM") == "deleted VM RealVM\n"


def test_apply_moves_a_vm_back_to_the_host_the_document_states(hnvctl):
    hnvctl.ok("vm", "migrate", "TenantVM01", "--host", "CON-HyperV7")
    out = hnvctl.ok("apply", "-f", str(SEED), "-f", str(TENANTS), "--dry-run")
    assert out.splitlines()[0] == "~ VM TenantVM01 (host: CON-HyperV7 -> CON-HyperV6)"
    assert hnvctl.json("vm", "show", "TenantVM01")["host"] == "CON-HyperV7"
    assert hnvctl.ok("apply", "-f", str(SEED), "-f", str(TENANTS)).splitlines()[0] == (
        "~ VM TenantVM01 (host: CON-HyperV7 -> CON-HyperV6)"
    )
    assert hnvctl.json("vm", "show", "TenantVM01")["host"] == "CON-HyperV6"
    wait_for_migrations(hnvctl)  # the tests after this one compare snapshots


def test_placement_refusal_names_the_reason(hnvctl):
    before = hnvctl.snapshot()
    code, out, err = hnvctl("vm", "create", "Stray", "--vm-network", "Fabrikam2", "--host", "CON-HyperV3")
    assert code == 2 and out == ""
    assert "CON-HyperV3" in one_line(err) and "Fabrikam2" in err
    assert hnvctl.snapshot() == before


def test_host_set_switch(hnvctl):
    out = hnvctl.ok(
        "host", "set-switch", "CON-HyperV5", "--logical-switch", "HostCluster", "--nic", "eth0", "--nic", "eth1",
        "--management-vm-network", "Management",
    )
    assert out.startswith("host CON-HyperV5: virtual switch HostCluster over eth0, eth1")
    assert hnvctl.ok("apply", "-f", str(SEED), "-f", str(TENANTS)).startswith("no changes")


# --- refusals: one line, exit 2, nothing changed ---------------------------------------------

BAD_DOCUMENTS = {
    "malformed": ("hosts: [{name: H\n", "line 2, column 1"),
    "unknown field": ("hostGroups: [{name: G, colour: red}]\n", "hostGroups[0].colour: unknown field"),
    "bad vlan": (
        "vmNetworks:\n  - name: T9\n    logicalNetwork: Tenants\n    isolation: VLAN\n"
        "    subnets: [{name: Default, prefix: 172.16.9.0/24, vlan: 5000}]\n",
        "vmNetworks[0].subnets[0].vlan: 5000 is out of range",
    ),
    "bad prefix": (
        "vmNetworks:\n  - name: F9\n    logicalNetwork: Virtualization\n"
        "    subnets: [{name: Default, prefix: 192.168.0.5/24}]\n",
        "vmNetworks[0].subnets[0].prefix: 192.168.0.5/24 has host bits set",
    ),
    # The rules across objects are the controller's; its refusal names the document's object.
    "missing reference": (
        "hostGroups: [{name: NewGroup}]\nvms: [{name: Lost, vmNetwork: Fabrikam9}]\n",
        "vms[0] (Lost): VM Lost: VM network Fabrikam9 does not exist: no VM network is called Fabrikam9 "
        "(field vms[0].vmNetwork)",
    ),
    "fixed field": (
        "logicalNetworks: [{name: Virtualization, networkVirtualization: true, encapsulation: vxlan}]\n",
        "logicalNetworks[0] (Virtualization): logical network Virtualization: encapsulation cannot be changed: "
        "only description, mtu can change",
    ),
    "isolation": (
        "vmNetworks: [{name: Fabrikam9, logicalNetwork: Management, isolation: WindowsNetworkVirtualization}]\n",
        "vmNetworks[0] (Fabrikam9): VM network Fabrikam9: logical network Management does not allow network "
        "virtualisation",
    ),
    "duplicate": (
        "hostGroups:\n  - {name: Twice}\n  - {name: Twice}\n",
        "hostGroups[1].name: host group Twice is already defined at",
    ),
    "key twice": ("hostGroups:\n  - name: G\n    name: H\n", "line 3, column 5: key 'name' is given twice"),
}


@pytest.mark.parametrize("name", BAD_DOCUMENTS)
def test_bad_documents_change_nothing(hnvctl, tmp_path, name):
    text, expected = BAD_DOCUMENTS[name]
    document = tmp_path / "fabric.yaml"
    document.write_text(text)
    before = hnvctl.snapshot()
    code, out, err = hnvctl("apply", "-f", str(document))
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith(f"hnvctl: {document}: ") and expected in line, line
    assert hnvctl.snapshot() == before


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["lookup-records", "--host", "CON-HyperV6", "--vsid", "4095"], "--vsid: VSID '4095' is not a number in 4096..16777214"),
        (["vm-subnet", "create", "Extra", "--vm-network", "TenantA", "--prefix", "172.16.100.0/24", "--vlan", "4095"], "--vlan: 4095 is out of range"),
        (["network-site", "create", "S9", "--logical-network", "Tenants", "--host-group", "HostCluster", "--subnet-vlan", "172.16.9.1/24:9"], "has host bits set"),
        (["vm-network", "delete", "Fabrikam2"], "VM network Fabrikam2"),
        (["vm", "create", "Nowhere", "--vm-network", "Fabrikam9"], "Fabrikam9"),
        (["logical-network", "set", "Virtualization", "--encapsulation", "vxlan"], "--encapsulation: encapsulation cannot change after create"),
        (["vm", "bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_commands_change_nothing(hnvctl, argv, expected):
    before = hnvctl.snapshot()
    code, out, err = hnvctl(*argv)
    assert code == 2 and out == ""
    assert expected in one_line(err)
    assert hnvctl.snapshot() == before


def test_a_refusal_in_the_middle_changes_nothing_and_names_the_object(hnvctl, tmp_path):
    """All or nothing: the third VM does not fit its pool of two addresses. Nothing of the
    document is created (not the VM network, its subnet, its pool, nor the first two VMs)
    and the refusal names the third VM where the document states it."""
    document = tmp_path / "fabric.yaml"
    document.write_text(
        "hostGroups: [{name: Midway}]\n"
        "vmNetworks:\n"
        "  - name: Small\n    logicalNetwork: Virtualization\n"
        "    subnets:\n      - name: Default\n        prefix: 10.9.0.0/24\n"
        "        ipPools: [{name: Default, rangeStart: 10.9.0.10, rangeEnd: 10.9.0.11}]\n"
        "vms:\n"
        "  - {name: Fits1, vmNetwork: Small, host: CON-HyperV6}\n"
        "  - {name: Fits2, vmNetwork: Small, host: CON-HyperV7}\n"
        "  - {name: TooMany, vmNetwork: Small, host: CON-HyperV6}\n"
    )
    before = hnvctl.snapshot()
    for dry_run in ((), ("--dry-run",)):  # a dry run refuses exactly as the real run
        code, out, err = hnvctl("apply", "-f", str(document), *dry_run)
        assert code == 2 and out == ""
        line = one_line(err)
        assert line.startswith(f"hnvctl: {document}: vms[2] (TooMany): "), line
        assert "IP pool Small/Default/Default is exhausted" in line and line.endswith("(field vms[2].ca)"), line
        assert hnvctl.snapshot() == before
    assert "Small" not in {n["name"] for n in hnvctl.json("vm-network", "list")}
    assert "Midway" not in {g["name"] for g in hnvctl.json("host-group", "list")}


def test_a_refusal_in_a_second_file_names_that_file(hnvctl, tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("hostGroups: [{name: FirstFile}]\nvms: [{name: Fine, vmNetwork: Fabrikam2, host: CON-HyperV6}]\n")
    second.write_text("vms: [{name: Stray, vmNetwork: Fabrikam2, host: CON-HyperV3}]\n")
    before = hnvctl.snapshot()
    code, out, err = hnvctl("apply", "-f", str(first), "-f", str(second))
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith(f"hnvctl: {second}: vms[0] (Stray): "), line
    assert "CON-HyperV3" in line and "(field vms[0].host)" in line
    assert hnvctl.snapshot() == before


def test_dry_run_answers_the_real_runs_change_list(hnvctl, tmp_path):
    document = tmp_path / "fabric.yaml"
    document.write_text(
        "hostGroups: [{name: Rehearsed, description: first}]\n"
        "logicalNetworks: [{name: Virtualization, mtu: 1400}]\n"
        "vms: [{name: TenantVM02, vmNetwork: Fabrikam2, host: CON-HyperV6}]\n"
    )
    before = hnvctl.snapshot()
    planned = hnvctl.json("apply", "-f", str(document), "--dry-run")
    assert planned["dry_run"] is True and planned["applied"] is False
    assert hnvctl.snapshot() == before
    done = hnvctl.json("apply", "-f", str(document))
    assert done["applied"] is True and done["changes"] == planned["changes"]
    assert [c["summary"] for c in done["changes"]] == [
        "+ host group Rehearsed",
        "~ logical network Virtualization (mtu: 1500 -> 1400)",
        "~ VM TenantVM02 (host: CON-HyperV7 -> CON-HyperV6)",
    ]
    assert done["changes"][1]["fields"] == [{"field": "mtu", "before": 1500, "after": 1400}]
    assert hnvctl.json("vm", "show", "TenantVM02")["host"] == "CON-HyperV6"
    assert hnvctl.ok("apply", "-f", str(document)).startswith("no changes")
    document.write_text("logicalNetworks: [{name: Virtualization, mtu: 1500}]\n"
                        "vms: [{name: TenantVM02, vmNetwork: Fabrikam2, host: CON-HyperV7}]\n")
    hnvctl.ok("apply", "-f", str(document))
    wait_for_migrations(hnvctl)  # back where it was, every stage: tests after this one read its records
    assert hnvctl.ok("host-group", "delete", "Rehearsed") == "deleted host group Rehearsed\n"


def test_prune_deletes_what_the_documents_omit_children_first(hnvctl):
    hnvctl.ok("host-group", "create", "Doomed")
    hnvctl.ok("host-group", "create", "DoomedChild", "--parent", "Doomed")
    out = hnvctl.ok("apply", "-f", str(SEED), "-f", str(TENANTS), "--prune")
    assert out.splitlines() == [
        "- host group DoomedChild",
        "- host group Doomed",
        f"applied 2 changes from {SEED}, {TENANTS}",
    ]
    assert not {"Doomed", "DoomedChild"} & {g["name"] for g in hnvctl.json("host-group", "list")}


def test_the_yaml_and_the_python_builder_describe_the_same_seed(tmp_path):
    """tests/lib/seed_fabric.py builds the seed through the API for other tests; the
    examples describe the same seed. On a fabric the builder made, apply may only add
    what the builder leaves out (the MANAGEMENT cluster, CON-HyperV1/2/5), never update."""
    with LiveController(tmp_path / "state") as live:
        build_seed_fabric(live.admin)
        add_tenants(live.admin)
        code, out, err = Hnvctl(live)("apply", "-f", str(SEED), "-f", str(TENANTS), "--dry-run")
    assert code == 0, err
    assert out.splitlines()[-1].startswith("dry run: ") and ", 0 to update, 0 to delete;" in out
    assert all(line.startswith("+ ") for line in out.splitlines()[:-1])


def test_unreachable_controller_is_exit_1(hnvctl):
    code, out, err = hnvctl("hosts", controller=f"http://127.0.0.1:{free_port()}")
    assert code == 1 and out == ""
    assert "connection refused" in one_line(err)


def test_missing_token_is_refused_by_the_controller(ctl):
    out, err = io.StringIO(), io.StringIO()
    code = main(["hosts"], stdout=out, stderr=err, environ={"HNV_CONTROLLER": ctl.base_url})
    assert code == 2 and "token" in one_line(err.getvalue()).lower()


# --- output ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["hosts"],
        ["ip", "list"],
        ["lookup-records", "--host", "CON-HyperV7"],
        ["vm", "list"],
        ["vm", "show", "TenantVM01"],
        ["host-group", "list"],
        ["cluster", "list"],
        ["logical-network", "list"],
        ["network-site", "list"],
        ["ip-pool", "list"],
        ["ip-pool", "show", "Fabrikam2/Default/Default"],
        ["uplink-port-profile", "list"],
        ["logical-switch", "list"],
        ["vm-network", "list"],
        ["vm-subnet", "show", "Fabrikam3/Default"],
        ["apply", "-f", str(SEED), "--dry-run"],
    ],
)
def test_json_output_parses(hnvctl, argv):
    assert hnvctl.json(*argv) is not None


def test_tables_are_aligned(hnvctl):
    lines = hnvctl.ok("vm", "list").splitlines()
    header, dashes = lines[0], lines[1]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    assert [i for i, c in enumerate(dashes) if c == "-" and (i == 0 or dashes[i - 1] == " ")] == starts
    for row in lines[2:]:
        for start in starts[1:]:
            assert row[start - 1] == " ", row  # every column starts where its header does


def test_hostile_status_text_never_reaches_the_terminal_raw(hnvctl, ctl):
    """A host writes escape sequences into its status (through the real API, with its own
    token): erase the line and rewrite it as InSync, retitle the window (OSC), reverse
    the text (U+202E). `hnvctl hosts` shows them escaped, in the table and in JSON."""
    hostile = "\x1b[2K\rCON-HyperV6 InSync \x1b]0;owned\x07 \u202etxet\u2028end"
    desired = hnvctl.json("host", "show", "CON-HyperV6")["desired_generation"]
    answer = ctl.client_for("CON-HyperV6").put(
        "/v1/hosts/CON-HyperV6/status",
        json={"generation": desired, "agent": "test",
              "errors": [{"kind": "link", "object": "hnv-team", "errno": 1, "message": hostile}]},
    )
    assert answer.status_code == 200, answer.text
    assert {h["name"]: h["reason"] for h in hnvctl.json("hosts")}["CON-HyperV6"] == f"hnv-team: {hostile}"
    for argv in (["hosts"], ["host", "show", "CON-HyperV6"], ["-o", "json", "hosts"]):
        out = hnvctl.ok(*argv)
        assert not any(c in out for c in "\x1b\x07\r\u202e\u2028"), (argv, out)
    table = hnvctl.ok("hosts")
    row = next(line for line in table.splitlines() if line.startswith("CON-HyperV6 "))
    assert row.split()[2] == "Error"  # the row still says what the controller says
    assert "\\x1b[2K\\rCON-HyperV6 InSync \\x1b]0;owned\\x07 \\u202etxet\\u2028end" in row
    # An error line quoting a hostile name is escaped too.
    code, out, err = hnvctl("vm", "show", "evil\x1b[2J\u202e")
    assert code == 2 and out == "" and not any(c in err for c in "\x1b\u202e"), err
    hnvctl.ctl.client_for("CON-HyperV6").put(
        "/v1/hosts/CON-HyperV6/status", json={"generation": desired, "agent": "test", "errors": []})


def test_console_script_runs_as_a_process(hnvctl, ctl):
    env = {**os.environ, "HNV_CONTROLLER": ctl.base_url, "HNV_TOKEN_FILE": str(ctl.state_dir / "admin.token")}
    result = subprocess.run(
        [sys.executable, "-m", "controller.hnvctl", "-o", "json", "vm-network", "list"],
        cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert {"Fabrikam2", "Fabrikam3", "Management", "Virtualization"} <= {n["name"] for n in json.loads(result.stdout)}
