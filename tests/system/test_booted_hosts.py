"""What an operator checks on hosts that booted with systemd and were installed as docs/operating.md says.

One lab for the module (``lab`` in conftest): CON-HyperV1 runs the controller unit,
CON-HyperV6 and CON-HyperV7 the agent unit, with the seed's fabric and tenants applied.
The tests run in file order and leave the hosts as they found them (agent active and in
sync, controller answering), so each can be read alone.

Tenant traffic: TenantVM01 (CON-HyperV6) and TenantVM02 (CON-HyperV7) are in Fabrikam2,
TenantVM03 and TenantVM04 in Fabrikam3, with the same customer addresses in both.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from agent.state import parse_host_state
from netns_lab.bootlab import BootedHost, BootLab, Command
from netns_lab.multivm import ping_summary
from tests.lib.nvgre import tenant_flows_on_trunk
from tests.system.conftest import record

TRANSPORT_VLAN = 802  # the seed's HNV provider VLAN
PING_INTERVAL = 0.1  # 10 pings a second: a gap of 100 ms shows
METRICS_PORT = 9477
SYNC_TIMEOUT = 600.0

# Run on a host by python3 (stdlib only): waits until the agent unit's main process is a
# new one (not OLD_PID) whose /healthz says it applied the desired generation; prints the
# seconds since EPOCH_START and the health. Bounded by TIMEOUT.
IN_SYNC = r"""
import json, subprocess, sys, time, urllib.request
url, old_pid, timeout, started = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
while time.time() - started < timeout:
    pid = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", "hnv-agent"],
                         capture_output=True, text=True).stdout.strip()
    health = None
    if pid not in ("", "0", old_pid):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                health = json.loads(response.read())
        except (OSError, ValueError):
            pass
    if health and health.get("applied_generation") and \
            health["applied_generation"] == health.get("desired_generation"):
        print(json.dumps({"pid": int(pid), "seconds": round(time.time() - started, 1), "health": health}))
        sys.exit(0)
    time.sleep(0.5)
