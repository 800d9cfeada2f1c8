"""The Vagrant lab: the Vagrantfile validates (and a broken one does not), its machines
follow the size variables, and the fabric it applies is one the controller accepts.

``vagrant validate`` runs against the libvirt provider's configuration through libvirt's
built-in test driver (``test:///default``: no daemon, no VM), so the provider block is
checked too, not skipped. VirtualBox's block can only be checked where VirtualBox is
installed. Each vagrant call costs a few seconds of Ruby start-up; there are few.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from controller.fabric import Fabric
from controller.fabric_document import apply_document, read_document

CHECKOUT = Path(__file__).resolve().parents[2]

# vagrant/ is provisioning material, not a package: load the script by its path.
_spec = importlib.util.spec_from_file_location("vagrant_lab_fabric", CHECKOUT / "vagrant" / "lab_fabric.py")
lab_fabric_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab_fabric_module)
HostTableError = lab_fabric_module.HostTableError
lab_fabric = lab_fabric_module.lab_fabric
lab_tenants = lab_fabric_module.lab_tenants
parse_host_table = lab_fabric_module.parse_host_table


def _vagrant() -> str:
    found = shutil.which("vagrant")
    if not found:
        pytest.fail("vagrant is missing: install Debian's vagrant and vagrant-libvirt packages "
                    "(make setup)", pytrace=False)
    return found


def _lab_copy(directory: Path) -> Path:
    """The Vagrantfile and its provisioning scripts, where vagrant may write .vagrant/."""
    shutil.copy(CHECKOUT / "Vagrantfile", directory / "Vagrantfile")
    shutil.copytree(CHECKOUT / "vagrant", directory / "vagrant")
    return directory


def _run_vagrant(directory: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HNV_", "VAGRANT_"))},
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "HNV_LIBVIRT_URI": "test:///default",
        "VAGRANT_HOME": str(directory / ".vagrant.d"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        **env,
    }
    return subprocess.run([_vagrant(), *args], cwd=directory, env=environment,
                          capture_output=True, text=True, check=False, timeout=120)


def test_vagrantfile_validates(tmp_path):
    result = _run_vagrant(_lab_copy(tmp_path), "validate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully" in result.stdout


def test_a_broken_vagrantfile_fails_validation(tmp_path):
    # Two breakages in one copy (each vagrant call costs seconds): vagrant reports every
    # problem of every machine, so both must be named.
    directory = _lab_copy(tmp_path)
    vagrantfile = directory / "Vagrantfile"
    text = vagrantfile.read_text()
    for old, new in (("lv.nic_model_type", "lv.nic_model_typo"),
                     ("vagrant/provision-agent.sh", "vagrant/provision-agnt.sh")):
        assert old in text
        text = text.replace(old, new)
    vagrantfile.write_text(text)
    result = _run_vagrant(directory, "validate")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "shouldn't exist: nic_model_typo" in output
    assert "provision-agnt.sh" in output and "does not exist" in output


def test_a_bad_size_variable_is_refused_with_its_name(tmp_path):
    result = _run_vagrant(_lab_copy(tmp_path), "validate", HNV_VIRTUALCLUSTER_COUNT="two")
    assert result.returncode != 0
    assert 'HNV_VIRTUALCLUSTER_COUNT="two": must be a whole number from 0 to 40' in result.stderr


def test_machines_follow_the_cluster_counts(tmp_path):
    result = _run_vagrant(_lab_copy(tmp_path), "status", "--machine-readable",
                          HNV_HOSTCLUSTER_COUNT="1", HNV_VIRTUALCLUSTER_COUNT="3")
    assert result.returncode == 0, result.stderr
    machines = [line.split(",")[1] for line in result.stdout.splitlines() if ",state," in line]
    # Management node first, then HOSTCLUSTER from 3, then VIRTUALCLUSTER after it.
    assert machines == ["CON-HyperV1", "CON-HyperV3", "CON-HyperV4", "CON-HyperV5", "CON-HyperV6"]


# --- the fabric the management node applies ---------------------------------------------

TABLE = ("CON-HyperV1=MANAGEMENT=10.0.0.11,CON-HyperV3=HOSTCLUSTER=10.0.0.13,"
         "CON-HyperV4=VIRTUALCLUSTER=10.0.0.14,CON-HyperV5=VIRTUALCLUSTER=10.0.0.15,"
         "CON-HyperV6=VIRTUALCLUSTER=10.0.0.16")


def _seed(name: str) -> dict:
    return yaml.safe_load((CHECKOUT / "examples" / name).read_text())


def test_lab_fabric_and_tenants_are_documents_the_controller_accepts(tmp_path):
    hosts = parse_host_table(TABLE)
    fabric = lab_fabric(_seed("seed-fabric.yaml"), hosts)
    tenants = lab_tenants(_seed("seed-tenants.yaml"), hosts)
    together = {**fabric, "vmNetworks": fabric["vmNetworks"] + tenants["vmNetworks"],
                "vms": tenants["vms"]}
    # The controller's own rules, on an empty fabric: a dry run of the apply accepts it all.
    controller = Fabric.open(tmp_path)
    try:
        changes = apply_document(controller, read_document(yaml.safe_load(yaml.safe_dump(together))), dry_run=True)
    finally:
        controller.store.close()
    assert changes and {change.action for change in changes} == {"create"}
    assert [h["name"] for h in fabric["hosts"]] == [h["name"] for h in hosts]
    assert {h["managementAddress"] for h in fabric["hosts"]} >= {"10.0.0.11/24", "10.0.0.16/24"}
    assert all(h["nics"] == ["trunk0", "trunk1"] for h in fabric["hosts"])
    # One VM per network-virtualised VM network on every VIRTUALCLUSTER host.
    placed = sorted((vm["vmNetwork"], vm["host"]) for vm in tenants["vms"])
    assert placed == sorted((net, host) for net in ("Fabrikam2", "Fabrikam3")
                            for host in ("CON-HyperV4", "CON-HyperV5", "CON-HyperV6"))


def test_default_sizes_reproduce_the_seed_tenants_exactly():
    hosts = parse_host_table("CON-HyperV1=MANAGEMENT=10.0.0.11,CON-HyperV6=VIRTUALCLUSTER=10.0.0.16,"
                             "CON-HyperV7=VIRTUALCLUSTER=10.0.0.17")
    assert lab_tenants(_seed("seed-tenants.yaml"), hosts)["vms"] == _seed("seed-tenants.yaml")["vms"]


@pytest.mark.parametrize(("table", "reason"), [
    ("CON-HyperV1=MANAGEMENT", "hosts[0]: 'CON-HyperV1=MANAGEMENT' is not name=cluster=address"),
    ("A=MANAGEMENT=10.0.0.1,A=MANAGEMENT=10.0.0.2", "hosts: A is listed twice"),
    ("", "hosts: the table is empty"),
])
def test_a_bad_host_table_is_refused_with_the_entry(table, reason):
    with pytest.raises(HostTableError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_host_table(table)


def test_a_cluster_unknown_to_the_seed_is_refused():
    with pytest.raises(HostTableError, match=r"hosts\[0\].cluster: EDGE has no host in the seed"):
        lab_fabric(_seed("seed-fabric.yaml"), parse_host_table("X=EDGE=10.0.0.9"))
