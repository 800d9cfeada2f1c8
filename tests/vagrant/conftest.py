"""vagrant tier: the project's Vagrantfile brought up with vagrant-libvirt, one lab per session.

What docs/lab.md "The Vagrant lab" tells a user to type, run as typed: ``vagrant up
--provider libvirt`` with the box made from the project's host image
(``netns_lab.vagrantbox``: nothing downloaded), the management node and two
VIRTUALCLUSTER hosts, then ``vagrant provision CON-HyperV1 --provision-with tenants``.
The project is copied to a scratch directory first (Vagrant keeps its machines in the
project's ``.vagrant/``, and the provisioning installs from a wheelhouse made there,
since the guests have no way to PyPI), and every machine is destroyed at the end.

Needs root, libvirt (``make vagrant`` installs libvirt-daemon-system; libvirtd is
started here when it is not running) and what the host image needs. When something is
missing, every test is skipped with the reason: the summary says SKIP, never PASS.
Under an emulated CPU (no KVM) the three machines take 10-20 minutes to come up, which
is why this tier is not part of ``make test``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netns_lab import vagrantbox, vm

CHECKOUT = Path(__file__).resolve().parents[2]
LIBVIRT_URI = "qemu:///system"
# The management node and two VIRTUALCLUSTER hosts (names follow the Vagrantfile's
# numbering with no HOSTCLUSTER host: CON-HyperV1, CON-HyperV3, CON-HyperV4).
SIZES = {"HNV_HOSTCLUSTER_COUNT": "0", "HNV_VIRTUALCLUSTER_COUNT": "2"}
UP_TIMEOUT = 3600.0


@dataclass
class VagrantLab:
    project: Path
    env: dict[str, str]

    def vagrant(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
        return subprocess.run(["vagrant", *args], cwd=self.project, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def ssh(self, machine: str, command: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return self.vagrant("ssh", machine, "-c", command, "--", "-q", timeout=timeout)


def _libvirt_answers() -> bool:
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, "version"], capture_output=True,
                          timeout=60, check=False).returncode == 0


def ensure_libvirtd() -> str | None:
    """None when libvirt answers (started here if needed), else why not."""
    if shutil.which("virsh") is None or shutil.which("libvirtd") is None:
        return "libvirt is not installed (make vagrant installs libvirt-daemon-system)"
    if _libvirt_answers():
        return None
    # A machine without systemd as PID 1 (a container) has nothing to start them: the
    # daemons' own --daemon mode, as their units would.
    for daemon in ("virtlogd", "libvirtd"):
        if shutil.which(daemon) and subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode:
            subprocess.run([daemon, "--daemon"], check=False, timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _libvirt_answers():
            return None
        time.sleep(0.5)
    return f"libvirtd does not answer on {LIBVIRT_URI}"


def _copy_project(target: Path) -> None:
    """The checkout's tracked files (what a user's clone has), and a wheelhouse of the
    project and its dependencies for the guests' pip."""
    files = subprocess.run(["git", "-C", str(CHECKOUT), "ls-files", "-z"], capture_output=True,
                           check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, files):
        source = CHECKOUT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(target / "wheelhouse"),
                    str(target)], check=True, timeout=1800)


@pytest.fixture(scope="session")
def vagrant_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VagrantLab]:
    if FAILED_UP:
        pytest.fail(FAILED_UP[0], pytrace=False)
    if os.geteuid() != 0:
        pytest.skip("the vagrant tier needs root (libvirt's system instance, the image build)")
    if vm.in_vm():
        pytest.skip("the vagrant tier boots its own VMs from the machine, not inside a lab VM")
    if why := ensure_libvirtd():
        pytest.skip(why)
    try:
        box = vagrantbox.ensure_box()
    except vagrantbox.BoxUnavailable as exc:
        pytest.skip(f"no Vagrant box: {exc}")
    project = tmp_path_factory.mktemp("vagrant-project")
    _copy_project(project)
    env = {**os.environ, **SIZES, "HNV_BOX": box, "VAGRANT_DEFAULT_PROVIDER": "libvirt",
           "HNV_LIBVIRT_URI": LIBVIRT_URI}
    consoles = project / "console"
    consoles.mkdir()
    consoles.chmod(0o777)  # written by libvirt's qemu user
    lab = VagrantLab(project, {**env, "HNV_CONSOLE_DIR": str(consoles)})
    try:
        started = time.monotonic()
        up = lab.vagrant("up", "--provider", "libvirt", timeout=UP_TIMEOUT)
        (project / "vagrant-up.log").write_text(up.stdout + up.stderr)
        if up.returncode != 0:
            tails = "".join(f"\n--- console of {log.stem} (last lines) ---\n" +
                            "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                            for log in sorted(consoles.glob("*.log")))
            FAILED_UP.append(f"vagrant up failed after {time.monotonic() - started:.0f} s (log: "
                             f"{project / 'vagrant-up.log'}):\n{(up.stdout + up.stderr)[-3000:]}{tails}")
            pytest.fail(FAILED_UP[0], pytrace=False)
        print(f"vagrant up: {time.monotonic() - started:.0f} s")
        yield lab
    finally:
        lab.vagrant("destroy", "--force", timeout=900)


# A session fixture that failed is set up again for the next test that uses it: once
# is enough for machines that take minutes each, so later tests fail with the first reason.
FAILED_UP: list[str] = []
