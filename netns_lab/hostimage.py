"""The lab's host image: Debian 12 with systemd, built from Debian's packages, cached.

Owns the recipe of the disk image the booted-host lab (``netns_lab.bootlab``) boots one
VM per host from, and building it: ``mmdebstrap`` installs the packages below from the
Debian mirror this machine's apt already uses (``/etc/apt/sources.list.d/debian.sources``
or ``/etc/apt/sources.list``; nothing else is downloaded), the customisation below is
written into the tree, and ``mkfs.ext4 -d`` turns the tree into a raw ext4 disk image.
The image's own kernel and initrd (Debian's ``linux-image-amd64``, whose modules are in
the image) are copied next to it for qemu's direct kernel boot.

The result is cached outside the checkout, in ``/var/cache/openhnv/images/<digest>/``,
where ``<digest>`` is a SHA-256 of the recipe (suite, packages, every file written into
the tree, the mirror's sources): change the recipe and the next run builds a new image;
leave it and every run boots the cached one. Guests boot it copy-on-write (qemu's
``snapshot=on``), so the cached image is never written to.

What is in the tree besides the packages is the least a lab host needs that a real host
gets from its installer, and nothing of openhnv (the tier installs openhnv as docs/operating.md's
"Installing on a host" says, on the booted host):

- its identity from the kernel command line: ``systemd.hostname=``, ``systemd.machine_id=``
  (udev derives the MACs of bonds and bridges from the machine-id, so hosts must not
  share one), NICs named ``eth0``, ``eth1`` in PCI order (``net.ifnames=0``);
- ``hnv-lab-network.service``: the management address (``hnv.address=`` on the command
  line) on eth0, both NICs up: what /etc/network/interfaces does on an installed host;
- ``hnv-lab-runner.service``: the lab's stand-in for an operator's shell. It runs the
  command files the test host drops into the 9p share ``lab`` (mounted at ``/lab``) and
  writes their output and exit status back there;
- the 9p share ``media`` (read-only, at ``/media/openhnv``): the installation media;
- no apt timers (the guests have no network beyond the lab's), no getty to spend CPU on.

It must not know about hosts, fabrics or openhnv's units: those belong to bootlab and
the install commands.

    python -m netns_lab.hostimage build     # build (or find) the image, print its path
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("OPENHNV_IMAGE_CACHE", "/var/cache/openhnv/images"))
SUITE = "bookworm"
# Debian 12 with systemd as PID 1, what the project needs on a host (iproute2, python3,
# python3-venv and python3-pip for the install, kmod for the data plane's modules) and what an
# operator checks with (tcpdump, ping, ps); Debian's kernel, whose modules must be in the
# image. dbus: systemctl and journalctl work without it, hostnamectl and friends do not.
# dnsmasq-base and nftables: the agent's DHCP servers and their guard (agent.dhcp).
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod",
    "iproute2", "iputils-ping", "tcpdump", "procps", "dnsmasq-base", "nftables",
    "python3", "python3-venv", "python3-pip",
    "linux-image-amd64", "initramfs-tools", "zstd",
)
IMAGE_SIZE = "3G"  # sparse; the tree is ~0.9 GB, the rest holds the venv and logs
IMAGE_FILE = "rootfs.img"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
RECIPE_FILE = "recipe.json"
LAB_SHARE = "lab"
MEDIA_SHARE = "media"
MEDIA_MOUNT = "/media/openhnv"
LAB_MOUNT = "/lab"

# Files written into the tree (path -> (mode, content)). Part of the recipe digest.
FILES: dict[str, tuple[int, str]] = {
    "/etc/fstab": (0o644, f"""\
# openhnv lab host: the root is the virtio disk (mounted rw by the kernel); the lab's
# shares are 9p over virtio. nofail: a host booted without the shares still boots.
{LAB_SHARE} {LAB_MOUNT} 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0
{MEDIA_SHARE} {MEDIA_MOUNT} 9p trans=virtio,version=9p2000.L,msize=262144,ro,nofail 0 0
"""),
    "/usr/local/sbin/hnv-lab-network": (0o755, """\
#!/bin/sh
# The management address from the kernel command line (hnv.address=A/LEN) on eth0 and
# every NIC up: a freshly installed host before openhnv's agent teams its NICs.
set -e
for nic in /sys/class/net/eth*; do ip link set "${nic##*/}" up; done
for word in $(cat /proc/cmdline); do
    case $word in hnv.address=*) ip addr replace "${word#hnv.address=}" dev eth0 ;; esac
