"""Gateway failover with two controller replicas on one real PostgreSQL database.

Each replica is a real controller (uvicorn serving `create_app` in a thread, failover
after 2 s, no start-up grace) with its own fabric in memory and its own failover loop.
The active gateway host's agent watches replica A, the standby's watches replica B: A
can only know that the standby reports through the database. When the active host's
watch closes, both replicas find the role due to move, and it moves exactly once: one
`event=gateway_failover` line, the failover counters of both replicas sum to 1, and
both serve the same active host and the same generations.
"""

from __future__ import annotations

import logging
import time

import pytest

from tests.lib.controller import LiveController
from tests.lib.wait import wait_until
from tests.unit.test_controller_api import Watcher, report_in_sync
from tests.unit.test_gateway_api import DOCUMENTS
from tests.unit.test_gateway_failover import WAIT, metric, service
from tests.unit.test_hnvctl import Hnvctl

# The active host's agent connects after the gateway documents are applied, and must
# within this (silence counts from when the service made it active): 1 s was too short
# for a loaded CI machine's TLS handshake, and the role moved before the test began.
AFTER = 2.0


@pytest.fixture
def replicas(pg_url, tmp_path):
    options = {"gateway_failover_after": AFTER, "gateway_failover_grace": 0}
    first = LiveController(tmp_path / "state", hosts=["CON-GW1", "CON-GW2", "CON-HyperV6"], store=pg_url,
                           app_options=options)
    second = LiveController(tmp_path / "state", store=pg_url, app_options=options)
    first.init()
    group = [first, second]
    try:
        for replica in group:
            replica.start(timeout=120)
        yield group
    finally:
        for replica in group:
            replica.__exit__(None, None, None)


def test_two_replicas_move_the_role_exactly_once(replicas, caplog):
    a, b = replicas
    caplog.set_level(logging.INFO, logger="openhnv.controller.gateway_failover")
    Hnvctl(a).ok("apply", *DOCUMENTS)
    watchers = {"CON-GW1": Watcher(a, "CON-GW1", heartbeat=0.5), "CON-GW2": Watcher(b, "CON-GW2", heartbeat=0.5),
                "CON-HyperV6": Watcher(b, "CON-HyperV6", heartbeat=0.5)}
    try:
        for watcher in watchers.values():
            watcher.wait_for(lambda line: line["type"] == "state", timeout=WAIT)
        # Each gateway host's agent applied its state and said so, each to its own replica
        # (a host still in its first apply would keep the role for the first-apply grace).
        report_in_sync(a, "CON-GW1")
        report_in_sync(b, "CON-GW2")
        time.sleep(3 * AFTER)  # both gateway hosts report (each to another replica): nothing moves
        assert [service(r)["active"] for r in replicas] == ["CON-GW1", "CON-GW1"]

        watchers.pop("CON-GW1").close()
        for replica in replicas:
            wait_until(lambda r=replica: service(r)["active"] == "CON-GW2", WAIT, f"replica {replica.port} to "
                       "serve CON-GW2 as the active gateway host")
        time.sleep(3 * AFTER)  # let both loops run more rounds: still exactly one move
        moves = [metric(r, "hnv_controller_gateway_failovers_total", service="Gateway") for r in replicas]
        assert sorted(moves) == [0, 1], moves
        events = [r.getMessage() for r in caplog.records if "event=gateway_failover " in r.getMessage()]
        assert len(events) == 1 and "from=CON-GW1 to=CON-GW2" in events[0], events
        assert service(a) == service(b)
        assert service(a)["active_reason"].startswith("failover: CON-GW1's agent silent for ")
        # Both replicas publish the same generation of a host the move changed, and its
        # watcher (on B) received it.
        generations = [r.admin.get("/v1/hosts/CON-HyperV6").json()["desired_generation"] for r in replicas]
        assert generations[0] == generations[1]
        watchers["CON-HyperV6"].wait_for(lambda line: line.get("generation") == generations[0], timeout=WAIT)
    finally:
        for watcher in watchers.values():
            watcher.close()
