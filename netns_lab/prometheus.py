"""The lab's Prometheus: Debian's ``prometheus`` server scraping the controller and every
agent over the lab's management network (``hnv-lab up --prometheus``, or
``prometheus: {enabled: true}`` in the topology).

Owns turning the project's shipped monitoring files (``monitoring/prometheus.yml`` and
``monitoring/alerts.yml``) into the lab's: the same jobs and rules, with the lab's
targets, a short scrape interval and every alert's ``for:`` shortened so that an alert
fires in seconds; starting the server in a host namespace of the management cluster
(through ``netns_lab.processes``, so the lab record lists it and ``down`` stops it);
and the one helper that talks to its HTTP API from inside the lab's network.

Work directory layout (``record.workdir``)::

    prometheus/prometheus.yml   the lab's scrape configuration
    prometheus/alerts.yml       the shipped rules, `for:` shortened
    prometheus/data/            the TSDB

and its log in ``record.artefacts_dir / "logs" / "prometheus.log"``. It never touches
links or namespaces, nor the daemons.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from netns_lab import processes
from netns_lab.build import LabError, LabRecord, ProcessEntry, entered_netns
from netns_lab.topology import HostSpec, Topology

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
SCRAPE_CONFIG = "prometheus.yml"
RULES = "alerts.yml"
CONTROLLER_JOB = "hnv-controller"
AGENT_JOB = "hnv-agent"
# Seconds, not the shipped minutes: a stopped agent's alert fires within ~20 s. Not
# shorter: one scrape of an agent costs ~0.4 s of CPU in the emulated kernel-tier VM, and
# eight targets every 2 s kept its two CPUs busy until scrapes timed out (up == 0).
LAB_SCRAPE_INTERVAL = "5s"
LAB_ALERT_FOR = "10s"


def server_host(topology: Topology) -> HostSpec:
    host = topology.host(topology.prometheus.host or topology.controller.host)
    assert host is not None  # validated by the topology
    return host


def base_url(topology: Topology) -> str:
    address = str(server_host(topology).address)
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{topology.prometheus.port}"


def workdir(record: LabRecord) -> Path:
    return Path(record.workdir) / "prometheus"


def _shipped(name: str) -> dict[str, Any]:
    path = MONITORING / name
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LabError(f"{path}: cannot read the shipped monitoring file ({exc.strerror}); "
                       "the lab's Prometheus runs from a checkout of the project") from None


def lab_scrape_config(topology: Topology, record: LabRecord) -> dict[str, Any]:
    """monitoring/prometheus.yml with the lab's targets and intervals."""
    config = _shipped(SCRAPE_CONFIG)
    config["global"] = {**config.get("global", {}), "scrape_interval": LAB_SCRAPE_INTERVAL,
                        "evaluation_interval": LAB_SCRAPE_INTERVAL}
    config["rule_files"] = [RULES]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    missing = {CONTROLLER_JOB, AGENT_JOB} - set(jobs)
    if missing:
        raise LabError(f"{MONITORING / SCRAPE_CONFIG}: no job {', '.join(sorted(missing))}")

    controller = jobs[CONTROLLER_JOB]
    url = urlsplit(topology.controller_url)
    # The scheme is the controller's: plain HTTP needs no CA; HTTPS is checked against the
    # private CA the controller keeps in its state directory.
    controller["scheme"] = url.scheme
    if url.scheme == "https":
        controller["tls_config"] = {"ca_file": str(processes.controller_dir(record) / "tls" / "ca.crt")}
    else:
        controller.pop("tls_config", None)
    controller["static_configs"] = [{"targets": [url.netloc]}]

    jobs[AGENT_JOB]["static_configs"] = [
        {"targets": [_host_port(str(host.address), topology.agent.metrics_port)], "labels": {"host": host.name}}
        for host in topology.hosts
    ]
    return config


def lab_rules() -> dict[str, Any]:
    """monitoring/alerts.yml, every ``for:`` shortened to LAB_ALERT_FOR."""
    rules = _shipped(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = LAB_ALERT_FOR
    return rules


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise LabError("prometheus not found: install Debian's prometheus package "
                       "(apt-get install prometheus, or make setup)")
    return found


def start(topology: Topology, record: LabRecord, timeout: float = processes.START_TIMEOUT) -> ProcessEntry:
    """Write the lab's configuration and start the server; returns once it is ready.

    Idempotent: a server of this lab already running is kept (its configuration is
    rewritten, which it reads again only on restart).
    """
    host = server_host(topology)
    directory = workdir(record)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    (directory / SCRAPE_CONFIG).write_text(yaml.safe_dump(lab_scrape_config(topology, record), sort_keys=False))
    (directory / RULES).write_text(yaml.safe_dump(lab_rules(), sort_keys=False))
    running = next((p for p in record.processes if p.role == "prometheus" and processes.is_alive(p)), None)
    if running is not None:
        entry = running
    else:
        entry = ProcessEntry(
            role="prometheus", name=host.name, netns=host.name,
            argv=[binary(), f"--config.file={directory / SCRAPE_CONFIG}",
                  f"--storage.tsdb.path={directory / 'data'}",
                  f"--web.listen-address={_host_port(str(host.address), topology.prometheus.port)}",
                  "--storage.tsdb.retention.time=1d", "--log.level=warn"],
            log=str(record.artefacts_dir / "logs" / "prometheus.log"),
        )
        processes.spawn(record, entry)
    _wait_ready(topology, entry, timeout)
    return entry


def _wait_ready(topology: Topology, entry: ProcessEntry, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if api_get(topology, "/-/ready", timeout=2).status_code == 200:
                return
            problem = "not ready"
        except httpx.TransportError as exc:
            problem = str(exc) or type(exc).__name__
        if not processes.is_alive(entry):
            raise LabError(f"prometheus on {entry.name} exited; see {entry.log}:\n{processes.tail(entry.log)}")
        if time.monotonic() > deadline:
            raise LabError(f"prometheus on {entry.name} is not ready after {timeout:.0f} s ({problem}); "
                           f"see {entry.log}")
        time.sleep(0.5)


def api_get(topology: Topology, path: str, params: dict[str, str] | None = None,
            timeout: float = 10.0) -> httpx.Response:
    """GET ``path`` of the lab's Prometheus, from inside the lab (its host's namespace)."""
    with entered_netns(server_host(topology).name):
        with httpx.Client(base_url=base_url(topology), timeout=timeout) as client:
            return client.get(path, params=params)


def query(topology: Topology, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector: [{"metric": {labels}, "value": [time, "v"]}, ...]."""
    response = api_get(topology, "/api/v1/query", {"query": promql})
    body = response.json()
    if response.status_code != 200 or body.get("status") != "success":
        raise LabError(f"prometheus query {promql!r}: {response.status_code} {body.get('error', body)}")
    return body["data"]["result"]


def firing_alerts(topology: Topology) -> list[dict[str, Any]]:
    """Alerts in state firing: [{"labels": {...}, "annotations": {...}, ...}, ...]."""
    response = api_get(topology, "/api/v1/alerts")
    response.raise_for_status()
    return [alert for alert in response.json()["data"]["alerts"] if alert.get("state") == "firing"]
