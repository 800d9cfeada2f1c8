"""Automatic gateway failover over the real API (a controller on loopback, failover after
1 s, no start-up grace).

The gateway hosts' "agents" are real watch streams opened with each host's token (what
an agent holds open all the time); an agent stops reporting when its stream closes.
Checked as an administrator would: the service's active host and why it moved (API and
hnvctl), the GatewayWildcard records every host is given, /metrics, the log line; that
a host coming back does not take the role back; that with no other host reporting the
role stays put; that a host's silence counts from when it became active (an agent a few
seconds late to a new service keeps its role); and the flag's refusals.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime, timezone

import pytest

from controller.cli import main as controller_main
from controller.gateway_failover import failover_decision
from controller.models import GatewayService
from tests.lib.controller import LiveController
from tests.unit.test_controller_api import Watcher, report_in_sync
from tests.unit.test_daemon import wait_until
from tests.unit.test_gateway_api import DOCUMENTS
from tests.unit.test_hnvctl import Hnvctl

AFTER = 1.0  # --gateway-failover-after of the controller under test
GATEWAY_HOSTS = ("CON-GW1", "CON-GW2")
WAIT = 30.0  # generous: CI machines are slow


@contextlib.contextmanager
def gateway_controller(tmp_path, after: float):
    """A controller failing over after `after` s (no start-up grace), the gateway
    documents applied: the service is created with CON-GW1 active."""
    options = {"gateway_failover_after": after, "gateway_failover_grace": 0}
    with LiveController(tmp_path / "state", hosts=GATEWAY_HOSTS, app_options=options) as live:
        Hnvctl(live).ok("apply", *DOCUMENTS)
        yield live


@pytest.fixture
def ctl(tmp_path):
    with gateway_controller(tmp_path, AFTER) as live:
        yield live


class Agents:
    """One watch stream per gateway host, opened and closed as an agent would."""

    def __init__(self, ctl: LiveController):
        self.ctl = ctl
        self.streams: dict[str, Watcher] = {}

    def start(self, host: str, applies: bool = True) -> None:
        """Open the host's stream and, as an agent does once it has applied its state,
        report it in sync (`applies`); without, the host is still in its first apply."""
        watcher = Watcher(self.ctl, host, heartbeat=0.5)
        watcher.wait_for(lambda line: line["type"] == "state", timeout=WAIT)
        self.streams[host] = watcher
        if applies:
            report_in_sync(self.ctl, host)

    def stop(self, host: str) -> None:
        self.streams.pop(host).close()

    def close(self) -> None:
        for watcher in self.streams.values():
            watcher.close()


@pytest.fixture
def agents(ctl):
    running = Agents(ctl)
    yield running
    running.close()


def service(ctl) -> dict:
    return ctl.admin.get("/v1/gateway-services/Gateway").json()


def wildcard_pas(ctl, host: str = "CON-HyperV6") -> set[str]:
    records = ctl.admin.get(f"/v1/hosts/{host}/lookup-records").json()
    return {record["pa"] for record in records if record["type"] == "GatewayWildcard"}


def pa_of(ctl, host: str) -> set[str]:
    leases = ctl.admin.get("/v1/ip-addresses", params={"kind": "PA", "host": host}).json()
    return {lease["address"] for lease in leases}


def metric(ctl, name: str, **labels: str) -> float | None:
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in ctl.client().get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


def hold(seconds: float) -> None:
    """Let the controller run several failover rounds (for what must NOT happen)."""
    time.sleep(seconds)


def test_the_role_moves_to_the_reporting_standby_when_the_active_agent_stops(ctl, agents, caplog):
    caplog.set_level(logging.INFO, logger="openhnv.controller.gateway_failover")
    for host in GATEWAY_HOSTS:
        agents.start(host)
    assert service(ctl)["active"] == "CON-GW1"
    assert wildcard_pas(ctl) <= pa_of(ctl, "CON-GW1")
    assert metric(ctl, "hnv_controller_gateway_failovers_total", service="Gateway") == 0
    hold(3 * AFTER)  # both report: nothing moves
    assert service(ctl)["active"] == "CON-GW1"

    agents.stop("CON-GW1")
    stopped = time.monotonic()
    wait_until(lambda: service(ctl)["active"] == "CON-GW2", timeout=WAIT, what="the role to move to CON-GW2")
    # Not before the failover time: the last round that heard CON-GW1 was at most one
    # interval (after / 4) before its stream closed.
    assert time.monotonic() - stopped >= AFTER * 3 / 4
    moved = service(ctl)
    assert moved["active_reason"].startswith("failover: CON-GW1's agent silent for "), moved
    # The records every host is given point at the new active host's PAs.
    assert wildcard_pas(ctl) and wildcard_pas(ctl) <= pa_of(ctl, "CON-GW2")
    assert metric(ctl, "hnv_controller_gateway_failovers_total", service="Gateway") == 1
    assert metric(ctl, "hnv_controller_gateway_active", service="Gateway", host="CON-GW2") == 1
    assert metric(ctl, "hnv_controller_gateway_active", service="Gateway", host="CON-GW1") == 0
    events = [r.getMessage() for r in caplog.records if "event=gateway_failover " in r.getMessage()]
    assert len(events) == 1 and "service=Gateway from=CON-GW1 to=CON-GW2" in events[0], events

    # hnvctl shows where the gateway's traffic goes now and why.
    hnvctl = Hnvctl(ctl)
    rows = hnvctl.ok("gateway-service", "list").splitlines()
    assert rows[0].split()[-3:] == ["Active", "ActiveSince", "LastMove"]
    assert "CON-GW2" in rows[2] and "failover: CON-GW1's agent silent for" in rows[2], rows
    gateways = hnvctl.ok("gateway", "list").splitlines()
    assert gateways[0].split()[-1] == "ActiveHost"
    assert all(line.split()[-1] == "CON-GW2" for line in gateways[2:]), gateways
    shown = {name.strip(): value for name, value in
             (line.split(" : ", 1) for line in hnvctl.ok("gateway", "show", "Fabrikam2_Gateway").splitlines())}
    assert shown["ActiveHost"] == "CON-GW2"
    assert shown["ActiveReason"].startswith("failover: CON-GW1's agent silent for ")

    # CON-GW1 comes back: it does not take the role back by itself.
    agents.start("CON-GW1")
    hold(3 * AFTER)
    assert service(ctl)["active"] == "CON-GW2"
    assert metric(ctl, "hnv_controller_gateway_failovers_total", service="Gateway") == 1

    # ... but it is the standby the next failover goes to (the order wraps round).
    agents.stop("CON-GW2")
    wait_until(lambda: service(ctl)["active"] == "CON-GW1", timeout=WAIT, what="the role to move back to CON-GW1")
    assert metric(ctl, "hnv_controller_gateway_failovers_total", service="Gateway") == 2


def test_no_move_when_no_other_host_reports(ctl, agents, caplog):
    caplog.set_level(logging.INFO, logger="openhnv.controller.gateway_failover")
    agents.start("CON-GW1")
    hold(2 * AFTER)  # the controller hears CON-GW1 for a few rounds
    generation = ctl.admin.get("/v1/hosts/CON-HyperV6").json()["desired_generation"]
    agents.stop("CON-GW1")  # CON-GW2's agent never reported
    wait_until(lambda: any("event=gateway_failover_blocked" in r.getMessage() for r in caplog.records),
               timeout=WAIT, what="the blocked failover to be logged")
    assert service(ctl)["active"] == "CON-GW1"
    assert ctl.admin.get("/v1/hosts/CON-HyperV6").json()["desired_generation"] == generation
    blocked = [r.getMessage() for r in caplog.records if "event=gateway_failover_blocked" in r.getMessage()]
    assert len(blocked) == 1 and "no other host of the service is reporting" in blocked[0]
    # The standby's agent starts: now the role can go there.
    agents.start("CON-GW2")
    wait_until(lambda: service(ctl)["active"] == "CON-GW2", timeout=WAIT, what="the role to move to CON-GW2")


def test_a_status_report_counts_as_reporting(ctl, agents):
    """An agent heard through its status PUT (its watch stream on no controller) is alive."""
    gw1 = ctl.client_for("CON-GW1")
    generation = ctl.admin.get("/v1/hosts/CON-GW1").json()["desired_generation"]

    def report() -> None:
        assert gw1.put("/v1/hosts/CON-GW1/status", json={"generation": generation}).status_code == 200

    report()
    agents.start("CON-GW2")
    deadline = time.monotonic() + 4 * AFTER
    while time.monotonic() < deadline:  # CON-GW1 reports its status every half interval
        report()
        hold(AFTER / 2)
    assert service(ctl)["active"] == "CON-GW1"
    wait_until(lambda: service(ctl)["active"] == "CON-GW2", timeout=WAIT, what="the role to move once it is silent")


def stamp(value: str) -> float:
    """An `active_since` of the API as seconds since the epoch."""
    return datetime.fromisoformat(value).timestamp()


def test_an_active_host_that_never_reports_loses_the_role_after_the_failover_time(ctl, agents):
    """Silence counts from when the host became active, not from the controller's start:
    the role leaves a host that never reported `after` seconds after it got it."""
    created = service(ctl)
    agents.start("CON-GW2")
    wait_until(lambda: service(ctl)["active"] == "CON-GW2", timeout=WAIT, what="the role to move to CON-GW2")
    moved = service(ctl)
    assert moved["active_reason"].startswith("failover: CON-GW1's agent never reported in the "), moved
    assert moved["active_reason"].endswith(" s since it became active (limit 1 s)"), moved
    # Both stamps are the controller's: the role was held `after` seconds at least.
    assert stamp(moved["active_since"]) - stamp(created["active_since"]) >= AFTER, (created, moved)


LATE_AFTER = 6.0  # a failover time long enough for a loaded machine to open two streams in
AGENT_LATE_BY = 2.0  # how late the active host's agent connects (the standby's came first)


def test_a_new_service_keeps_its_active_host_whose_agent_is_late_by_less_than_the_failover_time(tmp_path):
    """The lab's case: the gateway documents are applied, the standby's agent reports
    first and the active host's a few seconds later. The role stays where it was created
    (before, a host that never reported counted as silent since forever: the role moved
    to the standby at the first round after the standby reported)."""
    with gateway_controller(tmp_path, LATE_AFTER) as ctl:
        created = service(ctl)
        assert created["active"] == "CON-GW1"
        agents = Agents(ctl)
        try:
            agents.start("CON-GW2")
            hold(AGENT_LATE_BY)  # several failover rounds with only the standby reporting
            agents.start("CON-GW1")
            joined = time.time() - stamp(created["active_since"])
            assert joined < LATE_AFTER, f"the test's premise: CON-GW1's agent joined {joined:.1f} s after the service"
            # Past the failover time counted from the creation, and a few rounds more.
            hold(max(0.0, stamp(created["active_since"]) + LATE_AFTER + 2.0 - time.time()))
            now = service(ctl)
            assert (now["active"], now["active_reason"]) == ("CON-GW1", "created"), now
            assert metric(ctl, "hnv_controller_gateway_failovers_total", service="Gateway") == 0
        finally:
            agents.close()


def test_an_operator_move_is_recorded_as_set_by_hand(ctl):
    created = service(ctl)
    assert created["active_reason"] == "created" and created["active_since"]
    moved = ctl.admin.patch("/v1/gateway-services/Gateway", json={"active": "CON-GW2"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["active_reason"] == "set by hand"
    assert moved.json()["active_since"] > created["active_since"]


def _service(active: str, hosts=("A", "B", "C")) -> GatewayService:
    return GatewayService(name="S", front_end_logical_network="F", front_end_site="F", external_ip_pool="P",
                          back_end_logical_network="B", hosts=hosts, active=active, uuid="u")


def test_the_next_host_is_the_first_reporting_one_after_the_active_wrapping_round():
    now, after = 100.0, 10.0
    heard = {"A": 50.0, "B": 50.0, "C": 95.0}
    assert failover_decision(_service("A"), heard, now, after)[0] == "C"  # B is silent too
    assert failover_decision(_service("B"), {**heard, "A": 99.0}, now, after)[0] == "C"
    assert failover_decision(_service("C"), {"A": 99.0, "B": 99.0, "C": 50.0}, now, after)[0] == "A"
    assert failover_decision(_service("A"), {"A": 91.0, "B": 99.0}, now, after) is None  # A still reports
    assert failover_decision(_service("A"), {"B": 50.0}, now, after) is None  # nobody to move to
    target, why = failover_decision(_service("A"), {"B": 99.0}, now, after)
    assert (target, why) == ("B", "failover: A's agent never reported to this controller (limit 10 s)")


def test_silence_counts_from_the_later_of_the_last_report_and_becoming_active():
    after = 10.0
    since = datetime(2026, 1, 1, tzinfo=timezone.utc)
    became_active = since.timestamp()
    service = _service("A").model_copy(update={"active_since": since})
    # A never reported: silent since it became active, not forever.
    assert failover_decision(service, {"B": became_active + 5}, became_active + 5, after) is None
    target, why = failover_decision(service, {"B": became_active + 11}, became_active + 11, after)
    assert (target, why) == ("B", "failover: A's agent never reported in the 11.0 s since it became active "
                                  "(limit 10 s)")
    # A's last report before it became active does not count against it...
    heard = {"A": became_active - 60, "B": became_active + 5}
    assert failover_decision(service, heard, became_active + 5, after) is None
    # ... and a report after that does, from the report on.
    heard = {"A": became_active + 3, "B": became_active + 14}
    assert failover_decision(service, heard, became_active + 12, after) is None
    assert failover_decision(service, heard, became_active + 14, after)[1] == ("failover: A's agent silent for "
                                                                               "11.0 s (limit 10 s)")


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "1e9"])
def test_run_refuses_a_bad_failover_time_in_one_line(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        controller_main(["run", "--state-dir", str(tmp_path), "--gateway-failover-after", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--gateway-failover-after" in err[-1] and value in err[-1]


def test_the_environment_gives_the_default(monkeypatch):
    from controller.cli import build_parser

    monkeypatch.setenv("HNV_GATEWAY_FAILOVER_AFTER", "25")
    assert build_parser().parse_args(["run"]).gateway_failover_after == 25.0
    monkeypatch.delenv("HNV_GATEWAY_FAILOVER_AFTER")
    assert build_parser().parse_args(["run"]).gateway_failover_after == 10.0


def test_a_host_in_its_first_apply_keeps_the_role_for_the_grace_and_a_settled_standby_comes_first():
    """Heard from, never applied: its first apply may have cut it off (its management
    address moving onto the switch), so `after` does not yet count; the grace does."""
    now, after, grace = 100.0, 2.0, 30.0
    heard = {"A": 90.0, "B": 99.0, "C": 99.0}
    assert failover_decision(_service("A"), heard, now, after, settled={"C"}, first_apply_grace=grace) is None
    assert failover_decision(_service("A"), heard, now, after, settled={"A", "C"})[0] == "C"  # B is coming up
    target, why = failover_decision(_service("A"), {**heard, "A": 60.0}, now, after, settled={"C"},
                                    first_apply_grace=grace)
    assert (target, why) == ("C", "failover: A's agent silent for 40.0 s (limit 30 s, in its first apply)")
    # With no settled standby, one still coming up is better than none.
    assert failover_decision(_service("A"), {**heard, "A": 60.0}, now, after, settled=set(),
                             first_apply_grace=grace)[0] == "B"
    # Never heard from at all is not an apply: `after`, counted as before.
    assert failover_decision(_service("A"), {"B": 99.0}, now, after, settled={"B"}, first_apply_grace=grace)[0] == "B"


FIRST_APPLY_GRACE = 5.0  # the controller's first-apply grace in the test below


def test_a_gateway_host_cut_off_by_its_first_apply_is_not_failed_over_until_the_grace(tmp_path, caplog):
    """The seed lab's case: both gateway hosts' agents connect and get their state; the
    active one's first apply moves its management address and its stream breaks before
    it could report. Before, the role moved after 1 s; now it stays for the grace, and
    moves after it to the standby that did apply."""
    caplog.set_level(logging.INFO, logger="openhnv.controller.gateway_failover")
    options = {"gateway_failover_after": AFTER, "gateway_failover_grace": 0,
               "gateway_failover_first_apply_grace": FIRST_APPLY_GRACE}
    with LiveController(tmp_path / "state", hosts=GATEWAY_HOSTS, app_options=options) as ctl:
        Hnvctl(ctl).ok("apply", *DOCUMENTS)
        agents = Agents(ctl)
        try:
            agents.start("CON-GW2")
            agents.start("CON-GW1", applies=False)
            hold(2 * AFTER)  # heard from for a few rounds
            agents.stop("CON-GW1")  # its first apply cuts it off
            cut = time.monotonic()
            hold(3 * AFTER)
            assert service(ctl)["active"] == "CON-GW1"
            assert not [r for r in caplog.records if "event=gateway_failover " in r.getMessage()]
            wait_until(lambda: service(ctl)["active"] == "CON-GW2", timeout=WAIT + FIRST_APPLY_GRACE,
                       what="the role to move to CON-GW2 after the first-apply grace")
            assert time.monotonic() - cut >= FIRST_APPLY_GRACE * 3 / 4
            reason = service(ctl)["active_reason"]
            assert reason.startswith("failover: CON-GW1's agent silent for ") and reason.endswith(
                f"(limit {FIRST_APPLY_GRACE:g} s, in its first apply)"), reason
        finally:
            agents.close()
