"""The Vagrant box made from the project's host image, for the libvirt provider.

Owns turning the host image's Vagrant flavour (``netns_lab.hostimage --flavour vagrant``:
the lab hosts' Debian 12 plus sshd, sudo and the ``vagrant`` user) into a box and adding
it to Vagrant as ``openhnv/host``, the box the Vagrant lab runs with
(``HNV_BOX=openhnv/host``, docs/lab.md "The Vagrant lab"). Nothing is downloaded: the
image is built from Debian's packages like the lab's, and the box from the image.

The box (vagrant-libvirt's format, a tar of three files):

- ``box.img``: the image's raw ext4 disk converted to qcow2 (``qemu-img convert``; the
  provider makes one copy-on-write volume per machine on top of it);
- ``metadata.json``: provider, format, size, and ``openhnv_image`` (the image's recipe
  digest), by which a later build knows whether the box Vagrant holds is this one;
- ``Vagrantfile``: boots the image's own kernel directly, since the image is a bare root
  file system without a boot loader. libvirt's qemu must be able to read the kernel and
  initrd, so they are copied under ``/var/lib/libvirt/boot/``. The emulated CPU (driver
  ``qemu``) unless KVM is asked for with ``OPENHNV_VM_KVM=1``, as for the project's other
  VMs (``netns_lab.vm.kvm_usable`` says why it is opt-in).

The box's identity is the image's recipe digest and a digest of the box Vagrantfile
(``openhnv_image`` in its metadata): change either and the next build makes and adds a
new box.

It must not know about the lab's machines, fabrics or provisioning: those belong to the
project's Vagrantfile and ``vagrant/``.

    python -m netns_lab.vagrantbox build     # build (or find) the box, add it, print its name
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from netns_lab import hostimage
from netns_lab.vm import KVM_ENV

BOX_NAME = "openhnv/host"
LIBVIRT_BOOT = Path("/var/lib/libvirt/boot")
VIRTUAL_SIZE_GB = int(hostimage.IMAGE_SIZE.removesuffix("G"))

BOX_VAGRANTFILE = """\
# openhnv's host image as a Vagrant box (netns_lab.vagrantbox): Debian's kernel booted
# directly, the image being a bare ext4 root without a boot loader.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    # KVM only when asked, as for every VM of the project (netns_lab.vm.kvm_usable):
    # /dev/kvm can be there and open on hosts where a guest then never boots.
    lv.driver = ENV["{kvm_env}"] == "1" ? "kvm" : "qemu"   # qemu: emulated CPU
    lv.kernel = "{kernel}"
    lv.initrd = "{initrd}"
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
    lv.disk_bus = "virtio"
  end
end
"""


class BoxUnavailable(RuntimeError):
    """The box cannot be built or added here; the message says what is missing."""


def missing_tools() -> list[str]:
    lacking = [f"{tool} (Debian package {package})" for tool, package in
               (("vagrant", "vagrant"), ("qemu-img", "qemu-utils"))
               if shutil.which(tool) is None]
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True,
                             timeout=120, check=False) if not lacking else None
    if plugins is not None and "vagrant-libvirt" not in plugins.stdout:
        lacking.append("the vagrant-libvirt plugin (Debian package vagrant-libvirt)")
    return lacking


def _vagrant_home() -> Path:
    return Path(os.environ.get("VAGRANT_HOME", Path.home() / ".vagrant.d"))


def added_image() -> str | None:
    """The image digest of the ``openhnv/host`` box Vagrant holds (None: none, or not ours)."""
    for metadata in (_vagrant_home() / "boxes" / BOX_NAME.replace("/", "-VAGRANTSLASH-")).glob(
            "*/libvirt/metadata.json"):
        try:
            return json.loads(metadata.read_text()).get("openhnv_image")
        except (OSError, ValueError):
            return None
    return None


def box_identity(image: hostimage.HostImage) -> str:
    """The image's recipe digest and the box Vagrantfile's: what a box is made of."""
    return f"{image.directory.name}-{hashlib.sha256(BOX_VAGRANTFILE.encode()).hexdigest()[:8]}"


def build_box(image: hostimage.HostImage) -> Path:
    """The box file of ``image`` (made next to it the first time)."""
    identity = box_identity(image)
    box = image.directory / f"openhnv-host-{identity}.box"
    if box.is_file():
        return box
    digest = image.directory.name
    boot = LIBVIRT_BOOT / f"openhnv-{digest}"
    boot.mkdir(parents=True, exist_ok=True)
    shutil.copy(image.kernel, boot / hostimage.KERNEL_FILE)
    shutil.copy(image.initrd, boot / hostimage.INITRD_FILE)
    work = image.directory / "box.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image.disk), str(work / "box.img")],
                       check=True, capture_output=True, timeout=1800)
        (work / "metadata.json").write_text(json.dumps(
            {"provider": "libvirt", "format": "qcow2", "virtual_size": VIRTUAL_SIZE_GB,
             "openhnv_image": identity}) + "\n")
        (work / "Vagrantfile").write_text(BOX_VAGRANTFILE.format(
            kernel=boot / hostimage.KERNEL_FILE, initrd=boot / hostimage.INITRD_FILE, kvm_env=KVM_ENV))
        partial = work / box.name
        with tarfile.open(partial, "w") as tar:
            for name in ("metadata.json", "Vagrantfile", "box.img"):
                tar.add(work / name, arcname=name)
        partial.rename(box)  # atomic: a half-written box is never found
    except subprocess.CalledProcessError as exc:
        raise BoxUnavailable(f"qemu-img convert failed: {exc.stderr.decode(errors='replace')[-500:]}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return box


def ensure_box() -> str:
    """Build the image and the box if needed, add the box to Vagrant unless it holds this
    one already; return the box's name."""
    if lacking := missing_tools():
        raise BoxUnavailable("cannot make the Vagrant box: missing " + "; ".join(lacking))
    try:
        image = hostimage.cached_image(flavour="vagrant")
    except hostimage.ImageUnavailable as exc:
        raise BoxUnavailable(str(exc)) from None
    if added_image() == box_identity(image):
        return BOX_NAME
    box = build_box(image)
    added = subprocess.run(["vagrant", "box", "add", "--force", "--name", BOX_NAME, str(box)],
                           capture_output=True, text=True, timeout=1800, check=False)
    if added.returncode != 0:
        raise BoxUnavailable(f"vagrant box add failed: {(added.stderr or added.stdout)[-500:]}")
    return BOX_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns_lab.vagrantbox", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build"])
    parser.parse_args(argv)
    try:
        print(ensure_box())
    except BoxUnavailable as exc:
        print(f"vagrantbox: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
