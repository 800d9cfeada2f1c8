"""monitoring/: the alert rules pass promtool's own checks and unit tests, the scrape
configuration is valid, and every metric the rules and the Grafana dashboard name is one
the daemons really export.

"Really export" is read from the daemons themselves: a real controller (with the seed
fabric, so that pools exist) and a real agent daemon (over a fake controller and a fake
reconciler, as in test_daemon.py) are scraped over HTTP, and their exposition is parsed.
promtool is Debian's (package prometheus, installed by `make setup`); without it these
tests skip and say so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.lib.controller import LiveController
from tests.lib.sample_states import host_state
from tests.lib.seed_fabric import build_seed_fabric
from tests.unit.test_daemon import HOST, controller, make_daemon  # noqa: F401 (fixture)

CHECKOUT = Path(__file__).resolve().parents[2]
MONITORING = CHECKOUT / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts_test.yml"
SCRAPE_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

# Series Prometheus makes itself for every target, not exported by the daemons.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

# PromQL words that look like metric names: functions are recognised by their '(',
# these are not.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan"}


def _promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is missing: install Debian's prometheus package (make setup) "
                    "to check the alert rules")
    return subprocess.run([found, *args], capture_output=True, text=True, check=False, timeout=120, cwd=cwd)


def test_promtool_checks_the_rules():
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_fail_when_an_alert_would_not_fire_in_time(tmp_path):
    # The rule tests are worth something only if a changed rule breaks them: an agent
    # down alert that waits 10 minutes instead of 2 must fail the 5-minute expectation.
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "HnvAgentDown":
                rule["for"] = "10m"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "HnvAgentDown" in result.stdout + result.stderr


def test_alert_set_covers_what_operators_are_paged_for():
    names = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert {"HnvHostOutOfSync", "HnvAgentDown", "HnvReconcileErrors", "HnvDriftRepairsRising",
            "HnvPoolNearExhaustion", "HnvWatchStreamLost", "HnvControllerWithoutDatabase",
            "HnvGatewayFailedOver"} <= names


def test_promtool_checks_the_scrape_configuration():
    result = _promtool("check", "config", SCRAPE_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    assert set(jobs) == {"hnv-controller", "hnv-agent"}
    assert jobs["hnv-controller"]["scheme"] == "https" and jobs["hnv-controller"]["tls_config"]["ca_file"]
    assert all("host" in group["labels"] for group in jobs["hnv-agent"]["static_configs"])


# --- metric names ---------------------------------------------------------------------------


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings: label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if text[max(0, match.start() - 1)].isdigit():  # 5m, 1e3
            continue
        names.add(word)
    return names


def test_metric_name_extraction_reads_promql_as_prometheus_does():
    expr = ('histogram_quantile(0.95, sum by (host, le) (rate(hnv_agent_reconcile_duration_seconds_bucket'
            '{job="hnv-agent", host=~"CON.*"}[5m]))) / on(host) group_left hnv_agent_objects > bool 0')
    assert metric_names_in(expr) == {"hnv_agent_reconcile_duration_seconds_bucket", "hnv_agent_objects"}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(target["expr"] for target in panel.get("targets", ()))
            walk(panel.get("panels", ()))

    walk(dashboard["panels"])
    return exprs


def _rule_exprs() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _sample_names(exposition: str) -> set[str]:
    """Every series name an exposition defines, also for labelled metrics with no child
    yet (a counter by errno before the first error): from the family's type."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def controller_exposition(tmp_path_factory) -> str:
    with LiveController(tmp_path_factory.mktemp("monitoring") / "state", hosts=["CON-HyperV6"]) as live:
        build_seed_fabric(live.admin)
        response = live.client().get("/metrics")
        assert response.status_code == 200
        return response.text


@pytest.fixture
def agent_exposition(tmp_path, controller) -> str:  # noqa: F811
    controller.publish(HOST, host_state(HOST, 1))
    daemon = make_daemon(tmp_path, controller.url)
    daemon.start()
    try:
        controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
        response = httpx.get(f"http://127.0.0.1:{daemon.server.port}/metrics", timeout=10)
        assert response.status_code == 200
        return response.text
    finally:
        daemon.stop()


def test_every_metric_the_dashboard_and_alerts_name_is_exported(controller_exposition, agent_exposition):
    exported = _sample_names(controller_exposition) | _sample_names(agent_exposition) | PROMETHEUS_OWN
    assert "hnv_controller_pool_addresses" in exported and "hnv_agent_tunnel_rx_bytes_total" in exported
    for source, exprs in (("grafana-dashboard.json", _dashboard_exprs()), ("alerts.yml", _rule_exprs())):
        assert exprs, f"no queries found in {source}"
        named = set().union(*map(metric_names_in, exprs))
        unknown = sorted(named - exported)
        assert not unknown, f"{source} queries metrics no daemon exports: {unknown}"


def test_the_dashboard_shows_every_agent_and_controller_metric(controller_exposition, agent_exposition):
    # The other direction: a metric added to a daemon shows up on the dashboard too.
    named = set().union(*map(metric_names_in, _dashboard_exprs()))
    # (the text parser reports a counter's or histogram's _created series as a family of
    # its own: a timestamp, nothing to chart)
    families = {f.name for f in text_string_to_metric_families(controller_exposition + agent_exposition)
                if not f.name.endswith("_created")}
    shown = {f for f in families if any(n == f or n.startswith(f + "_") for n in named)}
    assert families - shown == set(), f"exported but on no panel: {sorted(families - shown)}"
