"""Data-path overhead: tenant traffic inside NVGRE (and VXLAN) against the same hosts' PA path.

Two hosts, each a network namespace with one NIC cabled to a "physical" switch namespace
(a VLAN-filtering bridge; the NICs are trunks carrying the provider VLAN 802 tagged). The
physical side is built with ``ip``; everything a host holds - team, virtual switch,
provider VLAN device and PA, VRF, VSID bridge and gateway, the tenant VM's veth into its
namespace, the gretap (or VXLAN) tunnel and the lookup records - is built by the agent
itself (``agent.reconcile.Reconciler`` on a HostState per host), as on a real host.

Measured in the same run, interleaved, best of ``REPEATS``:

- iperf3 TCP, PA to PA (host A's PA to host B's PA: the provider path, no tunnel), and
  tenant VM to tenant VM (192.168.0.10 -> 192.168.0.11 inside NVGRE, key VSID<<8);
- ping RTT on both paths;
- the same tenant figures with the provider network switched to VXLAN.

This kernel may lack gretap, 802.1Q, bonding, VRF and VLAN filtering, so ``run`` boots
the distribution kernel with ``netns_lab.vm`` and runs this module inside (``--in-vm``),
which writes its figures as JSON into the shared directory. Under TCG (no KVM) absolute
throughput is that of an emulated CPU and means nothing; the ratio of the two paths,
measured on the same emulated CPU seconds apart, is the figure.

Owns the namespaces it makes (``dp-*``) and the iperf3 processes it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time

from agent.netns import netns_exec_argv
from bench.invm import figures_from_vm, write_figures
from bench.table import Row

SECTION = "datapath"
TARGET_RATIO = 0.8
REPEATS = 2
VSID = 5001
PROVIDER_VLAN = 802
PA = {"a": "10.80.2.20", "b": "10.80.2.21"}
CA = {"a": "192.168.0.10", "b": "192.168.0.11"}
VM_MAC = {"a": "00:15:5d:00:02:0a", "b": "00:15:5d:00:02:0b"}
GATEWAY_MAC = "00:15:5d:ff:50:01"
MANAGEMENT = {"a": "10.0.0.11", "b": "10.0.0.12"}
RESULT_FILE = "datapath.json"
IPERF_PORT = 5201


def host_state(host: str, encapsulation: str, generation: int, mode: str = "device") -> dict:
    """The HostState document the controller would send host ``host`` ("a" or "b")."""
    records = [{"vsid": VSID, "ca": CA[h], "mac": VM_MAC[h], "pa": PA[h], "vm_name": f"vm{h}"}
               for h in ("a", "b")]
    records.append({"vsid": VSID, "ca": "192.168.0.1", "mac": GATEWAY_MAC, "pa": "0.0.0.0",
                    "type": "Gateway", "vm_name": "Gateway"})
    return {
        "host": f"bench-{host}",
        "generation": generation,
        "team": {"members": ["eth0"], "mode": "SwitchIndependent"},
        "switch": {"logical_switch": "Virtualization"},
        "management": {"address": f"{MANAGEMENT[host]}/24"},
        "provider": {"logical_network": "Virtualization", "vlan": PROVIDER_VLAN, "subnet": "10.80.2.0/24",
                     "encapsulation": encapsulation, "tunnel_mode": mode,
                     "addresses": [{"routing_domain": "Fabrikam2", "address": PA[host]}]},
        "routing_domains": [{"id": 2, "name": "Fabrikam2", "subnets": [
            {"vsid": VSID, "prefix": "192.168.0.0/24", "gateway": "192.168.0.1"}]}],
        "ports": [{"name": f"vm{host}", "mac": VM_MAC[host], "ca": f"{CA[host]}/24", "vsid": VSID,
                   "netns": vm_netns(host)}],
        "records": records,
    }


def host_netns(host: str) -> str:
    return f"dp-host-{host}"


def vm_netns(host: str) -> str:
    return f"dp-vm-{host}"


SWITCH_NETNS = "dp-switch"


def sh(*argv: str, netns: str | None = None, check: bool = True, timeout: float = 120) -> str:
    full = netns_exec_argv(netns, argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def build_physical() -> None:
    """Switch and host namespaces, NICs as veth pairs into the switch (trunks)."""
    for name in (SWITCH_NETNS, host_netns("a"), host_netns("b"), vm_netns("a"), vm_netns("b")):
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
    sw = SWITCH_NETNS
    sh("ip", "-n", sw, "link", "add", "sw", "type", "bridge", "vlan_filtering", "1")
    sh("ip", "-n", sw, "link", "set", "sw", "up")
    for host in ("a", "b"):
        port = f"{host}0"
        sh("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host_netns(host))
        sh("ip", "-n", sw, "link", "set", port, "master", "sw")
        sh("bridge", "-n", sw, "vlan", "add", "dev", port, "vid", str(PROVIDER_VLAN))
        sh("ip", "-n", sw, "link", "set", port, "up")
        sh("ip", "-n", host_netns(host), "link", "set", "eth0", "up")


def teardown() -> None:
    for name in (vm_netns("a"), vm_netns("b"), host_netns("a"), host_netns("b"), SWITCH_NETNS):
        pids = sh("ip", "netns", "pids", name, check=False).split()
        if pids:
            subprocess.run(["kill", "-KILL", *pids], capture_output=True, check=False)
        sh("ip", "netns", "del", name, check=False)


def configure_hosts(encapsulation: str, generation: int, mode: str = "device") -> float:
    """Reconcile both hosts with the agent; returns the slower host's reconcile seconds."""
    from agent.reconcile import Reconciler
    from agent.state import parse_host_state

    slowest = 0.0
    for host in ("a", "b"):
        with Reconciler(netns=host_netns(host)) as reconciler:
            result = reconciler.reconcile(parse_host_state(host_state(host, encapsulation, generation, mode)))
        if result.errors:
            raise RuntimeError(f"agent on host {host} ({encapsulation}): "
                               + "; ".join(e.message for e in result.errors[:3]))
        slowest = max(slowest, result.duration_s)
    return slowest


