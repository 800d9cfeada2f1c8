"""Both halves of the protocol together: the agent's own WatchStream and StatusReporter
(agent/watch.py) against a real controller on loopback. No kernel: what crosses is the
state document, the generation and the status."""

from __future__ import annotations

import threading
import time

from agent.state import parse_host_state
from agent.watch import ControllerEndpoint, StatusReport, StatusReporter, WatchStream
from tests.lib.seed_fabric import VIRTUAL_HOSTS, add_tenants, build_seed_fabric


def test_agent_follows_generations_and_its_status_reaches_the_host_list(live_controller):
    ctl = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(ctl.admin)
    endpoint = ControllerEndpoint(ctl.base_url, "CON-HyperV6", ctl.host_token("CON-HyperV6"))
    received: list = []
    arrived = threading.Condition()

    def on_state(document) -> None:
        with arrived:
            received.append(parse_host_state(document))
            arrived.notify_all()

    def wait_for_generation(generation: int):
        with arrived:
            assert arrived.wait_for(lambda: received and received[-1].generation >= generation, timeout=10), received
            return received[-1]

    watch = WatchStream(endpoint, on_state=on_state, heartbeat=1)
    reporter = StatusReporter(endpoint)
    watch.start()
    reporter.start()
    try:
        first = wait_for_generation(1)
        assert first.routing_domains == ()
        add_tenants(ctl.admin)  # TenantVM01 and TenantVM03 land on CON-HyperV6
        desired = ctl.admin.get("/v1/hosts/CON-HyperV6").json()["desired_generation"]
        latest = wait_for_generation(desired)
        assert latest.generation == desired
        assert [port.name for port in latest.ports] == ["TenantVM01", "TenantVM03"]
        reporter.submit(StatusReport(generation=latest.generation))
        deadline = time.monotonic() + 10
        while ctl.admin.get("/v1/hosts/CON-HyperV6").json()["sync"] != "InSync":
            assert time.monotonic() < deadline, ctl.admin.get("/v1/hosts/CON-HyperV6").json()
            time.sleep(0.05)
        error = {"kind": "tunnel", "object": "hnvt1a2b3c", "errno": 17, "message": "File exists"}
        reporter.submit(StatusReport(generation=latest.generation, errors=(error,)))
        while ctl.admin.get("/v1/hosts/CON-HyperV6").json()["sync"] != "Error":
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
        assert ctl.admin.get("/v1/hosts/CON-HyperV6").json()["reason"] == "hnvt1a2b3c: File exists"
    finally:
        watch.stop()
        reporter.stop(timeout=5)
