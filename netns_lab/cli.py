"""``hnv-lab``: the seed's seven-host fabric on one kernel, and the walkthrough over it.

Owns the command line: parsing, where each command runs, and exit codes (0 done,
1 a check or step failed, 2 bad input such as a topology refused by field and reason).
The work is done by topology (the model), build (namespaces and cabling), processes
(controller and agents), postgresql (``--store postgresql``: the replicas' database),
prometheus (``up --prometheus``), demo (the walkthrough, and with ``--ha`` the failover
of a controller replica), capture and graph. ``--controllers N --store postgresql``
override the topology's ``controller.replicas``/``controller.store`` for up, demo and run.

When the running kernel lacks what the data plane needs (``netns_lab.features``: gretap,
802.1Q, bonding, VRF, VLAN filtering), ``demo`` and ``run`` re-run themselves inside a
throw-away VM booting the distribution kernel (``netns_lab.vm``). A lab lives only as
long as that VM, so ``up`` alone would be gone when it returns: it says so, and points
at ``demo`` and ``run -- CMD`` (up, CMD, down in one VM boot). Inside the VM the probe
passes and everything runs directly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netns_lab import build, features, postgresql, processes, prometheus, vm
from netns_lab.build import LabError, LabRecord
from netns_lab.topology import StoreKind, Topology, TopologyError, load_topology

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _say(text: str) -> None:
    print(text, flush=True)


def default_workdir(topology: Topology) -> Path:
    return build.RECORD_DIR / topology.name


def default_artefacts(topology: Topology, workdir: Path) -> Path:
    # In the VM, logs and captures go to the shared directory so that they outlive the
    # VM. The state stays on the guest's own file system: SQLite's WAL needs shared
    # memory, which the VM's 9p share does not give ("disk I/O error").
    shared = os.environ.get(vm.RWDIR_ENV)
    if vm.in_vm() and shared:
        return Path(shared) / f"lab-{topology.name}"
    return workdir


def _need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("hnv-lab needs root (it creates network namespaces): run it with sudo")


def _kernel_lacks() -> list[str]:
    if vm.in_vm():
        return []
    return features.missing()


# --- up / down -----------------------------------------------------------------------------


def lab_up(topology: Topology, *, workdir: Path | None = None, daemons: bool = True,
           topology_source: str = "seed", with_prometheus: bool = False) -> LabRecord:
    """Build the lab and start its daemons; idempotent (a lab already up is completed).

    ``with_prometheus`` (or the topology's ``prometheus.enabled``) also starts Prometheus
    scraping them (netns_lab.prometheus)."""
    _need_root()
    record = LabRecord.load(topology.name)
    if record is None:
        workdir = workdir or default_workdir(topology)
        record = LabRecord(lab=topology.name, topology_source=topology_source,
                           workdir=str(workdir), artefacts=str(default_artefacts(topology, workdir)))
        record.save()
    started = time.monotonic()
    if not record.built:
        build.build(topology, record)
        _say(f"up: switch {topology.switch.namespace} and {len(topology.hosts)} hosts cabled "
             f"({sum(len(h.nics) for h in topology.hosts)} NICs, trunks: VLAN "
             f"{topology.switch.native_vlan} native, {','.join(map(str, topology.switch.trunk_vlans))} tagged) "
             f"in {time.monotonic() - started:.1f} s")
    if daemons:
        t0 = time.monotonic()
        processes.start_all(topology, record)
        if len(topology.controller_replicas) == 1 and topology.controller.store is StoreKind.sqlite:
            controllers = f"controller on {topology.controller.host} listening at {topology.controller_url}"
        else:
            controllers = (f"{len(topology.controller_replicas)} controller replicas at "
                           f"{', '.join(topology.controller_urls)} on PostgreSQL {topology.postgresql_url}")
        _say(f"up: {controllers}, "
             f"{len(topology.hosts)} agents running ({time.monotonic() - t0:.1f} s); "
             f"tokens and state in {record.workdir}, logs in {record.artefacts_dir / 'logs'}")
    if daemons and (with_prometheus or topology.prometheus.enabled):
        t0 = time.monotonic()
        prometheus.start(topology, record)
        _say(f"up: prometheus on {prometheus.server_host(topology).name} at {prometheus.base_url(topology)} "
             f"scraping the controller and {len(topology.hosts)} agents every {prometheus.LAB_SCRAPE_INTERVAL} "
             f"({time.monotonic() - t0:.1f} s); data in {prometheus.workdir(record)}")
    return record


def lab_down(topology: Topology) -> list[str]:
    """Remove exactly what ``up`` built (and the agents' VM namespaces); idempotent."""
    _need_root()
    record = LabRecord.load(topology.name)
    if record is None:
        return []
    stopped = processes.stop_all(record)
    on_postgresql = any(p.role == postgresql.ROLE for p in record.processes)
    removed = build.teardown(record)
    dropped = []
    if on_postgresql and postgresql.remove(record):
        # The database held the fabric and the tokens' hashes: the controller's state
        # directory (token files, certificates) belongs to it and goes with it.
        shutil.rmtree(processes.controller_dir(record), ignore_errors=True)
        dropped.append(f"PostgreSQL cluster {postgresql.directory(record)}")
    return [*stopped, *(f"namespace {ns}" for ns in removed), *dropped]


# --- commands ------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, topology: Topology) -> int:
    lacking = _kernel_lacks()
    if lacking:
        _say(f"up: this kernel ({os.uname().release}) lacks {', '.join(lacking)}, so the lab runs "
             "inside a throw-away VM, and a VM's lab is gone when the VM exits.\n"
             "    hnv-lab demo                       up, the walkthrough, down: one VM boot\n"
             "    hnv-lab run -- 'CMD; CMD ...'      up, your commands, down: one VM boot, e.g.\n"
             "    hnv-lab run -- 'hnv-lab demo --keep && hnv-lab ping TenantVM01 TenantVM02'")
        return EXIT_BAD_INPUT
    lab_up(topology, workdir=args.workdir, daemons=not args.no_daemons,
           topology_source=str(args.topology or "seed"), with_prometheus=args.prometheus)
    return 0


def cmd_down(args: argparse.Namespace, topology: Topology) -> int:
    removed = lab_down(topology)
    if removed:
        _say("down: stopped/removed " + ", ".join(removed))
    else:
        _say(f"down: lab {topology.name} is not up (no record in {build.RECORD_DIR}); nothing to do")
    return 0


def cmd_status(args: argparse.Namespace, topology: Topology) -> int:
    from netns_lab import demo

    record = LabRecord.load(topology.name)
    if record is None:
        _say(f"lab {topology.name}: down")
        return EXIT_FAILED
    ok = True
    _say(f"lab {topology.name}: record {record.path}, work dir {record.workdir}, "
         f"logs {record.artefacts_dir / 'logs'}")
    for ns in record.namespaces:
        exists = build.namespace_exists(ns)
        ok &= exists
        _say(f"  node {ns:<14} {'present' if exists else 'MISSING'}")
    for vm_ns in build.discover_vm_namespaces(record):
        _say(f"  vm   {vm_ns:<14} present")
    for entry in record.processes:
        alive = processes.is_alive(entry)
        ok &= alive
        _say(f"  {entry.role:<10} {entry.name:<12} pid {entry.pid} {'running' if alive else 'DEAD'}"
             f"  log {entry.log}")
    if any(p.role == "controller" and processes.is_alive(p) for p in record.processes):
        result = demo.Hnvctl(topology, record).run("hosts")
        _say("  $ hnvctl hosts\n" + demo.indent(result.output, 4))
        ok &= result.returncode == 0
    return 0 if ok else EXIT_FAILED


def cmd_exec(args: argparse.Namespace, topology: Topology) -> int:
    node = topology.switch.namespace if args.node == "switch" else args.node
    if not build.namespace_exists(node):
        raise LabError(f"node {args.node}: no such namespace (is the lab up? nodes: "
                       f"{', '.join(topology.namespaces)} and the VMs)")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise LabError("exec: no command given (hnv-lab exec NODE -- CMD ...)")
    os.execvp("ip", ["ip", "netns", "exec", node, *command])


def cmd_ping(args: argparse.Namespace, topology: Topology) -> int:
    from netns_lab import demo

    result = demo.ping(topology, args.source, args.target, count=args.count)
    _say(result.output.rstrip())
    return 0 if result.returncode == 0 else EXIT_FAILED


def cmd_capture(args: argparse.Namespace, topology: Topology) -> int:
    from netns_lab import capture

    if args.count is None and args.timeout is None:
        args.timeout = 10.0
    netns, interface = capture.resolve_link(args.link, topology)
    _say(f"capture: {netns}:{interface} (count {args.count or '-'}, timeout {args.timeout or '-'} s)")
    pcap, frames = capture.capture_link(args.link, topology, write=args.write, count=args.count,
                                        timeout=args.timeout, bpf_filter=args.filter or "")
    for frame in frames:
        _say("  " + frame.line())
    _say(f"capture: {len(frames)} frames, pcap {pcap}")
    return 0


def cmd_graph(args: argparse.Namespace, topology: Topology) -> int:
    from netns_lab import graph

    record = LabRecord.load(topology.name) if os.geteuid() == 0 else None
    vms = graph.running_vms(topology, record)
    if args.text or not args.output:
        _say(graph.to_text(topology, vms).rstrip())
    if args.output:
        graph.render(graph.to_dot(topology, vms), args.output)
        _say(f"graph: wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace, topology: Topology) -> int:
    from netns_lab import demo

    return demo.main(topology, keep=args.keep, topology_source=str(args.topology or "seed"),
                     workdir=args.workdir, ha=args.ha)


def cmd_run(args: argparse.Namespace, topology: Topology) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise LabError("run: no command given (hnv-lab run -- CMD ...)")
    shell_line = command[0] if len(command) == 1 else shlex.join(command)
    record = lab_up(topology, workdir=args.workdir, topology_source=str(args.topology or "seed"))
    try:
        env = dict(os.environ, HNV_LAB_WORKDIR=record.workdir)
        return subprocess.run(["sh", "-c", shell_line], env=env, check=False).returncode
    finally:
        lab_down(topology)


# Commands that need the data plane's kernel features, and whether they may re-run
# themselves in a VM (only those that complete a whole lab life in one go).
KERNEL_COMMANDS = {"up", "down", "status", "exec", "ping", "capture", "demo", "run"}
VM_COMMANDS = {"demo", "run"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hnv-lab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command_name", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--topology", type=Path, help="topology YAML (default: the seed's fabric)")
        return c

    def controllers_options(c: argparse.ArgumentParser) -> None:
        c.add_argument("--controllers", type=int, metavar="N",
                       help="controller replicas (default: the topology's controller.replicas, 1); "
                            "more than one needs --store postgresql")
        c.add_argument("--store", choices=[kind.value for kind in StoreKind],
                       help="the controller's store (default: the topology's controller.store, sqlite); "
                            "postgresql runs a throw-away PostgreSQL on the controller's host")

    up = command("up", "build the switch and hosts, start the controller and agents")
    controllers_options(up)
    up.add_argument("--workdir", type=Path, help="logs and tokens (default /run/openhnv-lab/<lab>)")
    up.add_argument("--no-daemons", action="store_true", help="only the namespaces and cabling")
    up.add_argument("--prometheus", action="store_true",
                    help="also run Prometheus scraping the controller and agents, with the shipped "
                         "alert rules (default: the topology's prometheus.enabled)")
    command("down", "remove exactly what up built (also after a crash); idempotent")
    demo = command("demo", "up (if needed), the seed walkthrough step by step, then down")
    demo.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    demo.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    demo.add_argument("--ha", action="store_true",
                      help="the failover demo: three controller replicas on PostgreSQL (unless the "
                           "topology or --controllers says otherwise), the fabric up to Fabrikam2's VMs, "
                           "then kill -9 of the replica the Virtualization hosts watch under a 10/s tenant "
                           "ping (a topology with replicas runs that step after the whole walkthrough)")
    controllers_options(demo)
    command("status", "nodes, processes, the controller's view of host sync")
    ex = command("exec", "run a command in a node's namespace: hnv-lab exec NODE -- CMD")
    ex.add_argument("node", help="switch, a host (CON-HyperV6) or a VM (TenantVM01)")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ping = command("ping", "ping B from A (hosts or VMs); B's address is looked up")
    ping.add_argument("source")
    ping.add_argument("target")
    ping.add_argument("-c", "--count", type=int, default=3)
    cap = command("capture", "capture on a lab link and decode VLAN/NVGRE/VXLAN")
    cap.add_argument("link", help="switch:CON-HyperV6-eth0, CON-HyperV6:eth0, TenantVM01:eth0")
    cap.add_argument("-w", "--write", type=Path, help="keep the pcap here")
    cap.add_argument("-c", "--count", type=int, help="stop after N frames")
    cap.add_argument("--timeout", type=float, help="stop after S seconds (default 10 without -c)")
    cap.add_argument("--filter", help="tcpdump filter expression, e.g. 'ip proto 47'")
    graph = command("graph", "draw the lab: -o FILE.png|.svg|.dot, or --text")
    graph.add_argument("-o", "--output", type=Path)
    graph.add_argument("--text", action="store_true")
    run = command("run", "up, run a shell command, down (one VM boot where needed)")
    controllers_options(run)
    run.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    run.add_argument("command", nargs=argparse.REMAINDER)
    return p


HANDLERS = {
    "up": cmd_up, "down": cmd_down, "demo": cmd_demo, "status": cmd_status, "exec": cmd_exec,
    "ping": cmd_ping, "capture": cmd_capture, "graph": cmd_graph, "run": cmd_run,
}


def _run_in_vm(argv: list[str], lacking: list[str]) -> int:
    _say(f"hnv-lab: this kernel ({os.uname().release}) lacks {', '.join(lacking)}; "
         "running in a throw-away VM with the distribution kernel (boot ~30-40 s without KVM)")
    rwdir = Path(os.environ.get("HNV_LAB_VM_DIR") or
                 tempfile.mkdtemp(prefix="hnv-lab-vm-"))
    result = vm.run_in_vm([processes.executable("hnv-lab"), *argv], rwdir=rwdir)
    how = "" if result.completed else " (the VM did not report the command's exit code)"
    _say(f"hnv-lab: VM exited with {result.returncode}{how} after {result.seconds:.0f} s "
         f"({'KVM' if result.kvm else 'TCG'}); logs in {rwdir}")
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        topology = load_topology(args.topology)
        if getattr(args, "ha", False) and topology.controller.replicas == 1 and args.controllers is None:
            # demo --ha on a one-controller topology: the HA layout it demonstrates.
            args.controllers, args.store = 3, args.store or StoreKind.postgresql.value
        if getattr(args, "controllers", None) is not None or getattr(args, "store", None) is not None:
            topology = topology.with_controllers(args.controllers, args.store)
    except TopologyError as exc:
        print(f"hnv-lab: topology {exc.source} refused:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.command_name in VM_COMMANDS:
            lacking = _kernel_lacks()
            if lacking:
                return _run_in_vm(argv, lacking)
        return HANDLERS[args.command_name](args, topology)
    except LabError as exc:
        print(f"hnv-lab {args.command_name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"hnv-lab {args.command_name}: interrupted; `hnv-lab down` removes what was built",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
