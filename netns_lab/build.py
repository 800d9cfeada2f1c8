"""Build and tear down the lab's physical layer: the switch, the hosts, their NICs.

Owns the lab record (``/run/openhnv-lab/<lab>.json``): the list of namespaces, links and
processes the lab made, each written to the record *before* it is created, so that
``down`` after a crash at any instant still knows everything that may exist and removes
exactly that, and nothing else; and finding the VM namespaces the agents made (through
the hosts' veths, and by the mark an agent puts on a VM namespace it creates). Also owns
the small shell every lab command uses to reach into a namespace (``run``,
``entered_netns``, both on agent.netns).

What gets built (the seed's cabling):

- one namespace for the physical switch, holding a VLAN-filtering bridge;
- one namespace per host, with its NICs (``eth0``, ``eth1``) as veth pairs whose other
  end is a port of that bridge: a trunk with the native VLAN untagged (PVID) and the
  trunk VLANs tagged;
- the management address on the host's first NIC, as on a fresh Hyper-V host. The agent
  moves it to its virtual switch when it builds the team;
- with ``external`` in the topology, one namespace for the network outside the fabric
  (the HNV gateway's front-end reaches it): one NIC on an access port of the switch, its
  VLAN untagged, and the upstream router's address.

Nothing is ever created in the caller's (root) namespace: veth pairs are created inside
the switch namespace with their peer placed straight into the host's. Removing a
namespace removes every device in it and the veth peers of those devices.

It does not start processes (``netns_lab.processes``) nor configure anything the agent
owns (team, virtual switch, PAs, tunnels, VMs).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent import naming, netns as agent_netns
from agent.netns import netns_exec_argv
from netns_lab.topology import Topology

RECORD_DIR = Path(os.environ.get("OPENHNV_LAB_RUN_DIR", "/run/openhnv-lab"))
NETNS_DIR = Path("/run/netns")


class LabError(RuntimeError):
    """Something the lab could not do; the message names the object and the reason."""


# --- running things in namespaces ----------------------------------------------------------


def run(argv: Sequence[str], *, netns: str | None = None, check: bool = True,
        timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (inside ``netns`` through ``ip netns exec`` when given), capture text."""
    full = netns_exec_argv(netns, argv)
    try:
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)
    except subprocess.TimeoutExpired:
        where = f" in namespace {netns}" if netns else ""
        raise LabError(f"{' '.join(argv)}{where} did not finish within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        where = f" in namespace {netns}" if netns else ""
        raise LabError(f"{' '.join(argv)}{where} exited {proc.returncode}: "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def ip_batch(netns: str, commands: Sequence[str], tool: str = "ip") -> None:
    """Many ``ip``/``bridge`` commands in one process (``-batch``): one fork, not dozens."""
    if commands:
        run([tool, "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")


@contextlib.contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """Move the calling thread into network namespace ``name`` for the ``with`` block.

    Sockets opened inside the block live in that namespace (an HTTP client talking to
    the controller over the lab's management network). setns() applies to the calling
    thread only, and the original namespace is restored on exit, also on error
    (agent.netns.entered_netns; here with the lab's error when the lab is not up).
    """
    if not (NETNS_DIR / name).exists():
        raise LabError(f"namespace {name} does not exist (is the lab up?)")
    with agent_netns.entered_netns(name):
        yield


def namespace_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def existing_namespaces() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


# --- the record ----------------------------------------------------------------------------


@dataclass
class ProcessEntry:
    role: str  # "controller", "agent", "prometheus" or "web" (the external network's)
    name: str  # host name
    netns: str
    argv: list[str]
    log: str
    pid: int | None = None
    start_time: int | None = None  # /proc/<pid>/stat field 22: tells a reused pid apart


@dataclass
class LinkEntry:
    netns: str
    name: str
    peer_netns: str
    peer: str


@dataclass
class LabRecord:
    """What a lab built, kept on disk; every entry is added before the object exists."""

    lab: str
    topology_source: str
    workdir: str  # tokens and the daemons' state: a local file system (SQLite needs one)
    artefacts: str = ""  # logs, captures, documents: kept where the user can read them

    @property
    def artefacts_dir(self) -> Path:
        return Path(self.artefacts or self.workdir)
    created: float = field(default_factory=time.time)
    namespaces: list[str] = field(default_factory=list)
    links: list[LinkEntry] = field(default_factory=list)
    processes: list[ProcessEntry] = field(default_factory=list)
    vm_namespaces: list[str] = field(default_factory=list)
    built: bool = False  # the physical layer is complete

    @staticmethod
    def path_for(lab: str) -> Path:
        return RECORD_DIR / f"{lab}.json"

    @property
    def path(self) -> Path:
        return self.path_for(self.lab)

    def save(self) -> None:
        """Write atomically (temporary file, fsync, rename): a crash leaves old or new."""
        RECORD_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, lab: str) -> LabRecord | None:
        try:
            data = json.loads(cls.path_for(lab).read_text())
        except FileNotFoundError:
            return None
        data["links"] = [LinkEntry(**link) for link in data.get("links", [])]
        data["processes"] = [ProcessEntry(**p) for p in data.get("processes", [])]
        return cls(**data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# --- build ---------------------------------------------------------------------------------


# The external network's NIC (topology.external): readable in captures as the upstream.
EXTERNAL_MAC = "02:4c:00:00:fe:00"


def host_mac(topology: Topology, host_index: int, nic_index: int) -> str:
    """Deterministic, locally administered MACs (02:4c:...:HH:NN): readable in captures."""
    return f"02:4c:00:00:{host_index + 1:02x}:{nic_index:02x}"


def build(topology: Topology, record: LabRecord) -> None:
    """Create the switch, the hosts and their cabling; ``record`` learns each one first."""
    foreign = [ns for ns in topology.namespaces if namespace_exists(ns) and ns not in record.namespaces]
    if foreign:
        raise LabError(
            f"namespace {foreign[0]} already exists and is not in the record of lab "
            f"{record.lab}: refusing to touch it (delete it, or use another topology name)"
        )
    for ns in topology.namespaces:
        if ns not in record.namespaces:
            record.namespaces.append(ns)
            record.save()
        if not namespace_exists(ns):
            run(["ip", "netns", "add", ns])

    switch = topology.switch
    # The cabling, recorded as one step before one batch creates it. Each veth is made in
    # the switch namespace with its peer placed directly in the host's: nothing ever
    # appears in the caller's namespace, even for an instant.
    switch_commands = [
        "link set lo up",
        # vlan_default_pvid: every new port starts with the native VLAN as untagged PVID.
        f"link add {switch.bridge} type bridge vlan_filtering 1 "
        f"vlan_default_pvid {switch.native_vlan} stp_state 0",
    ]
    vlan_commands = []
    for h, host in enumerate(topology.hosts):
        for n, nic in enumerate(host.nics):
            port = topology.switch_port(host, nic)
            entry = LinkEntry(switch.namespace, port, host.name, nic)
            if entry not in record.links:
                record.links.append(entry)
            switch_commands += [
                f"link add {port} type veth peer name {nic} netns {host.name} "
                f"address {host_mac(topology, h, n)}",
                f'link set {port} alias "{host.name} {nic}"',
                f"link set {port} master {switch.bridge} up",
            ]
            vlan_commands += [f"vlan add dev {port} vid {vlan}" for vlan in switch.trunk_vlans]
    external = topology.external
    if external is not None:
        # An access port: the external network's VLAN untagged, instead of the native one.
        entry = LinkEntry(switch.namespace, external.port, external.namespace, "eth0")
        if entry not in record.links:
            record.links.append(entry)
        switch_commands += [
            f"link add {external.port} type veth peer name eth0 netns {external.namespace} "
            f"address {EXTERNAL_MAC}",
            f'link set {external.port} alias "{external.namespace} eth0"',
            f"link set {external.port} master {switch.bridge} up",
        ]
        vlan_commands += [f"vlan del dev {external.port} vid {switch.native_vlan}",
                          f"vlan add dev {external.port} vid {external.vlan} pvid untagged"]
    switch_commands.append(f"link set {switch.bridge} up")
    record.save()
    ip_batch(switch.namespace, switch_commands)
    ip_batch(switch.namespace, vlan_commands, tool="bridge")
    if external is not None:
        ip_batch(external.namespace, ["link set lo up", "link set eth0 up",
                                      f"addr add {external.address} dev eth0"])

    for host in topology.hosts:
        commands = ["link set lo up"]
        commands += [f"link set {nic} up" for nic in host.nics]
        # A fresh host: the management address on its first NIC, untagged (native VLAN).
        commands.append(f"addr add {topology.management_interface(host)} dev {host.nics[0]}")
        ip_batch(host.name, commands)
    record.built = True
    record.save()


# --- teardown ------------------------------------------------------------------------------


def peer_namespaces(netns: str) -> set[str]:
    """Named namespaces holding the far end of a veth of ``netns`` (read from the kernel).

    The agents put each lab VM in a namespace of its own joined to the host by a veth;
    the kernel knows that peer's namespace (IFLA_LINK_NETNSID) even after a crash that
    lost every file, so teardown asks the kernel rather than a list.
    """
    ids = run(["ip", "-n", netns, "-j", "netns", "list-id"], check=False)
    links = run(["ip", "-n", netns, "-j", "link", "show"], check=False)
    if ids.returncode or links.returncode:
        return set()
    name_by_id = {entry["nsid"]: entry.get("name") for entry in json.loads(ids.stdout or "[]")}
    peers = set()
    for link in json.loads(links.stdout or "[]"):
        name = name_by_id.get(link.get("link_netnsid"))
        if name:
            peers.add(name)
    return peers


def marked_vm_namespaces(record: LabRecord) -> set[str]:
    """Namespaces an agent of this lab created for a VM, found by their mark alone.

    The agents mark each VM namespace they create (agent.netns.ensure_vm_netns) with the
    host's name; this finds one even when no veth leads to it any more (its port was
    deleted, its host namespace is gone). Another lab's VMs carry other host names.
    """
    own = set(record.namespaces)
    hosts = {naming.host_tag(ns) for ns in record.namespaces}
    found = set()
    for ns in agent_netns.netns_names() - own:
        try:
            mark = naming.parse_vm_netns_marker(agent_netns.vm_netns_marker_of(ns))
        except Exception:  # noqa: BLE001 - a stale name or a namespace we may not enter
            continue
        if mark is not None and mark[1] in hosts:
            found.add(ns)
    return found


def discover_vm_namespaces(record: LabRecord) -> list[str]:
    """The lab's VM namespaces: joined to a lab host by a veth, or marked by a lab agent."""
    own = set(record.namespaces)
    found = set(record.vm_namespaces) | marked_vm_namespaces(record)
    for ns in record.namespaces:
        if ns == record.namespaces[0] or not namespace_exists(ns):
            continue  # the switch's peers are the hosts
        found |= peer_namespaces(ns) - own
    return sorted(found)


def _kill_namespace_processes(netns: str) -> None:
    # Anything still running in a lab namespace is the lab's (an agent that forked, a
    # tcpdump, a ping): a namespace held open by a process would outlive `ip netns del`.
    pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
    if pids:
        subprocess.run(["kill", "-KILL", *pids], capture_output=True, check=False)


def teardown(record: LabRecord) -> list[str]:
    """Delete the VM namespaces, then every namespace in the record; return what was removed.

    Idempotent: what is already gone is skipped. Processes must have been stopped first
    (``netns_lab.processes.stop_all``); stragglers inside lab namespaces are killed here.
    """
    vm_namespaces = discover_vm_namespaces(record)
    if vm_namespaces != record.vm_namespaces:
        record.vm_namespaces = vm_namespaces
        record.save()
    removed = []
    # VMs first: some are found only through the hosts' veths (a VM namespace someone
    # else made), which vanish with the host namespaces.
    for ns in [*record.vm_namespaces, *reversed(record.namespaces)]:
        if not namespace_exists(ns):
            continue
        _kill_namespace_processes(ns)
        proc = run(["ip", "netns", "del", ns], check=False)
        if proc.returncode != 0 and namespace_exists(ns):
            raise LabError(f"namespace {ns}: could not delete: {proc.stderr.strip()}")
        removed.append(ns)
    record.remove()
    return removed