done
"""),
    "/etc/systemd/system/hnv-lab-network.service": (0o644, """\
[Unit]
Description=openhnv lab: management address from the kernel command line
DefaultDependencies=no
After=systemd-udev-settle.service systemd-udevd.service sys-subsystem-net-devices-eth0.device
Wants=sys-subsystem-net-devices-eth0.device
Before=network.target network-online.target
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/hnv-lab-network

[Install]
WantedBy=network-online.target multi-user.target
"""),
    "/usr/local/sbin/hnv-lab-runner": (0o755, f"""\
#!/usr/bin/python3
# The lab's stand-in for an operator's shell: runs every {LAB_MOUNT}/cmd/NAME.sh once, as
# root, in the background (a long ping and a restart run side by side), writing
# NAME.out (stdout and stderr) and then NAME.rc (the exit status) next to it.
# Python rather than a shell loop: polling forks nothing, so it costs the vCPU ~nothing.
import os, subprocess, threading, time

os.chdir("{LAB_MOUNT}")
os.makedirs("cmd", exist_ok=True)
open("runner.ready", "w").write("up\\n")

def run(base):
    with open(base + ".out", "wb") as out:
        code = subprocess.call(["bash", base + ".sh"], stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    with open(base + ".rc.tmp", "w") as rc:
        rc.write(f"{{code}}\\n")
    os.rename(base + ".rc.tmp", base + ".rc")

while True:
    for name in sorted(os.listdir("cmd")):
        base = "cmd/" + name[:-3]
        if name.endswith(".sh") and not os.path.exists(base + ".taken"):
            open(base + ".taken", "w").close()  # once, even across a restart of the runner
            threading.Thread(target=run, args=(base,), daemon=True).start()
    time.sleep(0.3)
"""),
    "/etc/systemd/system/hnv-lab-runner.service": (0o644, f"""\
[Unit]
Description=openhnv lab: run the test host's commands from {LAB_MOUNT}/cmd
RequiresMountsFor={LAB_MOUNT}
After=hnv-lab-network.service

[Service]
ExecStart=/usr/local/sbin/hnv-lab-runner
KillMode=process
Restart=always

[Install]
WantedBy=multi-user.target
"""),
    # No network beyond the lab: no apt downloads, no timers waking the slow vCPU.
    "/etc/apt/apt.conf.d/90openhnv-lab": (0o644, 'APT::Periodic::Enable "0";\n'),
    "/etc/hostname": (0o644, "openhnv-host\n"),
    # The initrd needs only what mounts the root: the virtio disk and ext4. initramfs-tools'
    # default (MODULES=most) packs ~30 MB of drivers that an emulated vCPU unpacks and
    # probes for half a minute at every boot.
    "/etc/initramfs-tools/conf.d/openhnv-lab.conf": (0o644, "MODULES=list\n"),
    "/etc/initramfs-tools/modules": (0o644, "virtio_pci\nvirtio_blk\next4\n"),
}
ENABLE = ("hnv-lab-network.service", "hnv-lab-runner.service")
MASK = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
        "man-db.timer", "getty@tty1.service", "serial-getty@ttyS0.service",
        "systemd-networkd-wait-online.service",
        # Nothing runs foreign binaries: a unit less to start on a slow emulated vCPU.
        # (systemd-logind stays: `systemctl poweroff` goes through it.)
        "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount")


# The Vagrant box's flavour (netns_lab.vagrantbox): the same base, plus what `vagrant up`
# needs of a box and a lab host does not (a lab host is driven through the 9p runner,
# a Vagrant machine through SSH): sshd, sudo, the `vagrant` user with Vagrant's public
# insecure key (Vagrant swaps it for a machine's own key at first boot), and DHCP on
# eth0, the management network the provider attaches first. The lab's runner is not
# enabled: there is no 9p share to run from.
FLAVOURS = ("lab", "vagrant")
VAGRANT_PACKAGES = ("openssh-server", "sudo")
VAGRANT_FILES: dict[str, tuple[int, str]] = {
    "/etc/systemd/network/20-openhnv-vagrant-eth0.network": (0o644, """\
# The provider's management network (first NIC): its DHCP server gives the address
# Vagrant reaches the machine's sshd on. The trunk NICs are the agent's.
[Match]
Name=eth0

[Network]
DHCP=ipv4
"""),
    "/etc/sudoers.d/vagrant": (0o440, "vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n"),
    # No reverse lookup of the host's address: the box has no resolver worth waiting for.
    "/etc/ssh/sshd_config.d/10-openhnv-vagrant.conf": (0o644, "UseDNS no\n"),
}
VAGRANT_ENABLE = ("hnv-lab-network.service", "systemd-networkd.service", "ssh.service")
VAGRANT_USER = "vagrant"


def vagrant_public_key() -> str:
    """Vagrant's public insecure key, from the Debian package (what `vagrant up` logs in
    with the first time, before it installs a key of the machine's own)."""
    keys = sorted(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-*/keys/vagrant.pub"))
    if not keys:
        raise ImageUnavailable("no Vagrant public key (Debian package vagrant: "
                               "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub)")
    return keys[-1].read_text()


def flavour_parts(flavour: str) -> tuple[tuple[str, ...], dict[str, tuple[int, str]], tuple[str, ...]]:
    """(packages, files, units to enable) of a flavour. Read at call time, so a recipe
    always reflects the module's lists as they are."""
    if flavour == "lab":
        return PACKAGES, FILES, ENABLE
    if flavour == "vagrant":
        files = {**FILES, **VAGRANT_FILES,
                 f"/home/{VAGRANT_USER}/.ssh/authorized_keys": (0o600, vagrant_public_key())}
        return (*PACKAGES, *VAGRANT_PACKAGES), files, VAGRANT_ENABLE
    raise ValueError(f"flavour: {flavour!r} is not one of {', '.join(FLAVOURS)}")


class ImageUnavailable(RuntimeError):
    """The image cannot be built here; the message says what is missing."""


@dataclass(frozen=True)
class HostImage:
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / IMAGE_FILE

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL_FILE

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD_FILE

    @property
    def kernel_release(self) -> str:
        """The release of the image's kernel (``uname -r`` on a host booted from it)."""
        return json.loads((self.directory / RECIPE_FILE).read_text())["kernel"].removeprefix("vmlinuz-")

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd,
                                          self.directory / RECIPE_FILE))


