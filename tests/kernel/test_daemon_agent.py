"""The real `hnv-agent run` on the real kernel: drift repair, restart safety, bad input.

Topology, built once for the module (the scenarios run in order on the same lab):

    vm1 (TenantVM01, 192.168.0.10)          vm2 (TenantVM02, 192.168.0.11)
      | veth made by the agent                | veth made by the agent
    h1  CON-HyperV6  PA 10.80.2.20          h2  CON-HyperV7  PA 10.80.2.21
      | eth1 (team member, trunk)             | eth1
      +---- p1 ---- sw: VLAN-filtering bridge ---- p2 ----+   (802 tagged, 1 native)

Each host namespace is managed by its own `hnv-agent run --netns <host>` process started
in the VM's root namespace, following a fake controller on loopback that serves fixed
HostState documents over the real protocol (tests/lib/fake_controller.py). Both hosts
carry VSID 3535905 (Fabrikam2); VM-to-VM pings cross the switch inside NVGRE.
"""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

import agent.daemon  # noqa: F401  imported here, once, for the forked agents
import agent.reconcile  # noqa: F401
from agent import cli as agent_cli

from tests.lib.fake_controller import FakeController, free_port
from tests.lib.netns import Namespace, NamespaceFactory, veth_pair
from tests.lib.sample_states import host_state, with_bad_record_ca
from tests.lib.wait import wait_until

HOSTS = {
    "CON-HyperV6": dict(pa="10.80.2.20", vm="TenantVM01", ca="192.168.0.10", mac="00:15:5d:00:00:01"),
    "CON-HyperV7": dict(pa="10.80.2.21", vm="TenantVM02", ca="192.168.0.11", mac="00:15:5d:00:00:02"),
}
PINGS = 600  # at 20 per second: 30 s, to cover a restart under emulation
RESYNC = "2"  # seconds (the default): drift must be repaired within 5 s


def document(host: str, generation: int, vm_netns: str) -> dict:
    me = HOSTS[host]
    peers = tuple((p["vm"], p["ca"], p["mac"], p["pa"]) for name, p in HOSTS.items() if name != host)
    return host_state(host, generation, **me, peers=peers, netns=vm_netns)


