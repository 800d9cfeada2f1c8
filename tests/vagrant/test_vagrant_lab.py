"""The Vagrant lab end to end: two VIRTUALCLUSTER hosts in sync, tenant pings across them in NVGRE.

One lab for the session (``vagrant_lab`` in conftest). What a user of the Vagrant lab
checks after ``vagrant up`` and the tenants' provisioning: ``hnvctl hosts`` on the
management node shows both hosts InSync, a tenant VM pings its peer on the other host,
and on the trunk (the libvirt network's bridge on this machine, the "physical switch")
the ping travels inside GRE on the transport VLAN with the key VSID << 8.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from netns_lab.multivm import ping_summary
from netns_lab.tcpdump import tcpdump_argv
from tests.lib.nvgre import tenant_flows_on_trunk
from tests.vagrant.conftest import LIBVIRT_URI, VagrantLab

CONTROLLER = "CON-HyperV1"
HOSTS = ("CON-HyperV3", "CON-HyperV4")
TRUNK_NETWORK = "hnv-trunk"  # the Vagrantfile's
TRANSPORT_VLAN = 802
HNVCTL = (". /etc/openhnv/controller.env && HNV_CONTROLLER=https://$HNV_LISTEN "
          "HNV_TOKEN_FILE=/root/.hnv-admin.token HNV_CA_FILE=/etc/openhnv/controller-ca.crt hnvctl")


def hnvctl(lab: VagrantLab, args: str) -> str:
    done = lab.ssh(CONTROLLER, f"sudo sh -c '{HNVCTL} {args}'")
    assert done.returncode == 0, f"hnvctl {args}: {done.stdout}{done.stderr}"
    return done.stdout


def _rows(text: str) -> list[dict]:
    data = json.loads(text)
    return data if isinstance(data, list) else data.get("items", [])


def wait_for(what: str, probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer := probe():
            return answer
        time.sleep(5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def tenants(vagrant_lab: VagrantLab) -> dict[str, dict]:
    done = vagrant_lab.vagrant("provision", CONTROLLER, "--provision-with", "tenants", timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    vms = {vm["name"]: vm for vm in _rows(hnvctl(vagrant_lab, "vm list -o json"))}
    assert {"TenantVM01", "TenantVM02", "TenantVM03", "TenantVM04"} <= set(vms), vms
    return vms


def _ca(vm: dict) -> str:
    return str(vm["ca"]).split("/")[0]


def test_both_hosts_come_up_in_sync(vagrant_lab, tenants):
    def in_sync():
        rows = {row["name"]: row for row in _rows(hnvctl(vagrant_lab, "hosts -o json"))}
        return all("InSync" in json.dumps(rows.get(host)) for host in HOSTS) and rows

    rows = wait_for("both hosts InSync", in_sync, timeout=900)
    for host in HOSTS:
        assert "InSync" in json.dumps(rows[host]), rows[host]
    for host in HOSTS:
        active = vagrant_lab.ssh(host, "systemctl is-active hnv-agent")
        assert active.stdout.strip() == "active", (host, active.stdout, active.stderr)


def test_tenant_pings_cross_the_hosts_inside_nvgre(vagrant_lab, tenants, tmp_path):
    bridge = subprocess.run(["virsh", "-c", LIBVIRT_URI, "net-info", TRUNK_NETWORK], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    bridge = next(line.split()[-1] for line in bridge.splitlines() if line.startswith("Bridge:"))
    pcap = tmp_path / "trunk.pcap"
    capture = subprocess.Popen(tcpdump_argv(bridge, pcap, "vlan"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    results = {}
    try:
        for network in ("Fabrikam2", "Fabrikam3"):
            pair = sorted((name, vm) for name, vm in tenants.items() if vm["vm_network"] == network)
            local, peer = pair[0], pair[1]
            assert local[1]["host"] != peer[1]["host"], (local, peer)
            host, ca = local[1]["host"], _ca(peer[1])
            # The first reply may wait for the agents to have the records: bounded, then 5 in a row.
            first = vagrant_lab.ssh(host, f"sudo ip netns exec {local[0]} ping -c 1 -W 2 -w 120 {ca}", timeout=300)
            assert first.returncode == 0, (local[0], ca, first.stdout, first.stderr)
            out = vagrant_lab.ssh(host, f"sudo ip netns exec {local[0]} ping -c 5 -i 0.2 -W 2 {ca}", timeout=300)
            summary = ping_summary(out.stdout)
            print(f"ping {local[0]} ({host}) -> {peer[0]} ({peer[1]['host']}, {ca}): "
                  f"{summary['received']}/{summary['transmitted']}")
            assert summary["received"] == summary["transmitted"] == 5, (summary, out.stdout)
            results[network] = (_ca(local[1]), ca)
    finally:
        capture.terminate()
        capture.wait(30)
    seen = tenant_flows_on_trunk([pcap], TRANSPORT_VLAN)
    # Both tenants' pings inside GRE, each in its own VSID (same CAs, different keys).
    for network, pair in results.items():
        assert any(pair in flows for flows in seen.values()), (network, pair, seen)
    assert len(seen) >= 2, seen
    print("NVGRE on the trunk (VLAN 802): " + ", ".join(f"VSID {v} key {v << 8:#x}" for v in sorted(seen)))
