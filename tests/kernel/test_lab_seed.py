"""The seed lab's one life in the kernel tier: up, the walkthrough, Prometheus, down.

`hnv-lab up` with a capture on the management switch from before the agents started:
the agents reach the controller across the switch with their bearer tokens, and the
capture holds TLS and never a token. Then `hnv-lab demo --keep` on that lab passes every
check of the seed walkthrough (seven host namespaces, the controller and seven agents as
processes talking HTTPS over the lab's management network, tenant pings inside NVGRE,
captures decoded). Then `hnv-lab up --prometheus` adds Debian's Prometheus to the running
lab, in the controller's host namespace with the project's scrape configuration and
alert rules (intervals and `for:` shortened for the lab); its HTTP API, queried from
inside the lab's management network, shows every target up and every host's series, and
stopping one agent fires HnvAgentDown for that host and no other. `down` stops
Prometheus with the daemons, removes a VM namespace of the lab that no veth leads to,
and leaves nothing else.

One lab for all of it (an `up` of the seed's seven hosts takes two minutes under
emulation); the tests run in file order. Prometheus starts after the walkthrough: its
scrapes of eight targets every few seconds slowed the walkthrough by minutes on the
emulated CPUs. `down` after a crash and `up` refusing a namespace it did not make are
tests/kernel/test_lab_demo.py's, on labs of their own. Runs on a kernel with gretap,
802.1Q, bonding, VRF and VLAN filtering (the kernel tier's VM here).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from netns_lab import processes, prometheus
from netns_lab.build import LabRecord
from netns_lab.tcpdump import tcpdump_argv
from tests.kernel.conftest import hnv_lab
from tests.kernel.test_lab_demo import HNV_LAB, TOPOLOGY, _assert_nothing_left, _snapshot, assert_walkthrough
from tests.lib.wait import wait_until

HOSTS = {host.name for host in TOPOLOGY.hosts}
STOPPED = "CON-HyperV7"
WAIT = 240  # seconds for a scrape to show what the test waits for (emulated CPU)
TLS_HANDSHAKE, TLS_APPLICATION_DATA = 0x16, 0x17


@dataclass
class Lab:
    started: float
    record: LabRecord
    pcap: Path
    capture: subprocess.Popen
    before: tuple  # namespaces, root links and processes before `up` (test_lab_demo._snapshot)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The seed lab, up with a capture on its switch from before the agents started; down
    (whatever the tests did) at the end."""
    hnv_lab("down")
    before = _snapshot()
    started = time.monotonic()
    built = hnv_lab("up", "--no-daemons")  # in this process: cabling only, nothing forked
    assert built.returncode == 0, built.stdout + built.stderr
    pcap = tmp_path_factory.mktemp("management") / "management.pcap"
    # -i any in the switch's namespace: every frame forwarded between hosts, on its ports.
    capture = subprocess.Popen(["ip", "netns", "exec", TOPOLOGY.switch.namespace,
                                *tcpdump_argv("any", pcap, f"tcp port {TOPOLOGY.controller.port}")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(pcap.exists, 60, "tcpdump to open its capture file")
        up = subprocess.run([*HNV_LAB, "up"], capture_output=True, text=True, timeout=1200, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"up took {time.monotonic() - started:.0f} s")
        record = LabRecord.load(TOPOLOGY.name)
        assert record is not None
        yield Lab(started, record, pcap, capture, before)
    finally:
        if capture.poll() is None:
            capture.terminate()
            capture.wait(timeout=30)
        hnv_lab("down")


def targets_up(job: str) -> dict[str, str]:
    """instance -> value of `up` for one job."""
    return {r["metric"]["instance"]: r["value"][1] for r in prometheus.query(TOPOLOGY, f'up{{job="{job}"}}')}


def _tls_records_from(pcap: Path, port: int) -> dict[str, set[int]]:
    """Source address -> TLS record types that begin a TCP payload sent to `port`."""
    from scapy.layers.inet import IP, TCP
    from scapy.utils import PcapReader

    seen: dict[str, set[int]] = {}
    with PcapReader(str(pcap)) as packets:
        for packet in packets:
            if packet.haslayer(TCP) and packet[TCP].dport == port and bytes(packet[TCP].payload):
                seen.setdefault(packet[IP].src, set()).add(bytes(packet[TCP].payload)[0])
    return seen


def test_the_management_network_carries_no_token_in_clear(lab):
    """Every agent's token crossed the switch (the controller answered each agent past its
    authentication: 404, its host not yet in the fabric, not 401), inside TLS only."""
    controller = next(p for p in lab.record.processes if p.role == "controller")
    agents = {str(host.address) for host in TOPOLOGY.hosts if host.name != TOPOLOGY.controller.host}
    authenticated = re.compile(r'(\d+\.\d+\.\d+\.\d+):\d+ - "GET /v1/hosts/[^/]+/state\S* HTTP/1.1" 404')

    def every_agent_authenticated():
        seen = set(authenticated.findall(Path(controller.log).read_text(errors="replace")))
        return seen >= agents

    wait_until(every_agent_authenticated, WAIT, "a request from every agent past the controller's authentication",
               interval=1)
    lab.capture.terminate()
    lab.capture.wait(timeout=30)

    state = Path(lab.record.workdir) / "controller"
    tokens = {path.name: path.read_text().strip().encode()
              for path in [state / "admin.token", *(state / "hosts").glob("*.token")]}
    assert len(tokens) == len(TOPOLOGY.hosts) + 1
    wire = lab.pcap.read_bytes()
    leaked = [name for name, token in tokens.items() if token in wire]
    assert not leaked, f"tokens in clear on the management network: {leaked}"
    assert b"Authorization" not in wire and b"Bearer" not in wire
    records = _tls_records_from(lab.pcap, TOPOLOGY.controller.port)
    inside_tls = {source for source, kinds in records.items() if {TLS_HANDSHAKE, TLS_APPLICATION_DATA} <= kinds}
    assert inside_tls >= agents, f"no TLS handshake and application data from {sorted(agents - inside_tls)}"


def test_the_walkthrough_passes_every_check_on_the_running_lab(lab, tmp_path):
    """What `make demo` runs, on the lab that is up (`--keep`: the last test takes it down).

    Through `hnv-lab`'s main in this process (tests/lib/cli.py): a new Python paid a minute
    of imports under emulation. That is safe only because every daemon of the lab runs, so
    `demo` starts none: starting one forks the calling process."""
    record = LabRecord.load(TOPOLOGY.name)
    assert record is not None
    dead = [f"{p.role} {p.name}" for p in record.processes if not processes.is_alive(p)]
    assert not dead, f"daemons of the lab stopped before the walkthrough: {dead}"
    started = time.monotonic()
    demo = hnv_lab("demo", "--keep")
    output = demo.stdout + demo.stderr
    (tmp_path / "demo.txt").write_text(output)
    print(output[-4000:])
    print(f"the walkthrough took {time.monotonic() - started:.0f} s")
    assert_walkthrough(output, demo.returncode)
    assert LabRecord.load(TOPOLOGY.name) is not None, "demo --keep took the lab down"


def test_prometheus_scrapes_every_target_and_fires_agent_down(lab):
    up = subprocess.run([*HNV_LAB, "up", "--prometheus"], capture_output=True, text=True, timeout=600, check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"up: prometheus on {TOPOLOGY.controller.host} at {prometheus.base_url(TOPOLOGY)}" in up.stdout
    record = LabRecord.load(TOPOLOGY.name)
    assert record is not None
    server = next(p for p in record.processes if p.role == "prometheus")
    assert processes.is_alive(server)

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


def test_down_stops_prometheus_and_removes_a_lab_vm_namespace_no_veth_leads_to(lab):
    """`down` stops Prometheus with the daemons. A VM namespace an agent of this lab made,
    whose port is gone (so no veth of a host leads to it), is still the lab's: `down`
    removes it by the agent's mark. A namespace marked by another lab's agent, and an
    unmarked one, are not the lab's; nothing else is left."""
    from agent import naming
    from agent.netns import ensure_vm_netns

    record = LabRecord.load(TOPOLOGY.name)  # with the Prometheus the test above started
    assert record is not None
    server = next(p for p in record.processes if p.role == "prometheus")
    orphan, other_lab, bystander = "orphan-vm-lab-test", "other-lab-vm-test", "bystander-lab-test"
    try:
        subprocess.run(["ip", "netns", "add", bystander], check=True)
        ensure_vm_netns(other_lab, naming.vm_netns_marker(naming.vm_port("ElsewhereVM"), "HOST-OF-ANOTHER-LAB"))
        # What an agent on the lab's first host does for a VM, with the port since deleted.
        ensure_vm_netns(orphan, naming.vm_netns_marker(naming.vm_port("OrphanVM"), TOPOLOGY.hosts[0].name))
        status = hnv_lab("status")
        assert f"vm   {orphan}" in status.stdout

        down = hnv_lab("down")
        assert down.returncode == 0, down.stderr
        assert f"prometheus {server.name} (pid {server.pid})" in down.stdout
        assert not processes.is_alive(server)
        assert f"namespace {orphan}" in down.stdout
        namespaces, links, procs = lab.before
        _assert_nothing_left((namespaces | {other_lab, bystander}, links, procs))
    finally:
        for name in (orphan, other_lab, bystander):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    print(f"the lab's whole life took {time.monotonic() - lab.started:.0f} s")
