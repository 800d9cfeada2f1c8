"""Real VMs' taps, plugged by MAC: the agent daemon against taps opened as a hypervisor does.

One module-scoped lab (tests/kernel/agentlab.py). On host A, vmA2 (Fabrikam2,
192.168.0.10) and vmA3 (Fabrikam3) are real VMs: their ports are of kind ``tap``, named
by the controller's rule (agent.naming.vm_tap), and host A is run by the agent daemon
itself (agent.daemon.AgentDaemon in this process: its threads, a Reconciler on host A's
namespace, the fake controller on loopback) with a periodic resync of ten minutes, so
whatever it does here within seconds comes from kernel events. Host B, with its
namespace VMs (vmB2 192.168.0.11), is configured once by a Reconciler.

The "VM" is `TapVm`, in this process: what libvirt and qemu do with a tap, and nothing
more. It opens /dev/net/tun in host A's namespace, creates the tap with TUNSETIFF
(IFF_TAP | IFF_NO_PI) under the VM's tap name, gives it libvirt's address with
SIOCSIFHWADDR (the VM's MAC, first octet fe) and holds the descriptor; closing it removes
the tap (the VM stopping). It writes Ethernet frames on the descriptor and reads what
the bridge sends it, built and parsed with scapy.

Times are read from the kernel's own link notifications, taken in host A's namespace by
`LinkLog`: from the notification that the tap exists to the first one showing it on its
bridge, with the tenant MTU and up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import rdpcap

from agent import naming
from agent.daemon import AgentDaemon, DaemonConfig
from agent.netns import entered_netns, in_netns
from agent.plan import tenant_mtu
from agent.reconcile import Reconciler
from agent.state import parse_host_state
from tests.kernel.agentlab import F2_VSID, F3_VSID, PA, PROVIDER_VLAN, VMS, AgentLab
from tests.lib.fake_controller import FakeController
from tests.lib.netns import NamespaceFactory
from tests.lib.nvgre import IPPROTO_GRE, decode_nvgre
from tests.lib.wait import wait_until

HOST = "CON-HyperV-A"
TOKEN = "token-a"
TAP_VMS = ("vmA2", "vmA3")
VM = {vm.name: vm for vm in VMS}
# From the tap's appearance to the tap on its bridge, up, with the tenant MTU: the goal
# (natively the tap's own plan takes milliseconds), plus twice what that plan took in the
# same run (plug_bound): under software emulation the plan alone takes ~0.5 s, and one
# CI run measured 1.16 s with it 0.50 s, so a bare 1 s bound measured the machine.
PLUG_BOUND_S = 1.0
SETTLE_S = 600  # the first reconcile builds host A from nothing: minutes under emulation

# <linux/if_tun.h>, <linux/sockios.h>, <linux/if_arp.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
IFREQ_SIZE = 40
IFF_UP = 0x1
RECONCILE_LINE = re.compile(r"event=reconcile reason=\w+ generation=\d+ planned=(-?\d+) applied=(\d+) "
                            r"errors=(\d+) duration_ms=([\d.]+)")
TAPS_PLUGGED_LINE = re.compile(r"event=taps_plugged devices=(\S+) .* duration_ms=([\d.]+)")
QUIET_S = 1.5  # past the gap between two event reconciles (agent.daemon.EVENT_RECONCILE_GAP) and a debounce
TUN = "/dev/net/tun"


def require_tun() -> None:
    """/dev/net/tun, where a hypervisor makes its taps (the kernel-lab VM loads the module
    at boot, netns_lab.vm; loaded here if not)."""
    if not os.path.exists(TUN):
        subprocess.run(["modprobe", "tun"], capture_output=True, check=False)
    assert os.path.exists(TUN), f"{TUN} is missing and the tun module could not be loaded"


def tap_document(lab: AgentLab) -> dict:
    """Host A's state with vmA2 and vmA3 as real VMs: tap ports with the derived names."""
    doc = lab.state("a")
    for port in doc["ports"]:
        if port["name"] in TAP_VMS:
            del port["netns"]
            port.update(kind="tap", device=naming.vm_tap(port["name"]))
    return doc