print(json.dumps({"error": f"hnv-agent not in sync {timeout:.0f} s after the action"}))
sys.exit(1)
"""


def _host(lab: BootLab, name: str) -> BootedHost:
    return lab.hosts[name]


def _vms(lab: BootLab) -> dict[str, dict]:
    return lab.tenant_vms()


def _ca(vm: dict) -> str:
    for key in ("ca", "ipAddress", "ip_address", "address"):
        if vm.get(key):
            return str(vm[key]).split("/")[0]
    raise AssertionError(f"no customer address in {vm}")


def _main_pid(host: BootedHost) -> str:
    return host.run("systemctl show -p MainPID --value hnv-agent").output.strip()


def _show(host: BootedHost, unit: str, *props: str) -> dict[str, str]:
    out = host.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).output
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(us|µs|ms|min|s|h)?")
_UNIT_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}


def _seconds(value: str) -> float:
    """A systemd time span as ``systemctl show`` prints it ("30s", "1min 30s", "0"); 0 when unset."""
    if value in ("", "infinity"):
        return 0.0
    return sum(float(n) * _UNIT_SECONDS[u or "us"] for n, u in _SPAN.findall(value))


class PingLoop:
    """``ping -i 0.1`` from a tenant VM, started before an action and stopped after it."""

    def __init__(self, host: BootedHost, vm: str, ca: str):
        self.host, self.vm, self.ca = host, vm, ca
        self.pidfile = f"/lab/ping-{vm}.pid"
        self.command: Command = host.start(
            # stdbuf: a line per reply in the output file as it comes, not per 4 KiB.
            f"ip netns exec {vm} stdbuf -oL ping -i {PING_INTERVAL} -W 1 {ca} &\n"
            f"echo $! > {self.pidfile}\nwait")
        # Started means answered: a loop that has not crossed yet would blame the action.
        deadline = time.monotonic() + 120
        while self.command.output().count("bytes from") < 10:
            assert not self.command.done(), f"ping {vm} -> {ca} ended: {self.command.output()[-500:]}"
            assert time.monotonic() < deadline, f"ping {vm} -> {ca} got no 10 replies in 120 s"
            time.sleep(0.3)

    def stop(self) -> dict:
        self.host.run(f"kill -INT $(cat {self.pidfile})")  # ping prints its summary on SIGINT
        result = ping_summary(self.command.wait(60, check=False).output)
        return result


def _after(host: BootedHost, action: str, old_pid: str) -> dict:
    """Run ``action`` on the host, then wait there until a new agent process is in sync."""
    host.put("in-sync.py", IN_SYNC, 0o644)
    url = f"http://{host.address}:{METRICS_PORT}/healthz"
    out = host.run(f"started=$(date +%s.%N)\n{action}\n"
                   f"python3 /lab/in-sync.py {url} {old_pid} {SYNC_TIMEOUT:.0f} $started",
                   timeout=SYNC_TIMEOUT + 60).output
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tenants(lab: BootLab) -> dict[str, dict]:
    vms = _vms(lab)
    assert {"TenantVM01", "TenantVM02", "TenantVM03", "TenantVM04"} <= set(vms), vms
    return vms


def test_hosts_boot_with_systemd_and_come_up_by_themselves(lab):
    for host in lab.hosts.values():
        assert host.run("cat /proc/1/comm").output.strip() == "systemd", host.name
        assert host.run("uname -r").output.strip() == lab.image.kernel_release, host.name
    controller = lab.controller.run("systemctl is-enabled hnv-controller; systemctl is-active hnv-controller").output
    assert controller.split() == ["enabled", "active"], controller
    for agent in lab.agents:
        state = agent.run("systemctl is-enabled hnv-agent; systemctl is-active hnv-agent").output
        assert state.split() == ["enabled", "active"], (agent.name, state)
    hosts = json.loads(lab.hnvctl("hosts -o json").output)
    rows = hosts if isinstance(hosts, list) else hosts.get("items", [])
    status = {row.get("name"): row for row in rows}
    for agent in lab.agents:
        row = json.dumps(status.get(agent.name))
        assert "InSync" in row, (agent.name, row)


def test_tenant_pings_cross_hosts_inside_nvgre_on_vlan_802(lab, tenants):
    h6 = _host(lab, "CON-HyperV6")
    pairs = [("TenantVM01", "TenantVM02", "Fabrikam2"), ("TenantVM03", "TenantVM04", "Fabrikam3")]
    for local, peer, network in pairs:
        assert tenants[local]["host"] == "CON-HyperV6" and tenants[peer]["host"] == "CON-HyperV7"
        ca = _ca(tenants[peer])
        # First reply may wait for ARP across the tunnel; then five in a row, none lost.
        h6.run(f"ip netns exec {local} ping -c 1 -W 2 -w 30 {ca}", timeout=60)
        summary = ping_summary(h6.run(f"ip netns exec {local} ping -c 5 -i 0.2 -W 2 {ca}", timeout=60).output)
        record(f"ping {local} -> {peer} ({network}, {ca})", f"{summary['received']}/{summary['transmitted']} received")
        assert summary["received"] == summary["transmitted"] == 5, summary
    # The VSIDs the controller gave the two VM networks, from the state the agent accepted.
    state = parse_host_state(h6.run("cat /var/lib/openhnv/agent/state.json").output.encode())
    vsids = {domain.name: domain.subnets[0].vsid for domain in state.routing_domains}
    assert set(vsids) == {"Fabrikam2", "Fabrikam3"}, vsids
    cas = {name: _ca(vm) for name, vm in tenants.items()}
    seen = tenant_flows_on_trunk(list(lab.captures.values()), TRANSPORT_VLAN)
    for local, peer, network in pairs:
        assert (cas[local], cas[peer]) in seen.get(vsids[network], set()), (network, vsids, seen)
    record("NVGRE on the switch (VLAN 802)", ", ".join(
        f"{n}: GRE key {vsids[n] << 8:#x} = VSID {vsids[n]} << 8" for n in sorted(vsids)))


def test_restarting_the_agent_under_a_10_per_second_ping_loses_nothing(lab, tenants):
    h6 = _host(lab, "CON-HyperV6")
    ping = PingLoop(h6, "TenantVM01", _ca(tenants["TenantVM02"]))
    old = _main_pid(h6)
    synced = _after(h6, "systemctl restart hnv-agent", old)
    time.sleep(2)  # keep pinging past the new agent's first reconcile
    summary = ping.stop()
    record("systemctl restart hnv-agent: pings lost", f"{summary['lost']} of {summary['transmitted']}")
    record("systemctl restart hnv-agent: seconds until in sync again", f"{synced.get('seconds')}")
    assert "error" not in synced, synced
    assert str(synced["pid"]) != old
    assert summary["transmitted"] >= 30, summary  # the loop spanned the whole restart
    assert summary["lost"] == 0, summary["summary"]


def test_a_killed_agent_is_restarted_by_systemd_and_loses_nothing(lab, tenants):
    h7 = _host(lab, "CON-HyperV7")
    restarts_before = int(_show(h7, "hnv-agent", "NRestarts")["NRestarts"])
    ping = PingLoop(h7, "TenantVM02", _ca(tenants["TenantVM01"]))
    old = _main_pid(h7)
    synced = _after(h7, "systemctl kill -s KILL hnv-agent", old)
    time.sleep(2)
    summary = ping.stop()
    after = _show(h7, "hnv-agent", "NRestarts", "ActiveState", "Result")
    record("systemctl kill -s KILL hnv-agent: pings lost", f"{summary['lost']} of {summary['transmitted']}")
    record("systemctl kill -s KILL hnv-agent: seconds until restarted and in sync", f"{synced.get('seconds')}")
    assert "error" not in synced, synced
    assert str(synced["pid"]) != old
    assert int(after["NRestarts"]) == restarts_before + 1, after  # systemd restarted it (Restart=on-failure)
    assert after["ActiveState"] == "active", after
    assert summary["transmitted"] >= 30, summary
    assert summary["lost"] == 0, summary["summary"]


def test_a_stopped_agent_leaves_the_kernel_as_it_is(lab, tenants):
    h6 = _host(lab, "CON-HyperV6")
    kernel = "ip -br link show; ip netns list; ip -br addr show"
    before = h6.run(kernel).output
    ping = PingLoop(h6, "TenantVM03", _ca(tenants["TenantVM04"]))
    h6.run("systemctl stop hnv-agent")
    assert h6.run("systemctl is-active hnv-agent", check=False).output.strip() == "inactive"
    time.sleep(5)  # 50 pings with no agent at all
    during = h6.run(kernel).output
    summary = ping.stop()
    record("systemctl stop hnv-agent: pings lost while stopped", f"{summary['lost']} of {summary['transmitted']}")
    try:
        assert during == before, "the kernel changed when the agent stopped"
        assert summary["transmitted"] >= 40, summary
        assert summary["lost"] == 0, summary["summary"]
    finally:
        synced = _after(h6, "systemctl start hnv-agent", "0")
        assert "error" not in synced, synced


def test_the_journal_has_the_agents_structured_lines(lab):
    h6 = _host(lab, "CON-HyperV6")
    journal = h6.run("journalctl -u hnv-agent -o cat --no-pager").output
    events = [line for line in journal.splitlines() if "event=" in line]
    record("journalctl -u hnv-agent: structured lines", str(len(events)))
    for expected in ("event=reconcile ", "event=agent_stopping", "kernel=left_in_place", "event=state_loaded"):
        assert any(expected in line for line in events), (expected, events[-20:])


def test_a_hung_agent_is_restarted_by_the_watchdog(lab, tenants):
    h7 = _host(lab, "CON-HyperV7")
    watchdog = _seconds(_show(h7, "hnv-agent", "WatchdogUSec")["WatchdogUSec"])
    if not watchdog:
        pytest.skip("hnv-agent.service has no WatchdogSec= (systemctl show: WatchdogUSec=0): "
                    "nothing would restart a hung agent; this test runs once the unit has one")
    restart_delay = _seconds(_show(h7, "hnv-agent", "RestartUSec")["RestartUSec"])
    ping = PingLoop(h7, "TenantVM04", _ca(tenants["TenantVM03"]))
    old = _main_pid(h7)
    synced = _after(h7, f"kill -STOP {old}", old)
    time.sleep(2)
    summary = ping.stop()
    record("SIGSTOP hnv-agent: pings lost", f"{summary['lost']} of {summary['transmitted']}")
    record("SIGSTOP hnv-agent: seconds until the watchdog restarted it, in sync",
           f"{synced.get('seconds')} (WatchdogSec {watchdog:g} s)")
    assert "error" not in synced, synced
    journal = h7.run("journalctl -u hnv-agent -o cat --no-pager | grep -i watchdog", check=False).output
    assert "watchdog timeout" in journal.lower(), journal
    # Restarted within the interval plus RestartSec, and a start under TCG (generous).
    assert synced["seconds"] <= watchdog + restart_delay + 120, synced
    assert summary["lost"] == 0, summary["summary"]


def test_the_controller_refuses_a_token_others_can_read(lab):
    # Not the directory's mode: systemd resets a StateDirectory= to StateDirectoryMode=
    # (0700) at every start. The files in it keep theirs.
    controller = lab.controller
    token = "/var/lib/openhnv/controller/admin.token"
    since = controller.run("date +%s").output.strip()
    # Type=notify: the start job fails, as the process exits 2 before it is ready (and
    # systemd retries, Restart=on-failure, with the same outcome); the journal says why.
    restart = controller.run(f"chmod 0644 {token}\nsystemctl restart hnv-controller", check=False)
    try:
        assert restart.returncode != 0, restart.output
        journal = ""
        deadline = time.monotonic() + 300
        while not ("lets group or others in" in journal and "status=2" in journal):
            assert time.monotonic() < deadline, f"hnv-controller did not refuse a 0644 token:\n{journal[-1500:]}"
            time.sleep(2)
            journal = controller.run(f"journalctl -u hnv-controller --since @{since} --no-pager -o cat").output
        why = [line for line in journal.splitlines() if "lets group or others in" in line][-1]
        record("hnv-controller with a 0644 admin token says", why)
        assert why == (f"{token}: mode 0644 lets group or others in; the controller's store and "
                       f"tokens must be owner-only: chmod 0600 {token}"), why
        assert lab.hnvctl("hosts", timeout=120, check=False).returncode != 0  # and it serves nothing
    finally:
        controller.run(f"chmod 0600 {token}\nsystemctl reset-failed hnv-controller\nsystemctl restart hnv-controller")
        deadline = time.monotonic() + 600
        while lab.hnvctl("hosts", timeout=120, check=False).returncode != 0:  # the API answers again
            assert time.monotonic() < deadline, "hnv-controller did not come back with a 0600 token"
            time.sleep(2)
        hosts = " ".join(f"--host {a.name}" for a in lab.agents)
        lab.hnvctl(f"hosts --wait {SYNC_TIMEOUT:.0f} {hosts}", timeout=SYNC_TIMEOUT + 60)
