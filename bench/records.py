"""Lookup-record programming: the agent's batched netlink against iproute2, same run.

A lookup record becomes two kernel entries: a static bridge FDB entry (MAC -> tunnel
port, NTF_MASTER) and a permanent neighbour (CA -> MAC on the VSID bridge). For N
records (1,000 / 10,000 / 50,000), each method programs the same 2N entries into its
own fresh namespace (a bridge with a veth port, which this kernel has; a gretap port is
programmed the same way) and is timed from its input to the last ack:

- agent reconcile: the agent's own path, ``agent.observe`` + ``agent.plan.diff`` +
  ``agent.apply.Applier`` (which writes records through ``agent.netlink_batch``), from
  the desired kernel state to the last ack; sockets are the agent's long-lived ones, so
  opening them is not timed;
- netlink_batch alone: ``NeighbourSocket.replace_fdb``/``replace_neigh`` on the entries;
- iproute2 batch (the C baseline): ``bridge -batch`` then ``ip -batch`` on prepared files;
- iproute2 per record (the naive baseline): one ``bridge`` and one ``ip`` process per
  record, sampled over a few hundred records and extrapolated;
- pyroute2 per call: ``IPRoute.fdb``/``neigh`` one call per entry, sampled.

Every method's result is read back and counted, so a method cannot win by doing less.
Each figure is shown as wall time and CPU time (user + system of the process and its
children: the kernel's netlink work runs in the caller's system calls, so it is counted).
Targets are judged on CPU time, because on a shared machine wall time mostly measures the
other tenants (the table's machine line gives the load average); on a quiet machine the
two are close.
Also: a resync of 10,000 records already in place (the agent's observe + diff, an empty
plan) and the peak RSS of a process reconciling 50,000 records (measured in a subprocess,
beside the same interpreter's floor with the same imports).

Owns the bench namespaces (``hnvbench-<hex>``) and removes them; touches nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.netlink_batch import FdbEntry, NeighbourSocket, NeighEntry
from bench.table import Row, Stopwatch, Timing, rate, seconds

SECTION = "records"
SIZES = (1_000, 10_000, 50_000)
QUICK_SIZES = (1_000, 10_000)
NAIVE_SAMPLE = 200
PYROUTE2_SAMPLE = 1_000
REPEATS = 3
RESYNC_REPEATS = 5
RESYNC_SIZE = 10_000
RSS_SIZE = 50_000
TARGET_RATIO = 0.5
TARGET_RESYNC_S = 0.5
TARGET_RSS_MB = 200
# A scrape of an agent's /metrics reads every link's counters: with this many tunnel ports
# (the convergence bench's layout puts ~250 gretaps on a host in device mode), the agent's
# raw dump must cost at most a fifth of the CPU of pyroute2's full parse of the same links.
SCRAPE_TUNNELS = 250
SCRAPE_REPEATS = 20
TARGET_SCRAPE_RATIO = 5.0


@dataclass(frozen=True)
class Record:
    mac: str
    ip: str


def make_records(count: int, tag: int = 0x5d) -> list[Record]:
    """``count`` distinct records: MAC 02:<tag>:xx:xx:xx:01, CA 10.x.x.x."""
    return [
        Record(f"02:{tag:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01",
               f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        for i in range(count)
    ]


# Named and marked (ifalias) as the agent names and marks a VSID bridge and a tunnel port,
# so the agent's observe/plan/apply treat them as its own, as they would on a host.
BRIDGE = "hnvb5000"
PORT = "hnvt0123456789"
PORT_PEER = "bench-peer"


@dataclass
class BenchNamespace:
    """A namespace with the VSID bridge ``BRIDGE`` and its port ``PORT`` (a veth: this
    kernel may lack gretap, and the bridge treats every port alike for FDB entries)."""

    name: str
    bridge: int
    port: int

    def run(self, *argv: str, stdin: str | None = None) -> str:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def bench_namespace() -> Iterator[BenchNamespace]:
    name = f"hnvbench-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        script = "\n".join([
            f"link add {BRIDGE} type bridge",
            f"link set dev {BRIDGE} alias openhnv:bridge:5000",
            f"link add {PORT} type veth peer name {PORT_PEER}",
            f"link set dev {PORT} alias openhnv:tunnel:bench",
            f"link set {PORT} master {BRIDGE}",
            f"link set {BRIDGE} up", f"link set {PORT} up", f"link set {PORT_PEER} up",
        ])
        subprocess.run(["ip", "-n", name, "-batch", "-"], input=script, text=True, check=True)
        links = json.loads(subprocess.check_output(["ip", "-n", name, "-j", "link"], text=True))
        index = {link["ifname"]: link["ifindex"] for link in links}
        yield BenchNamespace(name, index[BRIDGE], index[PORT])
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def count_in_place(ns: BenchNamespace) -> tuple[int, int]:
    """(static FDB entries on the port, permanent neighbours on the bridge)."""
    with NeighbourSocket(ns.name) as sock:
        return len(sock.dump_fdb({ns.port})), len(sock.dump_neigh({ns.bridge}))


def _check_all_in_place(ns: BenchNamespace, count: int, method: str) -> None:
    fdb, neigh = count_in_place(ns)
    if (fdb, neigh) != (count, count):
        raise RuntimeError(
            f"{method} left {fdb} FDB entries and {neigh} neighbours in place of {count} each"
        )


# --- the methods -------------------------------------------------------------------------


def program_with_agent(ns: BenchNamespace, records: list[Record]) -> Timing:
    with NeighbourSocket(ns.name) as sock, Stopwatch() as watch:
        port, bridge = ns.port, ns.bridge
        errors = sock.replace_fdb([FdbEntry(port, r.mac) for r in records])
        errors += sock.replace_neigh([NeighEntry(bridge, r.ip, r.mac) for r in records])
    if errors:
        raise RuntimeError(f"agent: {len(errors)} entries refused, first: {errors[0].message}")
    return watch.timing


class AgentRecords:
    """The agent's own read-plan-write path for records, on one namespace: ``observe`` (links
    through pyroute2, FDB and neighbours through netlink_batch's dumps), ``diff`` against
    the desired kernel state, ``Applier.apply`` (records batched through netlink_batch).

    The desired state is the observed links plus the records, so the plan holds records
    only: this kernel cannot build the rest of a host (bond, 802.1Q, VRF, gretap), and
    the records are what this section measures.
    """

    def __init__(self, ns: BenchNamespace):
        from pyroute2 import IPRoute

        self.netns = ns.name
        self.ipr = IPRoute(netns=ns.name)
        self.sock = NeighbourSocket(ns.name)

    def desired(self, records: list[Record]) -> KernelStateType:
        from agent.kernel_model import Fdb, KernelState, Neighbour
        from agent.observe import observe

        have = observe(self.ipr, self.sock)
        want = KernelState(links=dict(have.links), vlans=dict(have.vlans),
                           addresses=dict(have.addresses), routes=dict(have.routes))
        for r in records:
            want.add(Fdb(BRIDGE, r.mac, port=PORT))
            want.add(Neighbour(BRIDGE, r.ip, r.mac))
        return want

    def reconcile(self, want) -> tuple[int, int]:
        """observe + diff + apply; (operations planned, errors)."""
        from agent.apply import Applier
        from agent.observe import observe
        from agent.plan import diff

        plan = diff(want, observe(self.ipr, self.sock))
        if not plan.ops:
            return 0, 0
        _applied, errors = Applier(self.ipr, self.sock, self.netns).apply(plan)
        return len(plan.ops), len(errors)

    def close(self) -> None:
        self.ipr.close()
        self.sock.close()


KernelStateType = object  # agent.kernel_model.KernelState, imported lazily


def program_with_agent_reconcile(ns: BenchNamespace, records: list[Record]) -> Timing:
    agent = AgentRecords(ns)
    try:
        want = agent.desired(records)  # the plan's input, built before the clock starts
        with Stopwatch() as watch:
            planned, errors = agent.reconcile(want)
        if errors or planned != 2 * len(records):
            raise RuntimeError(f"agent reconcile planned {planned} operations for {len(records)} records, "
                               f"{errors} refused")
        return watch.timing
    finally:
        agent.close()


def resync_with_agent_reconcile(ns: BenchNamespace, records: list[Record]) -> tuple[Timing, int]:
    """A reconcile with every record already in place: observe + diff, an empty plan."""
    agent = AgentRecords(ns)
    try:
        want = agent.desired(records)
        with Stopwatch() as watch:
            planned, _errors = agent.reconcile(want)
        return watch.timing, planned
    finally:
        agent.close()


def program_with_iproute2_batch(ns: BenchNamespace, records: list[Record]) -> Timing:
    with tempfile.TemporaryDirectory() as tmp:
        fdb_file, neigh_file = Path(tmp, "fdb"), Path(tmp, "neigh")
        fdb_file.write_text("".join(f"fdb replace {r.mac} dev {PORT} master static\n" for r in records))
        neigh_file.write_text(
            "".join(f"neigh replace {r.ip} lladdr {r.mac} dev {BRIDGE} nud permanent\n" for r in records)
        )
        with Stopwatch() as watch:
            subprocess.run(["bridge", "-n", ns.name, "-batch", str(fdb_file)], check=True)
            subprocess.run(["ip", "-n", ns.name, "-batch", str(neigh_file)], check=True)
        return watch.timing


def program_with_iproute2_per_record(ns: BenchNamespace, records: list[Record]) -> Timing:
    with Stopwatch() as watch:
        for r in records:
            subprocess.run(["bridge", "-n", ns.name, "fdb", "replace", r.mac, "dev", PORT, "master",
                            "static"], check=True)
            subprocess.run(["ip", "-n", ns.name, "neigh", "replace", r.ip, "lladdr", r.mac, "dev", BRIDGE,
                            "nud", "permanent"], check=True)
    return watch.timing


def program_with_pyroute2(ns: BenchNamespace, records: list[Record]) -> Timing:
    from pyroute2 import IPRoute  # only this baseline needs it

    with IPRoute(netns=ns.name) as ipr, Stopwatch() as watch:
        for r in records:
            ipr.fdb("replace", ifindex=ns.port, lladdr=r.mac, state=0x42, flags=0x04)  # static, master
            ipr.neigh("replace", ifindex=ns.bridge, dst=r.ip, lladdr=r.mac, state=0x80)  # permanent
    return watch.timing


# --- resync and memory ---------------------------------------------------------------------


def resync(ns: BenchNamespace, records: list[Record]) -> tuple[Timing, int]:
    """Read back the owned devices' records and diff them against ``records``.

    Returns (timing, entries the plan would change). The socket is the agent's long-lived
    one, so it is opened before the clock starts.
    """
    with NeighbourSocket(ns.name) as sock, Stopwatch() as watch:
        desired_fdb = {FdbEntry(ns.port, r.mac) for r in records}
        desired_neigh = {NeighEntry(ns.bridge, r.ip, r.mac) for r in records}
        in_place_fdb = set(sock.dump_fdb({ns.port}))
        in_place_neigh = set(sock.dump_neigh({ns.bridge}))
        changes = len(desired_fdb ^ in_place_fdb) + len(desired_neigh ^ in_place_neigh)
    return watch.timing, changes


def iproute2_show(ns: BenchNamespace) -> Timing:
    with Stopwatch() as watch:
        subprocess.run(["bridge", "-n", ns.name, "fdb", "show", "dev", PORT], capture_output=True, check=True)
        subprocess.run(["ip", "-n", ns.name, "neigh", "show", "dev", BRIDGE, "nud", "permanent"],
                       capture_output=True, check=True)
    return watch.timing


def scrape_counters_row(log) -> Row:
    """The tunnel counters of a /metrics scrape: the agent's read (agent.reconcile's
    tunnel_stats: netlink_batch's raw link dump) against pyroute2's get_links, CPU per
    read, SCRAPE_TUNNELS owned tunnel ports (veth ends with the tunnel marker)."""
    from pyroute2 import IPRoute

    from agent.reconcile import Reconciler

    with bench_namespace() as ns:
        script = "\n".join(
            line for i in range(SCRAPE_TUNNELS) for line in (
                f"link add hnvtb{i} type veth peer name hnvtb{i}p",
                f"link set dev hnvtb{i} alias openhnv:tunnel:{5000 + i}/10.0.0.1/10.0.1.{i % 250 + 1}"))
        subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=script, text=True, check=True)
        with Reconciler(netns=ns.name) as reconciler, IPRoute(netns=ns.name) as ipr:
            counted = len(reconciler.tunnel_stats())
            if counted != SCRAPE_TUNNELS:
                raise RuntimeError(f"the agent read {counted} tunnels of {SCRAPE_TUNNELS}")
            timings = {}
            for what, read in (("agent", reconciler.tunnel_stats), ("pyroute2", lambda: list(ipr.get_links()))):
                best: Timing | None = None
                for _ in range(REPEATS):  # best of REPEATS rounds of SCRAPE_REPEATS reads
                    with Stopwatch() as watch:
                        for _ in range(SCRAPE_REPEATS):
                            read()
                    best = watch.timing.best(best)
                assert best is not None
                timings[what] = Timing(best.wall / SCRAPE_REPEATS, best.cpu / SCRAPE_REPEATS)
    agent, baseline = timings["agent"], timings["pyroute2"]
    ratio = baseline.cpu / agent.cpu if agent.cpu else float("inf")
    log(f"records: tunnel counters of {SCRAPE_TUNNELS} tunnels: agent {agent}, pyroute2 {baseline}")
    return Row(SECTION, f"tunnel counters for a scrape, {SCRAPE_TUNNELS} tunnel ports",
               f"{agent.cpu * 1000:.1f} ms cpu", f"{baseline.cpu * 1000:.1f} ms cpu (pyroute2 get_links)",
               f"{ratio:.1f}x", f">= {TARGET_SCRAPE_RATIO:g}x", ratio >= TARGET_SCRAPE_RATIO)


def peak_rss_mb(count: int, *, work: bool = True) -> float:
    """Peak RSS (MiB) of a fresh interpreter that programs ``count`` records and reads
    them back (``work=False``: the same imports only, the interpreter's floor)."""
    argv = [sys.executable, "-m", "bench.records", "--rss-child", str(count)]
    if not work:
        argv.append("--idle")
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(output.splitlines()[-1])["maxrss_kib"] / 1024


def _rss_child(count: int, idle: bool) -> None:
    # Both import the agent's modules, so the floor is the interpreter plus what it loads.
    from agent import apply, observe, plan  # noqa: F401
    from pyroute2 import IPRoute  # noqa: F401

    if not idle:
        with bench_namespace() as ns:
            records = make_records(count)
            program_with_agent_reconcile(ns, records)
            _elapsed, changes = resync_with_agent_reconcile(ns, records)
            if changes:
                raise RuntimeError(f"resync after programming found {changes} differences")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"maxrss_kib": usage.ru_maxrss}))