@dataclass(frozen=True)
class LinkEvent:
    at: float  # time.monotonic() when read
    event: str  # RTM_NEWLINK | RTM_DELLINK
    name: str
    master: int | None
    mtu: int | None
    up: bool
    mac: str | None


class LinkLog:
    """Every link notification of one namespace, with the time this process read it."""

    def __init__(self, netns: str):
        self.netns = netns
        self.events: list[LinkEvent] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: in_netns(netns, lambda: asyncio.run(self._follow())),
                                        name="test-linklog", daemon=True)

    def start(self) -> LinkLog:
        self._thread.start()
        assert self.ready.wait(30), "the link log never subscribed"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _follow(self) -> None:
        ipr = AsyncIPRoute()
        try:
            await ipr.setup_endpoint()
            await ipr.bind(groups=RTMGRP_LINK)
            self.ready.set()
            while not self._stop.is_set():
                try:
                    messages = await asyncio.wait_for(self._batch(ipr), 0.5)
                except asyncio.TimeoutError:
                    continue
                now = time.monotonic()
                for m in messages:
                    if m.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                        self.events.append(LinkEvent(now, m["event"], m.get_attr("IFLA_IFNAME"),
                                                     m.get_attr("IFLA_MASTER"), m.get_attr("IFLA_MTU"),
                                                     bool(m["flags"] & IFF_UP), m.get_attr("IFLA_ADDRESS")))
        finally:
            ipr.close()

    @staticmethod
    async def _batch(ipr: AsyncIPRoute) -> list:
        return [m async for m in ipr.get()]

    def of(self, name: str, since: float) -> list[LinkEvent]:
        return [e for e in list(self.events) if e.name == name and e.at >= since]


