"""Make-before-break migration under a 10/s ping from a third host, end to end.

The real controller (in this process, SQLite, its migration stepper) and three real
`hnv-agent run` processes, one per host namespace, talking the real watch/status protocol
over loopback; NVGRE over a VLAN-filtering switch, as in tests/kernel/test_daemon_agent.py:

    mover (192.168.0.x)          (after the move)          pinger (192.168.0.y)
      | veth made by the agent                                | veth made by the agent
    CON-HyperV6 ---------------- CON-HyperV7 ---------------- CON-HyperV8
      | eth1 (team member, trunk: 802 tagged)                 | eth1
      +------------------- sw: VLAN-filtering bridge ---------+

The VM `mover` moves from CON-HyperV6 to CON-HyperV7 while `pinger`, on CON-HyperV8,
pings it 10 times a second (from before the move until every host is InSync with it
done), with every host in device mode and again in flow mode (the controller's
`tunnel_mode` host setting). The controller stages the move
(controller.fabric.migrations: the destination adds the VM's second NIC while the source
keeps the first and every host learns to receive from both; then the peer switches and
the source forwards; the source's removal last). At most one echo may be lost (see
MOST_LOST for the gap that used to open at stage `peers`). (The same move with every
stage published at once, bound 0, what a one-shot migration did, is measured in
docs/architecture.md: it lost a 5 s gap of echoes; it is not repeated here, where it
would only print.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

import pytest

from controller.models import Kind
from netns_lab.pings import PING_IN_FLIGHT as PING_IN_FLIGHT_S
from netns_lab.pings import ping_losses
from tests.kernel.test_daemon_agent import Agent
from tests.lib.controller import LiveController
from tests.lib.nv_fabric import populate
from tests.lib.netns import NamespaceFactory, veth_pair
from tests.lib.wait import wait_until

SOURCE, DESTINATION, PEER = "CON-HyperV6", "CON-HyperV7", "CON-HyperV8"
HOSTS = (SOURCE, DESTINATION, PEER)
INTERVAL = 0.1  # 10 echoes a second
MOVE_AFTER_S = 3.0
# Before the agent's bridge FDB entries were sticky, some runs lost 5 to 8 echoes in one
# 0.5-0.8 s gap in stage `peers` (2026-12-02: two of five device-mode runs, one of three
# flow-mode runs): on the source, the VM's own frames, still sent by its old port, pulled
# its entry back from the tunnel onto that port (bridge learning moves a static entry),
# the port's deletion flushed it, and the peer's echoes, still sent to the source until
# the peer switched, were flooded into tunnel ports that refuse floods
# (agent.kernel_model.Fdb; tests/netns/test_netlink_batch.py shows the kernel doing it).
# In flow mode, until the receive program forwarded itself, 1 to 3 echoes were lost
# right after the source's FDB switch whenever it came before the peer's: the source's
# bridge cannot send a frame back out the tunnel port it came in by (one per VSID in flow
# mode), so what the peer still sent the source was dropped (agent/bpf/hnv_flow.c).
GOAL_MOST_LOST = 1
MOST_LOST = GOAL_MOST_LOST
# Every agent here reports; the bound is the fallback for one that does not, and under
# emulation one stage's apply alone may take longer than the default 5 s.
STAGE_BOUND_S = 120.0
LOG_EVENTS = ("event=state_accepted", "event=reconcile ", "event=drift_repaired", "VM mover")


def longest_gap(lost: list[int]) -> float:
    """Seconds of the longest run of consecutive lost echoes."""
    longest = run = 0
    for i, seq in enumerate(lost):
        run = run + 1 if i and seq == lost[i - 1] + 1 else 1
        longest = max(longest, run)
    return longest * INTERVAL


def agent_events(lab) -> str:
    """Each agent's log lines about generations, reconciles and the VM's NIC (a post-mortem)."""
    return "\n".join(f"--- {host} ---\n" + "\n".join(line for line in agent.log().splitlines()
                                                     if any(event in line for event in LOG_EVENTS))
                     for host, agent in lab["agents"].items())


def all_in_sync(fabric) -> bool:
    return all(fabric.sync_of(host).sync == "InSync" for host in HOSTS)


@pytest.fixture(params=["device", "flow"])
def lab(request, tmp_path):
    """Three hosts in one tunnel mode (the controller's host setting), their agents
    running, the VMs placed, every host InSync."""
    factory = NamespaceFactory(prefix="mb")
    agents: dict[str, Agent] = {}
    vm_netns = {vm: f"mb-{vm}-{os.getpid()}" for vm in ("mover", "pinger")}  # made by the agents
    controller = LiveController(tmp_path / "controller", hosts=HOSTS)
    try:
        controller.__enter__()
        fabric = controller.fabric
        sw = factory.create("sw")
        sw.ip("link", "add", "sw", "type", "bridge", "vlan_filtering", "1")
        sw.ip("link", "set", "sw", "up")
        for i, host in enumerate(HOSTS, start=1):
            ns = factory.create("h")
            veth_pair(ns, "eth1", sw, f"p{i}")
            sw.ip("link", "set", f"p{i}", "master", "sw")
            sw.run("bridge", "vlan", "add", "vid", "802", "dev", f"p{i}")
            workdir = tmp_path / host
            workdir.mkdir()
            agents[host] = Agent(host, ns, workdir, controller.base_url)
            agents[host].token_file.write_text(controller.host_token(host) + "\n")
            agents[host].token_file.chmod(0o600)
        populate(fabric, HOSTS, {"mover": SOURCE, "pinger": PEER}, nics=("eth1",), netns=vm_netns)
        for host in HOSTS:
            fabric.patch(Kind.host, host, {"tunnel_mode": request.param})
        for agent in agents.values():
            agent.start()
        try:
            wait_until(lambda: all_in_sync(fabric), timeout=300, what="every host InSync")
        except AssertionError as exc:
            logs = "\n".join(f"--- {host} ---\n{agent.log()[-3000:]}" for host, agent in agents.items())
            raise AssertionError(f"{exc}\n{logs}") from None
        yield {"fabric": fabric, "agents": agents, "vm_netns": vm_netns, "mode": request.param}
    finally:
        for agent in agents.values():
            agent.stop()
            agent.keep_logs(prefix=f"migration-{request.param}-")
        controller.__exit__(None, None, None)
        for name in vm_netns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        factory.close()


def move_under_ping(lab, destination: str) -> tuple[int, list[int], float]:
    """Move `mover` to `destination` while `pinger` pings it at 10/s, until every host is
    InSync with the migration done; (echoes sent, sequence numbers lost, seconds from the
    move until then). The echoes still in flight when the ping is stopped do not count."""
    fabric = lab["fabric"]
    target = str(fabric.get(Kind.vm, "mover").ca)
    pinger = ["ip", "netns", "exec", lab["vm_netns"]["pinger"]]
    wait_until(lambda: subprocess.run([*pinger, "ping", "-n", "-q", "-c", "1", "-W", "1", target],
                                      capture_output=True).returncode == 0, timeout=60, what="a first answer")
    # A file, not a pipe: a pipe nobody reads would stall ping after 64 KiB of replies.
    with tempfile.TemporaryFile("w+") as output:
        ping = subprocess.Popen([*pinger, "ping", "-n", "-i", str(INTERVAL), "-W", "1", target],
                                stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(MOVE_AFTER_S)
            moved_at = time.monotonic()
            fabric.migrate("mover", destination)
            wait_until(lambda: fabric.get(Kind.vm, "mover").migration is None and all_in_sync(fabric),
                       timeout=180, what="the migration done and every host InSync")
            settled = time.monotonic() - moved_at
            time.sleep(PING_IN_FLIGHT_S + 1.0)  # echoes after the move, answered or not, are counted
        finally:
            ping.send_signal(signal.SIGINT)
            ping.wait(timeout=60)
        output.seek(0)
        text = output.read()
    sent, _answered, lost = ping_losses(text, INTERVAL)
    return sent, lost, settled


def test_a_vm_moved_under_a_10_per_second_ping_from_a_third_host_loses_at_most_one(lab):
    fabric = lab["fabric"]
    fabric.migration_bound = STAGE_BOUND_S
    generations = {host: fabric.entries[host].generation for host in HOSTS}
    sent, lost, settled = move_under_ping(lab, DESTINATION)
    print(f"staged migration ({lab['mode']} mode): {sent} pings at 10/s from {PEER}, {len(lost)} lost {lost} "
          f"(longest gap {longest_gap(lost):.1f} s); every stage applied in {settled:.1f} s"
          + ("" if len(lost) <= GOAL_MOST_LOST else f"; over the goal of {GOAL_MOST_LOST}"))
    assert sent >= (MOVE_AFTER_S + settled) / INTERVAL / 2, f"only {sent} echoes sent: the ping proves little"
    assert len(lost) <= MOST_LOST, (f"{len(lost)} of {sent} pings lost during the staged migration: {lost}\n"
                                    f"{agent_events(lab)}")
    # The stages are in the generations: the destination +2 (port; transit gone), the peer
    # and the source +3 (transit; switched / forwarding; transit gone, Red let go).
    after = {host: fabric.entries[host].generation for host in HOSTS}
    assert after == {SOURCE: generations[SOURCE] + 3, DESTINATION: generations[DESTINATION] + 2,
                     PEER: generations[PEER] + 3}
