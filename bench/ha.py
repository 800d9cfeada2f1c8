"""The HA section: VM-create throughput on PostgreSQL against the embedded SQLite store,
measured in the same run on the same machine, and with three replicas sharing it.

Each case starts real `hnv-controller run` processes (tests.lib.controller), on a
throw-away PostgreSQL cluster (tests.lib.postgres, default settings: an fsync per
commit) or a SQLite file (synchronous=FULL, the controller's default: the same), builds the seed
fabric plus three tenant VM networks, then creates VMs through the REST API:
sequentially through one client (latency-bound, what one operator sees), and from
CONCURRENCY clients at once (spread over the replicas where there are several).
The target: PostgreSQL's sequential throughput at least half SQLite's.

Failover: three replicas on PostgreSQL, AGENTS simulated agents (tests.lib.simulated_agents:
a watch stream and status reports each, over an HTTP client of its own as a real agent's,
moving to the next URL with jittered backoff),
a third watching each replica; `kill -9` of one replica; for each agent that watched it,
the time until another replica answered its status report. Target: p99 < 5 s.

Migration convergence on three replicas: bench.convergence's fabric and layout (1,000
hosts, 100 VM networks, 50,000 VMs; `--quick`: its smaller scale) built once into SQLite
by its builder, copied into PostgreSQL with `hnv-controller migrate-store` (the supported
path, and far faster than 50,000 creates over HTTP), then the same migrations (same
seed, same starting layout) measured twice in this run: on one controller on the SQLite
file (convergence's own figure, the baseline) and on three `hnv-controller run --store
postgresql://...` replicas, with the watch streams spread host by host over the three and
every migration posted to replica 1. The figure is the time from each POST's answer until
every affected host's watcher, on whichever replica, holds the new generation (a watcher
served before the answer counts as 0). Target: p99 < 1 s. Also each replica's memory
against the single controller's. Owns the temporary directories, databases and
controller processes it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.table import Row, rate, seconds

SECTION = "ha"
CONCURRENCY = 12
AGENTS = 1000
NETWORKS = {"Blue": "192.168.10.0/24", "Green": "192.168.20.0/24", "Red": "192.168.30.0/24"}


def _controllers(root: Path, store: str | None, replicas: int):
    from tests.lib.controller import start_replicas
    from tests.lib.seed_fabric import VIRTUAL_HOSTS, add_tenant_network, build_seed_fabric

    # SQLite as it runs by default: synchronous=FULL, an fsync per commit like PostgreSQL's.
    options = ("--no-access-log",) if store else ("--no-access-log", "--synchronous", "FULL")
    group = start_replicas(root / "state", store, replicas, hosts=VIRTUAL_HOSTS, log_level="error",
                           run_args=options)
    first = group[0]
    build_seed_fabric(first.admin)
    for name, prefix in NETWORKS.items():
        add_tenant_network(first.admin, name, prefix)
    return group


def _create(group, count: int, workers: int, prefix: str) -> float:
    from tests.lib.seed_fabric import VIRTUAL_HOSTS

    names = list(NETWORKS)

    def one(i: int) -> None:
        body = {"name": f"{prefix}{i:04d}", "vm_network": names[i % 3], "host": VIRTUAL_HOSTS[i % 2]}
        response = group[i % len(group)].admin.post("/v1/vms", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"create {body['name']}: {response.status_code} {response.text[:200]}")

    started = time.perf_counter()
    if workers == 1:
        for i in range(count):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(count)))
    return time.perf_counter() - started


def _case(store_of, replicas: int, count: int, log) -> tuple[float, float]:
    """(sequential s, concurrent s) for `count` creations each."""
    with tempfile.TemporaryDirectory(prefix="openhnv-bench-ha-") as tmp:
        group = _controllers(Path(tmp), store_of(), replicas)
        try:
            sequential = _create(group[:1], count, 1, "s")
            concurrent = _create(group, count, CONCURRENCY, "c")
        finally:
            for controller in group:
                controller.__exit__(None, None, None)
    log(f"bench: ha: {replicas} replica(s): {count} sequential in {sequential:.2f} s, "
        f"{count} concurrent in {concurrent:.2f} s")
    return sequential, concurrent


def _failover(store: str, agents_count: int, log) -> tuple[list[float], float]:
    """(per-agent recovery seconds of the killed replica's agents, seconds until all)."""
    from tests.lib.controller import start_replicas
    from tests.lib.simulated_agents import SimulatedAgent, until

    hosts = [f"sim{i:04d}" for i in range(agents_count)]
    with tempfile.TemporaryDirectory(prefix="openhnv-bench-ha-") as tmp:
        group = start_replicas(Path(tmp) / "state", store, 3, hosts=hosts, log_level="error",
                               run_args=("--no-access-log",))
        try:
            first = group[0]
            for start in range(0, agents_count, 500):
                created = first.admin.post("/v1/hosts/batch", json={
                    "items": [{"name": h, "nics": ["eth0"]} for h in hosts[start:start + 500]]})
                if created.status_code != 201:
                    raise RuntimeError(f"hosts batch: {created.status_code} {created.text[:200]}")
            urls = [controller.base_url for controller in group]
            agents = [SimulatedAgent(h, first.host_token(h), urls, first=i % 3) for i, h in enumerate(hosts)]

            async def scenario() -> tuple[list[float], float]:
                stop = asyncio.Event()
                tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
                try:
                    await until(lambda: all(a.reported_to for a in agents), 300, "every agent reported")
                    victims = [a for a in agents if a.reported_to == urls[0]]
                    group[0].process.kill()
                    killed = time.monotonic()
                    await until(lambda: all(a.reported_to != urls[0] and a.reported_at > killed
                                            for a in victims), 120, "every moved agent reported")
                    attached = sorted(a.attached_at - killed for a in victims)
                    lost = sorted(a.lost_at - killed for a in victims)
                    log(f"bench: ha: streams lost min {lost[0]:.2f} s, max {lost[-1]:.2f} s")
                    log(f"bench: ha: re-attached min {attached[0]:.2f} s, p50 {attached[len(attached) // 2]:.2f} s, "
                        f"p99 {attached[int(0.99 * (len(attached) - 1))]:.2f} s")
                    return [a.reported_at - killed for a in victims], time.monotonic() - killed
                finally:
                    stop.set()
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

            recoveries, total = asyncio.run(scenario())
        finally:
            for controller in group:
                controller.__exit__(None, None, None)
    log(f"bench: ha: failover of {len(recoveries)} of {agents_count} agents in {total:.2f} s")
    return recoveries, total


def _after_answer(results) -> list[float]:
    """Per migration: POST answered -> last affected watcher served (0 if all were before)."""
    return [max(0.0, r.latency - r.request) for r in results]


def _replicated_convergence(store: str, quick: bool, log) -> list[Row]:
    """The migration-convergence rows: 3 replicas on PostgreSQL against one SQLite controller."""
    from bench import convergence
    from tests.lib.controller import free_port

    scale = convergence.QUICK if quick else convergence.FULL
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a watch stream per host, twice over
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, scale.hosts * 4 + 256)), hard))
    with tempfile.TemporaryDirectory(prefix="openhnv-bench-ha-") as tmp:
        root = Path(tmp)
        single_dir = root / "sqlite"
        single_dir.mkdir(mode=0o700)
        started = time.perf_counter()
        layout, admin, tokens = convergence.build_fabric(single_dir, scale, log)
        build = time.perf_counter() - started
        gc.collect()  # the builder's Fabric is unreachable now
        # Why copy before the SQLite run: both runs then start from the same fabric and,
        # with the same seed, make the same migrations.
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "controller.cli", "migrate-store", "--from",
                        f"sqlite:///{single_dir / 'controller.db'}", "--to", store],
                       cwd=convergence.CHECKOUT, check=True, capture_output=True, text=True)
        copied = time.perf_counter() - started
        log(f"bench: ha: fabric built in {build:.1f} s, copied into PostgreSQL in {copied:.1f} s")
        replicated_layout = copy.deepcopy(layout)

        port = free_port()
        with convergence.controller_server(single_dir, port, log) as server:
            convergence.wait_healthy(port, server, single_dir)
            single, _, _, single_cpu = asyncio.run(convergence.drive(
                port, admin, tokens, layout, scale, log, lambda: convergence.process_cpu_s(server.pid)))
            single_peak, _ = convergence.process_memory_mb(server.pid)

        with contextlib.ExitStack() as replicas:
            ports, servers = [], []
            for i in range(3):
                state_dir = root / f"replica{i + 1}"
                state_dir.mkdir(mode=0o700)
                ports.append(free_port())
                servers.append((replicas.enter_context(
                    convergence.controller_server(state_dir, ports[-1], log, store=store)), state_dir))
            for port, (server, state_dir) in zip(ports, servers):
                convergence.wait_healthy(port, server, state_dir)
            pids = [server.pid for server, _ in servers]
            replicated, unexpected, _, replicated_cpu = asyncio.run(convergence.drive(
                ports[0], admin, tokens, replicated_layout, scale, log,
                lambda: sum(convergence.process_cpu_s(pid) for pid in pids), watch_ports=ports))
            peaks = [convergence.process_memory_mb(pid)[0] for pid in pids]

    percentile = convergence.percentile
    sent = [r.latency for r in replicated]
    base_sent = [r.latency for r in single]
    p50, p99 = percentile(sent, 50), percentile(sent, 99)
    base50, base99 = percentile(base_sent, 50), percentile(base_sent, 99)
    single_after, replicated_after = _after_answer(single), _after_answer(replicated)
    after50, after99 = percentile(replicated_after, 50), percentile(replicated_after, 99)
    fanout = sum(r.affected for r in replicated) / len(replicated)
    where = f"{scale.hosts:,} hosts / {scale.vms:,} VMs" + (", --quick" if quick else "")
    log(f"bench: ha: migration convergence: 3 replicas p50 {p50:.3f} s p99 {p99:.3f} s "
        f"(after the answer p50 {after50:.3f} s p99 {after99:.3f} s), one SQLite controller "
        f"p50 {base50:.3f} s p99 {base99:.3f} s")
    cpu_each, base_cpu_each = replicated_cpu / len(replicated), single_cpu / len(single)
    requests = [r.request for r in replicated]
    base_requests = [r.request for r in single]
    return [
        Row(SECTION, f"migration convergence, 3 PostgreSQL replicas vs 1 SQLite controller, {where}: "
            "request -> every affected watcher (p50 / p99)",
            f"{seconds(p50)} / {seconds(p99)}", f"{seconds(base50)} / {seconds(base99)}",
            f"{p99 / base99:.2f}x", "p99 < 1 s", p99 < 1.0),
        Row(SECTION, f"migration convergence: POST answered -> every affected watcher (p50 / p99; "
            f"{len(replicated)} migrations posted to replica 1, ~{fanout:.0f} hosts each)",
            f"{seconds(after50)} / {seconds(after99)}",
            f"{seconds(percentile(single_after, 50))} / {seconds(percentile(single_after, 99))}"
            " (1 controller publishes before it answers)"),
        Row(SECTION, "migration convergence: migrate request round trip on replica 1 (p50 / p99)",
            f"{seconds(percentile(requests, 50))} / {seconds(percentile(requests, 99))}",
            f"{seconds(percentile(base_requests, 50))} / {seconds(percentile(base_requests, 99))}",
            f"{percentile(requests, 99) / percentile(base_requests, 99):.2f}x"),
        Row(SECTION, "migration convergence: CPU per migration, 3 replicas together; pushes to unaffected hosts",
            f"cpu {seconds(cpu_each)}, {unexpected} unexpected", f"cpu {seconds(base_cpu_each)}",
            f"{cpu_each / base_cpu_each:.2f}x" if base_cpu_each else "", "0 unexpected", unexpected == 0),
        Row(SECTION, "migration convergence: peak memory of each replica (fabric "
            f"built in {seconds(build)}, copied to PostgreSQL in {seconds(copied)})",
            " / ".join(f"{peak:,.0f} MiB" for peak in peaks), f"{single_peak:,.0f} MiB (1 controller on SQLite)",
            f"{max(peaks) / single_peak:.2f}x"),
    ]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(quick: bool = False, log=print) -> list[Row]:
    from tests.lib import postgres

    reason = postgres.missing()
    if reason:
        return [Row(SECTION, "VM-create throughput, PostgreSQL vs SQLite", "not measured", reason, met=False)]
    count = 60 if quick else 120  # per phase; three CA pools of 91 addresses hold 2 x 120
    cluster = postgres.PgCluster.create()
    try:
        sqlite_seq, sqlite_conc = _case(lambda: None, 1, count, log)
        pg_seq, pg_conc = _case(cluster.new_database, 1, count, log)
        ha_seq, ha_conc = _case(cluster.new_database, 3, count, log)
        agents = 200 if quick else AGENTS
        recoveries, total = _failover(cluster.new_database(), agents, log)
        convergence_rows = _replicated_convergence(cluster.new_database(), quick, log)
    finally:
        cluster.destroy()
    ratio = sqlite_seq / pg_seq
    p99 = _percentile(recoveries, 0.99)
    return [
        Row(SECTION, f"failover: kill -9 of 1 of 3 replicas, {len(recoveries)} of {agents} agents on it, "
            "until reported to another (p50 / p99)", f"{seconds(_percentile(recoveries, 0.5))} / {seconds(p99)}",
            target="p99 < 5 s", met=p99 < 5),
        Row(SECTION, "failover: until every moved agent reported", seconds(total)),
        Row(SECTION, f"VM creates, one client, {count} (PostgreSQL, 1 replica vs SQLite)",
            rate(count, pg_seq, "creates/s"), rate(count, sqlite_seq, "creates/s"), f"{ratio:.2f}x",
            ">= 0.5x", ratio >= 0.5),
        Row(SECTION, f"VM creates, {CONCURRENCY} clients, {count} (PostgreSQL, 1 replica vs SQLite)",
            rate(count, pg_conc, "creates/s"), rate(count, sqlite_conc, "creates/s"),
            f"{sqlite_conc / pg_conc:.2f}x"),
        Row(SECTION, f"VM creates, {CONCURRENCY} clients over 3 replicas, {count} (PostgreSQL vs SQLite)",
            rate(count, ha_conc, "creates/s"), rate(count, sqlite_conc, "creates/s"),
            f"{sqlite_conc / ha_conc:.2f}x"),
        Row(SECTION, "mean create round trip, one client (PostgreSQL 1 replica / 3 replicas)",
            f"{seconds(pg_seq / count)} / {seconds(ha_seq / count)}", seconds(sqlite_seq / count)),
        *convergence_rows,
    ]