class TapVm:
    """A VM's NIC as libvirt creates it and qemu holds it: the tap's descriptor."""

    def __init__(self, netns: str, name: str, device: str, mac: str, ca: str, tap_mac: str):
        self.netns, self.name, self.device, self.mac, self.ca, self.tap_mac = netns, name, device, mac, ca, tap_mac
        self.fd: int | None = None

    def start(self, set_mac: bool = True) -> float:
        """Create the tap (or attach to an existing one of that name, as qemu's ``ifname=``
        does) in the host's namespace, and set its MAC as libvirt does; returns
        time.monotonic() just before the tap was created."""
        name = self.device.encode()
        with entered_netns(self.netns):
            fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
            try:
                created = time.monotonic()
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name, IFF_TAP | IFF_NO_PI).ljust(IFREQ_SIZE, b"\0"))
                if set_mac:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                        address = bytes.fromhex(self.tap_mac.replace(":", ""))
                        fcntl.ioctl(sock, SIOCSIFHWADDR,
                                    struct.pack("16sH14s", name, ARPHRD_ETHER, address).ljust(IFREQ_SIZE, b"\0"))
            except BaseException:
                os.close(fd)
                raise
        self.fd = fd
        return created

    def stop(self) -> None:
        """Close the descriptor: the kernel removes the tap (unless it is persistent), as
        when qemu exits."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def send(self, frame) -> None:
        assert self.fd is not None
        os.write(self.fd, bytes(frame))

    def receive(self, match, timeout: float):
        """The first frame from the bridge for which `match(frame)` holds, or None."""
        assert self.fd is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.fd], [], [], left)
            if not readable:
                break
            frame = Ether(os.read(self.fd, 65535))
            if match(frame):
                return frame
        return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = AgentLab(NamespaceFactory(prefix="tp"))
    controller = FakeController({TOKEN: HOST})
    daemon: AgentDaemon | None = None
    link_log: LinkLog | None = None
    records = _LogRecords()
    daemon_log = logging.getLogger("agent.daemon")
    daemon_log.addHandler(records)
    level = daemon_log.level
    daemon_log.setLevel(logging.INFO)
    try:
        require_tun()
        lab.build()
        lab.reconcilers["b"] = Reconciler(netns=lab.hosts["b"].name)
        result = lab.reconcilers["b"].reconcile(parse_host_state(lab.state("b")))
        assert result.errors == [], result.errors
        lab.document = tap_document(lab)
        controller.publish(HOST, lab.document)
        controller.start()
        workdir = tmp_path_factory.mktemp("agent-a")
        lab.link_log = link_log = LinkLog(lab.hosts["a"].name).start()
        lab.reconcilers["a"] = Reconciler(netns=lab.hosts["a"].name, run_dir=workdir / "run")
        daemon = AgentDaemon(DaemonConfig(
            host=HOST, state_dir=workdir / "state", controller_url=controller.url, token=TOKEN,
            metrics_address=None, resync_interval=SETTLE_S, netns=lab.hosts["a"].name, heartbeat=1.0,
            reconnect_max_delay=1.0,
        ), lab.reconcilers["a"])
        lab.noticed = record_urgent_events(daemon)
        daemon.start()
        lab.daemon, lab.controller, lab.records = daemon, controller, records
        lab.vm = {name: TapVm(lab.hosts["a"].name, name, naming.vm_tap(name), VM[name].mac,
                              VM[name].ca, naming.tap_mac(VM[name].mac)) for name in TAP_VMS}
        yield lab
    finally:
        for vm in getattr(lab, "vm", {}).values():
            vm.stop()
        if daemon is not None:
            daemon.stop()
        if link_log is not None:
            link_log.stop()
        daemon_log.removeHandler(records)
        daemon_log.setLevel(level)
        records.keep()
        controller.stop()
        lab.close()


class _LogRecords(logging.Handler):
    """The daemon's log lines (with the time.monotonic() they were written at), kept for
    the assertions and copied out of the VM at the end."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.times.append(time.monotonic())
        self.lines.append(record.getMessage())

    def reconciles(self) -> list[tuple[float, float, int, bool]]:
        """(start, end, planned, done) of every whole-host reconcile so far, from its log
        line; done: it applied all it planned."""
        found = []
        for at, line in zip(list(self.times), list(self.lines)):
            match = RECONCILE_LINE.search(line)
            if match:
                planned, applied, errors = (int(match.group(i)) for i in (1, 2, 3))
                found.append((at - float(match.group(4)) / 1000, at, planned, applied == planned and not errors))
        return found

    def tap_plans(self, device: str) -> list[float]:
        """Seconds each of the taps' own plans that plugged `device` took, from its log line."""
        return [float(match.group(2)) / 1000 for line in list(self.lines)
                if (match := TAPS_PLUGGED_LINE.search(line)) and device in match.group(1).split(",")]

    def keep(self) -> None:
        keep = os.environ.get("OPENHNV_VM_RWDIR")
        if keep:
            (Path(keep) / "tap-ports-agent.log").write_text("\n".join(self.lines) + "\n")


def wait_idle(lab) -> None:
    """Until the agent is done with what the last step changed: its last reconcile applied
    all it planned (the notifications of its own writes wake nothing: agent.daemon.Inbox)
    and nothing has woken it for QUIET_S since, so that the next step's kernel events find
    its loop waiting (the agent after it has the state)."""
    def idle() -> bool:
        runs = lab.records.reconciles()
        return bool(runs) and runs[-1][3] and time.monotonic() - max(runs[-1][1], lab.records.times[-1]) > QUIET_S

    wait_until(idle, timeout=180, what="the agent to have nothing left to do")


def taps(lab) -> dict[str, dict]:
    """device -> the tap as the daemon's /healthz shows it."""
    return {tap["device"]: tap for tap in lab.daemon.health()[1]["taps"]}


def kernel_link(lab, device: str) -> dict | None:
    found = json.loads(lab.hosts["a"].ip("-d", "-j", "link", "show", check=False).stdout or "[]")
    return next((link for link in found if link["ifname"] == device), None)


