"""The booted-host lab: one qemu VM per host, systemd as PID 1, openhnv installed as docs/operating.md says.

The multi-kernel lab (``netns_lab.multivm``) runs the daemons by hand in throw-away VMs
that share this machine's file system; this lab boots hosts the way an operator has
them. Each host is a VM booting the project's host image (``netns_lab.hostimage``:
Debian 12 from Debian's packages, Debian's kernel, systemd as PID 1) copy-on-write, with
two virtio NICs whose tap ends are ports of one bridge in a network namespace this
module creates and deletes (``multivm.physical_switch``: the same switch, plan, MACs and
taps as the multi-kernel lab). Hosts come from the seed topology: the controller on its
management host (CON-HyperV1), agents on the two VIRTUALCLUSTER hosts.

openhnv is installed by the commands of docs/operating.md's "Installing on a host", read
from that document itself (``install_steps``) and run as they are: the build-machine step here (a
wheel of the project and a wheelhouse of its dependencies; the guests have no internet),
the host steps on each booted host, with only the settings block's values replaced by
each host's. The installation media reach the hosts as a read-only 9p share; each host
has a writable 9p share of its own (``/lab``), through which this side hands it command
files (the image's ``hnv-lab-runner``: an operator's shell) and reads their output back,
and through which the operator-copied host token travels. Every wait is bounded.

Owns: booting and reaping the VMs, the command channel, running the documented install
steps. It must not configure anything that the install steps, the units or the agent own.

    python -m netns_lab.bootlab up     # boot, install, bring the fabric up, print a summary
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from netns_lab import hostimage
from netns_lab.multivm import GuestPlan, LabPlan, physical_switch, plan_lab, start_switch_capture

CHECKOUT = Path(__file__).resolve().parent.parent
INSTALL_DOC = CHECKOUT / "docs" / "operating.md"
INSTALL_SECTION = "## Installing on a host"
# The install steps of that section, by the role named on each block's first line.
BUILD_STEP, SETTINGS, EVERY_HOST, MANAGEMENT_NODE, AGENT_HOST = (
    "on the build machine", "settings", "on every host", "on the management node", "on each agent host")
STEPS = (BUILD_STEP, SETTINGS, EVERY_HOST, MANAGEMENT_NODE, AGENT_HOST)

# The seed's management node runs the controller; two VIRTUALCLUSTER hosts run agents.
HOSTS = ("CON-HyperV1", "CON-HyperV6", "CON-HyperV7")
# Under TCG each guest gets one vCPU of two shared cores. 640 MiB hold systemd, the
# controller or the agent, pip's install of the wheelhouse and the page cache of the venv.
GUEST_MEMORY = "640M"
# The one place that says how the hosts reach the controller (the scheme the settings
# block's CONTROLLER_URL uses): the lab and its tests read it from here.
CONTROLLER_SCHEME = "https"
ADMIN_TOKEN = "/var/lib/openhnv/controller/admin.token"
HOST_TOKEN_DIR = "/var/lib/openhnv/controller/hosts"
CONTROLLER_CA = "/var/lib/openhnv/controller/tls/ca.crt"
MEDIA_CA = "controller-ca.crt"  # where the guide has the operator put the CA on the media
BOOT_TIMEOUT = float(os.environ.get("OPENHNV_BOOT_TIMEOUT", "900"))
STEP_TIMEOUT = float(os.environ.get("OPENHNV_STEP_TIMEOUT", "900"))


class BootLabError(RuntimeError):
    """Something the booted-host lab could not do; names the host and the reason."""


# --- the documented install steps ----------------------------------------------------------

_FENCE = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)


def install_steps(doc: Path = INSTALL_DOC) -> dict[str, str]:
    """The shell blocks of the operating guide's "Installing on a host", keyed by their first-line role.

    Every block in the section starts with ``# on ...`` (or ``# settings``); the lab runs
    them as they stand, so what the guide says is exactly what the tier proves. The
    section ends at the next level-2 heading ("## "; a block's "# on ..." comment is not one).
    """
    text = doc.read_text()
    heading = re.search(rf"^{re.escape(INSTALL_SECTION)}$", text, re.M)
    if heading is None:
        raise BootLabError(f"{doc.name} has no section {INSTALL_SECTION!r}")
    end = text.find("\n## ", heading.end())
    section = text[heading.end():end if end > 0 else None]
    steps: dict[str, str] = {}
    for block in _FENCE.findall(section):
        first, _, body = block.partition("\n")
        role = first.lstrip("#").strip()
        role = next((r for r in STEPS if role.startswith(r)), role)
        if role not in STEPS:
            raise BootLabError(f"{doc.name} {INSTALL_SECTION}: a block starts with {first!r}, "
                               f"not one of {', '.join('# ' + s for s in STEPS)}")
        if role in steps:
            raise BootLabError(f"{doc.name} {INSTALL_SECTION}: two blocks for {role!r}")
        steps[role] = body
    if missing := [s for s in STEPS if s not in steps]:
        raise BootLabError(f"{doc.name} {INSTALL_SECTION}: no block for {', '.join(missing)}")
    return steps


def settings_names(settings: str) -> list[str]:
    """The variables the settings block assigns (``NAME=value  # comment`` lines)."""
    return re.findall(r"^([A-Z_]+)=", settings, re.M)


def with_settings(step: str, settings_block: str, values: dict[str, str]) -> str:
    """A step preceded by this host's settings; every name the settings block sets, and only those."""
    names = settings_names(settings_block)
    if unknown := sorted(set(values) - set(names)):
        raise BootLabError(f"settings {', '.join(unknown)} are not in the guide's settings block")
    lines = [f"{name}={shlex.quote(values[name])}" for name in names if name in values]
    return "set -euo pipefail\n" + "\n".join(lines) + "\n" + step


# --- one booted host -----------------------------------------------------------------------


@dataclass
class Command:
    """A command file handed to a host's runner; its output and exit status come back."""

    host: BootedHost
    name: str
    script: str

    @property
    def _base(self) -> Path:
        return self.host.share / "cmd" / self.name

    def done(self) -> bool:
        return self._base.with_suffix(".rc").exists()

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self._base.with_suffix(".out").read_text(errors="replace")
        return ""

    def wait(self, timeout: float, check: bool = True) -> CommandResult:
        deadline = time.monotonic() + timeout
        while not self.done():
            if self.host.qemu is not None and self.host.qemu.poll() is not None:
                raise BootLabError(f"{self.host.name}: the VM exited ({self.host.qemu.returncode}) "
                                   f"while running {self.script.splitlines()[-1]!r}:\n{self.host.console_tail()}")
            if time.monotonic() > deadline:
                raise BootLabError(f"{self.host.name}: {self.script.strip().splitlines()[-1]!r} still running "
                                   f"after {timeout:.0f} s; output so far:\n{self.output()[-1500:]}")
            time.sleep(0.3)
        result = CommandResult(int(self._base.with_suffix(".rc").read_text().strip() or 1), self.output())
        if check and result.returncode != 0:
            raise BootLabError(f"{self.host.name}: exit {result.returncode} from\n{self.script.strip()}\n"
                               f"--- output:\n{result.output[-3000:]}")
        return result


@dataclass
class CommandResult:
    returncode: int
    output: str


@dataclass
class BootedHost:
    plan: GuestPlan
    share: Path  # this host's /lab
    qemu: subprocess.Popen | None = None
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def address(self) -> str:
        return self.plan.address.split("/")[0]

    @property
    def console(self) -> Path:
        return self.share.parent / f"{self.name}.console.log"

    def console_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def start(self, script: str) -> Command:
        """Hand ``script`` (bash) to the host's runner; it runs in the background there."""
        name = f"{next(self._numbers):03d}"
        path = self.share / "cmd" / f"{name}.sh"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(script if script.endswith("\n") else script + "\n")
        tmp.rename(path)  # atomic: the runner never reads half a script
        return Command(self, name, script)

    def run(self, script: str, timeout: float = 300, check: bool = True) -> CommandResult:
        return self.start(script).wait(timeout, check)

    def put(self, name: str, content: str, mode: int = 0o600) -> str:
        """A file in this host's share (what an operator copies over); its path in the guest."""
        path = self.share / name
        path.write_text(content)
        path.chmod(mode)
        return f"{hostimage.LAB_MOUNT}/{name}"

    def wait_booted(self, deadline: float) -> float:
        """Seconds the host took until its runner (a multi-user.target unit) answered."""
        while not (self.share / "runner.ready").exists():
            if self.qemu is not None and self.qemu.poll() is not None:
                raise BootLabError(f"{self.name}: qemu exited {self.qemu.returncode} during boot:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise BootLabError(f"{self.name}: not booted after {BOOT_TIMEOUT:.0f} s:\n{self.console_tail()}")
            time.sleep(0.5)
        return float(self.run("cut -d' ' -f1 /proc/uptime", timeout=120).output.split()[0])


def qemu_argv(image: hostimage.HostImage, host: BootedHost, media: Path) -> list[str]:
    """One host: the image copy-on-write, Debian's kernel, two NICs on the switch's taps."""
    cmdline = " ".join([
        "root=/dev/vda", "rw", "console=ttyS0", "panic=-1", "quiet",
        # Identity a real host has from its installer (see netns_lab.hostimage).
        "net.ifnames=0", f"systemd.hostname={host.name}",
        f"systemd.machine_id={secrets.token_hex(16)}", f"hnv.address={host.plan.address}",
    ])
    argv = ["qemu-system-x86_64", "-name", host.name, "-nodefaults", "-no-user-config",
            "-machine", "pc", "-accel", "tcg", "-cpu", "qemu64", "-smp", "1", "-m", GUEST_MEMORY,
            "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            # snapshot=on: writes go to a temporary overlay, the cached image stays clean.
            "-drive", f"file={image.disk},format=raw,if=virtio,snapshot=on",
            "-virtfs", f"local,path={host.share},mount_tag={hostimage.LAB_SHARE},security_model=none,id=lab",
            "-virtfs", f"local,path={media},mount_tag={hostimage.MEDIA_SHARE},security_model=none,readonly=on,id=media",
            "-serial", f"file:{host.console}"]
    for n, (tap, mac) in enumerate(zip(host.plan.taps, host.plan.macs)):
        argv += ["-netdev", f"tap,id=nic{n},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=nic{n},mac={mac}"]
    return argv


# --- the lab -------------------------------------------------------------------------------


@dataclass
class BootLab:
    plan: LabPlan
    image: hostimage.HostImage
    run_dir: Path
    media: Path
    hosts: dict[str, BootedHost]
    captures: dict[str, Path] = field(default_factory=dict)  # tap -> pcap
    timings: dict[str, float] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)

    @property
    def controller(self) -> BootedHost:
        return self.hosts[self.plan.controller_host]

    @property
    def agents(self) -> list[BootedHost]:
        return [h for h in self.hosts.values() if h.plan.virtualization]

    @property
    def controller_address(self) -> str:
        return self.plan.controller_listen

    def settings(self, host: BootedHost) -> dict[str, str]:
        values = {"MEDIA": hostimage.MEDIA_MOUNT,
                  "CONTROLLER_URL": f"{CONTROLLER_SCHEME}://{self.controller_address}"}
        if host is self.controller:
            values["LISTEN"] = self.controller_address
            values["HOSTS"] = " ".join(a.name for a in self.agents)
        else:
            values["HOST"] = host.name
            values["ADDRESS"] = host.address
            values["TOKEN"] = f"{hostimage.LAB_MOUNT}/{host.name}.token"
        return values

    def step(self, host: BootedHost, role: str) -> Command:
        return host.start(with_settings(self.steps[role], self.steps[SETTINGS], self.settings(host)))

    def hnvctl(self, args: str, timeout: float = 300, check: bool = True) -> CommandResult:
        """hnvctl on the management node, as the operator runs it there."""
        env = (f"HNV_CONTROLLER={CONTROLLER_SCHEME}://{self.controller_address} HNV_TOKEN_FILE={ADMIN_TOKEN} "
               f"HNV_CA_FILE={CONTROLLER_CA}")
        return self.controller.run(f"{env} /opt/openhnv/bin/hnvctl {args}", timeout, check)

    def build_media(self) -> None:
        """The guide's build-machine step, here: the wheelhouse, the units and the seed files."""
        script = with_settings(self.steps[BUILD_STEP], self.steps[SETTINGS], {"MEDIA": str(self.media)})
        # python3 is this machine's venv interpreter (it has pip); the step runs in the checkout.
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        proc = subprocess.run(["bash", "-c", script], cwd=CHECKOUT, env=env, capture_output=True,
                              text=True, check=False, timeout=STEP_TIMEOUT)
        (self.run_dir / "build-media.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BootLabError(f"the build-machine step exited {proc.returncode}:\n{(proc.stderr or proc.stdout)[-2000:]}")

    def install(self) -> None:
        """The guide's host steps on every host; the hosts bring the fabric up by themselves."""
        t = time.monotonic()
        for command in [self.step(h, EVERY_HOST) for h in self.hosts.values()]:
            command.wait(STEP_TIMEOUT)
        self.timings["install openhnv (every host, in parallel)"] = time.monotonic() - t
        t = time.monotonic()
        self.step(self.controller, MANAGEMENT_NODE).wait(STEP_TIMEOUT)
        self.timings["management node: init, controller unit, apply"] = time.monotonic() - t
        t = time.monotonic()
        # The operator copies the controller's CA certificate (public) onto the media and
        # each host's token (secret: through the host's own share, never the media) to
        # the host.
        ca = self.controller.run(f"cat {CONTROLLER_CA}").output
        if "BEGIN CERTIFICATE" not in ca:
            raise BootLabError(f"{self.controller.name}: {CONTROLLER_CA} holds no certificate: {ca[:200]!r}")
        (self.media / MEDIA_CA).write_text(ca)
        for agent in self.agents:
            token = self.controller.run(f"cat {HOST_TOKEN_DIR}/{agent.name}.token").output.strip()
            agent.put(f"{agent.name}.token", token + "\n")
        for command in [self.step(a, AGENT_HOST) for a in self.agents]:
            command.wait(STEP_TIMEOUT)
        hosts = " ".join(f"--host {a.name}" for a in self.agents)
        self.hnvctl(f"hosts --wait {STEP_TIMEOUT:.0f} {hosts}", timeout=STEP_TIMEOUT + 60)
        self.timings["agents: token, agent unit, hosts in sync"] = time.monotonic() - t

    def tenant_vms(self) -> dict[str, dict]:
        """name -> {host, network, ca, mac} of the tenant VMs, from the controller."""
        vms = json.loads(self.hnvctl("vm list -o json").output)
        return {vm["name"]: vm for vm in (vms if isinstance(vms, list) else vms.get("items", []))}


@contextlib.contextmanager
def booted_lab(run_dir: Path, image: hostimage.HostImage, hosts: Sequence[str] = HOSTS) -> Iterator[BootLab]:
    """Boot the hosts (in parallel), build the media meanwhile; reap everything on exit."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_lab(run_dir, hosts)
    media = run_dir / "media"
    media.mkdir(exist_ok=True)
    booted = {}
    for guest in plan.guests:
        share = run_dir / guest.name
        (share / "cmd").mkdir(parents=True, exist_ok=True)
        booted[guest.name] = BootedHost(guest, share)
    lab = BootLab(plan, image, run_dir, media, booted, steps=install_steps())
    tcpdumps: list[subprocess.Popen] = []
    with physical_switch(plan):
        try:
            started = time.monotonic()
            for host in booted.values():
                if host.plan.virtualization and not lab.captures:  # one host's NICs see every tunnel
                    for tap in host.plan.taps:
                        lab.captures[tap] = run_dir / f"wire-{tap}.pcap"
                        tcpdumps.append(start_switch_capture(plan, tap, lab.captures[tap]))
            for host in booted.values():
                host.qemu = subprocess.Popen(
                    ["ip", "netns", "exec", plan.switch_namespace, *qemu_argv(image, host, media)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True)
            # The media build (pip, mostly) overlaps the boot: both take a minute or more.
            lab.build_media()
            lab.timings["build installation media (this machine)"] = time.monotonic() - started
            deadline = started + BOOT_TIMEOUT
            for host in booted.values():
                lab.timings[f"boot {host.name} (guest uptime)"] = host.wait_booted(deadline)
            lab.timings["boot all hosts (wall clock)"] = time.monotonic() - started
            yield lab
        finally:
            _reap(lab, tcpdumps)


def _reap(lab: BootLab, tcpdumps: list[subprocess.Popen]) -> None:
    for host in lab.hosts.values():
        if host.qemu is not None and host.qemu.poll() is None:
            with contextlib.suppress(OSError):
                host.start("systemctl poweroff")  # a clean journal; killed below if slow
    deadline = time.monotonic() + 30
    for host in lab.hosts.values():
        if host.qemu is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.qemu.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.qemu.pid, signal.SIGKILL)
        host.qemu.wait(timeout=30)
    for proc in tcpdumps:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def format_timings(lab: BootLab) -> str:
    return "\n".join(f"  {what:<52} {seconds:7.1f} s" for what, seconds in lab.timings.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns_lab.bootlab", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--run-dir", type=Path, help="where shares, consoles and captures go (default: a new temp dir, kept)")
    parser.add_argument("--hold", action="store_true", help="keep the hosts up until Ctrl-C")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it creates a network namespace, tap devices and an image")
    try:
        image = hostimage.cached_image()
    except hostimage.ImageUnavailable as exc:
        print(f"bootlab: {exc}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="openhnv-bootlab-"))
    try:
        with booted_lab(run_dir, image) as lab:
            lab.install()
            print(json.dumps(lab.tenant_vms(), indent=2))
            print(format_timings(lab))
            if args.hold:
                print(f"hosts up; shares and consoles in {run_dir}; Ctrl-C to power off")
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
    except BootLabError as exc:
        print(f"bootlab: {exc}\nrun directory: {run_dir}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