def mirror_sources() -> Path:
    """The Debian sources this machine's apt uses (the only place packages come from)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.is_file() and path.read_text().strip():
            return path
    raise ImageUnavailable("no Debian apt sources (/etc/apt/sources.list.d/debian.sources "
                           "or /etc/apt/sources.list) to build the host image from")


def recipe(sources: Path | None = None, flavour: str = "lab") -> dict:
    sources = sources or mirror_sources()
    packages, files, enable = flavour_parts(flavour)
    data = {"suite": SUITE, "packages": sorted(packages), "size": IMAGE_SIZE,
            "files": {p: [oct(m), c] for p, (m, c) in sorted(files.items())},
            "enable": sorted(enable), "mask": sorted(MASK),
            "sources": sources.read_text()}
    if flavour != "lab":  # the lab's digest stays what it was: its cached image is kept
        data["flavour"] = flavour
    return data


def recipe_digest(recipe_data: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_data, sort_keys=True).encode()).hexdigest()[:16]


def missing_tools() -> list[str]:
    """What building needs and this machine lacks (empty: it can build)."""
    lacking = []
    if os.geteuid() != 0:
        lacking.append("root (mmdebstrap --mode=root, mkfs.ext4 -d of a root-owned tree)")
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs"),
                          ("qemu-system-x86_64", "qemu-system-x86")):
        if shutil.which(tool) is None:
            lacking.append(f"{tool} (Debian package {package})")
    return lacking


def cached_image(cache_root: Path = CACHE_ROOT, flavour: str = "lab") -> HostImage:
    """The image for today's recipe, built first if the cache has none."""
    lacking = missing_tools()
    data = recipe(flavour=flavour)
    image = HostImage(cache_root / recipe_digest(data))
    if image.complete():
        return image
    if lacking:
        raise ImageUnavailable("cannot build the host image: missing " + "; ".join(lacking))
    cache_root.mkdir(parents=True, exist_ok=True)
    # One builder at a time (a second `make system` waits, then finds the image built).
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.complete():
            _build(image.directory, data, flavour)
    return image