def ipv6_disabled(lab, device: str) -> bool:
    with entered_netns(lab.hosts["a"].name):
        return Path(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6").read_text().strip() == "1"


def plugged_events(lab, device: str, bridge: str, mtu: int, since: float) -> tuple[LinkEvent, LinkEvent]:
    """The kernel's first notification after `since` that `device` exists, and the first
    one showing it on `bridge` with `mtu`, up (waited for)."""
    bridge_index = kernel_link(lab, bridge)["ifindex"]

    def plugged():
        events = lab.link_log.of(device, since)
        appeared = next((e for e in events if e.event == "RTM_NEWLINK"), None)
        done = next((e for e in events if e.event == "RTM_NEWLINK" and e.master == bridge_index
                     and e.mtu == mtu and e.up), None)
        return appeared and done and (appeared, done)

    return wait_until(plugged, timeout=120, what=f"{device} on {bridge}, up, MTU {mtu}")


def record_urgent_events(daemon: AgentDaemon) -> list[tuple[float, str]]:
    """(time.monotonic(), description) of every kernel event the daemon's event thread
    found urgent (a waited-for tap appearing: TapWatch.urgent), as it found it: when the
    agent learnt of a tap, which under emulation can be a tenth of a second after the
    test's own link log (both are threads of this one process)."""
    noticed: list[tuple[float, str]] = []
    urgent = daemon.tap_watch.urgent

    def recording(description: str) -> bool:
        verdict = urgent(description)
        if verdict:
            noticed.append((time.monotonic(), description))
        return verdict

    daemon.tap_watch.urgent = recording
    return noticed


def plug_latency(lab, vm: TapVm, vsid: int, since: float, what: str) -> float:
    """Seconds from the notification that the VM's tap exists, or from the end of the
    whole-host reconcile the agent was in the middle of when it learnt of the tap, to the
    notification showing the tap plugged.

    Why from the end of a running reconcile: the agent's one loop finishes what it is
    doing before it turns to the tap. Natively a reconcile of this host takes
    milliseconds; under software emulation 1.5-3.5 s, and the writes of one raise the
    events of the next, so a tap often appears in the middle of one, or just before one
    the loop begins before the tap's notification has reached the agent (a restarting
    VM: its old tap's deletion wakes the loop, and the new tap appears as the debounce
    ends; the CI of d3c010a saw it). Both figures are printed."""
    mtu = tenant_mtu(parse_host_state(lab.document), vsid)
    appeared, done = plugged_events(lab, vm.device, naming.vsid_bridge(vsid), mtu, since)
    learnt = next((at for at, description in list(lab.noticed)
                   if at >= appeared.at and description.endswith(f" {vm.device}")), appeared.at)
    busy_until = max([end for start, end, *_ in lab.records.reconciles()
                      if start < appeared.at < end or start < learnt < end], default=appeared.at)
    latency = max(0.0, done.at - busy_until)
    waited = busy_until - appeared.at
    print(f"\ntap {vm.device} of {vm.name} {what}: on {naming.vsid_bridge(vsid)} {latency * 1000:.0f} ms after "
          f"it appeared" + (f" and a running reconcile ended (it appeared {(done.at - appeared.at) * 1000:.0f} ms "
                            f"before, {waited * 1000:.0f} ms of them the reconcile's)" if waited else ""))
    return latency


def plug_bound(lab, device: str) -> float:
    """PLUG_BOUND_S plus twice the longest of `device`'s own plug plans so far (their
    `event=taps_plugged ... duration_ms=`): the same path measured on this machine."""
    plans = lab.records.tap_plans(device)
    assert plans, f"no plan of its own plugged {device}"
    return PLUG_BOUND_S + 2 * max(plans)


def test_absent_taps_wait_without_an_error(lab):
    status = lab.controller.wait_for_status(HOST, lambda s: s["generation"] == 1, timeout=SETTLE_S)
    assert status["errors"] == [] and status["sync"] == "InSync", status
    waiting = taps(lab)
    for name in TAP_VMS:
        device = naming.vm_tap(name)
        assert waiting[device]["state"] == "waiting" and waiting[device]["vm"] == name, waiting
        assert kernel_link(lab, device) is None
        assert any("event=tap_waiting" in line and f"device={device}" in line for line in lab.records.lines), \
            lab.records.lines


def test_tap_created_after_the_state_is_plugged_within_1s(lab):
    vm = lab.vm["vmA2"]
    bridge, mtu = naming.vsid_bridge(F2_VSID), tenant_mtu(parse_host_state(lab.document), F2_VSID)
    wait_idle(lab)
    latency = plug_latency(lab, vm, F2_VSID, vm.start(), "created")
    link = kernel_link(lab, vm.device)
    assert link["master"] == bridge and link["mtu"] == mtu and "UP" in link["flags"], link
    assert link["address"] == naming.tap_mac(vm.mac) and ipv6_disabled(lab, vm.device)
    assert wait_until(lambda: taps(lab)[vm.device]["state"] == "plugged", timeout=30, what="the daemon's view")
    # by the tap's own plan (Reconciler.plug_taps), not by a whole host's reconcile ...
    plugged = [i for i, line in enumerate(lab.records.lines) if "event=taps_plugged" in line and vm.device in line]
    assert plugged, lab.records.lines[-20:]
    # ... and it stays so: the reconciles that follow (its writes raise events) find
    # nothing to do, and nothing counts as drift.
    wait_until(lambda: [line for line in lab.records.lines[plugged[0]:]
                        if "event=reconcile reason=event" in line and " planned=0 " in line],
               timeout=120, what="a reconcile with nothing to do after the plug")
    assert not [line for line in lab.records.lines if "event=drift_repaired" in line], lab.records.lines
    bound = plug_bound(lab, vm.device)
    assert latency <= bound, f"plugged {latency:.3f} s after it appeared, over {bound:.3f} s"


def test_vm_on_its_tap_reaches_a_vm_on_host_b_over_nvgre(lab, tmp_path):
    vm = lab.vm["vmA2"]
    peer = VM["vmB2"]
    own_ip, peer_ip = vm.ca.split("/")[0], peer.ca.split("/")[0]
    stack = contextlib.ExitStack()
    pcaps = [stack.enter_context(lab.switch.capture(f"a{nic}", tmp_path / f"trunk{nic}.pcap")) for nic in (0, 1)]
    with stack:
        vm.send(Ether(src=vm.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=vm.mac, psrc=own_ip, pdst=peer_ip))
        answer = vm.receive(lambda f: ARP in f and f[ARP].op == 2 and f[ARP].psrc == peer_ip, timeout=10)
        assert answer is not None, "nobody answered the VM's ARP for its peer"
        assert answer[ARP].hwsrc == peer.mac
        replies = 0
        for seq in range(1, 4):
            vm.send(Ether(src=vm.mac, dst=answer[ARP].hwsrc) / IP(src=own_ip, dst=peer_ip) / ICMP(id=0x7a9, seq=seq))
            reply = vm.receive(lambda f: ICMP in f and f[ICMP].type == 0 and f[ICMP].seq == seq
                               and f[IP].src == peer_ip, timeout=10)
            replies += reply is not None
    assert replies == 3, f"{replies} of 3 echo replies from {peer.name}"
    gre = [p for pcap in pcaps for p in rdpcap(str(pcap)) if IP in p and p[IP].proto == IPPROTO_GRE]
    frames = [decode_nvgre(p) for p in gre]
    assert gre and all(Dot1Q in p and p[Dot1Q].vlan == PROVIDER_VLAN for p in gre)
    assert all(f is not None and f.vsid == F2_VSID and f.flow_id == 0 for f in frames), [p.summary() for p in gre]
    assert all({f.outer_src, f.outer_dst} == {PA[("a", "Fabrikam2")], PA[("b", "Fabrikam2")]} for f in frames)
    inner = [f.inner for f in frames]
    assert any(ICMP in i and i[ICMP].type == 8 and i[IP].src == own_ip and i[IP].dst == peer_ip for i in inner)
    assert any(ICMP in i and i[ICMP].type == 0 and i[IP].src == peer_ip and i[IP].dst == own_ip for i in inner)
    assert not [i for i in inner if ARP in i], "the VM's ARP crossed the provider network"


def test_a_restarted_vms_new_tap_is_plugged_again_within_1s(lab):
    """Destroyed and started again at once (the agent still counts the old tap as plugged
    when the new one appears), then stopped until the agent waits for it, then started."""
    vm = lab.vm["vmA2"]

    def plugs() -> int:  # the tap's own plans that plugged it (Reconciler.plug_taps)
        return len([line for line in lab.records.lines if "event=taps_plugged" in line and vm.device in line])

    before = plugs()
    wait_idle(lab)
    vm.stop()
    at_once = plug_latency(lab, vm, F2_VSID, vm.start(), "created again at once")
    assert kernel_link(lab, vm.device)["master"] == naming.vsid_bridge(F2_VSID)
    vm.stop()
    wait_until(lambda: taps(lab)[vm.device]["state"] == "waiting", timeout=60, what="the stopped VM's tap waiting")
    assert any("event=tap_waiting" in line and f"device={vm.device}" in line for line in lab.records.lines[-20:])
    wait_idle(lab)
    later = plug_latency(lab, vm, F2_VSID, vm.start(), "created again after a wait")
    wait_until(lambda: plugs() >= before + 2, timeout=30, what="both plugged by the tap's own plan")
    bound = plug_bound(lab, vm.device)
    assert max(at_once, later) <= bound, f"plugged {at_once:.3f} s and {later:.3f} s after it appeared, over {bound:.3f} s"


def test_a_tap_with_another_mac_is_never_enslaved_until_it_has_the_vms(lab):
    """qemu's own tap (``-netdev tap,ifname=...,script=no``) keeps the random address the
    kernel gave it: refused, and never on the bridge. Given the VM's tap MAC (the qemu
    recipe in docs/architecture.md: a persistent tap made and addressed beforehand), it
    is plugged, and a VM attaching to it by name reaches its own tenant only."""
    vm = lab.vm["vmA3"]
    host = lab.hosts["a"]
    expected = naming.tap_mac(vm.mac)
    since = time.monotonic()
    host.ip("tuntap", "add", "dev", vm.device, "mode", "tap")
    try:
        seen = kernel_link(lab, vm.device)["address"]
        status = lab.controller.wait_for_status(
            HOST, lambda s: any(e["kind"] == "tap" and e["object"] == vm.device for e in s["errors"]), timeout=120)
        message = next(e["message"] for e in status["errors"] if e["object"] == vm.device)
        assert f"its MAC is {seen}, expected {expected}" in message, message
        shown = taps(lab)[vm.device]
        assert (shown["state"], shown["expected_mac"], shown["seen_mac"]) == ("refused", expected, seen), shown
        assert any("event=tap_refused" in line and f"device={vm.device}" in line and f"seen_mac={seen}" in line
                   for line in lab.records.lines), lab.records.lines
        assert kernel_link(lab, vm.device).get("master") is None
        events = lab.link_log.of(vm.device, since)
        assert events and not [e for e in events if e.master], f"the refused tap was enslaved: {events}"

        reported = len(lab.controller.statuses(HOST))
        host.ip("link", "set", "dev", vm.device, "address", expected)
        plugged_events(lab, vm.device, naming.vsid_bridge(F3_VSID),
                       tenant_mtu(parse_host_state(lab.document), F3_VSID), since)
        lab.controller.wait_for_status(HOST, lambda s: s["errors"] == [], timeout=60, after=reported)
        vm.start(set_mac=False)  # qemu opening ifname=<the tap>
        own_ip, peer = vm.ca.split("/")[0], VM["vmB3"]
        vm.send(Ether(src=vm.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=vm.mac, psrc=own_ip,
                                                                pdst=peer.ca.split("/")[0]))
        answer = vm.receive(lambda f: ARP in f and f[ARP].op == 2, timeout=10)
        assert answer is not None and answer[ARP].hwsrc == peer.mac, answer  # Fabrikam3's, not Fabrikam2's
    finally:
        vm.stop()
        host.ip("link", "del", "dev", vm.device, check=False)
