"""Simulated agents: a watch stream and a status report each, no kernel, many per process.

Each follows the agents' failover rule: watch one controller URL; when the stream ends
or cannot be opened, move to the next URL after a jittered backoff; report every state
it receives (`PUT .../status` with that generation) to the controller it watches.
Used by the pg tier (`kill -9` of a replica) and the bench's HA section.

Each agent has its own HTTP client, as a real agent on its own host has (`agent.watch`):
one client shared by a thousand agents makes httpcore's connection pool scan every
other agent's connections on each request, and that scan, not the controllers, then
sets the pace of a mass re-attach. The clients share one TLS context (building one per
client would cost tens of milliseconds each).
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from functools import lru_cache

import httpx


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class SimulatedAgent:
    def __init__(self, host: str, token: str, urls: list[str], first: int = 0):
        self.attached_at = 0.0  # time.monotonic() when its current stream opened
        self.lost_at = 0.0  # ... and when the last one ended
        self.host, self.token, self.urls = host, token, urls
        self.index = first  # which URL it watches first
        self.replica: str | None = None  # the URL whose stream is open now
        self.generation: int | None = None
        self.reported_to: str | None = None  # the replica that last answered its status 200
        self.reported_at = 0.0  # time.monotonic() of that answer

    async def run(self, stop: asyncio.Event) -> None:
        """Watch and report until `stop` is set (or the task is cancelled)."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=10), verify=_tls_context(),
                                     headers={"Authorization": f"Bearer {self.token}"}) as client:
            while not stop.is_set():
                await self._watch(client, self.urls[self.index % len(self.urls)])
                self.lost_at = time.monotonic()
                self.replica = None
                self.index += 1
                await asyncio.sleep(random.uniform(0.05, 0.5))  # jittered backoff

    async def _watch(self, client: httpx.AsyncClient, url: str) -> None:
        """One stream: each state it brings is reported to the same controller."""
        try:
            async with client.stream("GET", f"{url}/v1/hosts/{self.host}/state",
                                     params={"watch": 1, "heartbeat": 5}) as stream:
                if stream.status_code != 200:
                    return
                self.replica, self.attached_at = url, time.monotonic()
                async for line in stream.aiter_lines():
                    document = json.loads(line)
                    if document["type"] != "state":
                        continue
                    self.generation = document["generation"]
                    answer = await client.put(f"{url}/v1/hosts/{self.host}/status",
                                              json={"generation": self.generation, "errors": [],
                                                    "agent": "simulated"})
                    if answer.status_code == 200:
                        self.reported_to, self.reported_at = url, time.monotonic()
        except (httpx.HTTPError, json.JSONDecodeError):
            pass


async def until(condition, timeout: float, what: str, blocking: bool = False) -> None:
    """Wait for `condition()` (run in a thread when `blocking`), else AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        done = await asyncio.to_thread(condition) if blocking else condition()
        if done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)
