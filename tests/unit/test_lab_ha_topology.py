"""The lab's HA layout in the topology: controller replicas on PostgreSQL, where each
listens, what a refusal says, and `hnv-lab` refusing a bad combination with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from netns_lab.pings import ping_losses
from netns_lab.topology import TopologyError, load_topology, parse_topology, seed_topology_text


def _seed() -> dict:
    return yaml.safe_load(seed_topology_text())


def test_the_seed_has_one_controller_on_sqlite_as_before():
    topology = load_topology()
    assert topology.controller_urls == ("https://10.0.0.11:8080",)
    assert topology.controller.store == "sqlite"


def test_three_replicas_take_the_management_hosts_in_turn_each_on_its_own_port():
    topology = load_topology().with_controllers(3, "postgresql")
    assert topology.controller_urls == (
        "https://10.0.0.11:8080", "https://10.0.0.12:8081", "https://10.0.0.11:8082")
    assert topology.postgresql_url == "postgresql://postgres@10.0.0.11:5432/hnv"


def test_the_topology_file_can_ask_for_replicas():
    document = _seed()
    document["controller"].update(replicas=3, store="postgresql")
    topology = parse_topology(yaml.safe_dump(document), "ha.yaml")
    assert len(topology.controller_replicas) == 3


def test_replicas_on_sqlite_are_refused_naming_the_field():
    with pytest.raises(TopologyError) as caught:
        load_topology().with_controllers(3, None)
    assert caught.value.problems == [
        "controller.store: 3 replicas share one database: store must be postgresql, not sqlite "
        "(one controller per SQLite file)"]


def test_a_replica_port_on_the_agents_metrics_port_is_refused():
    document = _seed()
    document["controller"].update(replicas=3, store="postgresql", port=9475)
    with pytest.raises(TopologyError) as caught:
        parse_topology(yaml.safe_dump(document), "ha.yaml")
    assert any("replica's port 9477 is already agent.metrics_port" in p for p in caught.value.problems)


def test_hnv_lab_refuses_replicas_without_postgresql_with_exit_2():
    proc = subprocess.run([sys.executable, "-m", "netns_lab.cli", "up", "--controllers", "3"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "controller.store: 3 replicas share one database" in proc.stderr


def test_ping_losses_counts_unanswered_echoes_but_not_those_still_in_flight():
    replies = "".join(f"64 bytes from 192.168.0.11: icmp_seq={seq} ttl=64 time=0.5 ms\n"
                      for seq in range(1, 41) if seq != 7)
    output = replies + "--- 192.168.0.11 ping statistics ---\n45 packets transmitted, 39 received, 13% packet loss\n"
    sent, answered, lost = ping_losses(output, 0.1)
    # 45 sent, the last 20 (2 s at 10/s) may be in flight: only echo 7 is lost.
    assert (sent, answered, lost) == (45, 39, [7])