def wait_for_ping(netns: str, address: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", address],
                          capture_output=True, check=False).returncode == 0:
            return
    raise RuntimeError(f"{address} does not answer from namespace {netns}")


def _listening(netns: str, port: int) -> bool:
    return bool(sh("ss", "-Hltn", f"sport = :{port}", netns=netns, check=False).strip())


def iperf3(server_netns: str, server_address: str, client_netns: str, seconds: float) -> tuple[float, int]:
    """(TCP throughput in bits/s received by the server, retransmits), one stream."""
    last = ""
    for _attempt in range(5):
        server = subprocess.Popen(["ip", "netns", "exec", server_netns, "iperf3", "-s", "-1", "-B",
                                   server_address, "-p", str(IPERF_PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not _listening(server_netns, IPERF_PORT) and time.monotonic() < deadline:
                time.sleep(0.1)
            proc = subprocess.run(["ip", "netns", "exec", client_netns, "iperf3", "-c", server_address,
                                   "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
                                  capture_output=True, text=True, timeout=seconds + 60, check=False)
            with contextlib.suppress(ValueError):
                report = json.loads(proc.stdout)
                received = report.get("end", {}).get("sum_received")
                if received is not None and not report.get("error"):
                    retransmits = report["end"].get("sum_sent", {}).get("retransmits", 0)
                    return received["bits_per_second"], retransmits
                last = report.get("error") or "no sum_received in the report"
            last = last or proc.stdout[-300:] + proc.stderr[-300:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                server.kill()
            server.wait()
    raise RuntimeError(f"iperf3 to {server_address} from {client_netns} failed 5 times: {last}")


def ping_rtt_ms(netns: str, address: str, count: int) -> float:
    """Average RTT in ms of ``count`` echo requests 50 ms apart."""
    output = sh("ping", "-n", "-q", "-c", str(count), "-i", "0.05", address, netns=netns)
    match = re.search(r"= [\d.]+/([\d.]+)/", output)
    if match is None:
        raise RuntimeError(f"no RTT in ping output: {output}")
    return float(match.group(1))


def describe_mtus() -> str:
    """'<namespace>/<device> <mtu>' for every device on the tenant and provider paths of host a."""
    shown = []
    for netns in (vm_netns("a"), host_netns("a")):
        for link in json.loads(sh("ip", "-j", "-d", "link", "show", netns=netns)):
            if link["ifname"] == "lo":
                continue
            kind = link.get("linkinfo", {}).get("info_kind", "nic")
            shown.append(f"{link['ifname']}({kind}) {link['mtu']}")
    return ", ".join(shown)


# The tenant paths measured, in this order: (encapsulation, tunnel mode, where the PA's
# VLAN device sits). "team" is the agent's layout; "switch" is the one it replaced (the
# VLAN device on the virtual switch's bridge), rebuilt by hand for the comparison.
PATHS = (("nvgre", "device", "team"), ("nvgre", "device", "switch"), ("nvgre", "flow", "team"),
         ("vxlan", "device", "team"), ("vxlan", "device", "switch"))
TUNNEL_PREFIXES = ("hnvt", "hnvx", "hnvf")  # agent.naming: per-peer gretap, VXLAN, flow tunnel


def path_key(encapsulation: str, mode: str, layout: str) -> str:
    return f"{encapsulation}-{mode}" + ("-on-switch" if layout == "switch" else "")


def tx_packets(netns: str) -> dict[str, int]:
    """Packets sent per device of a host: the tunnels (summed as "tunnel"), every other link."""
    counts: dict[str, int] = {"tunnel": 0}
    for link in json.loads(sh("ip", "-j", "-s", "link", "show", netns=netns)):
        sent = link["stats64"]["tx"]["packets"]
        if link["ifname"].startswith(TUNNEL_PREFIXES):
            counts["tunnel"] += sent
        else:
            counts[link["ifname"]] = sent
    return counts


def provider_vlan_device(host: str) -> tuple[str, str, str, int]:
    """(provider VLAN device, switch, team, provider MTU) of host ``host``, as the agent names them."""
    from agent import naming
    from agent.state import parse_host_state

    state = parse_host_state(host_state(host, "nvgre", 1))
    assert state.switch and state.team and state.provider
    return (naming.provider_vlan(state.switch.name, PROVIDER_VLAN), state.switch.name, state.team.name,
            state.provider.mtu)


def move_provider_vlan_to_switch() -> None:
    """The layout before the agent put the PA's VLAN device on the team: on the switch's
    bridge, the bridge and the team tagged in the VLAN. The next reconcile moves it back."""
    from agent import naming

    for host in ("a", "b"):
        device, switch, team, mtu = provider_vlan_device(host)
        ns = host_netns(host)
        sh("ip", "link", "del", device, netns=ns)
        sh("ip", "link", "add", "link", switch, "name", device, "mtu", str(mtu), "type", "vlan", "id",
           str(PROVIDER_VLAN), netns=ns)
        sh("bridge", "vlan", "add", "dev", switch, "vid", str(PROVIDER_VLAN), "self", netns=ns)
        sh("bridge", "vlan", "add", "dev", team, "vid", str(PROVIDER_VLAN), netns=ns)
        sh("ip", "addr", "add", f"{PA[host]}/24", "dev", device, netns=ns)
        # The agent's ownership marker, as the agents of that layout left it: the next
        # reconcile may then replace the device (it never touches a device not its own).
        sh("ip", "link", "set", device, "alias", naming.marker(naming.PROVIDER, str(PROVIDER_VLAN)), netns=ns)
        sh("ip", "link", "set", device, "up", netns=ns)


def measure(seconds: float, pings: int, log) -> dict:
    """Inside a kernel with every feature: build, measure, tear down; the figures as a dict."""
    teardown()
    build_physical()
    figures: dict = {"reconcile_s": {}, "segments": {}}
    device = provider_vlan_device("a")[0]
    try:
        for generation, (encapsulation, mode, layout) in enumerate(PATHS, start=1):
            key = path_key(encapsulation, mode, layout)
            figures["reconcile_s"][key] = configure_hosts(encapsulation, generation, mode)
            if layout == "switch":
                move_provider_vlan_to_switch()
            wait_for_ping(host_netns("a"), PA["b"])
            wait_for_ping(vm_netns("a"), CA["b"])
            if generation == 1:
                log("datapath: MTUs " + describe_mtus())
            # A warm-up, so neither path pays for ARP, route or conntrack set-up in its figure.
            ping_rtt_ms(vm_netns("a"), CA["b"], 3)
            ping_rtt_ms(host_netns("a"), PA["b"], 3)
            paths = {key: (vm_netns("b"), CA["b"], vm_netns("a"))}
            if generation == 1:
                paths["pa"] = (host_netns("b"), PA["b"], host_netns("a"))
            for _ in range(REPEATS):
                for path, (server_ns, address, client_ns) in paths.items():
                    before = tx_packets(host_netns("a"))
                    bps, retransmits = iperf3(server_ns, address, client_ns, seconds)
                    after = tx_packets(host_netns("a"))
                    sent = {name: after[name] - before.get(name, 0) for name in after}
                    rtt = ping_rtt_ms(client_ns, address, pings)
                    log(f"datapath: {path}: {bps / 1e6:.0f} Mbit/s, {retransmits} retransmits, rtt {rtt:.3f} ms, "
                        f"packets sent: tunnel {sent['tunnel']}, {device} {sent[device]}, eth0 {sent['eth0']}")
                    figures.setdefault(f"{path}_bps", 0.0)
                    if path != "pa" and bps > figures[f"{path}_bps"]:
                        figures["segments"][path] = sent["eth0"] / max(sent["tunnel"], 1)
                    figures[f"{path}_bps"] = max(figures[f"{path}_bps"], bps)
                    figures[f"{path}_rtt_ms"] = min(figures.get(f"{path}_rtt_ms", rtt), rtt)
        figures["kernel"] = sh("uname", "-r").strip()
    finally:
        teardown()
    return figures


# --- the host side ------------------------------------------------------------------------------


def _describe(key: str) -> str:
    encapsulation, mode, *rest = key.split("-")
    where = "PA VLAN on the switch (before)" if rest else "PA VLAN on the team"
    return f"{encapsulation.upper()} {mode} mode, {where}"


def _rows(figures: dict, where: str) -> list[Row]:
    pa = figures["pa_bps"]
    rows = [Row(SECTION, f"PA to PA, iperf3 TCP ({where})", f"{pa / 1e6:,.0f} Mbit/s",
                f"rtt {figures['pa_rtt_ms']:.3f} ms")]
    for encapsulation, mode, layout in PATHS:
        key = path_key(encapsulation, mode, layout)
        bps, rtt = figures[f"{key}_bps"], figures[f"{key}_rtt_ms"]
        ratio = bps / pa
        # Only the agent's own layout is held to the target; the old one is the comparison.
        target, met = (f">= {TARGET_RATIO}x", ratio >= TARGET_RATIO) if layout == "team" else ("", None)
        rows.append(Row(SECTION, f"tenant TCP, {_describe(key)}; NIC packets per tunnel packet "
                                 f"{figures['segments'][key]:.1f}",
                        f"{bps / 1e6:,.0f} Mbit/s", f"{pa / 1e6:,.0f} Mbit/s (PA to PA)",
                        f"{ratio:.2f}x", target, met))
        rows.append(Row(SECTION, f"tenant ping RTT, {_describe(key)}", f"{rtt:.3f} ms",
                        f"{figures['pa_rtt_ms']:.3f} ms (PA to PA)", f"+{rtt - figures['pa_rtt_ms']:.3f} ms"))
    rows.append(Row(SECTION, "agent reconcile of a host (first build / NVGRE flow mode / VXLAN switch-over)",
                    f"{figures['reconcile_s']['nvgre-device']:.2f} s / {figures['reconcile_s']['nvgre-flow']:.2f} s"
                    f" / {figures['reconcile_s']['vxlan-device']:.2f} s"))
    return rows


def run(quick: bool = False, log=print) -> list[Row]:
    seconds, pings = (2, 10) if quick else (5, 20)
    from netns_lab import features, vm

    if vm.in_vm() or not features.missing():
        figures = measure(seconds, pings, log)
        return _rows(figures, f"kernel {figures['kernel']}")
    if shutil.which("iperf3") is None:
        raise RuntimeError("iperf3 is not installed (make setup installs it)")
    log("datapath: this kernel lacks " + ", ".join(features.missing()) + "; booting the lab VM")
    figures, kvm = figures_from_vm("bench.datapath", ["--seconds", str(seconds), "--pings", str(pings)],
                                   RESULT_FILE, SECTION, log, timeout=1200)
    how = "KVM" if kvm else "TCG: absolute numbers are meaningless, the ratio is the figure"
    return _rows(figures, f"VM, kernel {figures['kernel']}, {how}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__.splitlines()[0])
    parser.add_argument("--in-vm", action="store_true", help="measure here and write JSON to the shared dir")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.in_vm:
        figures = measure(args.seconds, args.pings, lambda line: print(line, flush=True))
        write_figures(RESULT_FILE, figures)
        return 0
    from bench.table import render

    print(render(run(args.quick, log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
