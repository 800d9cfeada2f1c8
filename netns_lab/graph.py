"""Draw the lab: the topology (and, when the lab is up, its VMs) as DOT, an image or text.

Owns rendering only. The picture comes from the topology (switch, clusters, hosts,
cabling, VLANs) plus what the running kernel shows when the lab is up: the tenant VMs
the agents made (their namespaces and addresses). Images are drawn by graphviz's
``dot`` (Debian package graphviz). It never changes anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from netns_lab.build import LabError, LabRecord, discover_vm_namespaces, namespace_exists, peer_namespaces, run
from netns_lab.topology import Topology


@dataclass(frozen=True)
class VmView:
    name: str
    host: str
    addresses: tuple[str, ...]


def running_vms(topology: Topology, record: LabRecord | None) -> list[VmView]:
    """The VM namespaces hanging off each lab host, read from the kernel (empty when down)."""
    if record is None:
        return []
    vms = []
    vm_names = set(discover_vm_namespaces(record))
    for host in topology.hosts:
        if not namespace_exists(host.name):
            continue
        for vm in sorted(peer_namespaces(host.name) & vm_names):
            vms.append(VmView(vm, host.name, vm_addresses(vm)))
    return vms


def vm_addresses(netns: str) -> tuple[str, ...]:
    proc = run(["ip", "-n", netns, "-j", "-4", "addr", "show"], check=False)
    if proc.returncode:
        return ()
    return tuple(
        f"{a['local']}/{a['prefixlen']}"
        for link in json.loads(proc.stdout or "[]") if link.get("ifname") != "lo"
        for a in link.get("addr_info", [])
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_label(text: str) -> str:
    """A quoted DOT label; a newline in ``text`` becomes a line break in the drawing."""
    return _quote(text).replace("\n", "\\n")


def to_dot(topology: Topology, vms: list[VmView] = ()) -> str:
    switch = topology.switch
    tagged = ",".join(map(str, switch.trunk_vlans))
    lines = [
        f"graph {_quote(topology.name)} {{",
        "  graph [fontname=Helvetica, fontsize=11, nodesep=0.3, ranksep=0.9];",
        "  node [fontname=Helvetica, fontsize=10, shape=box, style=rounded];",
        "  edge [fontname=Helvetica, fontsize=8];",
    ]
    switch_label = "\n".join((switch.namespace, f"{switch.bridge}: VLAN-filtering bridge",
                              f"native {switch.native_vlan} untagged, {tagged} tagged"))
    lines.append(f"  switch [shape=box3d, label={_dot_label(switch_label)}];")
    for cluster in topology.clusters:
        lines.append(f"  subgraph {_quote('cluster_' + cluster.name)} {{")
        lines.append(f"    label={_quote(f'{cluster.name} (host group {cluster.host_group}, {cluster.role.value})')};")
        for host in cluster.hosts:
            label = [host.name, str(host.address)]
            if host.name == topology.controller.host:
                label.append("controller")
            lines.append(f"    {_quote(host.name)} [label={_dot_label(chr(10).join(label))}];")
        for vm in vms:
            if topology.cluster_of(vm.host) is cluster:
                label = "\n".join((vm.name, *vm.addresses))
                lines.append(f"    {_quote('vm:' + vm.name)} [shape=ellipse, label={_dot_label(label)}];")
        lines.append("  }")
    for host in topology.hosts:
        for nic in host.nics:
            lines.append(f"  {_quote(host.name)} -- switch [label={_quote(f'{nic} - {topology.switch_port(host, nic)}')}];")
    external = topology.external
    if external is not None:
        label = "\n".join((external.namespace, "the external network", str(external.address),
                           f"web server :{external.web_port}"))
        lines.append(f"  {_quote('external')} [shape=box, style=dashed, label={_dot_label(label)}];")
        lines.append(f"  {_quote('external')} -- switch "
                     f"[label={_quote(f'eth0 - {external.port} (VLAN {external.vlan} untagged)')}];")
    for vm in vms:
        lines.append(f"  {_quote('vm:' + vm.name)} -- {_quote(vm.host)} [style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_text(topology: Topology, vms: list[VmView] = ()) -> str:
    switch = topology.switch
    tagged = ",".join(map(str, switch.trunk_vlans))
    lines = [f"lab {topology.name}: switch {switch.namespace} ({switch.bridge}, VLAN filtering; "
             f"VLAN {switch.native_vlan} untagged, {tagged} tagged on every host port)"]
    external = topology.external
    for c, cluster in enumerate(topology.clusters):
        last_cluster = c == len(topology.clusters) - 1 and external is None
        lines.append(f"{'└─' if last_cluster else '├─'} {cluster.name} "
                     f"(host group {cluster.host_group}, {cluster.role.value})")
        indent = "   " if last_cluster else "│  "
        for h, host in enumerate(cluster.hosts):
            last_host = h == len(cluster.hosts) - 1
            cabling = " ".join(f"{nic}={topology.switch_port(host, nic)}" for nic in host.nics)
            role = "  [controller]" if host.name == topology.controller.host else ""
            lines.append(f"{indent}{'└─' if last_host else '├─'} {host.name:<12} {str(host.address):<15} {cabling}{role}")
            host_vms = [vm for vm in vms if vm.host == host.name]
            for v, vm in enumerate(host_vms):
                lines.append(f"{indent}{'   ' if last_host else '│  '}{'└─' if v == len(host_vms) - 1 else '├─'} "
                             f"VM {vm.name} {' '.join(vm.addresses)}")
    if external is not None:
        lines.append(f"└─ {external.namespace} (the external network) {external.address} "
                     f"eth0={external.port}, VLAN {external.vlan} untagged; web server on port {external.web_port}")
    return "\n".join(lines) + "\n"


def render(dot: str, output: Path) -> None:
    """Write ``dot`` to ``output``: as is for .dot, drawn by graphviz for .png/.svg/.pdf."""
    fmt = output.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv"):
        output.write_text(dot)
        return
    if fmt not in ("png", "svg", "pdf"):
        raise LabError(f"graph output {output}: unknown format {fmt!r} (use .png, .svg, .pdf or .dot)")
    dot_bin = shutil.which("dot")
    if not dot_bin:
        raise LabError("graphviz's dot is not installed (apt-get install graphviz), "
                       "or write .dot, or use --text")
    proc = subprocess.run([dot_bin, f"-T{fmt}", "-o", str(output)], input=dot, text=True,
                          capture_output=True, check=False, timeout=60)
    if proc.returncode:
        raise LabError(f"dot -T{fmt} failed: {proc.stderr.strip()}")
