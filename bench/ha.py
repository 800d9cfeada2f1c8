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
a watch stream and status reports each, moving to the next URL with jittered backoff),
a third watching each replica; `kill -9` of one replica; for each agent that watched it,
the time until another replica answered its status report. Target: p99 < 5 s.

Not here yet: migration convergence with 3 replicas at 1,000 hosts / 50,000 VMs.
"""

from __future__ import annotations

import asyncio
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
    from tests.lib.simulated_agents import SimulatedAgent, client_for, until

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
                async with client_for(agents_count) as client:
                    tasks = [asyncio.create_task(agent.run(client, stop)) for agent in agents]
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
    ]