class Agent:
    """One `hnv-agent run` process, its log, its metrics port."""

    def __init__(self, host: str, netns: Namespace, workdir: Path, controller_url: str):
        self.host = host
        self.netns = netns
        self.workdir = workdir
        self.controller_url = controller_url
        self.metrics_port = free_port()
        self.token_file = workdir / "token"
        self.token_file.write_text(f"token-{host}\n")
        self.state_dir = workdir / "state"
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self, controller_url: str | None = None) -> None:
        self.starts += 1
        self.log_path = self.workdir / f"agent-{self.starts}.log"
        argv = [
            "run",
            "--controller", controller_url or self.controller_url, "--host", self.host,
            "--token-file", str(self.token_file), "--state-dir", str(self.state_dir),
            "--metrics-address", f"127.0.0.1:{self.metrics_port}",
            "--netns", self.netns.name, "--resync-interval", RESYNC,
            "--heartbeat", "1", "--reconnect-max-delay", "1",
            "--log-level", "debug",  # quiet periodic reconciles too: the drift test times them
        ]
        self.proc = FORK.Process(target=run_agent_process, args=(argv, str(self.log_path)), name=f"agent-{self.host}")
        self.proc.start()

    def log(self) -> str:
        """The current run's log; empty until the forked child has opened it."""
        try:
            return self.log_path.read_text() if self.log_path else ""
        except FileNotFoundError:
            return ""

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not exposed by the agent of {self.host}")

    def held_generation_on_disk(self) -> int:
        return json.loads((self.state_dir / "state.json").read_text())["generation"]

    def keep_logs(self, prefix: str = "") -> None:
        """Copy this agent's logs where they survive the VM (OPENHNV_VM_RWDIR), for a post-mortem."""
        keep = os.environ.get("OPENHNV_VM_RWDIR")
        if keep:
            for log in self.workdir.glob("agent-*.log"):
                shutil.copy(log, Path(keep) / f"{prefix}{self.host}-{log.name}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` and return the exit code (negative: the signal that ended it)."""
        if self.proc is None:
            return None
        if self.proc.is_alive():
            os.kill(self.proc.pid, sig)
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        return self.proc.exitcode


# Each agent is a process of its own running exactly what `hnv-agent run` runs
# (agent.cli.main), forked from this test process, which has already imported the agent:
# under software emulation a fresh interpreter takes minutes to import pydantic, httpx
# and pyroute2 through the VM's 9p root, and the restart below must not wait for that.
# A forked child also inherits the test's open sockets (the fake controller's); nothing
# here relies on those closing while an agent runs.
FORK = multiprocessing.get_context("fork")


def run_agent_process(argv: list[str], log_path: str) -> None:
    """The child: stdin from /dev/null, stdout and stderr to the log, then the agent."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    # pytest's handlers are not the agent's: start from the defaults `hnv-agent` has.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(agent_cli.main(argv))


def links(ns: Namespace) -> dict[str, dict]:
    """name -> `ip -d -j link` entry of every link in the namespace."""
    return {link["ifname"]: link for link in json.loads(ns.ip("-d", "-j", "link", "show").stdout)}


def owned_links(ns: Namespace, kind: str) -> list[str]:
    return sorted(name for name, link in links(ns).items() if (link.get("ifalias") or "").startswith(f"openhnv:{kind}:"))


def ifindexes(ns: Namespace) -> dict[str, int]:
    return {name: link["ifindex"] for name, link in links(ns).items()}


def static_fdb(ns: Namespace) -> set[tuple[str, str]]:
    """(MAC, device) of the static/permanent bridge FDB entries the agent writes."""
    entries = json.loads(ns.run("bridge", "-j", "fdb", "show").stdout or "[]")
    return {
        (e["mac"], e["ifname"]) for e in entries
        if e.get("master") and any(f in e.get("state", "") for f in ("static", "permanent"))
        and not e.get("vlan") and e["mac"].startswith("00:15:5d")
    }


def permanent_neighbours(ns: Namespace) -> set[tuple[str, str, str]]:
    entries = json.loads(ns.ip("-j", "neigh", "show", "nud", "permanent").stdout or "[]")
    return {(e["dst"], e.get("lladdr", ""), e["dev"]) for e in entries}


def kernel_snapshot(*namespaces: Namespace) -> dict:
    return {
        ns.name: {"ifindex": ifindexes(ns), "fdb": static_fdb(ns), "neigh": permanent_neighbours(ns)}
        for ns in namespaces
    }


def lost_packets(ping_output: str) -> tuple[int, int]:
    match = re.search(r"(\d+) packets transmitted, (\d+) received", ping_output)
    assert match, f"no ping summary in: {ping_output!r}"
    sent, received = int(match.group(1)), int(match.group(2))
    return sent, sent - received


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    factory = NamespaceFactory(prefix="d")
    controller = FakeController({f"token-{host}": host for host in HOSTS}).start()
    agents: dict[str, Agent] = {}
    try:
        sw = factory.create("sw")
        sw.ip("link", "add", "sw", "type", "bridge", "vlan_filtering", "1")
        sw.ip("link", "set", "sw", "up")
        hosts, vms = {}, {}
        for i, host in enumerate(HOSTS, start=1):
            hosts[host] = factory.create("h")
            vms[host] = factory.create("vm")
            # The host's NIC is a trunk port of the physical switch: VLAN 1 native
            # (management), the transport VLAN 802 tagged.
            veth_pair(hosts[host], "eth1", sw, f"p{i}")
            sw.ip("link", "set", f"p{i}", "master", "sw")
            sw.run("bridge", "vlan", "add", "vid", "802", "dev", f"p{i}")
            controller.publish(host, document(host, 1, vms[host].name))
            workdir = tmp_path_factory.mktemp(host)
            agents[host] = Agent(host, hosts[host], workdir, controller.url)
            agents[host].start()
        for host in HOSTS:
            try:
                controller.wait_for_status(host, lambda s: s["generation"] == 1 and s["sync"] == "InSync", timeout=180)
            except AssertionError as exc:
                agent = agents[host]
                raise AssertionError(
                    f"{exc}\nagent process: {'running' if agent.alive() else f'exited {agent.proc.exitcode}'}"
                    f"\n--- agent log of {host} ---\n{agents[host].log()[-6000:]}"
                ) from None
        yield {"controller": controller, "agents": agents, "hosts": hosts, "vms": vms, "sw": sw}
    finally:
        for agent in agents.values():
            agent.stop()
            agent.keep_logs()
        controller.stop()
        factory.close()


def test_agents_bring_up_nvgre_between_the_vms(lab):
    vm1 = lab["vms"]["CON-HyperV6"]
    assert vm1.ping("192.168.0.11", count=3), "TenantVM01 cannot reach TenantVM02 through the agents' tunnels"
    h1 = lab["hosts"]["CON-HyperV6"]
    tunnels = owned_links(h1, "tunnel")
    assert len(tunnels) == 1
    info = links(h1)[tunnels[0]]["linkinfo"]
    assert info["info_kind"] == "gretap"
    # iproute2 prints a GRE key as a dotted quad: VSID << 8 (FlowID 0).
    assert info["info_data"]["ikey"] == str(ipaddress.IPv4Address(3535905 << 8))


def last_reconcile(agent: Agent) -> dict:
    return httpx.get(f"http://127.0.0.1:{agent.metrics_port}/healthz", timeout=30).json()["last_reconcile"]


def wait_for_a_reconcile_after(agent: Agent, since: float) -> dict:
    """Until the agent has reconciled again (periodic, event), started after ``since``."""
    return wait_until(lambda: (r := last_reconcile(agent))["time"] - r["duration_s"] > since and r,
                      timeout=60, what="another reconcile")


RECONCILE_LINE = re.compile(
    r"^ts=(\S+) .*event=reconcile reason=(\w+) generation=\d+ planned=(-?\d+) .*duration_ms=([\d.]+)",
    re.MULTILINE,
)


def reconciles(agent: Agent) -> list[tuple[float, float, str, int]]:
    """(start, end, reason, planned) of every reconcile in the agent's log (wall clock)."""
    found = []
    for match in RECONCILE_LINE.finditer(agent.log()):
        end = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
        found.append((end - float(match.group(4)) / 1000, end, match.group(2), int(match.group(3))))
    return found


def repair_after(agent: Agent, since: float) -> tuple[float, float, float]:
    """For the first reconcile with work to do that ended after ``since``: its start and
    end after ``since``, and its start after the agent was free to begin it (the end of
    another reconcile already running at ``since``, or ``since``; 0 when the repairing
    one was itself already running and read the kernel after the deletion: under
    emulation its observe takes long enough for that, as CI once saw). Waits for its log
    line, which is written when the reconcile ends, a little after the repaired object
    is back."""

    def find() -> tuple[float, float, float] | None:
        runs = reconciles(agent)
        for index, (start, end, _, planned) in enumerate(runs):
            if end > since and planned > 0:
                free = max([since] + [e for i, (s, e, _, _) in enumerate(runs)
                                      if i != index and s < since < e])
                return start - since, end - since, max(0.0, start - free)
        return None

    return wait_until(find, timeout=60, what=f"the repairing reconcile in the log of {agent.host}")


def test_drift_a_deleted_tunnel_and_fdb_entry_come_back_within_5s(lab):
    """A tunnel deleted by hand, then an FDB entry, each repaired by the running agent.

    The 5 s are the agent's to spend noticing the deletion and starting the repair: it
    reacts to the kernel's netlink notification (measured: well under a second) and the
    periodic resync backs that up. A reconcile's own duration is the reconciler's: in
    milliseconds natively, but under software emulation on a busy machine one takes
    seconds (1.5-17 s measured), and a repair must wait for one already running. So here
    end to end is printed, and what is held to 5 s is the start of the repair after the
    agent was free to begin it.
    """
    h1 = lab["hosts"]["CON-HyperV6"]
    agent = lab["agents"]["CON-HyperV6"]
    repairs_before = agent.metric("hnv_agent_drift_repairs_total")

    tunnel = owned_links(h1, "tunnel")[0]
    deleted = time.time()
    h1.ip("link", "del", tunnel)
    wait_until(lambda: tunnel in links(h1), timeout=60, what=f"tunnel {tunnel} to be recreated")
    tunnel_back = time.time() - deleted
    tunnel_repair = repair_after(agent, deleted)

    peer_mac = HOSTS["CON-HyperV7"]["mac"]
    wait_until(lambda: (peer_mac, tunnel) in static_fdb(h1), timeout=60, what="the FDB entry on the new tunnel")
    settled_after = deleted + tunnel_repair[1]
    wait_until(lambda: (r := last_reconcile(agent))["planned"] == 0 and r["time"] > settled_after,
               timeout=60, what="a quiet reconcile after the repair")
    deleted = time.time()
    # (Checking that it is gone would race the agent: under emulation reading the FDB
    # back with a new `bridge` process takes longer than the repair.)
    h1.run("bridge", "fdb", "del", peer_mac, "dev", tunnel, "master")
    wait_until(lambda: (peer_mac, tunnel) in static_fdb(h1), timeout=60, what=f"FDB {peer_mac} on {tunnel}")
    fdb_back = time.time() - deleted
    fdb_repair = repair_after(agent, deleted)

    print(f"drift: tunnel back after {tunnel_back:.2f}s (repair started at +{tunnel_repair[0]:.2f}s, "
          f"{tunnel_repair[2]:.2f}s after the agent was free; done at +{tunnel_repair[1]:.2f}s); "
          f"FDB entry back after {fdb_back:.2f}s (repair started at +{fdb_repair[0]:.2f}s, "
          f"{fdb_repair[2]:.2f}s after the agent was free; done at +{fdb_repair[1]:.2f}s)")
    assert tunnel_repair[2] <= 5.0, f"the tunnel's repair started {tunnel_repair[2]:.1f}s after it could"
    assert fdb_repair[2] <= 5.0, f"the FDB entry's repair started {fdb_repair[2]:.1f}s after it could"

    assert lab["vms"]["CON-HyperV6"].ping("192.168.0.11", count=2)
    wait_until(lambda: agent.metric("hnv_agent_drift_repairs_total") >= repairs_before + 2, timeout=30,
               what="two drift repairs counted")


def test_bad_document_is_refused_and_nothing_changes(lab):
    controller, h1 = lab["controller"], lab["hosts"]["CON-HyperV6"]
    agent = lab["agents"]["CON-HyperV6"]
    host = "CON-HyperV6"
    good = document(host, 1, lab["vms"][host].name)
    before = kernel_snapshot(h1, lab["vms"][host])

    seen = len(controller.statuses(host))
    controller.publish(host, with_bad_record_ca(good, 2))
    status = controller.wait_for_status(
        host, lambda s: any(e["kind"] == "state" for e in s["errors"]), after=seen, timeout=60
    )
    assert status["generation"] == 1 and status["sync"] == "Error"
    assert status["errors"][0]["message"].startswith(
        "records[0].ca: lookup record 172.16.0.9 in VSID 3535905 is outside the prefix 192.168.0.0/24"
    )
    assert 'problem="records[0].ca: lookup record 172.16.0.9' in agent.log()
    wait_for_a_reconcile_after(agent, time.time())  # the loop ran again: still nothing changed
    assert agent.held_generation_on_disk() == 1
    assert kernel_snapshot(h1, lab["vms"][host]) == before
    assert lab["vms"][host].ping("192.168.0.11", count=2)

    # Back to the good document: the controller sees the host in sync again.
    seen = len(controller.statuses(host))
    controller.publish(host, good)
    controller.wait_for_status(host, lambda s: s["generation"] == 1 and not s["errors"], after=seen, timeout=60)


def test_restart_with_controller_down_loses_no_ping_and_changes_nothing(lab):
    host = "CON-HyperV6"
    h1, vm1, agent = lab["hosts"][host], lab["vms"][host], lab["agents"][host]
    before = kernel_snapshot(h1, vm1)
    dead_controller = f"http://127.0.0.1:{free_port()}"

    # 30 s of pings at 20/s; the agent dies (SIGKILL) and comes back in the middle.
    ping = vm1.popen("ping", "-n", "-q", "-i", "0.05", "-c", str(PINGS), "-W", "1", "192.168.0.11",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(0.5)
    agent.start(controller_url=dead_controller)
    wait_until(lambda: "event=startup_in_sync" in agent.log() or "reason=startup" in agent.log(),
               timeout=60, what="the restarted agent's first reconcile")
    assert ping.poll() is None, "the ping ended before the restarted agent's first reconcile: it proves nothing"
    output, _ = ping.communicate(timeout=60)

    log = agent.log()
    assert "event=state_loaded generation=1" in log
    assert re.search(r"event=reconcile reason=startup generation=1 planned=0 applied=0 errors=0", log), log
    assert "event=startup_in_sync generation=1 kernel=unchanged" in log
    sent, lost = lost_packets(output)
    print(f"restart: {sent} pings sent, {lost} lost across kill -9 and restart; "
          + next(line for line in log.splitlines() if "reason=startup" in line).split(" component=")[1])
    assert sent == PINGS and lost == 0, f"{lost} of {sent} pings lost across the agent restart: {output}"
    # A periodic reconcile against the controller-less agent: still nothing changes.
    wait_for_a_reconcile_after(agent, time.time())
    assert kernel_snapshot(h1, vm1) == before
    assert not re.search(r"event=reconcile reason=(periodic|event) .*planned=[1-9]", agent.log())
    assert agent.metric("hnv_agent_controller_connected") == 0
    assert agent.metric("hnv_agent_applied_generation") == 1
    assert agent.stop(signal.SIGTERM) == 0
    assert kernel_snapshot(h1, vm1) == before, "stopping the agent must leave the kernel as it is"
    assert vm1.ping("192.168.0.11", count=2), "tenant traffic must survive the agent being stopped"
