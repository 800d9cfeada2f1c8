"""`kill -9` of the controller replica 300 simulated agents watch: each moves to another
replica, finds the same generation there, reports its status through it, and every host
reads InSync again through any replica.

The simulated agents (tests.lib.simulated_agents) follow the agents' failover rule (next
URL in the list, jittered backoff); what this test shows is the replicas' side: the same generation on every
replica, statuses written through one replica read by all.
"""

from __future__ import annotations

import asyncio
import time

from tests.lib.controller import start_replicas
from tests.lib.simulated_agents import SimulatedAgent, until

AGENTS = 300


def test_kill_9_of_the_watched_replica_moves_300_agents_and_they_are_in_sync(pg_url, tmp_path):
    hosts = [f"sim{i:03d}" for i in range(AGENTS)]
    group = start_replicas(tmp_path / "state", pg_url, 3, hosts=hosts, log_level="warning",
                           run_args=("--no-access-log",))
    try:
        first, second, third = group
        created = first.admin.post("/v1/hosts/batch", json={"items": [{"name": h, "nics": ["eth0"]} for h in hosts]})
        assert created.status_code == 201, created.text
        agents = [SimulatedAgent(h, first.host_token(h), [r.base_url for r in group]) for h in hosts]
        seconds = asyncio.run(_scenario(group, agents))
        print(f"kill -9 of the replica {AGENTS} agents watched: all re-attached and InSync in {seconds:.2f} s")
    finally:
        for controller in group:
            controller.__exit__(None, None, None)


def _in_sync(controller) -> bool:
    listed = controller.admin.get("/v1/hosts").json()
    return len(listed) == AGENTS and all(h["sync"] == "InSync" for h in listed)


async def _scenario(group, agents: list[SimulatedAgent]) -> float:
    first, second, third = group
    stop = asyncio.Event()
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
    try:
        await until(lambda: all(a.reported_to == first.base_url for a in agents), 120,
                     "every agent watching replica 1 and reported")
        await until(lambda: _in_sync(third), 30, "replica 3 reads every host InSync", blocking=True)
        before = {agent.host: agent.generation for agent in agents}

        first.process.kill()  # kill -9: no goodbye on any stream
        killed = time.monotonic()
        await until(lambda: all(a.replica not in (None, first.base_url) and a.reported_to != first.base_url
                                 for a in agents), 60, "every agent re-attached to another replica")
        await until(lambda: _in_sync(second) and _in_sync(third), 30,
                     "replicas 2 and 3 read every host InSync", blocking=True)
        seconds = time.monotonic() - killed
        # The other replicas served the same generation the killed one had.
        assert {agent.host: agent.generation for agent in agents} == before
        return seconds
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
