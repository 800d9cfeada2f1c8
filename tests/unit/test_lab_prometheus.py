"""The lab's Prometheus configuration (netns_lab.prometheus), without starting anything:
generated from the shipped monitoring files, it is valid for promtool, scrapes the lab's
controller and every agent, and keeps the shipped alerts with their `for:` shortened.
Topology settings are refused by field and reason. The server itself runs in the kernel
tier (tests/kernel/test_lab_seed.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from netns_lab import prometheus
from netns_lab.build import LabRecord
from netns_lab.topology import TopologyError, load_topology, parse_topology, seed_topology_text

TOPOLOGY = load_topology()


def _record(tmp_path) -> LabRecord:
    return LabRecord(lab="seed", topology_source="seed", workdir=str(tmp_path))


def test_lab_configuration_is_valid_and_scrapes_the_controller_and_every_agent(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is missing: install Debian's prometheus package (make setup)")
    config = prometheus.lab_scrape_config(TOPOLOGY, _record(tmp_path))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(prometheus.lab_rules()))
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # The lab's controller serves HTTPS: Prometheus checks it against the lab controller's CA.
    assert jobs["hnv-controller"]["scheme"] == "https"
    assert jobs["hnv-controller"]["tls_config"] == {"ca_file": str(tmp_path / "controller" / "tls" / "ca.crt")}
    assert jobs["hnv-controller"]["static_configs"] == [{"targets": ["10.0.0.11:8080"]}]
    agents = {group["labels"]["host"]: group["targets"] for group in jobs["hnv-agent"]["static_configs"]}
    assert agents == {h.name: [f"{h.address}:{TOPOLOGY.agent.metrics_port}"] for h in TOPOLOGY.hosts}
    assert config["global"]["scrape_interval"] == prometheus.LAB_SCRAPE_INTERVAL


def test_lab_rules_are_the_shipped_rules_with_short_for():
    shipped = yaml.safe_load((prometheus.MONITORING / "alerts.yml").read_text())
    lab = prometheus.lab_rules()
    def by_name(rules):
        return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert by_name(lab).keys() == by_name(shipped).keys()
    for name, rule in by_name(lab).items():
        assert rule["expr"] == by_name(shipped)[name]["expr"]
        assert rule["for"] == prometheus.LAB_ALERT_FOR


def test_prometheus_topology_setting():
    document = yaml.safe_load(seed_topology_text())
    assert load_topology().prometheus.enabled is False
    document["prometheus"] = {"enabled": True, "host": "CON-HyperV2", "port": 9091}
    topology = parse_topology(yaml.safe_dump(document))
    assert prometheus.base_url(topology) == "http://10.0.0.12:9091"

    for setting, expected in (
        ({"host": "CON-HyperV6"}, "prometheus.host: CON-HyperV6 is not in a cluster with role management"),
        ({"host": "nowhere"}, "prometheus.host: nowhere is not a host of any cluster"),
        ({"port": 8080}, "prometheus.port: 8080 is already controller.port on CON-HyperV1"),
        ({"port": 9477, "host": "CON-HyperV2"}, "prometheus.port: 9477 is already agent.metrics_port"),
    ):
        document["prometheus"] = setting
        with pytest.raises(TopologyError) as caught:
            parse_topology(yaml.safe_dump(document), "lab.yaml")
        assert any(expected in problem for problem in caught.value.problems), caught.value.problems
