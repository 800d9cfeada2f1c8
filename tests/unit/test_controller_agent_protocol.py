"""Both halves of the protocol together: the agent's own WatchStream and StatusReporter
(agent/watch.py) against a real controller on loopback. No kernel: what crosses is the
state document, the generation and the status."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import httpx

from agent.state import parse_host_state
from agent.watch import Backoff, ControllerEndpoint, StatusReport, StatusReporter, WatchStream
from tests.lib.seed_fabric import VIRTUAL_HOSTS, add_tenants, build_seed_fabric
from tests.lib.wait import wait_until

IDLE_PAST_UVICORN_DEFAULT = 6.0  # seconds: uvicorn closes an idle connection after 5 by default


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


class CountingRelay:
    """A TCP relay in front of the controller that counts the connections it is asked for:
    what the controller's listener sees."""

    def __init__(self, ctl):
        self.target = ("127.0.0.1", ctl.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        self.connections = 0
        # The agent's endpoint for CON-HyperV6, through the relay (the controller's scheme).
        self.endpoint = ControllerEndpoint(f"{ctl.base_url.rsplit(':', 1)[0]}:{port}", "CON-HyperV6",
                                           ctl.host_token("CON-HyperV6"),
                                           ca_file=str(ctl.ca_file) if ctl.tls else None)
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            outbound = socket.create_connection(self.target)
            self._open += [inbound, outbound]
            for source, sink in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self._open:
            sock.close()


def test_an_agent_waiting_to_be_added_asks_again_on_one_connection(live_controller, caplog):
    """A host not yet in the fabric is answered 404 at each try; the agent asks again on
    the same kept-alive connection (one TLS handshake, not one per try), and once the
    host is added the same watch gets its state."""
    caplog.set_level(logging.WARNING, logger="agent.watch")
    ctl = live_controller(hosts=VIRTUAL_HOSTS)  # tokens, but no fabric yet: the host is unknown
    relay = CountingRelay(ctl)
    states: list = []
    watch = WatchStream(relay.endpoint, on_state=states.append, heartbeat=1, backoff=Backoff(initial=0.05, cap=0.1))

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "event=watch_refused" in r.getMessage()]

    watch.start()
    try:
        wait_until(lambda: len(refusals()) >= 5, 30, "five refused tries")
        assert all(" status=404 " in line for line in refusals()), refusals()
        assert relay.connections == 1, f"{relay.connections} connections for {len(refusals())} tries"
        build_seed_fabric(ctl.admin)
        wait_until(lambda: states, 30, "the host's state once it is added")
    finally:
        watch.stop()
        relay.close()


def test_the_controller_keeps_an_idle_connection_past_an_agents_retry_delay(live_controller):
    """`hnv-controller run` keeps an idle connection open a minute and the agent's client
    keeps it too (uvicorn's and httpx's defaults would drop it after 5 s), so an agent
    that retries after a few seconds, or after going round the replicas, finds its
    connection still open."""
    ctl = live_controller(hosts=VIRTUAL_HOSTS, process=True)
    relay = CountingRelay(ctl)
    try:
        with relay.endpoint.client(httpx.Timeout(10)) as client:  # the agent's own client
            assert client.get("/healthz").status_code == 200
            time.sleep(IDLE_PAST_UVICORN_DEFAULT)  # idle: the wait is the point
            assert client.get("/healthz").status_code == 200
        assert relay.connections == 1
    finally:
        relay.close()
