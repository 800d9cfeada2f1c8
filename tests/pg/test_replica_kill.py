"""`kill -9` of the controller replica 300 simulated agents watch: each moves to another
replica, finds the same generation there, reports its status through it, and every host
reads InSync again through any replica.

The simulated agents follow the agents' failover rule (next URL in the list, jittered
backoff); what this test shows is the replicas' side: the same generation on every
replica, statuses written through one replica read by all.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from tests.lib.controller import start_replicas

AGENTS = 300


class SimulatedAgent:
    def __init__(self, host: str, token: str, urls: list[str]):
        self.host, self.token, self.urls = host, token, urls
        self.index = 0  # every agent starts on the first replica
        self.replica: str | None = None
        self.generation: int | None = None
        self.reported_to: str | None = None  # the replica that last answered its status 200
        self.generations_seen: set[int] = set()

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        while not stop.is_set():
            url = self.urls[self.index % len(self.urls)]
            try:
                async with client.stream("GET", f"{url}/v1/hosts/{self.host}/state",
                                         params={"watch": 1, "heartbeat": 1}, headers=headers) as stream:
                    if stream.status_code != 200:
                        raise httpx.HTTPError(f"watch answered {stream.status_code}")
                    self.replica = url
                    async for line in stream.aiter_lines():
                        document = json.loads(line)
                        if document["type"] != "state":
                            continue
                        self.generation = document["generation"]
                        self.generations_seen.add(self.generation)
                        answer = await client.put(f"{url}/v1/hosts/{self.host}/status", headers=headers,
                                                  json={"generation": self.generation, "errors": [],
                                                        "agent": "simulated"})
                        if answer.status_code == 200:
                            self.reported_to = url
            except (httpx.HTTPError, json.JSONDecodeError):
                pass
            self.replica = None
            self.index += 1
            await asyncio.sleep(random.uniform(0.05, 0.5))  # jittered backoff


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
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=AGENTS)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=10), limits=limits) as client:
        tasks = [asyncio.create_task(agent.run(client, stop)) for agent in agents]
        try:
            await _until(lambda: all(a.reported_to == first.base_url for a in agents), 120,
                         "every agent watching replica 1 and reported")
            await _until(lambda: _in_sync(third), 30, "replica 3 reads every host InSync", blocking=True)
            before = {agent.host: agent.generation for agent in agents}

            first.process.kill()  # kill -9: no goodbye on any stream
            killed = time.monotonic()
            await _until(lambda: all(a.replica not in (None, first.base_url) and a.reported_to != first.base_url
                                     for a in agents), 60, "every agent re-attached to another replica")
            await _until(lambda: _in_sync(second) and _in_sync(third), 30,
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


async def _until(condition, timeout: float, what: str, blocking: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = await asyncio.to_thread(condition) if blocking else condition()
        if done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)