# --- the table -----------------------------------------------------------------------------


def _faster(agent: Timing, count_agent: int, other: Timing, count_other: int) -> str:
    wall = (count_agent / agent.wall) / (count_other / other.wall)
    cpu = (count_agent / agent.cpu) / (count_other / other.cpu)
    return f"agent {wall:,.0f}x faster (cpu {cpu:,.0f}x)"


def run(sizes: tuple[int, ...] = SIZES, log=print) -> list[Row]:
    rows: list[Row] = []
    methods = (("agent reconcile", program_with_agent_reconcile),
               ("netlink_batch", program_with_agent),
               ("iproute2 batch", program_with_iproute2_batch))
    for count in sizes:
        records = make_records(count)
        best: dict[str, Timing] = {}
        # Interleaved and best of REPEATS: the machine is shared, so a single run mostly
        # measures whoever else is on the CPU; the fastest run is the method's own cost.
        for _ in range(REPEATS):
            for method, program in methods:
                with bench_namespace() as ns:
                    timing = program(ns, records)
                    _check_all_in_place(ns, count, method)
                best[method] = timing.best(best.get(method))
        batch = best["iproute2 batch"]
        log(f"records: {count:>6}: " + ", ".join(f"{m} {t.wall:.3f} s (cpu {t.cpu:.3f})" for m, t in best.items()))
        at_target = count == 10_000
        for method, label in (("agent reconcile", "agent: observe+diff+apply"),
                              ("netlink_batch", "netlink_batch alone")):
            timing = best[method]
            ratio, cpu_ratio = batch.wall / timing.wall, batch.cpu / timing.cpu
            judged = at_target and method == "agent reconcile"
            rows.append(Row(SECTION, f"program {count:,} records ({label})",
                            rate(count, timing.wall), rate(count, batch.wall) + " (iproute2 -batch)",
                            f"{ratio:.2f}x (cpu {cpu_ratio:.2f}x)", f">= {TARGET_RATIO}x cpu" if judged else "",
                            cpu_ratio >= TARGET_RATIO if judged else None))

    samples = {}
    for name, program, size, tag in (("naive", program_with_iproute2_per_record, NAIVE_SAMPLE, 0x6d),
                                     ("pyroute2", program_with_pyroute2, PYROUTE2_SAMPLE, 0x7d)):
        with bench_namespace() as ns:
            samples[name] = program(ns, make_records(size, tag=tag))
            _check_all_in_place(ns, size, name)
    # The agent at the same (small) size is the comparison point for the samples.
    with bench_namespace() as ns:
        agent = program_with_agent_reconcile(ns, make_records(PYROUTE2_SAMPLE, tag=0x7d))
    rows.append(Row(SECTION, f"iproute2, one process per record ({NAIVE_SAMPLE} sampled)",
                    rate(NAIVE_SAMPLE, samples["naive"].wall), "",
                    _faster(agent, PYROUTE2_SAMPLE, samples["naive"], NAIVE_SAMPLE)))
    rows.append(Row(SECTION, f"pyroute2, one call per entry ({PYROUTE2_SAMPLE:,} sampled)",
                    rate(PYROUTE2_SAMPLE, samples["pyroute2"].wall), "",
                    _faster(agent, PYROUTE2_SAMPLE, samples["pyroute2"], PYROUTE2_SAMPLE)))

    records = make_records(RESYNC_SIZE)
    with bench_namespace() as ns:
        program_with_agent(ns, records)
        elapsed: Timing | None = None
        shown: Timing | None = None
        for _ in range(RESYNC_REPEATS):
            timing, changes = resync_with_agent_reconcile(ns, records)
            if changes:
                raise RuntimeError(f"resync of {RESYNC_SIZE} records in place planned {changes} changes")
            elapsed = timing.best(elapsed)
            shown = iproute2_show(ns).best(shown)
    assert elapsed is not None and shown is not None
    log(f"records: resync of {RESYNC_SIZE}: {elapsed}, plan empty")
    rows.append(Row(SECTION, f"resync {RESYNC_SIZE:,} records in place (observe+diff, empty plan)",
                    f"{seconds(elapsed.wall)} (cpu {seconds(elapsed.cpu)})",
                    seconds(shown.wall) + " (bridge+ip show, no diff)", f"{shown.wall / elapsed.wall:.1f}x",
                    f"< {TARGET_RESYNC_S} s cpu", elapsed.cpu < TARGET_RESYNC_S))

    rows.append(scrape_counters_row(log))

    floor = peak_rss_mb(RSS_SIZE, work=False)
    peak = peak_rss_mb(RSS_SIZE)
    log(f"records: peak RSS at {RSS_SIZE}: {peak:.0f} MiB (interpreter floor {floor:.0f} MiB)")
    rows.append(Row(SECTION, f"peak RSS, agent reconciling {RSS_SIZE:,} records", f"{peak:.0f} MiB",
                    f"{floor:.0f} MiB (interpreter + imports)", "", f"< {TARGET_RSS_MB} MiB",
                    peak < TARGET_RSS_MB))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.records", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=SIZES)
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child is not None:
        _rss_child(args.rss_child, args.idle)
        return 0
    from bench.table import render

    print(render(run(args.sizes, log=lambda line: print(line, file=sys.stderr))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
