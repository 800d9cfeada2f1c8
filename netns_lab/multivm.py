"""The multi-kernel lab: the seed's fabric with one kernel per host, on a shared wire.

The netns lab puts every host in one kernel; this lab gives each host a kernel of its
own, the shape of the Vagrant lab without a hypervisor that needs KVM. Each host is a
throw-away virtme-ng VM (``netns_lab.vm``: this machine's file system read-only, the
same checkout and venv) with two virtio NICs, ``eth0`` and ``eth1``, whose host ends are
tap devices on one bridge: the physical switch. That bridge and its taps live in a
network namespace this module creates and deletes, so nothing of the lab touches this
machine's own network. The bridge has no VLAN filtering (it need not: it forwards the
hosts' 802.1Q-tagged frames as they are), just like an unmanaged trunk.

Inside each guest, as on a freshly installed host: NICs named by MAC, a machine-id of
its own (see ``Guest.own_machine_id``), the management address on eth0, then

- the controller host runs ``hnv-controller init`` (a CA and a server certificate for its
  management address) and ``run`` (HTTPS), ``hnvctl apply`` of the seed fabric and
  tenants, and publishes the host tokens and the CA certificate;
- every host runs ``hnv-agent run`` with its token, verifying the controller with the CA; the agent builds team, trunk,
  switch, PAs, NVGRE tunnels, lookup records and the tenant VMs (namespaces);
- the virtualisation hosts ping each other's tenant VMs across the NICs (inside NVGRE,
  VLAN 802), and one of them kills and restarts its agent under a continuous ping.

The guests coordinate through files in the shared run directory (one writable
directory, ``--rwdir``): ``<host>/stage`` progress, ``barriers/<name>`` to wait for,
``<host>/result.json`` for the test on this side, ``<host>/failed`` to make every other
guest stop waiting. Every wait is bounded.

Owns: the switch namespace and its taps, booting and reaping the guests, the guest-side
script. It must not configure anything the agent owns (team, switch, tunnels, VMs).

    python -m netns_lab.multivm run        # run the lab, print a summary, exit 0 if good
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netns_lab import vm
from netns_lab.build import host_mac
from netns_lab.pings import PING_IN_FLIGHT, ping_losses, ping_summary
from netns_lab.tcpdump import tcpdump_argv
from netns_lab.topology import ClusterRole, Topology, load_topology

CHECKOUT = vm.CHECKOUT
FABRIC_FILES = ("examples/seed-fabric.yaml", "examples/seed-tenants.yaml")
# The walkthrough's two network-virtualisation hosts. Under TCG every guest costs a share
# of two cores, so by default the controller runs on the first of them rather than in a
# third VM of its own (add CON-HyperV1 to give the controller its management host).
DEFAULT_HOSTS = ("CON-HyperV6", "CON-HyperV7")
PLAN_FILE = "plan.json"
RESULT_FILE = "result.json"
FAILED_FILE = "failed"

# Under TCG the two machine cores are shared by every guest: one vCPU each. 1 GiB holds
# the guest's page cache of the venv plus controller and agent comfortably.
GUEST_MEMORY = "1G"
GUEST_CPUS = 1
RESTART_PING_INTERVAL = 0.2  # the tenant ping across an agent's kill and restart


class MultiVMError(RuntimeError):
    """Something the multi-kernel lab could not do; names the host and the reason."""


# --- the plan: plain data, written once by the host, read by every guest -----------------


@dataclass(frozen=True)
class GuestPlan:
    name: str
    address: str  # management address with prefix length, on eth0 at boot
    nics: tuple[str, ...]
    macs: tuple[str, ...]
    taps: tuple[str, ...]  # host-side ends, ports of the switch bridge
    runs_controller: bool
    virtualization: bool  # hosts tenant VMs (VIRTUALCLUSTER)


@dataclass(frozen=True)
class LabPlan:
    run_dir: str
    switch_namespace: str
    guests: tuple[GuestPlan, ...]
    controller_host: str
    controller_url: str
    controller_listen: str
    metrics_port: int
    fabric_files: tuple[str, ...] = FABRIC_FILES
    restart_host: str = "CON-HyperV7"  # the host whose agent is killed and restarted
    # Seconds any one wait may take inside a guest; the host bounds the whole run anyway.
    # Under TCG on a busy machine, Python start-up alone can take minutes.
    stage_timeout: float = 600.0

    def guest(self, name: str) -> GuestPlan:
        for guest in self.guests:
            if guest.name == name:
                return guest
        raise MultiVMError(f"host {name} is not part of this lab")

    def save(self) -> None:
        Path(self.run_dir, PLAN_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> LabPlan:
        data = json.loads((run_dir / PLAN_FILE).read_text())
        data["guests"] = tuple(GuestPlan(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in g.items()}) for g in data["guests"])
        data["fabric_files"] = tuple(data["fabric_files"])
        return cls(**data)


def plan_lab(run_dir: Path, hosts: Sequence[str] = DEFAULT_HOSTS,
             topology: Topology | None = None, stage_timeout: float = 600.0) -> LabPlan:
    """Which hosts of the seed topology get a kernel, their NICs, MACs and taps."""
    topology = topology or load_topology()
    all_hosts = [h.name for h in topology.hosts]
    if not hosts:
        raise MultiVMError("hosts: name at least two hosts")
    # The topology's controller host when it has a kernel here, else the first host.
    controller = topology.controller.host if topology.controller.host in hosts else hosts[0]
    guests = []
    for name in hosts:
        spec = topology.host(name)
        if spec is None:
            raise MultiVMError(f"hosts: {name} is not a host of topology {topology.name}")
        index = all_hosts.index(name)
        guests.append(GuestPlan(
            name=name,
            address=topology.management_interface(spec),
            nics=tuple(spec.nics),
            # Unique per host and NIC, and the same ones the netns lab uses: a capture
            # reads the same in both labs.
            macs=tuple(host_mac(topology, index, n) for n in range(len(spec.nics))),
            taps=tuple(topology.switch_port(spec, nic) for nic in spec.nics),
            runs_controller=name == controller,
            virtualization=topology.cluster_of(name).role is ClusterRole.virtualization,
        ))
    virtualization = [g.name for g in guests if g.virtualization]
    if len(virtualization) < 2:
        raise MultiVMError("hosts: at least two VIRTUALCLUSTER hosts are needed for tenant pings")
    controller_address = str(topology.host(controller).address)
    return LabPlan(
        run_dir=str(run_dir),
        switch_namespace=f"hnvmk-{secrets.token_hex(3)}",
        guests=tuple(guests),
        controller_host=controller,
        controller_url=f"https://{controller_address}:{topology.controller.port}",
        controller_listen=f"{controller_address}:{topology.controller.port}",
        metrics_port=topology.agent.metrics_port,
        restart_host=virtualization[-1],
        stage_timeout=stage_timeout,
    )


# --- host side: the switch, the guests, the capture -----------------------------------------


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise MultiVMError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@contextlib.contextmanager
def physical_switch(plan: LabPlan) -> Iterator[None]:
    """The switch namespace: one bridge, two taps per guest; deleted on exit, always.

    The taps are made before qemu starts (qemu attaches to an existing tap by name, in
    the namespace it runs in) and are owned by this namespace, so deleting the namespace
    removes the bridge and every tap with it.
    """
    ns = plan.switch_namespace
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        # Forward at once: no STP listening/learning delay on a lab's single switch.
        _ip("-n", ns, "link", "set", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip("-n", ns, "link", "set", "br0", "up")
        for guest in plan.guests:
            for tap in guest.taps:
                _ip("-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
                _ip("-n", ns, "link", "set", tap, "master", "br0", "up")
        yield
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)


def _guest_argv(plan: LabPlan, guest: GuestPlan, kernel: Path, kvm: bool) -> list[str]:
    guest_dir = Path(plan.run_dir, guest.name)
    script = guest_dir / vm.GUEST_SCRIPT_FILE
    command = [sys.executable, "-m", "netns_lab.multivm", "guest",
               "--run-dir", plan.run_dir, "--host", guest.name]
    script.write_text(vm.guest_script(command, rwdir=guest_dir))
    argv = vm.vng_command(script, rwdir=Path(plan.run_dir), kernel=kernel, kvm=kvm,
                          memory=GUEST_MEMORY, cpus=GUEST_CPUS)
    nics = []
    for n, (tap, mac) in enumerate(zip(guest.taps, guest.macs)):
        nics += [f"-netdev tap,id=hnv{n},ifname={tap},script=no,downscript=no",
                 f"-device virtio-net-pci,netdev=hnv{n},mac={mac}"]
    # "--qemu-opts=..." in one word: a separate value starting with "-" reads as an option.
    argv.append(f"--qemu-opts={' '.join(nics)}")
    # qemu opens the taps by name in its own network namespace: run it in the switch's.
    return ["ip", "netns", "exec", plan.switch_namespace, *argv]


@dataclass
class GuestOutcome:
    name: str
    returncode: int
    completed: bool  # the guest script reported an exit code
    result: dict = field(default_factory=dict)  # <host>/result.json
    failure: str = ""  # <host>/failed, if the guest gave up
    console_tail: str = ""


@dataclass
class LabOutcome:
    plan: LabPlan
    guests: dict[str, GuestOutcome]
    seconds: float
    captures: dict[str, Path]  # tap -> pcap of the wire between the hosts

    @property
    def ok(self) -> bool:
        return all(g.completed and g.returncode == 0 for g in self.guests.values())

    def problems(self) -> list[str]:
        lines = []
        for g in self.guests.values():
            if not g.completed or g.returncode != 0:
                why = g.failure or (f"exit {g.returncode}" if g.completed else "never reported")
                lines.append(f"{g.name}: {why}\n{g.console_tail}")
        return lines


def start_switch_capture(plan: LabPlan, tap: str, pcap: Path) -> subprocess.Popen:
    # Everything, headers only (256 bytes hold outer 802.1Q/IP/GRE and the inner frame's
    # headers): the tests look for NVGRE in VLAN 802, a person debugging for ARP and the rest.
    return subprocess.Popen(
        ["ip", "netns", "exec", plan.switch_namespace,
         *tcpdump_argv(tap, pcap, "", "-s", "256", "-c", "20000")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def run_lab(run_dir: Path, hosts: Sequence[str] = DEFAULT_HOSTS, timeout: float = 600,
            kernel: Path | None = None) -> LabOutcome:
    """Boot one VM per host on one switch, run the walkthrough, collect what they found."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_lab(run_dir, hosts, stage_timeout=timeout)
    for guest in plan.guests:
        (run_dir / guest.name).mkdir(exist_ok=True)
    (run_dir / "barriers").mkdir(exist_ok=True)
    plan.save()
    # The guests see the checkout read-only and must not spend their slow vCPU compiling
    # the project's modules on every import: compile them here, once.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "agent", "controller", "netns_lab"],
                   cwd=CHECKOUT, capture_output=True, check=False, timeout=300)
    kernel = kernel or vm.newest_kernel()
    kvm = vm.kvm_usable()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    started = time.monotonic()
    captures: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen] = {}
    tcpdumps: list[subprocess.Popen] = []
    with physical_switch(plan):
        try:
            for guest in plan.guests:
                if guest.virtualization:
                    for tap in guest.taps:
                        captures[tap] = run_dir / f"wire-{tap}.pcap"
                        tcpdumps.append(start_switch_capture(plan, tap, captures[tap]))
            for guest in plan.guests:
                console = open(run_dir / guest.name / "console.log", "w")
                procs[guest.name] = subprocess.Popen(
                    _guest_argv(plan, guest, kernel, kvm), env=env, cwd=CHECKOUT,
                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                    start_new_session=True)
                console.close()
            deadline = started + timeout
            for name, proc in procs.items():
                try:
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _fail_marker(run_dir / name, f"the VM was still running after {timeout:.0f} s")
        finally:
            for proc in [*procs.values(), *tcpdumps]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM if proc in tcpdumps else signal.SIGKILL)
            for proc in [*procs.values(), *tcpdumps]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
    seconds = time.monotonic() - started
    return LabOutcome(plan, {g.name: _outcome(run_dir, g.name) for g in plan.guests},
                      seconds, captures)


