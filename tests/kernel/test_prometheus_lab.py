"""A real Prometheus scraping the lab: `hnv-lab up --prometheus` starts Debian's server in
the controller's host namespace with the project's scrape configuration and alert rules
(intervals and `for:` shortened for the lab), and its HTTP API, queried from inside the
lab's management network, shows every target up and every host's series; stopping one
agent fires HnvAgentDown for that host and no other; `down` stops Prometheus too.

Runs in the kernel tier's VM, like the lab demo (tests/kernel/test_lab_demo.py).
"""

from __future__ import annotations

import subprocess
import time

from netns_lab import processes, prometheus
from netns_lab.build import LabRecord
from tests.kernel.conftest import hnv_lab
from tests.kernel.test_lab_demo import HNV_LAB, TOPOLOGY
from tests.lib.wait import wait_until

HOSTS = {host.name for host in TOPOLOGY.hosts}
STOPPED = "CON-HyperV7"
WAIT = 240  # seconds for a scrape to show what the test waits for (emulated CPU)


def targets_up(job: str) -> dict[str, str]:
    """instance -> value of `up` for one job."""
    return {r["metric"]["instance"]: r["value"][1] for r in prometheus.query(TOPOLOGY, f'up{{job="{job}"}}')}


def test_prometheus_scrapes_every_target_and_fires_agent_down(clean_lab):
    started = time.monotonic()
    up = subprocess.run([*HNV_LAB, "up", "--prometheus"], capture_output=True, text=True,
                        timeout=1200, check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"up: prometheus on {TOPOLOGY.controller.host} at {prometheus.base_url(TOPOLOGY)}" in up.stdout
    record = LabRecord.load(TOPOLOGY.name)
    assert record is not None
    server = next(p for p in record.processes if p.role == "prometheus")
    assert processes.is_alive(server)
    print(f"up --prometheus took {time.monotonic() - started:.0f} s")

    # Every target answers: the controller and seven agents, each up == 1.
    agents = {f"{host.address}:{TOPOLOGY.agent.metrics_port}" for host in TOPOLOGY.hosts}
    wait_until(lambda: (lambda up: up if set(up) == agents and set(up.values()) == {"1"} else None)(
        targets_up("hnv-agent")), WAIT, "every agent scraped with up == 1", interval=1)
    controller_target = f"{TOPOLOGY.controller_address}:{TOPOLOGY.controller.port}"
    assert wait_until(lambda: targets_up("hnv-controller"), WAIT, "the controller scraped with up == 1",
                      interval=1) == {controller_target: "1"}

    # Every host's own series, labelled with its name in the fabric. Waited for: `up` and
    # a target's samples can show in different instant queries while Prometheus is
    # still taking its first scrapes (under emulation one scrape round takes seconds).
    for metric in ("hnv_agent_controller_connected", "hnv_agent_reconcile_duration_seconds_count"):
        seen: list[set[str]] = [set()]

        def every_host(metric=metric, seen=seen):
            seen[0] = {r["metric"]["host"] for r in prometheus.query(TOPOLOGY, metric)}
            return seen[0] == HOSTS

        try:
            wait_until(every_host, 60, f"{metric} series for every host", interval=1)
        except AssertionError:
            raise AssertionError(f"{metric}: series for {sorted(seen[0])}, expected {sorted(HOSTS)}") from None
    # The controller's own series, waited for the same way (CI once queried it between
    # the controller's `up` and its first samples).
    wait_until(lambda: [r["value"][1] for r in prometheus.query(TOPOLOGY, "hnv_controller_database_up")] == ["1"],
               60, "hnv_controller_database_up == 1", interval=1)
    # An agent scraped before it listened (the lab starts Prometheus first) fires
    # HnvAgentDown; it resolves at the first rule evaluation after every target is up,
    # which can come after the checks above: waited for, not read once (CI saw it firing).
    wait_until(lambda: not [a for a in prometheus.firing_alerts(TOPOLOGY)
                            if a["labels"]["alertname"] == "HnvAgentDown"],
               120, "no HnvAgentDown firing once every agent is up", interval=1)

    # One agent stops: its alert fires, for it alone.
    agent = next(p for p in record.processes if p.role == "agent" and p.name == STOPPED)
    stopped_at = time.monotonic()
    assert processes.stop(agent)

    def agent_down_alerts():
        firing = [a for a in prometheus.firing_alerts(TOPOLOGY) if a["labels"]["alertname"] == "HnvAgentDown"]
        return firing or None

    firing = wait_until(agent_down_alerts, 120, f"HnvAgentDown to fire for {STOPPED}", interval=1)
    print(f"HnvAgentDown fired {time.monotonic() - stopped_at:.1f} s after the agent stopped")
    assert [a["labels"]["host"] for a in firing] == [STOPPED]
    assert firing[0]["labels"]["severity"] == "critical"
    assert firing[0]["annotations"]["summary"] == f"openhnv agent on {STOPPED} is down"
    assert targets_up("hnv-agent")[f"{TOPOLOGY.host(STOPPED).address}:{TOPOLOGY.agent.metrics_port}"] == "0"

    # down stops Prometheus with the daemons.
    down = hnv_lab("down")
    assert down.returncode == 0, down.stderr
    assert f"prometheus {server.name} (pid {server.pid})" in down.stdout
    assert not processes.is_alive(server)
    print(f"the whole test took {time.monotonic() - started:.0f} s")
