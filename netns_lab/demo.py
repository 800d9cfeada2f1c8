"""The seed walkthrough, end to end, on the lab: ``hnv-lab demo``.

Owns the story and its checks. Every fabric change goes through ``hnvctl`` (one verb per
VMM cmdlet of the seed, the cmdlet printed next to it), every "what does the host now
hold" is read back from the hosts' kernels (``ip``, ``bridge``, ``hnv-agent show``), and
every claim of the walkthrough is a check that can fail: a ping that must cross, a ping
that must not, a GRE key on the wire, a PA count.

How it runs: hnvctl and ``hnv-agent show`` are called in this process (their ``main``
with captured output) instead of as new Python processes, which saves seconds per call
under software emulation; hnvctl's HTTP goes over the lab's management network because
the calling thread enters the controller host's namespace for the call. Pings and
captures are the real ``ping`` and ``tcpdump`` inside the namespaces.

With several controller replicas (``demo --ha``, or a topology asking for them) the demo
ends with the failover step (``run_failover_step``): ``kill -9`` of the replica the
Virtualization hosts watch while a tenant VM pings another 10 times a second; the hosts
must move to another replica (their /healthz), a VM created through a third replica must
reach both, no echo may be lost and every host must be InSync.

On failure: a failed check is printed with its reason and the walk goes on (later checks
still tell something); a failed hnvctl step stops the walk, because every later step
builds on it. Either way the exit status is 1 and the summary lists what failed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from netns_lab import build, processes
from netns_lab.build import LabError, LabRecord, entered_netns, run
from netns_lab.capture import Capture, DecodedFrame
from netns_lab.graph import vm_addresses
from netns_lab.pings import PING_IN_FLIGHT, ping_losses
from netns_lab.tcp import TcpService, http_get, tcp_exchange
from netns_lab.topology import ClusterRole, Topology
from netns_lab.webserver import came_from

# The seed's numbers (examples/seed-fabric.yaml): the transport site, the PA pool, the
# tenants' shared CA range and part I's VLAN tenants.
TRANSPORT_VLAN = 802
TRANSPORT_SUBNET = "10.80.2.0/24"
PA_RANGE = ("10.80.2.20", "10.80.2.250")
CA_PREFIX = "192.168.0.0/24"
CA_RANGE = ("192.168.0.10", "192.168.0.100")
CA_GATEWAY = "192.168.0.1"
# The IPv6 tenant: IPv6 customer addresses over the same IPv4 provider addresses.
CA6_PREFIX = "fd00:6::/64"
CA6_RANGE = ("fd00:6::10", "fd00:6::ff")
CA6_GATEWAY = "fd00:6::1"
VLAN_TENANTS = {  # VM network: (VLAN, prefix, pool start, pool end, gateway)
    "TenantA": (100, "172.16.100.0/24", "172.16.100.10", "172.16.100.100", "172.16.100.1"),
    "TenantB": (101, "172.16.101.0/24", "172.16.101.10", "172.16.101.100", "172.16.101.1"),
}
# Polled, so only a slow machine waits this long: the first sync includes the agents'
# start-up, which under software emulation on a busy machine takes minutes.
SYNC_TIMEOUT = 900.0
# Each poll is an HTTP request and a parse on both ends: under emulation that is CPU the
# agents need, so poll at a pace that costs little and adds at most this much latency.
SYNC_POLL = 1.0


def indent(text: str, spaces: int = 4) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in text.rstrip().splitlines())


@dataclass
class Result:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class StepFailed(Exception):
    """A fabric step did not go through; the walk cannot go on without it."""


# --- the tools, called in-process ------------------------------------------------------------


class Hnvctl:
    """``hnvctl`` against the lab's controller, run in this process, over the lab network."""

    def __init__(self, topology: Topology, record: LabRecord, url: str | None = None):
        self.netns = topology.controller.host
        self.url = url or topology.controller_url  # one replica's, when there are several
        self.environ = {
            "HNV_CONTROLLER": self.url,
            "HNV_TOKEN_FILE": str(processes.admin_token_file(record)),
            "HNV_CA_FILE": str(processes.ca_file(record)),
            # The lab runs a controller and every host's agent on one machine, maybe an
            # emulated one: a TLS handshake there can wait past hnvctl's 5 s while the
            # agents connect, and that is no reason to stop the walk.
            "HNV_CONNECT_TIMEOUT": "60",
        }

    def run(self, *argv: str) -> Result:
        try:
            from controller import hnvctl
        except ImportError as exc:
            return Result(127, f"hnvctl is not available: {exc}")
        out, err = io.StringIO(), io.StringIO()
        with entered_netns(self.netns):
            code = hnvctl.main(list(argv), stdout=out, stderr=err, environ=self.environ)
        return Result(code, out.getvalue() + err.getvalue())

    def json(self, *argv: str) -> Any:
        result = self.run(*argv, "-o", "json")
        if not result.ok:
            raise StepFailed(f"hnvctl {' '.join(argv)} -o json: {result.output.strip()}")
        return json.loads(result.output)


def agent_show(view: str, netns: str, output: str = "table") -> Result:
    """``hnv-agent show VIEW --netns NS``: the host's HNV state read back from its kernel."""
    try:
        from agent import cli as agent_cli
    except ImportError as exc:
        return Result(127, f"hnv-agent is not available: {exc}")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = agent_cli.main(["show", view, "--netns", netns, "-o", output])
    except Exception as exc:  # noqa: BLE001 - a tool's crash is a failed step, with its reason
        return Result(1, f"hnv-agent show {view} --netns {netns} failed: {type(exc).__name__}: {exc}")
    return Result(code, out.getvalue())


def address_of(topology: Topology, node: str) -> str:
    """A host's management address, a VM's first IPv4 address, or ``node`` if an address."""
    host = topology.host(node)
    if host is not None:
        return str(host.address)
    if build.namespace_exists(node):
        addresses = vm_addresses(node)
        if not addresses:
            raise LabError(f"{node} has no IPv4 address (has its agent configured it yet?)")
        return addresses[0].split("/")[0]
    if node.replace(".", "").isdigit() or ":" in node:
        return node
    raise LabError(f"{node}: not a host of the topology, nor a VM namespace, nor an address")


def ping(topology: Topology, source: str, target: str, *, count: int = 3, wait: float = 1.0) -> Result:
    """A real ICMP echo from ``source``'s namespace to ``target`` (name or address)."""
    if not build.namespace_exists(source):
        raise LabError(f"{source}: no such node (is the lab up? is it a host or a VM?)")
    address = address_of(topology, target)
    proc = run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), address],
               netns=source, check=False, timeout=count * (wait + 1) + 10)
    head = f"{source} -> {target} ({address})"
    return Result(proc.returncode, f"{head}\n{proc.stdout}{proc.stderr}")