def _build(target: Path, data: dict, flavour: str = "lab") -> None:
    work = target.with_name(target.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "tree"
    work.mkdir(parents=True)
    started = time.monotonic()
    try:
        argv = ["mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
                "--include=" + ",".join(data["packages"]),
                # Why hooks, in this order: the files go in after every package (they
                # replace conffiles such as /etc/initramfs-tools/modules), then the initrd
                # is made again from them, inside the chroot mmdebstrap has set up.
                f"--customize-hook={shlex.join([sys.executable, '-m', 'netns_lab.hostimage', 'customise', '--flavour', flavour])} \"$1\"",
                '--customize-hook=chroot "$1" update-initramfs -u -k all',
                SUITE, str(tree), str(mirror_sources())]
        _run(argv, work / "mmdebstrap.log", timeout=3600, cwd=CHECKOUT)
        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        initrds = sorted((tree / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise ImageUnavailable(f"the image has no kernel or initrd in /boot (see {work}/mmdebstrap.log)")
        shutil.copy(kernels[-1], work / KERNEL_FILE)
        shutil.copy(initrds[-1], work / INITRD_FILE)
        _run(["mkfs.ext4", "-q", "-F", "-L", "openhnv-root", "-d", str(tree),
              str(work / IMAGE_FILE), IMAGE_SIZE], work / "mkfs.log", timeout=1800)
        shutil.rmtree(tree)
        (work / RECIPE_FILE).write_text(json.dumps(
            {**data, "kernel": kernels[-1].name, "build_seconds": round(time.monotonic() - started)},
            indent=2))
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)  # atomic: a half-built image is never found complete
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tree)
        raise


def _run(argv: list[str], log: Path, timeout: float, cwd: Path | None = None) -> None:
    with open(log, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False,
                              timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise ImageUnavailable(f"{argv[0]} exited {proc.returncode} (log {log}):\n{tail}")


def _customise(tree: Path, flavour: str = "lab") -> None:
    _, files, enable = flavour_parts(flavour)
    if flavour == "vagrant":
        # The user first (its home is where its key goes); chroot: useradd writes the
        # tree's passwd, shadow and group the way it does on a host.
        subprocess.run(["chroot", str(tree), "useradd", "--create-home", "--user-group",
                        "--shell", "/bin/bash", VAGRANT_USER], check=True, capture_output=True, timeout=120)
    for path, (mode, content) in files.items():
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(mode)
    if flavour == "vagrant":
        (tree / f"home/{VAGRANT_USER}/.ssh").chmod(0o700)
        subprocess.run(["chroot", str(tree), "chown", "-R", f"{VAGRANT_USER}:{VAGRANT_USER}",
                        f"/home/{VAGRANT_USER}/.ssh"], check=True, capture_output=True, timeout=120)
    for mount in (LAB_MOUNT, MEDIA_MOUNT):
        (tree / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # Empty: systemd takes the machine-id from the command line (or makes one) at boot.
    (tree / "etc/machine-id").write_text("")
    # Why chroot systemctl: enabling and masking are symlinks that systemctl knows how to
    # place (--root works on a tree without a running systemd).
    subprocess.run(["systemctl", f"--root={tree}", "enable", *enable], check=True,
                   capture_output=True, timeout=120)
    subprocess.run(["systemctl", f"--root={tree}", "mask", *MASK], check=True,
                   capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns_lab.hostimage", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "digest", "customise"])
    parser.add_argument("tree", nargs="?", type=Path, help="customise: the tree mmdebstrap made")
    parser.add_argument("--flavour", choices=FLAVOURS, default="lab",
                        help="lab: the booted-host lab's hosts; vagrant: the Vagrant box's (sshd, a vagrant user)")
    args = parser.parse_intermixed_args(argv)  # the hook puts the tree after --flavour
    if args.command == "customise":  # mmdebstrap's customize hook
        _customise(args.tree, args.flavour)
        return 0
    if args.command == "digest":
        print(recipe_digest(recipe(flavour=args.flavour)))
        return 0
    try:
        image = cached_image(flavour=args.flavour)
    except ImageUnavailable as exc:
        print(f"hostimage: {exc}", file=sys.stderr)
        return 2
    print(image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
