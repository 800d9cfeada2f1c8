"""Tunnel-state programming: one host with P peers x V VSIDs, device mode vs flow mode.

One HostState (a switch, the provider VLAN, one VM network with V subnets, one remote VM
per peer PA in every subnet: P x V lookup records, no local VM) reconciled from empty by
the agent's own path (``agent.reconcile.Reconciler``: observe, plan, apply) in a fresh
namespace, once with ``tunnel_mode: device`` (a gretap per VSID and peer) and once with
``tunnel_mode: flow`` (one gretap, a tunnel port per VSID, eBPF map entries), in the
same run. Figures per mode: wall time of the reconcile, the devices in the namespace,
the kernel memory it took (Slab + percpu + kernel stack growth in /proc/meminfo, a
machine-wide figure, so taken on a quiet machine it is the namespace's), and the time
of the next reconcile (a resync: observe and an empty plan).

Needs gretap, VLAN-filtering bridges and eBPF at tc: on a kernel without them the
section boots the lab VM (netns_lab.vm). Owns its ``hnvtb-<hex>`` namespaces and
removes them; touches nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import time
from typing import Any

from bench.invm import figures_from_vm, write_figures
from bench.table import Row

SECTION = "tunnels"
PEERS, VSIDS = 1_000, 10
QUICK_PEERS = 100
VM_MEMORY = "8G"
RESULT_FILE = "tunnels.json"
FIRST_VSID = 7001
PROVIDER_SUBNET = ipaddress.ip_network("10.96.0.0/16")


def host_state(peers: int, vsids: int, mode: str) -> dict[str, Any]:
    """The bench host's HostState document: P peers x V VSIDs of remote VMs."""
    local = PROVIDER_SUBNET.network_address + 1
    subnets, records = [], []
    for v in range(vsids):
        vsid = FIRST_VSID + v
        subnets.append({"name": f"S{v}", "vsid": vsid, "prefix": f"172.{16 + v}.0.0/16",
                        "gateway": f"172.{16 + v}.0.1"})
        for p in range(peers):
            ca = ipaddress.ip_address(f"172.{16 + v}.0.0") + 2 + p
            records.append({"vsid": vsid, "ca": str(ca), "pa": str(local + 1 + p),
                            "mac": "00:15:5d:%02x:%02x:%02x" % (v, p >> 8, p & 0xFF)})
    return {
        "host": "BENCH-HOST", "generation": 1,
        "switch": {"logical_switch": "Virtualization"},
        "provider": {"logical_network": "Virtualization", "vlan": 802, "subnet": str(PROVIDER_SUBNET),
                     "tunnel_mode": mode, "addresses": [{"routing_domain": "Bench", "address": str(local)}]},
        "routing_domains": [{"id": 1, "name": "Bench", "subnets": subnets}],
        "records": records,
    }


def _kernel_kb() -> int:
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0])
    return fields["Slab"] + fields.get("Percpu", 0) + fields.get("KernelStack", 0)


@contextlib.contextmanager
def _namespace():
    name = f"hnvtb-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(f"/sys/fs/bpf/openhnv/{name}", ignore_errors=True)


def measure_mode(peers: int, vsids: int, mode: str, log) -> dict[str, Any]:
    from agent.reconcile import Reconciler
    from agent.state import parse_host_state

    state = parse_host_state(host_state(peers, vsids, mode))
    with _namespace() as netns, contextlib.closing(Reconciler(netns=netns)) as rec:
        rec.observe()  # opens the sockets: not timed
        kernel_before = _kernel_kb()
        started = time.monotonic()
        result = rec.reconcile(state)
        took = time.monotonic() - started
        if result.errors:
            raise RuntimeError(f"{mode} mode: {len(result.errors)} errors, first: {result.errors[0].message}")
        kernel_kb = _kernel_kb() - kernel_before
        started = time.monotonic()
        again = rec.reconcile(state)
        resync = time.monotonic() - started
        links = subprocess.run(["ip", "-n", netns, "-o", "link", "show"], capture_output=True,
                               text=True, check=True).stdout.count("\n")
    figures = {"mode": mode, "seconds": took, "devices": links, "kernel_kb": kernel_kb,
               "resync_seconds": resync, "resync_planned": again.planned}
    log(f"tunnels: {mode} mode, {peers} peers x {vsids} VSIDs: {took:.1f} s, {links} devices, "
        f"kernel +{kernel_kb / 1024:.1f} MiB, resync {resync:.2f} s")
    return figures


def measure(peers: int, vsids: int, log) -> dict[str, Any]:
    return {"kernel": os.uname().release, "peers": peers, "vsids": vsids,
            "modes": [measure_mode(peers, vsids, mode, log) for mode in ("device", "flow")]}


def _rows(figures: dict[str, Any], where: str) -> list[Row]:
    device, flow = figures["modes"]
    scale = f"{figures['peers']:,} peers x {figures['vsids']} VSIDs ({where})"
    rows = []
    for name, key, fmt in (("reconcile from empty", "seconds", "{:.1f} s"),
                           ("devices in the namespace", "devices", "{:,}"),
                           ("kernel memory", "kernel_kb", "{:.1f} MiB"),
                           ("resync (nothing to do)", "resync_seconds", "{:.2f} s")):
        value = flow[key] / 1024 if key == "kernel_kb" else flow[key]
        base = device[key] / 1024 if key == "kernel_kb" else device[key]
        ratio = f"{value / base:.2f}x" if base else ""
        rows.append(Row(SECTION, f"flow vs device mode, {name}, {scale}", fmt.format(value),
                        f"device {fmt.format(base)}", ratio))
    return rows


def run(quick: bool = False, log=print) -> list[Row]:
    peers = QUICK_PEERS if quick else PEERS
    from netns_lab import features, vm

    if vm.in_vm() or not features.missing():
        figures = measure(peers, VSIDS, log)
        return _rows(figures, f"kernel {figures['kernel']}")
    log("tunnels: this kernel lacks " + ", ".join(features.missing()) + "; booting the lab VM")
    # 10,000 gretaps and the agent reconciling them do not fit the lab VM's usual 2 GiB
    # (the agent was killed for memory after 16 minutes, 2026-12-02).
    figures, kvm = figures_from_vm("bench.tunnels", ["--peers", str(peers)], RESULT_FILE, SECTION, log,
                                   timeout=3600, memory=VM_MEMORY)
    how = "KVM" if kvm else "TCG: compare the modes, not the absolute times"
    return _rows(figures, f"VM, kernel {figures['kernel']}, {how}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tunnels", description=__doc__.splitlines()[0])
    parser.add_argument("--in-vm", action="store_true", help="measure here and write JSON to the shared dir")
    parser.add_argument("--peers", type=int, default=PEERS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.in_vm:
        figures = measure(args.peers, VSIDS, lambda line: print(line, flush=True))
        write_figures(RESULT_FILE, figures)
        return 0
    from bench.table import render

    print(render(run(args.quick, log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