# --- the walkthrough -------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Walkthrough:
    topology: Topology
    record: LabRecord
    hnvctl: Hnvctl
    checks: list[Check] = field(default_factory=list)
    step_number: int = 0
    started: float = field(default_factory=time.monotonic)
    _cas: dict[str, str] = field(default_factory=dict)

    # --- printing --------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def step(self, title: str) -> None:
        self.step_number += 1
        elapsed = time.monotonic() - self.started
        self.say(f"\n== {self.step_number}. {title}  [{elapsed:.0f} s]")

    def cmdlet(self, text: str) -> None:
        self.say(f"   PS> {text}")

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        self.say(f"   [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        return ok

    # --- doing ------------------------------------------------------------------------------

    def ctl(self, *argv: str, show: bool = True) -> Result:
        """One hnvctl step: printed as typed, output shown; a refusal stops the walk."""
        self.say(f"   $ hnvctl {' '.join(_shell_word(a) for a in argv)}")
        result = self.hnvctl.run(*argv)
        if show or not result.ok:
            self.say(indent(result.output, 5))
        if not result.ok:
            raise StepFailed(f"hnvctl {' '.join(argv)} exited {result.returncode}: {result.output.strip()}")
        return result

    def kernel(self, netns: str, *argv: str) -> str:
        """What a host's kernel shows now, printed under a prompt naming the host."""
        proc = run(list(argv), check=False)
        shown = " ".join(argv).replace(f"-n {netns} ", "")
        self.say(f"   {netns}# {shown}")
        self.say(indent(proc.stdout or proc.stderr, 5))
        return proc.stdout

    def agent_view(self, view: str, host: str) -> Result:
        self.say(f"   {host}# hnv-agent show {view}")
        result = agent_show(view, host)
        self.say(indent(result.output, 5))
        return result

    def wait_in_sync(self, hosts: list[str], what: str) -> bool:
        """Poll ``hnvctl hosts`` until each host applied the generation it is due."""
        deadline = time.monotonic() + SYNC_TIMEOUT
        started = time.monotonic()
        rows: dict[str, dict] = {}
        while time.monotonic() < deadline:
            rows = {row["name"]: row for row in self.hnvctl.json("hosts")}
            if all(_in_sync(rows.get(h)) for h in hosts):
                generations = ", ".join(f"{h} gen {rows[h]['applied_generation']}" for h in hosts)
                return self.check(f"in-sync-{what}", True,
                                  f"{generations} applied in {time.monotonic() - started:.1f} s")
            time.sleep(SYNC_POLL)
        lagging = [f"{h}: {(rows.get(h) or {}).get('sync', 'unknown')} "
                   f"(desired {(rows.get(h) or {}).get('desired_generation')}, applied "
                   f"{(rows.get(h) or {}).get('applied_generation')}) {(rows.get(h) or {}).get('reason') or ''}".rstrip()
                   for h in hosts if not _in_sync(rows.get(h))]
        return self.check(f"in-sync-{what}", False,
                          f"not in sync after {SYNC_TIMEOUT:.0f} s: " + "; ".join(lagging))

    def wait_guest_dhcp(self, vms: tuple[str, ...] | list[str], what: str) -> bool:
        """Where the topology's guests ask DHCP for their address (``agent.vm_dhcp``: the
        agents start each VM's client, agent.guest), poll until every VM holds the CA VMM
        gave it, a default route and the tenant MTU its host's server handed out."""
        if not self.topology.agent.vm_dhcp:
            return True
        deadline = time.monotonic() + SYNC_TIMEOUT
        started = time.monotonic()
        while True:
            found = {vm: _guest_config(vm, self.vm_ca(vm)) for vm in vms}
            if all(found.values()) or time.monotonic() > deadline:
                break
            time.sleep(SYNC_POLL)
        missing = [vm for vm, config in found.items() if not config]
        detail = "; ".join(f"{vm} {config}" if config else f"{vm}: no address {self.vm_ca(vm)} by DHCP"
                           for vm, config in found.items())
        return self.check(f"dhcp-{what}", not missing,
                          f"by DHCP from their hosts in {time.monotonic() - started:.1f} s: {detail}")

    def wait_migration_done(self, vm: str) -> None:
        """Poll ``hnvctl vm show`` until the controller published every stage of ``vm``'s
        migration (its ``migration`` is null); the InSync check that follows says the rest."""
        deadline = time.monotonic() + SYNC_TIMEOUT
        while time.monotonic() < deadline and self.hnvctl.json("vm", "show", vm).get("migration") is not None:
            time.sleep(SYNC_POLL)

    def vm_ca(self, vm: str) -> str:
        """The CA VMM gave ``vm`` (what a user would ping), or ``vm`` if it is no VM."""
        if vm not in self._cas:
            result = self.hnvctl.run("vm", "show", vm, "-o", "json")
            if not result.ok:
                return vm
            self._cas[vm] = str(json.loads(result.output)["ca"]).split("/")[0]
        return self._cas[vm]

    def ping_check(self, name: str, source: str, target: str, *, expect: bool = True,
                   count: int = 3, attempts: int = 3) -> bool:
        """A ping that must cross (retried: under emulation a first reply can be late) or
        must not (one try: any reply at all is a failure)."""
        address = target if target[0].isdigit() else (
            str(self.topology.host(target).address) if self.topology.host(target) else self.vm_ca(target))
        for attempt in range(attempts if expect else 1):
            result = ping(self.topology, source, address, count=count)
            if result.ok or not expect:
                break
        summary = next((line for line in result.output.splitlines() if "packets transmitted" in line),
                       result.output.strip().splitlines()[-1] if result.output.strip() else "no output")
        self.say(f"   {source}# ping {address}   ({summary.strip()})")
        if expect:
            return self.check(name, result.ok, f"{source} -> {target} ({address}): {summary.strip()}")
        return self.check(name, not result.ok,
                          f"{source} -> {target} ({address}) must not answer: {summary.strip()}")

    def capture_while(self, links: list[tuple[str, str]], bpf: str, action) -> list[DecodedFrame]:
        """Capture on ``links`` (namespace, interface) while ``action()`` runs; decoded frames."""
        return [f for frames in self.capture_each(links, bpf, action).values() for f in frames]

    def capture_each(self, links: list[tuple[str, str]], bpf: str, action) -> dict[str, list[DecodedFrame]]:
        """Like capture_while, the frames kept apart per ``namespace:interface``."""
        pcap_dir = self.record.artefacts_dir / "captures"
        pcap_dir.mkdir(parents=True, exist_ok=True)
        captures = [Capture(ns, ifname, pcap_dir / f"{ns}-{ifname}-{self.step_number}.pcap",
                            bpf_filter=bpf) for ns, ifname in links]
        for capture in captures:
            capture.start()
        try:
            action()
        finally:
            frames = {f"{c.netns}:{c.interface}": c.stop() for c in captures}
        return frames


def _in_sync(row: dict | None) -> bool:
    return bool(row) and row.get("sync") == "InSync" and (
        row.get("applied_generation") == row.get("desired_generation"))


def _shell_word(text: str) -> str:
    return f'"{text}"' if " " in text else text


def part1_document(topology: Topology) -> dict[str, Any]:
    """Part I of the series as a fabric document: management network and VLAN tenants."""
    management = topology.clusters_with_role(ClusterRole.management)
    vlan_clusters = topology.clusters_with_role(ClusterRole.vlan)
    groups = {c.host_group for c in (*management, *vlan_clusters)}
    vlan_groups = sorted({c.host_group for c in vlan_clusters})
    document: dict[str, Any] = {
        "hostGroups": [{"name": g} for g in sorted(groups)],
        "clusters": [{"name": c.name, "hostGroup": c.host_group} for c in (*management, *vlan_clusters)],
        "logicalNetworks": [
            {"name": "Management", "sites": [{
                "name": "Management", "hostGroups": ["All Hosts"],
                "subnetVlans": [{"subnet": str(topology.management.subnet), "vlan": 0}]}]},
        ],
        "uplinkPortProfiles": [{"name": "Management", "networkSites": ["Management"],
                                "teamMode": "SwitchIndependent", "loadBalancing": "HostDefault"}],
        "logicalSwitches": [{"name": "Management", "uplinkMode": "Team",
                             "uplinkPortProfiles": ["Management"]}],
        "vmNetworks": [{"name": "Management", "logicalNetwork": "Management", "isolation": "NoIsolation"}],
        "hosts": [],
    }
    if vlan_groups:
        document["logicalNetworks"].append({"name": "Tenants", "sites": [{
            "name": "Tenants", "hostGroups": vlan_groups,
            "subnetVlans": [{"subnet": prefix, "vlan": vlan} for vlan, prefix, *_ in VLAN_TENANTS.values()]}]})
        document["uplinkPortProfiles"].append({
            "name": "HostCluster", "networkSites": ["Management", "Tenants"],
            "teamMode": "SwitchIndependent", "loadBalancing": "HostDefault"})
        document["logicalSwitches"].append({"name": "HostCluster", "uplinkMode": "Team",
                                            "uplinkPortProfiles": ["HostCluster"]})
        for name, (vlan, prefix, start, end, gateway) in VLAN_TENANTS.items():
            document["vmNetworks"].append({
                "name": name, "logicalNetwork": "Tenants", "isolation": "VLAN",
                "subnets": [{"name": name, "prefix": prefix, "vlan": vlan, "ipPools": [
                    {"name": name, "rangeStart": start, "rangeEnd": end, "gateway": gateway}]}]})
    for cluster in (*management, *vlan_clusters):
        switch = "Management" if cluster.role is ClusterRole.management else "HostCluster"
        for host in cluster.hosts:
            document["hosts"].append({
                "name": host.name, "cluster": cluster.name,
                "managementAddress": topology.management_interface(host), "nics": list(host.nics),
                "virtualSwitch": {"logicalSwitch": switch, "managementAdapter": {"vmNetwork": "Management"}}})
    return document


def run_walkthrough(w: Walkthrough, *, only_for_failover: bool = False) -> None:
    """The seed walkthrough; ``only_for_failover`` (``demo --ha``) walks only what the
    failover step stands on: part I's fabric, the Virtualization hosts and Fabrikam2's
    two VMs (no VLAN tenants, no Fabrikam3, no migration), so it ends sooner."""
    topology = w.topology
    management = [h.name for c in topology.clusters_with_role(ClusterRole.management) for h in c.hosts]
    vlan_hosts = [h.name for c in topology.clusters_with_role(ClusterRole.vlan) for h in c.hosts]
    virtual = topology.clusters_with_role(ClusterRole.virtualization)
    if not virtual or len(virtual[0].hosts) < 2:
        raise StepFailed("the topology needs a cluster with role virtualization and two hosts")
    if TRANSPORT_VLAN not in topology.switch.trunk_vlans:
        raise StepFailed(f"the switch must trunk the transport VLAN {TRANSPORT_VLAN} (switch.trunk_vlans)")
    vcluster = virtual[0]
    hv_a, hv_b = vcluster.hosts[0].name, vcluster.hosts[1].name

    # --- part I ---------------------------------------------------------------------------
    w.step("Part I (previous post): management network and the VLAN tenants of "
           + ", ".join(c.name for c in topology.clusters_with_role(ClusterRole.vlan)))
    w.say("   Host groups, clusters, the Management and Tenants logical networks (VLAN 100/101),\n"
          "   port profiles, logical switches and VM networks, declaratively:")
    document = w.record.artefacts_dir / "part1-fabric.yaml"
    document.parent.mkdir(parents=True, exist_ok=True)
    document.write_text(yaml.safe_dump(part1_document(topology), sort_keys=False))
    w.ctl("apply", "-f", str(document))
    w.wait_in_sync([*management, *vlan_hosts], "part1")
    w.kernel(vlan_hosts[0], "ip", "-n", vlan_hosts[0], "-br", "link", "show", "master", "hnv-team")
    w.kernel(vlan_hosts[0], "ip", "-n", vlan_hosts[0], "-br", "-4", "addr", "show")

    if len(vlan_hosts) >= 2 and not only_for_failover:
        w.step("Part I's VLAN tenants: TenantA on VLAN 100, TenantB on VLAN 101")
        w.cmdlet(f'New-SCVirtualMachine -Name "VlanVM01" -VMHost {vlan_hosts[0]} ... (VM network TenantA)')
        w.ctl("vm", "create", "VlanVM01", "--vm-network", "TenantA", "--host", vlan_hosts[0])
        w.ctl("vm", "create", "VlanVM02", "--vm-network", "TenantA", "--host", vlan_hosts[1])
        w.ctl("vm", "create", "VlanVM03", "--vm-network", "TenantB", "--host", vlan_hosts[-1])
        w.wait_in_sync(vlan_hosts, "vlan-tenants")
        port_a = _switch_ports(topology, vlan_hosts[0])
        frames = w.capture_while(port_a, "vlan 100 and icmp",
                                 lambda: w.ping_check("vlan-100-ping", "VlanVM01", "VlanVM02"))
        tagged = [f for f in frames if 100 in f.vlans and "echo" in f.what]
        for frame in tagged[:2]:
            w.say("     wire: " + frame.line())
        w.check("vlan-100-tagged-on-the-wire", bool(tagged),
                f"{len(tagged)} ICMP frames tagged 802.1Q VLAN 100 on {vlan_hosts[0]}'s switch port")
        # TenantB's VM, given an address in TenantA's subnet as a careless tenant might:
        # VLAN 101 frames never reach VLAN 100, so even an L2 neighbour cannot answer.
        intruder = "172.16.100.99/24"
        run(["ip", "-n", "VlanVM03", "addr", "add", intruder, "dev", "eth0"], check=False)
        w.say(f"   VlanVM03# ip addr add {intruder} dev eth0   (TenantB's VM tries TenantA's subnet)")
        w.ping_check("vlan-101-cannot-reach-vlan-100", "VlanVM03", "VlanVM01", expect=False, count=2)
        run(["ip", "-n", "VlanVM03", "addr", "del", intruder, "dev", "eth0"], check=False)

    # --- part II: adding hosts ------------------------------------------------------------
    w.step(f"Adding hosts: host group {vcluster.host_group} and cluster {vcluster.name}")
    w.cmdlet(f'$virtualizationGroup = New-SCVMHostGroup -Name "{vcluster.host_group}" -ParentHostGroup $allHostsGroup')
    w.ctl("host-group", "create", vcluster.host_group, "--parent", "All Hosts")
    w.cmdlet(f'$virtualizationCluster = Add-SCVMHostCluster -Name "{vcluster.name}" -VMHostGroup $virtualizationGroup ...')
    w.ctl("cluster", "create", vcluster.name, "--host-group", vcluster.host_group)
    for host in vcluster.hosts:
        w.ctl("host", "create", host.name, "--cluster", vcluster.name, "--management-address",
              topology.management_interface(host), *[a for nic in host.nics for a in ("--nic", nic)])
    w.wait_in_sync([h.name for h in vcluster.hosts], "virtualcluster-added")
    w.kernel(hv_a, "ip", "-n", hv_a, "-br", "-4", "addr", "show")

    w.step("Adding network objects: the Virtualization logical network and its VLAN 802 site")
    w.cmdlet('$virtualizationLogicalNetwork = New-SCLogicalNetwork -Name "Virtualization" '
             '-LogicalNetworkDefinitionIsolation $false -EnableNetworkVirtualization $true -UseGRE $true -IsPVLAN $false')
    w.ctl("logical-network", "create", "Virtualization", "--network-virtualization", "--encapsulation", "nvgre")
    w.cmdlet(f'$virtualizationSubnetVlan = New-SCSubnetVLan -Subnet "{TRANSPORT_SUBNET}" -VLanID {TRANSPORT_VLAN}')
    w.cmdlet('$virtualizationLogicalNetworkDefinition = New-SCLogicalNetworkDefinition -Name "Virtualization" '
             '-LogicalNetwork $virtualizationLogicalNetwork -VMHostGroup @($virtualizationGroup) -SubnetVLan $virtualizationSubnetVlan')
    w.ctl("network-site", "create", "Virtualization", "--logical-network", "Virtualization",
          "--host-group", vcluster.host_group, "--subnet-vlan", f"{TRANSPORT_SUBNET}:{TRANSPORT_VLAN}")

    w.step("The uplink port profile and the logical switch Virtualization")
    w.cmdlet('$virtualizationUplinkPortProfile = New-SCNativeUplinkPortProfile -Name "Virtualization" '
             '-LogicalNetworkDefinition @($mgmtLogicalNetworkDefinition, $virtualizationLogicalNetworkDefinition) '
             '-EnableNetworkVirtualization $true -LBFOLoadBalancingAlgorithm "HostDefault" -LBFOTeamMode "SwitchIndependent"')
    w.ctl("uplink-port-profile", "create", "Virtualization", "--network-site", "Management",
          "--network-site", "Virtualization", "--network-virtualization",
          "--team-mode", "SwitchIndependent", "--load-balancing", "HostDefault")
    w.cmdlet('$virtualizationLogicalSwitch = New-SCLogicalSwitch -Name "Virtualization" -EnableSriov $false -SwitchUplinkMode "Team"')
    w.cmdlet('New-SCUplinkPortProfileSet -Name "Virtualization_<guid>" -LogicalSwitch $virtualizationLogicalSwitch '
             '-NativeUplinkPortProfile $virtualizationUplinkPortProfile')
    w.ctl("logical-switch", "create", "Virtualization", "--uplink-mode", "Team",
          "--uplink-port-profile", "Virtualization")

    w.step("The transport VM network Virtualization (no isolation)")
    w.cmdlet('$virtualizationVMNetwork = New-SCVMNetwork -Name "Virtualization" '
             '-LogicalNetwork $virtualizationLogicalNetwork -IsolationType "NoIsolation"')
    w.ctl("vm-network", "create", "Virtualization", "--logical-network", "Virtualization",
          "--isolation", "NoIsolation")

    w.step(f"Adding the logical switch to the {vcluster.name} hosts (team of both NICs, management adapter)")
    w.cmdlet("Set-SCVMHostNetworkAdapter -UplinkPortProfileSet $virtualizationUplinkPortProfileSet (each NIC)")
    w.cmdlet('New-SCVirtualNetwork -VMHost $node -VMHostNetworkAdapters $networkAdapters '
             '-LogicalSwitch $virtualizationLogicalSwitch -CreateManagementAdapter '
             '-ManagementAdapterName "Management" -ManagementAdapterVMNetwork $mgmtVMNetwork')
    for host in vcluster.hosts:
        w.ctl("host", "set-switch", host.name, "--logical-switch", "Virtualization",
              *[a for nic in host.nics for a in ("--nic", nic)], "--management-vm-network", "Management")
    w.wait_in_sync([h.name for h in vcluster.hosts], "logical-switch")
    w.kernel(hv_a, "ip", "-n", hv_a, "-br", "link", "show", "master", "hnv-team")
    addresses = w.kernel(hv_a, "ip", "-n", hv_a, "-br", "-4", "addr", "show")
    first_nic = vcluster.hosts[0].nics[0]
    moved = [line.split()[0] for line in addresses.splitlines() if str(vcluster.hosts[0].address) + "/" in line]
    w.check("management-address-moved-to-switch", bool(moved) and first_nic not in moved[0],
            f"{vcluster.hosts[0].address} is on {', '.join(moved) or 'nothing'} (was {first_nic})")
    w.ping_check("management-network-after-team", hv_a, topology.controller.host)

    w.step("Adding the provider IP pool (the PA space)")
    w.cmdlet(f'$virtualizationStaticIPPool = New-SCStaticIPAddressPool -Name "Default" '
             f'-LogicalNetworkDefinition $virtualizationLogicalNetworkDefinition -Subnet "{TRANSPORT_SUBNET}" '
             f'-IPAddressRangeStart "{PA_RANGE[0]}" -IPAddressRangeEnd "{PA_RANGE[1]}"')
    w.ctl("ip-pool", "create", "Default", "--network-site", "Virtualization", "--subnet", TRANSPORT_SUBNET,
          "--range-start", PA_RANGE[0], "--range-end", PA_RANGE[1])

    # --- tenants --------------------------------------------------------------------------
    vsids: dict[str, int] = {}
    tenants = (("Fabrikam2", ("TenantVM01", "TenantVM02")), ("Fabrikam3", ("TenantVM03", "TenantVM04")))
    for network, vms in tenants[:1] if only_for_failover else tenants:
        w.step(f"Adding tenant network {network}: VM subnet {CA_PREFIX} and its CA pool")
        w.cmdlet(f'${network.lower()}VMNetwork = New-SCVMNetwork -Name "{network}" -LogicalNetwork $virtualizationLogicalNetwork '
                 '-IsolationType "WindowsNetworkVirtualization" -CAIPAddressPoolType "IPV4" -PAIPAddressPoolType "IPV4"')
        w.ctl("vm-network", "create", network, "--logical-network", "Virtualization",
              "--isolation", "WindowsNetworkVirtualization", "--ca-family", "IPv4", "--pa-family", "IPv4")
        w.cmdlet(f'New-SCVMSubnet -Name "Default" -VMNetwork ${network.lower()}VMNetwork '
                 f'-SubnetVLan (New-SCSubnetVLan -Subnet "{CA_PREFIX}")')
        w.ctl("vm-subnet", "create", "Default", "--vm-network", network, "--prefix", CA_PREFIX)
        w.cmdlet(f'New-SCStaticIPAddressPool -Name "Default" -VMSubnet ${network.lower()}VMSubnet -Subnet "{CA_PREFIX}" '
                 f'-IPAddressRangeStart "{CA_RANGE[0]}" -IPAddressRangeEnd "{CA_RANGE[1]}"')
        w.ctl("ip-pool", "create", "Default", "--vm-network", network, "--vm-subnet", "Default",
              "--subnet", CA_PREFIX, "--range-start", CA_RANGE[0], "--range-end", CA_RANGE[1],
              "--gateway", CA_GATEWAY)
        vsids[network] = int(w.hnvctl.json("vm-subnet", "show", f"{network}/Default")["vsid"])
        w.say(f"   {network}/Default has VSID {vsids[network]}")

        w.step(f"Deploying {vms[0]} and {vms[1]} into {network}, one per host")
        w.cmdlet(f'New-SCVirtualMachine -Name "{vms[0]}" -VMConfiguration $vmConfig ... (placement: {hv_a})')
        w.ctl("vm", "create", vms[0], "--vm-network", network, "--host", hv_a)
        w.ctl("vm", "create", vms[1], "--vm-network", network, "--host", hv_b)
        w.wait_in_sync([hv_a, hv_b], f"{network.lower()}-vms")
        w.wait_guest_dhcp(vms, f"{network.lower()}-vms")
        w.cmdlet("Get-SCIPAddress")
        w.ctl("ip", "list", "--vm-network", network)
        w.ping_check(f"{network.lower()}-ping", vms[0], vms[1])
    if only_for_failover:
        return

    w.step("Looking at IP leases again: CA and PA addresses (Get-SCIPAddress)")
    w.ctl("ip", "list")
    leases = w.hnvctl.json("ip", "list")
    cas = {lease["holder"]: lease["address"] for lease in leases if lease["kind"] == "CA"}
    w.check("overlapping-customer-addresses",
            cas.get("TenantVM01") == cas.get("TenantVM03") and cas.get("TenantVM01") is not None,
            f"TenantVM01 (Fabrikam2) and TenantVM03 (Fabrikam3) both hold CA {cas.get('TenantVM01')} / {cas.get('TenantVM03')}")

    w.step("Host configuration objects: lookup records and provider addresses, kernel next to VMM")
    for host in (hv_a, hv_b):
        w.cmdlet(f"Get-NetVirtualizationLookupRecord   (on {host}, read back from its kernel)")
        kernel = agent_show("records", host, "json")
        w.agent_view("records", host)
        w.cmdlet(f"Get-NetVirtualizationProviderAddress   (on {host})")
        w.agent_view("provider-addresses", host)
        w.say(f"   VMM's view of {host}:")
        w.ctl("lookup-records", "--host", host)
        _compare_records(w, host, kernel)

    w.step("Isolation: the same CA in two VM networks reaches only its own tenant")
    target_ca = cas.get("TenantVM02")
    w.say(f"   TenantVM02 (Fabrikam2) and TenantVM04 (Fabrikam3) both hold {target_ca}; "
          "TenantVM01 pings it:")
    seen = w.capture_each(
        [("TenantVM02", "eth0"), ("TenantVM04", "eth0")], "icmp",
        lambda: w.ping_check("fabrikam2-reaches-its-own", "TenantVM01", str(target_ca)))
    requests = {link: len([f for f in frames if f.inner_dst == target_ca and "echo-request" in f.what])
                for link, frames in seen.items()}
    w.check("isolation-other-tenant-untouched",
            requests["TenantVM02:eth0"] > 0 and requests["TenantVM04:eth0"] == 0,
            f"echo requests for {target_ca} seen in TenantVM02 (Fabrikam2): {requests['TenantVM02:eth0']}, "
            f"in TenantVM04 (Fabrikam3): {requests['TenantVM04:eth0']}")

    w.step("PA count: hosts x VM networks, whatever the VM count")
    pas_before = [lease for lease in w.hnvctl.json("ip", "list", "--kind", "PA")]
    expected = len(vcluster.hosts) * 2
    w.check("pa-count", len(pas_before) == expected,
            f"{len(pas_before)} PAs for {len(vcluster.hosts)} hosts x 2 VM networks (expected {expected})")
    w.cmdlet(f'New-SCVirtualMachine -Name "TenantVM05" ... (Fabrikam2, on {hv_a})')
    w.ctl("vm", "create", "TenantVM05", "--vm-network", "Fabrikam2", "--host", hv_a)
    w.wait_in_sync([hv_a, hv_b], "tenantvm05")
    w.wait_guest_dhcp(["TenantVM05"], "tenantvm05")
    pas_after = w.hnvctl.json("ip", "list", "--kind", "PA")
    w.ctl("ip", "list", "--kind", "PA")
    w.check("no-new-pa-for-another-vm", len(pas_after) == len(pas_before),
            f"{len(pas_after)} PAs after deploying TenantVM05 (was {len(pas_before)})")

    w.step("The gateway record: the VM subnet's .1 answers on every host (distributed router)")
    w.ping_check("gateway-ping", "TenantVM01", CA_GATEWAY)
    w.ping_check("gateway-ping-other-host", "TenantVM02", CA_GATEWAY)

    w.step(f"Migration: TenantVM05 moves from {hv_a} to {hv_b}; every host's lookup records follow")
    w.ping_check("ping-before-migration", "TenantVM01", "TenantVM05")
    w.cmdlet(f'Move-SCVirtualMachine -VM "TenantVM05" -VMHost {hv_b}')
    w.ctl("vm", "migrate", "TenantVM05", "--host", hv_b)
    # The controller publishes the move in stages (docs/fabric.md#migration): the source
    # holds the VM until every host applied the first, so wait for the last one.
    w.wait_migration_done("TenantVM05")
    w.wait_in_sync([hv_a, hv_b], "migration")
    # The VM's NIC on its new host asked the new host's server: the same address.
    w.wait_guest_dhcp(["TenantVM05"], "after-migration")
    pa_b = next((lease["address"] for lease in pas_after
                 if lease["holder"] == hv_b and lease.get("vm_network") == "Fabrikam2"), None)
    ca05 = str(w.hnvctl.json("vm", "show", "TenantVM05")["ca"]).split("/")[0]
    w.agent_view("records", hv_a)
    row = next((r for r in _kernel_records(agent_show("records", hv_a, "json"))
                if r["ca"] == ca05 and r["vsid"] == str(vsids["Fabrikam2"])), None)
    w.check("record-follows-migration", row is not None and row["pa"] == str(pa_b),
            f"on {hv_a} the kernel maps TenantVM05 ({ca05}) to PA {row['pa'] if row else None} "
            f"({hv_b}'s Fabrikam2 PA is {pa_b})")
    w.ping_check("ping-after-migration", "TenantVM01", "TenantVM05")

    w.step("On the wire: a capture on the physical switch, decoded")
    ports = _switch_ports(topology, hv_a)
    w.say(f"   capturing on {', '.join(f'{ns}:{ifname}' for ns, ifname in ports)} "
          f"({hv_a}'s NICs) while TenantVM01 pings TenantVM02")
    frames = w.capture_while(ports, f"vlan {TRANSPORT_VLAN} and ip proto 47",
                             lambda: ping(topology, "TenantVM01", w.vm_ca("TenantVM02"), count=3))
    nvgre = [f for f in frames if f.encapsulation == "nvgre"]
    for frame in nvgre[:4]:
        w.say("     wire: " + frame.line())
    pa_of = {(lease["holder"], lease.get("vm_network")): lease["address"] for lease in pas_after}
    expected_pas = {pa_of.get((hv_a, "Fabrikam2")), pa_of.get((hv_b, "Fabrikam2"))}
    expected_cas = {cas.get("TenantVM01"), cas.get("TenantVM02")}
    good = [f for f in nvgre if TRANSPORT_VLAN in f.vlans and f.vsid == vsids["Fabrikam2"]
            and {f.outer_src, f.outer_dst} == expected_pas and {f.inner_src, f.inner_dst} == expected_cas]
    w.check("nvgre-on-the-wire", bool(good) and len(good) == len(nvgre),
            f"{len(good)}/{len(nvgre)} frames: 802.1Q VLAN {TRANSPORT_VLAN}, GRE key VSID "
            f"{vsids['Fabrikam2']} (Fabrikam2), PAs {sorted(filter(None, expected_pas))}, "
            f"CAs {sorted(filter(None, expected_cas))}")

    w.step(f"VM delete: TenantVM05 leaves {hv_b}, and its namespace goes with it")
    w.cmdlet('Remove-SCVirtualMachine -VM "TenantVM05"')
    w.ctl("vm", "delete", "TenantVM05")
    w.wait_in_sync([hv_a, hv_b], "vm-delete")
    # The agent made the VM's namespace (as a hypervisor makes the VM) and removes it
    # with its port; nothing is left for `down` to find.
    # The reconcile that reported InSync removed it: seconds, not a sync timeout.
    gone = _wait_for(lambda: not build.namespace_exists("TenantVM05"), 30.0)
    w.check("vm-delete-removes-namespace", gone,
            f"namespace TenantVM05 {'removed' if gone else 'still present'} after the VM was deleted")

    run_ipv6_tenant_step(w, hv_a, hv_b)
    if topology.clusters_with_role(ClusterRole.gateway) and topology.external is not None:
        run_gateway_steps(w, hv_a, hv_b)


def run_ipv6_tenant_step(w: Walkthrough, hv_a: str, hv_b: str) -> None:
    """An IPv6 VM network over the IPv4 PAs: ping6 across the hosts and to the distributed
    router, and on the wire NVGRE (outer IPv4, key VSID << 8) around the IPv6 echoes, with
    neighbour discovery answered on each host and never inside a tunnel."""
    topology, network, vms = w.topology, "Fabrikam6", ("TenantVM07", "TenantVM08")
    w.step(f"An IPv6 tenant: {network}, VM subnet {CA6_PREFIX}, over the same IPv4 provider addresses")
    w.cmdlet(f'$fabrikam6VMNetwork = New-SCVMNetwork -Name "{network}" -LogicalNetwork $virtualizationLogicalNetwork '
             '-IsolationType "WindowsNetworkVirtualization" -CAIPAddressPoolType "IPV6" -PAIPAddressPoolType "IPV4"')
    w.ctl("vm-network", "create", network, "--logical-network", "Virtualization",
          "--isolation", "WindowsNetworkVirtualization", "--ca-family", "IPv6", "--pa-family", "IPv4")
    w.ctl("vm-subnet", "create", "Default", "--vm-network", network, "--prefix", CA6_PREFIX)
    w.ctl("ip-pool", "create", "Default", "--vm-network", network, "--vm-subnet", "Default",
          "--subnet", CA6_PREFIX, "--range-start", CA6_RANGE[0], "--range-end", CA6_RANGE[1],
          "--gateway", CA6_GATEWAY)
    vsid = int(w.hnvctl.json("vm-subnet", "show", f"{network}/Default")["vsid"])
    w.ctl("vm", "create", vms[0], "--vm-network", network, "--host", hv_a)
    w.ctl("vm", "create", vms[1], "--vm-network", network, "--host", hv_b)
    w.wait_in_sync([hv_a, hv_b], "fabrikam6-vms")
    w.ctl("ip", "list", "--vm-network", network)
    cas = {vm: w.vm_ca(vm) for vm in vms}
    # An IPv6 address is usable once the VM's duplicate address detection is over (a
    # second or two after its NIC came up): until then it is "tentative".
    _wait_for(lambda: all("tentative" not in run(["ip", "-6", "addr", "show", "dev", "eth0"], netns=vm,
                                                 check=False).stdout for vm in vms), 30.0)
    ports = _switch_ports(topology, hv_a)
    w.say(f"   capturing on {hv_a}'s NICs while {vms[0]} pings {vms[1]} and the gateway {CA6_GATEWAY}")
    frames = w.capture_while(ports, f"vlan {TRANSPORT_VLAN} and ip proto 47", lambda: (
        w.ping_check("fabrikam6-ping6", vms[0], vms[1]),
        w.ping_check("fabrikam6-gateway-ping6", vms[1], CA6_GATEWAY)))
    nvgre = [f for f in frames if f.encapsulation == "nvgre"]
    for frame in nvgre[:4]:
        w.say("     wire: " + frame.line())
    echoes = [f for f in nvgre if f.vsid == vsid and {f.inner_src, f.inner_dst} == set(cas.values())
              and "ICMPv6 echo" in f.what]
    w.check("fabrikam6-ipv6-in-nvgre-on-the-wire", len(echoes) >= 2 and all(TRANSPORT_VLAN in f.vlans for f in echoes),
            f"{len(echoes)} IPv6 echoes between {cas[vms[0]]} and {cas[vms[1]]} in NVGRE VSID {vsid} "
            f"on VLAN {TRANSPORT_VLAN}, of {len(nvgre)} NVGRE frames")
    discovery = [f for f in nvgre if "neighbour-" in f.what or "router-" in f.what]
    w.check("fabrikam6-neighbour-discovery-stays-on-the-host", not discovery,
            f"{len(discovery)} neighbour or router discovery frames inside the tunnels"
            + (f": {discovery[0].line()}" if discovery else ""))


# --- the HNV gateway ---------------------------------------------------------------------------

GATEWAY_SERVICE = "Gateway"
SERVICE_PORT = 8080  # the tenant VMs' service behind Fabrikam2's NAT rule (external port 80)
GATEWAY_FAILOVER_GOAL = 10.0  # seconds from the active gateway host's loss to a new connection
CONNECT_TIMEOUT = 1.0  # one attempt of a new connection while the gateway fails over


def gateway_document(topology: Topology) -> dict[str, Any]:
    """The gateway hosts and their front-end as a fabric document (what
    examples/seed-gateway.yaml holds, from the lab's topology): host group Gateway inside
    the Virtualization group (so the gateway hosts reach the transport site), the External
    logical network on the external VLAN with its static pool, the Gateway port profile
    and switch, and the hosts with role gateway."""
    external = topology.external
    assert external is not None
    vcluster = topology.clusters_with_role(ClusterRole.virtualization)[0]
    clusters = topology.clusters_with_role(ClusterRole.gateway)
    subnet = external.address.network
    first, last = subnet.network_address + 10, subnet.network_address + min(99, subnet.num_addresses - 2)
    return {
        "hostGroups": [{"name": c.host_group, "parent": vcluster.host_group} for c in clusters],
        "clusters": [{"name": c.name, "hostGroup": c.host_group} for c in clusters],
        "logicalNetworks": [{"name": "External", "sites": [{
            "name": "External", "hostGroups": sorted({c.host_group for c in clusters}),
            "subnetVlans": [{"subnet": str(subnet), "vlan": external.vlan}],
            "ipPools": [{"name": "Default", "rangeStart": str(first), "rangeEnd": str(last),
                         "gateway": str(external.address.ip)}]}]}],
        "uplinkPortProfiles": [{"name": "Gateway", "networkSites": ["Management", "Virtualization", "External"],
                                "networkVirtualization": True}],
        "logicalSwitches": [{"name": "Gateway", "uplinkMode": "Team", "uplinkPortProfiles": ["Gateway"]}],
        "hosts": [{"name": host.name, "cluster": c.name, "role": "gateway",
                   "managementAddress": topology.management_interface(host), "nics": list(host.nics),
                   "virtualSwitch": {"logicalSwitch": "Gateway", "managementAdapter": {"vmNetwork": "Management"}}}
                  for c in clusters for host in c.hosts],
    }


def gateway_verbs(gateways: list[str], vm01_ca: str) -> list[tuple[str, tuple[str, ...]]]:
    """The walkthrough's gateway, as (the cmdlet VMM would run, the hnvctl verb that does
    it): the service on the gateway hosts, Fabrikam2 and Fabrikam3 each with a NAT
    gateway and connection, and Fabrikam2's rule for port 80 to TenantVM01."""
    verbs: list[tuple[str, tuple[str, ...]]] = [(
        '$gatewayService = Add-SCNetworkService -Name "Gateway" ... (front-end: External; back-end: '
        f'Virtualization; hosts: {", ".join(gateways)})',
        ("gateway-service", "create", GATEWAY_SERVICE, "--front-end-logical-network", "External",
         "--front-end-site", "External", "--external-ip-pool", "Default",
         "--back-end-logical-network", "Virtualization", *[a for g in gateways for a in ("--host", g)]))]
    for network in ("Fabrikam2", "Fabrikam3"):
        verbs += [
            (f'$gateway = Add-SCVMNetworkGateway -Name "{network}_Gateway" -NetworkGateway $gatewayService '
             f'-VMNetwork ${network.lower()}VMNetwork',
             ("gateway", "create", f"{network}_Gateway", "--vm-network", network,
              "--gateway-service", GATEWAY_SERVICE, "--connectivity", "nat")),
            (f'$nat = Add-SCNATConnection -Name "{network}_NAT" -VMNetworkGateway $gateway -ExternalIPPool $externalPool',
             ("nat-connection", "create", f"{network}_NAT", "--gateway", f"{network}_Gateway")),
        ]
    verbs.append((f'Add-SCNATRule -Name "Fabrikam2_Web" -NATConnection $nat -Protocol TCP -ExternalPort 80 '
                  f'-InternalIPAddress {vm01_ca} -InternalPort {SERVICE_PORT}',
                  ("nat-rule", "create", "Fabrikam2_Web", "--nat-connection", "Fabrikam2_NAT", "--protocol", "tcp",
                   "--external-port", "80", "--vm", "TenantVM01", "--internal-port", str(SERVICE_PORT))))
    return verbs


def _first_answer(attempt, timeout: float, poll: float = SYNC_POLL):
    """The first answer of ``attempt()`` that is not None, retried every ``poll`` seconds
    until ``timeout`` (a first connection waits on ARP across the fabric, slow under
    emulation)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = attempt()
        if answer is not None or time.monotonic() > deadline:
            return answer
        time.sleep(poll)


def run_gateway_steps(w: Walkthrough, hv_a: str, hv_b: str) -> None:
    """The HNV gateway after the walkthrough: Fabrikam2 and Fabrikam3 (the same CAs) leave
    through NAT to their own external addresses, a NAT rule forwards the external
    network to TenantVM01's service and never to TenantVM03 (the same CA in Fabrikam3),
    no tenant reaches another through the gateway, and the active gateway host is lost:
    new connections leave through the standby within GATEWAY_FAILOVER_GOAL seconds."""
    topology, external = w.topology, w.topology.external
    assert external is not None
    gateways = [h.name for c in topology.clusters_with_role(ClusterRole.gateway) for h in c.hosts]
    upstream = str(external.address.ip)
    networks = {"Fabrikam2": "TenantVM01", "Fabrikam3": "TenantVM03"}  # one VM each, the same CA

    w.step(f"The HNV gateway: hosts {', '.join(gateways)} and the External network on VLAN {external.vlan}")
    w.say(f"   The gateway hosts, the External logical network ({external.address.network}, VLAN {external.vlan},\n"
          "   its static pool for NAT addresses), the Gateway port profile and switch, declaratively:")
    document = w.record.artefacts_dir / "gateway-fabric.yaml"
    document.write_text(yaml.safe_dump(gateway_document(topology), sort_keys=False))
    w.ctl("apply", "-f", str(document))
    for cmdlet, argv in gateway_verbs(gateways, w.vm_ca("TenantVM01")):
        w.cmdlet(cmdlet)
        w.ctl(*argv)
    # Where the service put the role, while its hosts are still in their first apply.
    created = w.hnvctl.json("gateway-service", "show", GATEWAY_SERVICE)
    w.wait_in_sync([*gateways, hv_a, hv_b], "gateway")
    w.cmdlet("Get-SCIPAddress   (the NAT addresses)")
    w.ctl("ip", "list", "--kind", "NAT")
    nat = {lease["vm_network"]: lease["address"] for lease in w.hnvctl.json("ip", "list", "--kind", "NAT")}
    w.ctl("gateway-service", "list")
    w.cmdlet(f"Get-NetVirtualizationLookupRecord   (on {hv_a}: the gateway's GatewayWildcard records)")
    w.ctl("lookup-records", "--host", hv_a)
    active = w.hnvctl.json("gateway-service", "show", GATEWAY_SERVICE)["active"]
    w.kernel(active, "ip", "-n", active, "-br", "-4", "addr", "show")

    w.step(f"Out through NAT: each tenant reaches the external web server at {upstream} as its own address")
    port = [(topology.switch.namespace, external.port)]
    seen: dict[str, str | None] = {}

    def fetch_all() -> None:
        for network, vm in networks.items():
            page = _first_answer(lambda vm=vm: http_get(vm, upstream, external.web_port), SYNC_TIMEOUT / 10)
            seen[network] = _came_from(page)
            w.say(f"   {vm}# wget -qO- http://{upstream}/   ({network}): "
                  + (f"you came from {seen[network]}" if seen[network] else "no answer"))

    frames = w.capture_while(port, f"tcp port {external.web_port}", fetch_all)
    syns = [f for f in frames if f.inner_dst == upstream and f.what.endswith("[S]")]
    for frame in syns[:2]:
        w.say("     wire: " + frame.line())
    for network, vm in networks.items():
        w.check(f"gateway-nat-{network.lower()}", seen.get(network) == nat.get(network),
                f"{vm} ({network}, CA {w.vm_ca(vm)}) reached {upstream} as {seen.get(network)} "
                f"(its NAT address {nat.get(network)})")
    sources = {f.inner_src for f in syns}
    w.check("gateway-nat-on-the-wire", sources == set(nat.values()) and not any(
                (f.inner_src or "").startswith(CA_PREFIX.rsplit(".", 2)[0]) for f in frames),
            f"SYNs on the external port come from {sorted(filter(None, sources))}, no tenant CA on the wire")

    w.step(f"A NAT rule: port 80 of {nat.get('Fabrikam2')} reaches TenantVM01's service, never TenantVM03's")
    services = {vm: TcpService(vm, "0.0.0.0", SERVICE_PORT, f"{vm} ({network})") for network, vm in networks.items()}
    try:
        w.say(f"   TenantVM01 and TenantVM03 (both {w.vm_ca('TenantVM01')}) listen on port {SERVICE_PORT}")
        answer = _first_answer(lambda: tcp_exchange(external.namespace, nat["Fabrikam2"], 80), SYNC_TIMEOUT / 10)
        w.say(f"   {external.namespace}# connect {nat['Fabrikam2']}:80   -> {answer!r}")
        w.check("gateway-port-forward", answer == "TenantVM01 (Fabrikam2)" and not services["TenantVM03"].peers
                and services["TenantVM01"].peers[-1:] == [upstream],
                f"the external host reached {answer!r}, which saw it as {services['TenantVM01'].peers[-1:]}; "
                f"TenantVM03 saw {len(services['TenantVM03'].peers)} connections")
        other = tcp_exchange(external.namespace, nat["Fabrikam3"], 80, timeout=2.0)
        w.check("gateway-no-rule-no-way-in", other is None and not services["TenantVM03"].peers,
                f"{nat['Fabrikam3']}:80 (Fabrikam3, no NAT rule) answered {other!r}")

        w.step("No path between tenants through the gateway")
        before = len(services["TenantVM01"].peers)
        cross = tcp_exchange("TenantVM03", nat["Fabrikam2"], 80, timeout=2.0)
        w.say(f"   TenantVM03# connect {nat['Fabrikam2']}:80   (Fabrikam3 to Fabrikam2's forwarded port) -> {cross!r}")
        w.check("gateway-no-path-between-tenants", cross is None and len(services["TenantVM01"].peers) == before,
                f"TenantVM03 (Fabrikam3) -> Fabrikam2's NAT address {nat['Fabrikam2']}:80: "
                f"{'no connection' if cross is None else repr(cross)}")
        # The gateway hosts were added with the service: their first applies moved their
        # management addresses (unreachable for seconds, more than the failover time here).
        # That is no failure: the role stays where the service put it.
        steady = w.hnvctl.json("gateway-service", "show", GATEWAY_SERVICE)
        w.check("gateway-role-steady-while-hosts-came-up",
                (steady["active"], steady["active_since"]) == (created["active"], created["active_since"]),
                f"the role is on {steady['active']} ({steady.get('active_reason')}) since {steady['active_since']}; "
                f"the service put it on {created['active']} at {created['active_since']}")
        lost, standby = run_gateway_failover_step(w, gateways, networks, nat)
    finally:
        # Closed before a daemon is forked again below: a forked child would hold the
        # listening sockets open for its whole life.
        for service in services.values():
            service.close()
    run_gateway_host_back_step(w, lost, standby, networks, nat, hv_a, hv_b)


def run_gateway_failover_step(w: Walkthrough, gateways: list[str], networks: dict[str, str],
                              nat: dict[str, str]) -> tuple[str, str]:
    """The active gateway host is lost (its agent stops, its cables are pulled): the
    controller moves the role, and a new connection from each tenant leaves through the
    standby. Returns (the lost host, the standby)."""
    topology, record, external = w.topology, w.record, w.topology.external
    assert external is not None
    upstream = str(external.address.ip)
    lost = w.hnvctl.json("gateway-service", "show", GATEWAY_SERVICE)["active"]
    standby = next(g for g in gateways if g != lost)
    after = topology.controller.gateway_failover_after
    w.step(f"Gateway failover: {lost} is lost; new connections leave through {standby} "
           f"(controller: --gateway-failover-after {after:g})")
    # The machine is lost: its agent dies (kill -9: no goodbye, its connection to the
    # controller closes with it) and its cables are pulled. Why the cables too: a host
    # whose agent alone stopped keeps its kernel as it was and goes on forwarding
    # (`systemctl stop hnv-agent` leaves the kernel as it is), so there would be nothing
    # to fail over; a lost machine forwards nothing, and that is what the standby is for.
    agent = next(p for p in record.processes if p.role == "agent" and p.name == lost and processes.is_alive(p))
    cables = [port for _switch, port in _switch_ports(topology, lost)]
    lost_at, lost_wall = time.monotonic(), time.time()
    os.kill(agent.pid, signal.SIGKILL)  # type: ignore[arg-type]
    build.ip_batch(topology.switch.namespace, [f"link set {port} down" for port in cables])
    w.say(f"   # kill -9 {agent.pid}   (hnv-agent run --host {lost}); its cables ({', '.join(cables)}) are pulled")
    attempts = 0

    def new_connection() -> str | None:
        nonlocal attempts
        attempts += 1
        return _came_from(http_get(networks["Fabrikam2"], upstream, external.web_port, timeout=CONNECT_TIMEOUT))

    address = _first_answer(new_connection, 120.0, poll=0.2)
    took = time.monotonic() - lost_at
    w.say(f"   TenantVM01# wget -qO- http://{upstream}/   (a new connection each {CONNECT_TIMEOUT:g} s at most): "
          f"answered after {attempts} attempts, you came from {address}")
    moved = w.hnvctl.json("gateway-service", "show", GATEWAY_SERVICE)
    w.ctl("gateway-service", "list")
    w.check("gateway-failover-role-moved", moved["active"] == standby,
            f"active host {moved['active']} ({moved.get('active_reason') or 'no reason given'})")
    # The controller's part is its own time (the silence it waits for plus one tick of at
    # most a quarter of it): checked to within a second. The rest, the agents' applies,
    # is CPU: tens of milliseconds on a real host, seconds under emulation (2-3 s in the
    # kernel tier's VM on an idle machine). The whole is held to the goal: a new
    # connection through the standby within GATEWAY_FAILOVER_GOAL of the loss.
    decided = _seconds_since(lost_wall, moved.get("active_since"))
    decision_bound = after * 1.25 + 1.0
    w.check("gateway-failover-decision", decided is not None and decided <= decision_bound,
            f"the controller moved the role to {moved['active']} "
            f"{'?' if decided is None else f'{decided:.1f}'} s after {lost} was lost "
            f"(--gateway-failover-after {after:g}: at most {decision_bound:g} s)")
    w.check("gateway-failover-new-connections", address == nat["Fabrikam2"] and took <= GATEWAY_FAILOVER_GOAL,
            f"TenantVM01 reached {upstream} again, as {address}, through {standby} {took:.1f} s after {lost} "
            f"was lost ({'within' if took <= GATEWAY_FAILOVER_GOAL else 'over'} the {GATEWAY_FAILOVER_GOAL:g} s "
            f"goal; after the controller's move, the agents' applies and the first new connection took "
            f"{'?' if decided is None else f'{took - decided:.1f}'} s)")
    page = _first_answer(lambda: http_get(networks["Fabrikam3"], upstream, external.web_port), 30.0)
    forward = _first_answer(lambda: tcp_exchange(external.namespace, nat["Fabrikam2"], 80), 30.0)
    w.check("gateway-failover-both-tenants-and-the-rule", _came_from(page) == nat["Fabrikam3"]
            and forward == "TenantVM01 (Fabrikam2)",
            f"through {standby}: TenantVM03 came from {_came_from(page)}, the NAT rule "
            f"answered {forward!r}")
    return lost, standby


def _came_from(page: str | None) -> str | None:
    """The address the external web server saw, from its page (None: no page)."""
    return came_from(page) if page else None


def _seconds_since(start: float, iso: str | None) -> float | None:
    """Seconds from ``start`` (time.time()) to the controller's ISO 8601 timestamp."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - start
    except ValueError:
        return None


def run_gateway_host_back_step(w: Walkthrough, lost: str, standby: str, networks: dict[str, str],
                               nat: dict[str, str], hv_a: str, hv_b: str) -> None:
    """The lost gateway host comes back (cables in, agent started) and stays the standby:
    the role does not move back, and new connections still leave through the standby."""
    topology, record, external = w.topology, w.record, w.topology.external
    assert external is not None
    upstream = str(external.address.ip)
    agent = next(p for p in record.processes if p.role == "agent" and p.name == lost)
    cables = [port for _switch, port in _switch_ports(topology, lost)]
    w.step(f"{lost} comes back: cables in, agent started; it stays the standby")
    build.ip_batch(topology.switch.namespace, [f"link set {port} up" for port in cables])
    processes.restart(record, agent)
    w.wait_in_sync([lost, standby, hv_a, hv_b], "gateway-host-back")
    still = w.hnvctl.json("gateway-service", "show", GATEWAY_SERVICE)["active"]
    again = _first_answer(lambda: http_get(networks["Fabrikam2"], upstream, external.web_port), 30.0)
    w.check("gateway-no-flapping", still == standby and _came_from(again) == nat["Fabrikam2"],
            f"active host {still} after {lost} came back; TenantVM01 came from {_came_from(again)}")


# The failover step's tenant ping: 10 echoes a second, as the users would watch.
HA_PING_INTERVAL = 0.1
FAILOVER_TIMEOUT = 120.0


def agent_health(topology: Topology, host: str) -> dict[str, Any]:
    """The agent's /healthz body (which controller it watches), over the management network."""
    import urllib.error
    import urllib.request

    spec = topology.host(host)
    assert spec is not None
    url = f"http://{spec.address}:{topology.agent.metrics_port}/healthz"
    with entered_netns(topology.controller.host):
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 503: unhealthy, the body still says why
            return json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return {}


def run_failover_step(w: Walkthrough) -> None:
    """kill -9 of the replica the Virtualization hosts watch, under a 10/s tenant ping.

    Each agent ranks the replicas in an order of its own (agent.watch), so the hosts may
    watch different replicas: the one killed is CON-HyperV6's (the first Virtualization
    host's), and every host that watched it must move to another.
    """
    topology, record = w.topology, w.record
    vcluster = topology.clusters_with_role(ClusterRole.virtualization)[0]
    hv_a = vcluster.hosts[0].name
    hosts = [h.name for h in vcluster.hosts]
    w.step(f"High availability: {len(topology.controller_replicas)} controller replicas on PostgreSQL; "
           f"kill -9 of the one {hv_a} watches, under a 10/s tenant ping")
    watched: dict[str, str] = {}

    def all_connected() -> bool:
        for host in hosts:
            health = agent_health(topology, host)
            if health.get("controller_connected") and health.get("controller"):
                watched[host] = health["controller"]
        return len(watched) == len(hosts)

    if not _wait_for(all_connected, FAILOVER_TIMEOUT):
        raise StepFailed(f"not every {vcluster.name} host is connected to a replica: {watched}")
    for host, url in watched.items():
        w.say(f"   {host} watches {url}   (its agent's /healthz)")
    victim_url = watched[hv_a]
    victim = next((p for p in record.processes if p.role == "controller"
                   and f"https://{p.argv[p.argv.index('--listen') + 1]}" == victim_url), None)
    if victim is None or not processes.is_alive(victim):
        raise StepFailed(f"no running replica listens at {victim_url}")
    movers = [host for host, url in watched.items() if url == victim_url]
    others = [url for url in topology.controller_urls if url != victim_url]

    target = w.vm_ca("TenantVM02")
    # A file, not a pipe: a pipe nobody reads would stall ping after 64 KiB of replies.
    with tempfile.TemporaryFile("w+") as ping_output:
        pinger = subprocess.Popen(build.netns_exec_argv("TenantVM01", ["ping", "-n", "-i", str(HA_PING_INTERVAL), target]),
                                  stdout=ping_output, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(2.0)  # the ping runs before the kill (some echoes answered first)
            w.say(f"   # kill -9 {victim.pid}    (hnv-controller run --listen {victim_url}, on {victim.netns})")
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
            killed_at = time.monotonic()
            moved: dict[str, str] = {}

            def all_moved() -> bool:
                for host in movers:
                    health = agent_health(topology, host)
                    if health.get("controller_connected") and health.get("controller") not in (None, victim_url):
                        moved[host] = health["controller"]
                return len(moved) == len(movers)

            ok = _wait_for(all_moved, FAILOVER_TIMEOUT)
            w.check("ha-hosts-moved", ok,
                    f"{', '.join(f'{h} moved from {victim_url} to {u}' for h, u in moved.items()) or 'none moved'} "
                    f"({time.monotonic() - killed_at:.1f} s after the kill)")

            # Through a replica no moved host watches, where there is one: the VM must
            # reach the hosts by the database and the revision log, not the same process.
            through = ([url for url in others if url not in moved.values()] or others)[-1]
            w.hnvctl = Hnvctl(topology, record, through)
            w.say(f"   # through another replica: HNV_CONTROLLER={through}")
            w.cmdlet(f'New-SCVirtualMachine -Name "TenantVM06" ... (placement: {hv_a})')
            w.ctl("vm", "create", "TenantVM06", "--vm-network", "Fabrikam2", "--host", hv_a)
            w.wait_in_sync(hosts, "ha-vm-create")
            w.wait_guest_dhcp(["TenantVM06"], "ha-vm-create")
            w.ping_check("ha-vm-through-another-replica", "TenantVM06", "TenantVM02")
            time.sleep(PING_IN_FLIGHT)
        finally:
            processes.stop_process(pinger, signal.SIGINT)
        ping_output.seek(0)
        output = ping_output.read()
    sent, answered, lost = ping_losses(output, HA_PING_INTERVAL)
    w.check("ha-no-ping-lost", sent > 0 and not lost,
            f"TenantVM01 -> TenantVM02 ({target}) every {HA_PING_INTERVAL} s throughout: {sent} sent, "
            f"{answered} answered, lost {lost[:10] or 'none'}")
    # Every host the fabric holds: `demo --ha` never adds the topology's gateway hosts.
    w.wait_in_sync([row["name"] for row in w.hnvctl.json("hosts")], "ha-all-hosts")


def _guest_config(vm: str, ca: str) -> str | None:
    """'192.168.0.10/24 on eth0, MTU 1458, default via 192.168.0.1' once the VM's namespace
    holds ``ca`` and an IPv4 default route; None before."""
    links = json.loads(run(["ip", "-4", "-j", "addr", "show"], netns=vm, check=False).stdout or "[]")
    nic = next(((link, a) for link in links for a in link.get("addr_info", []) if a.get("local") == ca), None)
    routes = json.loads(run(["ip", "-4", "-j", "route", "show", "default"], netns=vm, check=False).stdout or "[]")
    if nic is None or not routes:
        return None
    link, address = nic
    return (f"{ca}/{address.get('prefixlen')} on {link.get('ifname')}, MTU {link.get('mtu')}, "
            f"default via {routes[0].get('gateway')}")


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(SYNC_POLL)
    return True


def _kernel_records(result: Result) -> list[dict[str, str]]:
    """``hnv-agent show records -o json`` rows (Get-NetVirtualizationLookupRecord's
    column names) as {vsid, ca, mac, pa, type} strings."""
    if not result.ok:
        return []
    try:
        rows = json.loads(result.output)
    except json.JSONDecodeError:
        return []
    return [{"vsid": str(r.get("VirtualSubnetID")), "ca": str(r.get("CustomerAddress")),
             "mac": str(r.get("MACAddress")).lower(), "pa": str(r.get("ProviderAddress")),
             "type": str(r.get("Type"))} for r in rows]


def _compare_records(w: Walkthrough, host: str, kernel: Result) -> None:
    def key(r: dict) -> tuple[str, str, str, str]:
        return (str(r["vsid"]), str(r["ca"]), str(r["mac"]).lower(), str(r["pa"]))

    controller = {key(r) for r in w.hnvctl.json("lookup-records", "--host", host) if r.get("type") == "Static"}
    in_kernel = {key(r) for r in _kernel_records(kernel) if r["type"] == "Static"}
    missing, extra = controller - in_kernel, in_kernel - controller
    w.check(f"records-{host}", kernel.ok and bool(controller) and not missing and not extra,
            f"{len(in_kernel)} static records in the kernel, {len(controller)} from VMM"
            + (f"; missing {sorted(missing)}" if missing else "")
            + (f"; unexpected {sorted(extra)}" if extra else "")
            + ("" if kernel.ok else f"; hnv-agent show failed: {kernel.output.strip()}"))


def _switch_ports(topology: Topology, host_name: str) -> list[tuple[str, str]]:
    host = topology.host(host_name)
    assert host is not None
    return [(topology.switch.namespace, topology.switch_port(host, nic)) for nic in host.nics]


def main(topology: Topology, *, keep: bool = False, topology_source: str = "seed",
         workdir: Path | None = None, ha: bool = False) -> int:
    from netns_lab.cli import lab_down, lab_up

    started = time.monotonic()
    print(f"hnv-lab demo: the seed walkthrough on lab {topology.name} "
          f"({len(topology.hosts)} hosts, switch {topology.switch.namespace})", flush=True)
    record = None
    w = None
    failure = None
    try:
        record = lab_up(topology, workdir=workdir, topology_source=topology_source)
        w = Walkthrough(topology, record, Hnvctl(topology, record), started=started)
        run_walkthrough(w, only_for_failover=ha)
        if ha or len(topology.controller_replicas) > 1:
            if len(topology.controller_replicas) < 2:
                raise StepFailed("the failover step needs 2 or more controller replicas (--controllers 3 "
                                 "--store postgresql)")
            run_failover_step(w)
    except (StepFailed, LabError) as exc:
        failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - still tear down and report, with the trace
        traceback.print_exc()
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        checks = w.checks if w else []
        passed = sum(c.ok for c in checks)
        failed = [c for c in checks if not c.ok]
        if failure:
            print(f"\n[FAIL] step: {failure}\n       the walkthrough stopped here: every later step builds on this one",
                  flush=True)
        if record is not None:
            print(f"\nlogs: {record.artefacts_dir / 'logs'}", flush=True)
            if failure or failed:
                for entry in record.processes:
                    if not processes.is_alive(entry):
                        print(f"   {entry.role} {entry.name} is not running; last lines of {entry.log}:\n"
                              + indent(processes.tail(entry.log), 6), flush=True)
        if not keep and record is not None:
            removed = lab_down(topology)
            print(f"down: removed {len(removed)} processes and namespaces (--keep leaves the lab up)", flush=True)
        print(f"\ndemo: {passed} checks passed, {len(failed)} failed"
              + (", walkthrough stopped early" if failure else "")
              + f" in {time.monotonic() - started:.0f} s", flush=True)
        for check in failed:
            print(f"   FAILED {check.name}: {check.detail}", flush=True)
    return 0 if not failure and not failed and checks else 1