def _outcome(run_dir: Path, name: str) -> GuestOutcome:
    guest_dir = run_dir / name
    try:
        returncode, completed = int((guest_dir / vm.EXIT_CODE_FILE).read_text().strip()), True
    except (OSError, ValueError):
        returncode, completed = 1, False
    result = {}
    with contextlib.suppress(OSError, ValueError):
        result = json.loads((guest_dir / RESULT_FILE).read_text())
    failure = ""
    with contextlib.suppress(OSError):
        failure = (guest_dir / FAILED_FILE).read_text().strip()
    console = ""
    with contextlib.suppress(OSError):
        console = "\n".join((guest_dir / "console.log").read_text(errors="replace").splitlines()[-15:])
    return GuestOutcome(name, returncode, completed, result, failure, console)


def _fail_marker(guest_dir: Path, reason: str) -> None:
    with contextlib.suppress(OSError):
        if not (guest_dir / FAILED_FILE).exists():
            (guest_dir / FAILED_FILE).write_text(reason + "\n")


# --- guest side --------------------------------------------------------------------------


class Guest:
    """One host's part of the walkthrough, run inside its own kernel as root."""

    def __init__(self, plan: LabPlan, name: str):
        self.plan = plan
        self.me = plan.guest(name)
        self.run_dir = Path(plan.run_dir)
        self.dir = self.run_dir / name
        self.barriers = self.run_dir / "barriers"
        self.work = Path("/tmp/openhnv-multivm")  # the guest's own tmpfs
        self.work.mkdir(parents=True, exist_ok=True)
        self.result: dict = {"host": name, "timings": {}}
        self.started = time.monotonic()
        self.processes: dict[str, subprocess.Popen] = {}

    # --- coordination -------------------------------------------------------------------

    def stage(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        self.result["timings"][text] = round(elapsed, 1)
        with open(self.dir / "stage", "a") as f:
            f.write(f"{elapsed:7.1f}s {text}\n")
        print(f"multivm[{self.me.name}] {elapsed:.1f}s {text}", flush=True)

    def signal(self, barrier: str, payload: dict | None = None) -> None:
        path = self.barriers / barrier
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload or {}))
        tmp.rename(path)  # atomic: a waiter never reads half a file

    def wait(self, what: str, ready: Callable[[], object], timeout: float | None = None) -> object:
        """Poll ``ready`` until it returns something truthy; give up when any guest failed."""
        deadline = time.monotonic() + (timeout or self.plan.stage_timeout)
        while True:
            value = ready()
            if value:
                return value
            failed = [p.parent.name for p in self.run_dir.glob(f"*/{FAILED_FILE}")]
            if failed:
                raise MultiVMError(f"gave up waiting for {what}: {', '.join(failed)} failed")
            if time.monotonic() > deadline:
                raise MultiVMError(f"waited {timeout or self.plan.stage_timeout:.0f} s for {what}")
            # Not faster: the waiter shares one emulated vCPU with the daemons it waits for.
            time.sleep(1.0)

    def wait_barrier(self, barrier: str) -> dict:
        path = self.barriers / barrier
        self.wait(f"barrier {barrier}", path.exists)
        return json.loads(path.read_text())

    # --- processes ----------------------------------------------------------------------

    def sh(self, argv: Sequence[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise MultiVMError(f"{shlex.join(argv)} exited {proc.returncode}: "
                               f"{(proc.stderr or proc.stdout).strip()[-800:]}")
        return proc

    def spawn(self, role: str, argv: Sequence[str]) -> subprocess.Popen:
        log = open(self.dir / f"{role}.log", "a")
        log.write(f"--- {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        self.processes[role] = proc
        return proc

    # --- the walkthrough ----------------------------------------------------------------

    def run(self) -> None:
        self.stage(f"booted (kernel {os.uname().release}, uptime {_uptime():.1f}s)")
        self.result["boot_seconds"] = _uptime()
        self.fresh_host()
        # The agents start as soon as their tokens exist, while the controller is still
        # coming up and taking the fabric: they retry the connection by themselves.
        if self.me.runs_controller:
            self.init_controller()
        self.start_agent(self.wait_barrier("tokens"))
        if self.me.runs_controller:
            self.start_controller()
        if self.me.virtualization:
            self.publish_vms()
            self.ping_peers()
            self.dump_kernel_state()
            if self.me.name == self.plan.restart_host:
                self.restart_agent_under_ping()
            self.signal(f"done-{self.me.name}")
        # Keep every kernel (and so every tunnel end) up until all pings are over.
        for guest in self.plan.guests:
            if guest.virtualization:
                self.wait_barrier(f"done-{guest.name}")
        self.stage("finished")

    def fresh_host(self) -> None:
        """A freshly installed host: NICs up, the management address on the first one."""
        by_mac = {}
        for link in Path("/sys/class/net").iterdir():
            with contextlib.suppress(OSError):
                by_mac[(link / "address").read_text().strip()] = link.name
        for nic, mac in zip(self.me.nics, self.me.macs):
            current = by_mac.get(mac)
            if current is None:
                raise MultiVMError(f"no NIC with MAC {mac} (for {nic}) in the guest; "
                                   f"have {sorted(by_mac.values())}")
            # udev names virtio NICs by PCI slot (enp0s10); the fabric says eth0, eth1. Name
            # them by MAC, as a .link file or udev rule does on a real host.
            if current != nic:
                self.sh(["ip", "link", "set", "dev", current, "name", nic])
            self.sh(["ip", "link", "set", nic, "up"])
        self.sh(["ip", "addr", "add", self.me.address, "dev", self.me.nics[0]])
        self.sh(["hostname", self.me.name], check=False)
        self.own_machine_id()
        self.stage("management address up")

    def own_machine_id(self) -> None:
        """A machine-id of this host's own, and a udevd that uses it.

        Every guest boots this machine's root file system, so all of them read the same
        /etc/machine-id: a cloned identity, like a VM image nobody resealed. It matters on
        the wire: udev's MACAddressPolicy=persistent derives the MAC of every software
        device (bond, bridge) from machine-id and device name, so both hosts' switches got
        the same MAC, and each bridge dropped the other's frames as its own. udevd read the
        id at boot, so it is restarted after the new one is mounted over the old.
        """
        machine_id = self.work / "machine-id"
        machine_id.write_text(secrets.token_hex(16) + "\n")
        self.sh(["mount", "--bind", str(machine_id), "/etc/machine-id"])
        udevd = next((p for p in ("/usr/lib/systemd/systemd-udevd", "/lib/systemd/systemd-udevd")
                      if os.path.exists(p)), None)
        if udevd is None:
            return  # no udevd: nothing assigns MACs from the machine-id
        self.sh(["udevadm", "control", "--exit"], check=False, timeout=60)
        self.sh([udevd, "--daemon"], timeout=60)

    def init_controller(self) -> None:
        state = self.work / "controller"
        hosts = [arg for g in self.plan.guests for arg in ("--host", g.name)]
        from controller.cli import host_token_path

        address = self.plan.controller_listen.rpartition(":")[0]
        self.sh([_exe("hnv-controller"), "init", "--state-dir", str(state), *hosts,
                 "--tls-address", address, "--tls-address", "127.0.0.1"])
        tokens = {g.name: host_token_path(state, g.name).read_text().strip() for g in self.plan.guests}
        # The CA certificate is public; the tokens are the secret, as before.
        self.signal("tokens", {"tokens": tokens, "ca": (state / "tls" / "ca.crt").read_text()})
        self.stage("controller initialised, host tokens published")

    def start_controller(self) -> None:
        state = self.work / "controller"
        self.spawn("controller", [_exe("hnv-controller"), "run", "--state-dir", str(state),
                                  "--listen", self.plan.controller_listen])
        ca = ssl.create_default_context(cafile=str(state / "tls" / "ca.crt"))
        self.wait("the controller to answer",
                  lambda: _http_status(f"{self.plan.controller_url}/metrics", ca) is not None)
        self.stage("controller listening")
        admin = (state / "admin.token").read_text().strip()
        env = dict(os.environ, HNV_CONTROLLER=self.plan.controller_url, HNV_TOKEN=admin)
        apply = [_exe("hnvctl"), "--controller", self.plan.controller_url,
                 "--token-file", str(state / "admin.token"), "--ca-file", str(state / "tls" / "ca.crt"), "apply"]
        for path in self.plan.fabric_files:
            apply += ["-f", str(CHECKOUT / path)]
        proc = subprocess.run(apply, capture_output=True, text=True, env=env, check=False, timeout=300)
        (self.dir / "apply.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise MultiVMError(f"hnvctl apply exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
        self.stage("fabric and tenants applied")

    def agent_argv(self, token_file: Path) -> list[str]:
        address = self.me.address.split("/")[0]
        return [_exe("hnv-agent"), "run", "--controller", self.plan.controller_url,
                "--host", self.me.name, "--token-file", str(token_file),
                "--ca-file", str(self.work / "ca.crt"),
                "--state-dir", str(self.work / "agent"),
                "--metrics-address", f"{address}:{self.plan.metrics_port}",
                # Under TCG the controller takes a while to come up: retry often. Drift
                # repair is not what this lab shows: resync rarely, leave the vCPU to pings.
                "--reconnect-max-delay", "2", "--resync-interval", "10"]

    def start_agent(self, ready: dict) -> None:
        token_file = self.work / "host.token"
        token_file.write_text(ready["tokens"][self.me.name] + "\n")
        token_file.chmod(0o600)
        (self.work / "ca.crt").write_text(ready["ca"])
        self.spawn("agent", self.agent_argv(token_file))
        self.stage("agent started")

    def health(self) -> dict | None:
        address = self.me.address.split("/")[0]
        return _http_json(f"http://{address}:{self.plan.metrics_port}/healthz")

    def publish_vms(self) -> None:
        """Wait until the agent has built this host's tenant VMs; publish their CA and MAC."""
        expected = _vms_placed_on(self.me.name)
        if not expected:
            raise MultiVMError(f"the tenants file places no VM on {self.me.name}")

        def vms_ready() -> dict | None:
            agent = self.processes["agent"]
            if agent.poll() is not None:
                raise MultiVMError(f"hnv-agent exited {agent.returncode}; see {self.me.name}/agent.log")
            # Cheapest check first: no namespace yet, no need to ask the agent anything.
            found = {}
            for netns in _namespaces():
                address = _vm_address(netns)
                if address:
                    found[netns] = address
            if set(found) != expected:
                return None
            health = self.health()
            if not health or health.get("applied_generation") in (None, 0):
                return None
            return found
        vms = self.wait("the agent to build this host's tenant VMs", vms_ready)
        self.result["vms"] = vms
        self.result["health_after_start"] = self.health()
        # The state the agent accepted (VSIDs, PAs, lookup records), for the host side.
        with contextlib.suppress(OSError):
            shutil.copy(self.work / "agent" / "state.json", self.dir / "agent-state.json")
        self.stage(f"tenant VMs up: {', '.join(sorted(vms))}")
        self.signal(f"vms-{self.me.name}", vms)

    def peers(self) -> list[tuple[str, str, dict]]:
        """(local VM, peer VM, peer facts) for every VM network shared with another host."""
        mine = self.result["vms"]
        pairs = []
        for guest in self.plan.guests:
            if not guest.virtualization or guest.name == self.me.name:
                continue
            theirs = self.wait_barrier(f"vms-{guest.name}")
            for local, facts in sorted(mine.items()):
                for peer, peer_facts in sorted(theirs.items()):
                    if peer_facts["network"] == facts["network"]:
                        pairs.append((local, peer, peer_facts))
        return pairs

    def ping_peers(self) -> None:
        pings = []
        for local, peer, facts in self.peers():
            # A few seconds of retries first: the peer's tunnel end may still be coming up.
            out = self.sh(["ip", "netns", "exec", local, "ping", "-c", "3", "-i", "0.3", "-W", "2",
                           "-w", "30", facts["ca"]], check=False, timeout=60).stdout
            neighbour = self.sh(["ip", "-n", local, "-j", "neigh", "show", facts["ca"]],
                                check=False).stdout
            learnt = [n.get("lladdr") for n in json.loads(neighbour or "[]")]
            pings.append({"from": local, "to": peer, "ca": facts["ca"], "network": facts["network"],
                          "peer_mac": facts["mac"], "learnt_mac": learnt[0] if learnt else None,
                          **ping_summary(out)})
        self.result["pings"] = pings
        self.stage(f"pinged {len(pings)} peer VMs")

    def restart_agent_under_ping(self) -> None:
        """A continuous ping across kill -9 and restart of the agent: no loss allowed."""
        local, peer, facts = self.peers()[0]
        ping = subprocess.Popen(["ip", "netns", "exec", local, "ping", "-i", str(RESTART_PING_INTERVAL),
                                 "-W", "1", facts["ca"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        time.sleep(2)
        agent = self.processes["agent"]
        old_pid = agent.pid
        agent.kill()  # SIGKILL: the harshest stop; nothing is cleaned up, by design
        agent.wait(timeout=10)
        self.stage("agent killed")
        time.sleep(1)
        self.spawn("agent", self.agent_argv(self.work / "host.token"))
        restarted = time.monotonic()

        def in_sync() -> dict | None:
            health = self.health()
            if health and health.get("applied_generation") and \
                    health.get("applied_generation") == health.get("desired_generation"):
                return health
            return None
        health = self.wait("the restarted agent to be in sync", in_sync)
        self.stage(f"agent restarted and in sync after {time.monotonic() - restarted:.1f}s")
        # Keep pinging past the first reconciles of the new agent, and then for as long as
        # the echoes not counted (the last ones, maybe still in flight at SIGINT) take.
        time.sleep(3 + PING_IN_FLIGHT)
        ping.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
        out, _ = ping.communicate(timeout=10)
        _sent, _answered, lost = ping_losses(out, RESTART_PING_INTERVAL)
        self.result["restart"] = {"from": local, "to": peer, "ca": facts["ca"],
                                  "old_pid": old_pid, "new_pid": self.processes["agent"].pid,
                                  "health": health,
                                  "resync_seconds": round(time.monotonic() - restarted, 1),
                                  **ping_summary(out), "lost": len(lost), "lost_seqs": lost[:50]}
        self.stage("continuous ping stopped")

    def dump_kernel_state(self) -> None:
        """What a person would look at first when a ping did not cross: kept per host."""
        commands = [["ip", "-d", "-br", "link"], ["ip", "-br", "addr"], ["ip", "route", "show", "table", "all"],
                    ["bridge", "vlan", "show"], ["bridge", "fdb", "show"], ["ip", "neigh", "show"],
                    ["cat", "/proc/net/bonding/hnv-team"], ["ip", "-s", "-br", "link"]]
        with open(self.dir / "kernel-state.txt", "w") as out:
            for argv in commands:
                proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
                out.write(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}\n")

    def finish(self, error: BaseException | None) -> int:
        with contextlib.suppress(Exception):
            self.dump_kernel_state()
        if error is not None:
            self.result["error"] = f"{type(error).__name__}: {error}"
            _fail_marker(self.dir, f"{self.me.name}: {error}")
        # Let the controller and agents die with the VM; nothing outlives it anyway.
        (self.dir / RESULT_FILE).write_text(json.dumps(self.result, indent=2, default=str))
        return 0 if error is None else 1


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def _namespaces() -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(os.listdir("/run/netns"))
    return []


def _vm_address(netns: str) -> dict | None:
    """A tenant VM's CA and MAC as seen inside its namespace, with its VM network."""
    proc = subprocess.run(["ip", "-n", netns, "-j", "addr", "show"], capture_output=True,
                          text=True, check=False, timeout=30)
    if proc.returncode != 0:
        return None
    for link in json.loads(proc.stdout or "[]"):
        if link.get("ifname") == "lo":
            continue
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                return {"ca": info["local"], "mac": link.get("address"),
                        "network": _network_of(netns)}
    return None


def _seed_vms() -> list[dict]:
    """The tenant VMs the applied documents declare (name, vmNetwork, host)."""
    import yaml  # only the guest needs it

    vms = []
    for path in FABRIC_FILES:
        document = yaml.safe_load((CHECKOUT / path).read_text()) or {}
        vms += document.get("vms", [])
    return vms


def _vms_placed_on(host: str) -> set[str]:
    return {vm["name"] for vm in _seed_vms() if vm.get("host") == host}


def _network_of(vm_name: str) -> str | None:
    """The VM network of a tenant VM, from the seed's tenants file (the source of truth)."""
    return next((vm.get("vmNetwork") for vm in _seed_vms() if vm.get("name") == vm_name), None)


def _http_status(url: str, context: ssl.SSLContext | None = None) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _http_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def guest_main(run_dir: Path, host: str) -> int:
    guest = Guest(LabPlan.load(run_dir), host)
    error: BaseException | None = None
    try:
        guest.run()
    except Exception as exc:  # reported to the host through failed + result.json
        error = exc
        print(f"multivm[{host}] failed: {exc}", file=sys.stderr, flush=True)
    return guest.finish(error)


# --- command line --------------------------------------------------------------------------


def format_outcome(outcome: LabOutcome) -> str:
    lines = [f"multi-kernel lab: {len(outcome.guests)} VMs, {outcome.seconds:.0f} s"]
    for g in outcome.guests.values():
        r = g.result
        state = "ok" if g.completed and g.returncode == 0 else f"FAILED ({g.failure or g.returncode})"
        lines.append(f"  {g.name:<12} {state}; booted in {r.get('boot_seconds', 0):.1f} s")
        for p in r.get("pings", []):
            lines.append(f"    ping {p['from']} -> {p['to']} ({p['ca']}, {p['network']}): "
                         f"{p['received']}/{p['transmitted']} received")
        if "restart" in r:
            p = r["restart"]
            lines.append(f"    agent killed and restarted under ping {p['from']} -> {p['to']}: "
                         f"{p['lost']} of {p['transmitted']} lost; in sync again after "
                         f"{p['resync_seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns_lab.multivm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("run", help="boot the lab, run the walkthrough, print a summary (default)")
    up.add_argument("--run-dir", type=Path, help="shared directory (default: a new temp dir, kept)")
    up.add_argument("--host", action="append", dest="hosts", help=f"hosts to boot (default {' '.join(DEFAULT_HOSTS)})")
    up.add_argument("--timeout", type=float, default=600)
    guest = sub.add_parser("guest", help="(inside a VM) one host's part")
    guest.add_argument("--run-dir", type=Path, required=True)
    guest.add_argument("--host", required=True)
    args = parser.parse_args(argv)
    if args.command == "guest":
        return guest_main(args.run_dir, args.host)
    if os.geteuid() != 0:
        parser.error("needs root: it creates a network namespace and tap devices")
    import tempfile

    run_dir = getattr(args, "run_dir", None) or Path(tempfile.mkdtemp(prefix="openhnv-multivm-"))
    outcome = run_lab(run_dir, tuple(getattr(args, "hosts", None) or DEFAULT_HOSTS),
                      timeout=getattr(args, "timeout", 600))
    print(format_outcome(outcome))
    for problem in outcome.problems():
        print(problem, file=sys.stderr)
    print(f"run directory: {run_dir}")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
