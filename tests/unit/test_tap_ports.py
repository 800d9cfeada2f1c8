"""Real VMs' taps: the name the controller gives one, the MAC it must carry, what the plan
does with it present, absent or someone else's, and how the daemon waits for it.

No root, no kernel: the plan over hand-made kernel states, the controller's fabric in
this process, the daemon over loopback with a stand-in reconciler. The kernel tier
(tests/kernel/test_tap_ports.py) opens real taps the way a hypervisor does.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial

import pytest
from pydantic import ValidationError

from agent import naming
from agent.daemon import AgentDaemon, DaemonConfig, TapWatch
from agent.kernel_model import KernelState, Link
from agent.plan import PLUGGED, REFUSED, WAITING, TapPort, desired_kernel_state, diff, tap_plan, tenant_mtu
from agent.state import HostState, StateError, parse_host_state
from controller.models import Kind, VmSpec
from tests.lib.fake_controller import FakeController
from tests.lib.sample_states import host_state
from tests.lib.wait import wait_until
from tests.unit.test_controller_fabric import small_fabric
from tests.unit.test_state_validation import BASE

VSID = 3535905
BRIDGE = naming.vsid_bridge(VSID)
VM_MAC = "00:15:5d:01:02:03"
TAP = naming.vm_tap("TenantVM01")


# --- the names and the MAC ------------------------------------------------------------------


def test_a_tap_name_is_derived_from_the_vm_name_and_is_a_kernel_name():
    names = {naming.vm_tap(f"TenantVM{i:02}") for i in range(200)}
    assert len(names) == 200
    for name in names | {naming.vm_tap("x" * 256), naming.vm_tap("Ünïcode VM / with spaces")}:
        assert name.startswith("hnvn") and len(name.encode()) <= 15 and name.isascii() and name.isalnum()
    assert naming.vm_tap("TenantVM01") == naming.vm_tap("TenantVM01") == TAP
    assert TAP != naming.vm_port("TenantVM01") and not TAP.startswith("hnvp")  # the lab's veth prefix


@pytest.mark.parametrize("vm_mac, tap_mac", [
    ("00:15:5d:01:02:03", "fe:15:5d:01:02:03"),
    ("00:1d:d8:b7:1c:00", "fe:1d:d8:b7:1c:00"),
    ("52:54:00:AB:CD:EF", "fe:54:00:ab:cd:ef"),
    ("fe:54:00:01:02:03", "fa:54:00:01:02:03"),  # libvirt's rule for a MAC already beginning with fe
])
def test_a_taps_mac_is_the_vm_mac_with_libvirts_first_octet(vm_mac, tap_mac):
    assert naming.tap_mac(vm_mac) == tap_mac


# --- the contract ------------------------------------------------------------------------------


def tap_state(**port) -> HostState:
    doc = copy.deepcopy(BASE)
    doc["ports"][0].update({"kind": "tap", "device": TAP, **port})
    return parse_host_state(json.dumps(doc))


def test_the_contract_takes_a_tap_port_and_refuses_one_on_a_host_device():
    assert tap_state().ports[0].device == TAP
    for device, what in (("hnv-sw", "the virtual switch"), ("hnv-team", "the team"), ("eth1", "a NIC of the team")):
        with pytest.raises(StateError) as caught:
            tap_state(device=device)
        assert f"ports[0].device: {device} is {what}, not a VM's tap" in caught.value.problems, caught.value.problems


def test_the_contract_refuses_one_tap_on_two_ports():
    doc = copy.deepcopy(BASE)
    doc["ports"] = [{"name": f"VM{i}", "mac": f"00:15:5d:01:02:0{i}", "vsid": VSID, "kind": "tap", "device": "tap0"}
                    for i in (3, 5)]
    with pytest.raises(StateError) as caught:
        parse_host_state(json.dumps(doc))
    assert "ports[1].device: tap device tap0 is given to two ports" in caught.value.problems


# --- the plan ------------------------------------------------------------------------------------


def kernel_with(want: KernelState, tap: Link | None) -> KernelState:
    """The kernel once everything else of `want` is realised, with `tap` as the hypervisor left it."""
    have = copy.deepcopy(want)
    have.links = {name: replace(link, vm=None, expect_mac=None, kind="veth" if link.kind == "nic" else link.kind)
                  for name, link in want.links.items() if name != TAP}
    have.fdb = {key: f for key, f in want.fdb.items() if f.port != TAP}
    have.vlans = {key: v for key, v in want.vlans.items() if v.device != TAP}
    if tap is not None:
        have.links[TAP] = tap
    return have


def hypervisors_tap(mac: str = naming.tap_mac(VM_MAC), kind: str = "tap", **changes) -> Link:
    """A tap as libvirt leaves it for an `<interface type='ethernet'>`: up, no master, MTU 1500."""
    tap = dict(name=TAP, kind=kind, role="external", owned=False, mac=mac, mtu=1500, up=True,
               settings=(("disable_ipv6", 0),))
    return Link(**{**tap, **changes})


def test_a_present_tap_with_the_vms_mac_is_plugged_with_the_tenant_mtu_and_ipv6_off():
    state = tap_state()
    want = desired_kernel_state(state)
    plan = diff(want, kernel_with(want, hypervisors_tap()))
    assert plan.taps == (TapPort("TenantVM01", TAP, PLUGGED, BRIDGE, naming.tap_mac(VM_MAC), naming.tap_mac(VM_MAC)),)
    (op,) = [op for op in plan if op.name == TAP]
    assert (op.action, op.kind) == ("set", "external")
    assert op.desired.master == BRIDGE and op.desired.mtu == tenant_mtu(state, VSID) == 1458
    assert op.desired.setting("disable_ipv6") == 1 and op.desired.up and op.desired.mac is None  # never set
    assert f"add fdb {VM_MAC} on {BRIDGE} -> {TAP}" in plan.describe()
    # once plugged, nothing more to do
    have = kernel_with(want, hypervisors_tap(master=BRIDGE, mtu=1458, settings=(("disable_ipv6", 1),)))
    have.fdb.update({k: f for k, f in want.fdb.items() if f.port == TAP})
    settled = diff(want, have)
    assert settled.is_empty and settled.describe() == "nothing to do" and settled.taps[0].state == PLUGGED


def test_an_absent_tap_plans_nothing_and_waits():
    want = desired_kernel_state(tap_state())
    plan = diff(want, kernel_with(want, None))
    assert plan.is_empty, plan.describe()
    (tap,) = plan.taps
    assert (tap.state, tap.device, tap.vm, tap.seen_mac) == (WAITING, TAP, "TenantVM01", None)
    assert plan.describe() == f"waiting tap {TAP} of VM TenantVM01: not there yet (the hypervisor creates it " \
                              "when the VM starts); plugged when it appears"
    assert want.links[TAP].expect_mac == naming.tap_mac(VM_MAC)  # the desired state still holds it


@pytest.mark.parametrize("seen", ["52:54:00:12:34:56", VM_MAC, "fe:15:5d:01:02:04"])
def test_a_tap_with_another_mac_is_refused_and_never_enslaved(seen):
    want = desired_kernel_state(tap_state())
    plan = diff(want, kernel_with(want, hypervisors_tap(mac=seen)))
    assert not [op for op in plan if op.name == TAP or TAP in op.describe()], plan.describe()
    (tap,) = plan.taps
    assert (tap.state, tap.expected_mac, tap.seen_mac) == (REFUSED, "fe:15:5d:01:02:03", seen)
    assert f"refused tap {TAP} of VM TenantVM01: its MAC is {seen}, expected fe:15:5d:01:02:03" in plan.describe()


def test_a_plugged_tap_whose_mac_changed_is_released_not_deleted():
    want = desired_kernel_state(tap_state())
    have = kernel_with(want, hypervisors_tap(mac="52:54:00:12:34:56", master=BRIDGE, mtu=1458))
    plan = diff(want, have)
    assert [op.describe() for op in plan] == [f"release external {TAP} from {BRIDGE}"]
    assert plan.taps[0].state == REFUSED


def test_a_device_of_another_kind_under_the_taps_name_is_refused():
    want = desired_kernel_state(tap_state())
    plan = diff(want, kernel_with(want, hypervisors_tap(kind="veth")))
    assert not [op for op in plan if op.name == TAP]
    assert plan.taps[0].state == REFUSED and f"{TAP} is a veth device, not a tap" in plan.taps[0].reason


def test_a_tap_port_of_a_vlan_network_gets_its_vlan_only_when_plugged():
    def on_vlan(doc):
        doc["ports"][0].update(kind="tap", device=TAP, vlan=100)
        del doc["ports"][0]["vsid"], doc["ports"][0]["ca"]
    doc = copy.deepcopy(BASE)
    on_vlan(doc)
    want = desired_kernel_state(parse_host_state(json.dumps(doc)))
    assert "vlan" not in {op.kind for op in diff(want, kernel_with(want, None))}
    plugged = diff(want, kernel_with(want, hypervisors_tap()))
    assert f"add vlan 100 on {TAP} pvid untagged" in plugged.describe()
    assert f"delete vlan 1 on {TAP} pvid untagged" in plugged.describe()  # never on the management VLAN


def only(want: KernelState, *links: Link) -> KernelState:
    """What agent.observe.observe_links reads: a few links, nothing else."""
    seen = KernelState()
    for link in links:
        seen.add(link)
    return seen


def test_the_taps_own_plan_touches_the_tap_its_fdb_entry_and_nothing_else():
    want = desired_kernel_state(tap_state())
    bridge = replace(want.links[BRIDGE], index=7)
    plan = tap_plan(want, only(want, hypervisors_tap(index=9), bridge), {TAP})
    assert [op.describe().split(" ", 3)[:3] for op in plan] == [["set", "external", TAP], ["add", "fdb", VM_MAC]]
    assert plan.taps[0].state == PLUGGED
    # the full plan of the same kernel would also build everything else: not this one's business
    assert len(diff(want, only(want, hypervisors_tap(), bridge))) > 10
    # absent, another MAC: nothing; no bridge yet: nothing (the full reconcile builds it)
    assert tap_plan(want, only(want, bridge), {TAP}).is_empty
    refused = tap_plan(want, only(want, hypervisors_tap(mac=VM_MAC), bridge), {TAP})
    assert refused.is_empty and refused.taps[0].state == REFUSED
    assert tap_plan(want, only(want, hypervisors_tap()), {TAP}).is_empty
    assert tap_plan(want, only(want, hypervisors_tap(), bridge), {"hnvb3535905", "eth0"}).is_empty  # not taps


def test_the_taps_own_plan_on_a_vlan_network_takes_it_off_the_management_vlan():
    doc = copy.deepcopy(BASE)
    doc["ports"][0].update(kind="tap", device=TAP, vlan=100)
    del doc["ports"][0]["vsid"], doc["ports"][0]["ca"]
    want = desired_kernel_state(parse_host_state(json.dumps(doc)))
    switch = want.links["hnv-sw"]
    assert switch.setting("vlan_filtering") == 1
    described = tap_plan(want, only(want, hypervisors_tap(), switch), {TAP}).describe()
    assert f"add vlan 100 on {TAP} pvid untagged" in described and f"delete vlan 1 on {TAP}" in described


# --- the controller ------------------------------------------------------------------------------


@pytest.fixture
def fabric(tmp_path):
    return small_fabric(tmp_path)


def port_on(fabric, host: str, vm: str):
    return next(p for p in fabric.host_entry(host).state.ports if p.name == vm)


def test_a_tap_nic_without_a_device_is_compiled_with_the_derived_name(fabric, tmp_path):
    vm = fabric.create(Kind.vm, VmSpec(name="Web 01", vm_network="Red", host="A", nic_kind="tap"))
    assert vm.device is None and vm.tap_device == naming.vm_tap("Web 01")
    assert vm.model_dump(mode="json")["tap_device"] == naming.vm_tap("Web 01")  # what the API and hnvctl show
    port = port_on(fabric, "A", "Web 01")
    assert (port.kind, port.device) == ("tap", naming.vm_tap("Web 01"))
    explicit = fabric.create(Kind.vm, VmSpec(name="Db", vm_network="Red", host="A", nic_kind="tap", device="vnet-db"))
    assert explicit.tap_device == port_on(fabric, "A", "Db").device == "vnet-db"  # a given name wins
    lab = fabric.create(Kind.vm, VmSpec(name="Lab", vm_network="Red", host="A"))
    assert lab.tap_device is None and port_on(fabric, "A", "Lab").device is None
    # kept across a restart (the derived name is not stored: it is derived again)
    fabric.store.close()
    from controller.fabric import Fabric
    reopened = Fabric.open(tmp_path, synchronous="NORMAL")
    assert reopened.get(Kind.vm, "Web 01").tap_device == naming.vm_tap("Web 01")
    assert port_on(reopened, "A", "Web 01").device == naming.vm_tap("Web 01")


def test_a_patch_to_a_tap_nic_derives_the_name_and_back_drops_it(fabric):
    fabric.create(Kind.vm, VmSpec(name="V", vm_network="Red", host="A"))
    patched = fabric.patch(Kind.vm, "V", {"nic_kind": "tap"})
    assert patched.tap_device == naming.vm_tap("V") == port_on(fabric, "A", "V").device
    back = fabric.patch(Kind.vm, "V", {"nic_kind": "namespace"})
    assert back.tap_device is None and port_on(fabric, "A", "V").kind == "namespace"


def test_a_given_device_may_not_take_openhnvs_names(fabric):
    with pytest.raises(ValidationError) as caught:
        VmSpec(name="V", vm_network="Red", nic_kind="tap", device="hnvb3535905")
    assert f"device: hnvb3535905 begins with hnv, which names openhnv's own devices; leave device out and " \
           f"the tap is {naming.vm_tap('V')}" in str(caught.value)
    assert VmSpec(name="V", vm_network="Red", nic_kind="tap", device=naming.vm_tap("V")).device == naming.vm_tap("V")
    with pytest.raises(ValidationError) as caught:
        VmSpec(name="V", vm_network="Red", nic_kind="tap", device="a-sixteen-bytes!")
    assert "device" in str(caught.value) and "over the kernel's 15" in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        VmSpec(name="V", vm_network="Red", device="tap0")
    assert "device: only a tap NIC names a device" in str(caught.value)


def test_two_tap_nics_on_one_host_may_not_share_a_device(fabric):
    from controller.models import Invalid

    fabric.create(Kind.vm, VmSpec(name="V1", vm_network="Red", host="A", nic_kind="tap", device="tap0"))
    with pytest.raises(Invalid) as caught:
        fabric.create(Kind.vm, VmSpec(name="V2", vm_network="Red", host="A", nic_kind="tap", device="tap0"))
    assert "tap device tap0 is given to two ports" in caught.value.reason, caught.value.body()
    assert [vm.name for vm in fabric.list(Kind.vm)] == ["V1"]


# --- the daemon ----------------------------------------------------------------------------------

HOST = "CON-HyperV6"
TOKEN = "host-token-tap"


@dataclass
class TapResult:
    generation: int
    taps: tuple
    planned: int = 0
    applied: int = 0
    errors: list = field(default_factory=list)
    duration_s: float = 0.001
    objects_by_kind: dict = field(default_factory=dict)


@dataclass
class TapReconciler:
    """The kernel as a tap's state: what each reconcile sees of the one tap, and when."""

    state: str = WAITING
    seen_mac: str | None = None
    started: list[float] = field(default_factory=list)
    last: str | None = None
    plugs: list[tuple[float, set]] = field(default_factory=list)

    def plug_taps(self, desired: HostState, devices: set) -> TapResult:
        self.plugs.append((time.monotonic(), set(devices)))
        tap = TapPort("TenantVM01", TAP, self.state, BRIDGE, "fe:15:5d:00:00:01", self.seen_mac)
        return TapResult(desired.generation, (tap,), planned=2, applied=2)

    def reconcile(self, desired: HostState) -> TapResult:
        self.started.append(time.monotonic())
        tap = TapPort("TenantVM01", TAP, self.state, BRIDGE, "fe:15:5d:00:00:01", self.seen_mac)
        errors = [type("E", (), {"kind": "tap", "object": TAP, "errno": None, "message": tap.describe()})()] \
            if self.state == REFUSED else []
        planned = 3 if self.state != self.last else 0  # plugging: link, FDB entry, ...
        self.last = self.state
        return TapResult(desired.generation, (tap,), planned=planned, applied=planned, errors=errors)

    def tunnel_stats(self, timeout=None):
        return []

    def close(self) -> None:
        pass


TAPS = (TapPort("A", "tapA", WAITING, BRIDGE, "fe:00:00:00:00:01"),
        TapPort("B", "tapB", PLUGGED, BRIDGE, "fe:00:00:00:00:02", "fe:00:00:00:00:02"),
        TapPort("C", "tapC", REFUSED, BRIDGE, "fe:00:00:00:00:03", "52:54:00:00:00:03"))


def test_only_a_waited_for_tap_appearing_is_urgent():
    watch = TapWatch()
    watch.update(TAPS, watch.begin())
    assert watch.urgent("RTM_NEWLINK tapA") and watch.urgent("RTM_NEWLINK tapC")
    assert not watch.urgent("RTM_NEWLINK tapB")  # our own writes to a plugged tap
    assert not watch.urgent("RTM_NEWLINK hnvt35f4210a") and not watch.urgent("RTM_DELNEIGH ifindex=7 tapA")
    assert not watch.urgent("RTM_DELLINK tapB")  # the VM stopped ...
    assert watch.urgent("RTM_NEWLINK tapB")  # ... and its new tap is urgent
    assert watch.unplugged() == {"tapA", "tapB", "tapC"}
    watch.plugging({"tapA", "tapB"})  # the loop plugs them: what its writes raise is not urgent
    assert not watch.urgent("RTM_NEWLINK tapA") and watch.urgent("RTM_NEWLINK tapC")
    watch.mark_plugged({"tapA"}, watch.begin())  # tapB was not there after all
    assert watch.unplugged() == {"tapB", "tapC"} and watch.urgent("RTM_NEWLINK tapB")


def test_a_reconcile_that_read_the_old_tap_does_not_hide_the_new_one():
    """The VM restarts while a reconcile runs: that reconcile read the old tap, plugged."""
    watch = TapWatch()
    watch.update(TAPS, watch.begin())
    running = watch.begin()  # a reconcile reads the kernel: tapB plugged
    watch.urgent("RTM_DELLINK tapB")
    assert watch.urgent("RTM_NEWLINK tapB")
    watch.update(TAPS, running)  # ... and ends, saying tapB is plugged: the old one
    assert "tapB" in watch.unplugged() and watch.urgent("RTM_NEWLINK tapB")
    assert watch.deleted_since(running) == {"tapB"}
    watch.mark_plugged({"tapB"}, running)
    assert "tapB" in watch.unplugged()
    after = watch.begin()  # one that reads the new tap
    watch.update(TAPS, after)
    assert "tapB" not in watch.unplugged() and not watch.urgent("RTM_NEWLINK tapB")
    assert watch.deleted_since(after) == set()


@pytest.fixture
def controller():
    fake = FakeController({TOKEN: HOST}).start()
    fake.publish(HOST, host_state(HOST, 1))
    yield fake
    fake.stop()


@pytest.fixture
def daemon_with(tmp_path, controller):
    started = []

    def make(reconciler) -> AgentDaemon:
        daemon = AgentDaemon(DaemonConfig(
            host=HOST, state_dir=tmp_path / "state", controller_url=controller.url, token=TOKEN,
            metrics_address=None, resync_interval=30.0, heartbeat=0.2, reconnect_max_delay=0.5,
            watch_kernel_events=False, event_debounce=0.05), reconciler)
        started.append(daemon)
        daemon.start()
        controller.wait_for_status(HOST, lambda s: s["generation"] == 1)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


# The project's condition wait, polled finely: these tests time the loop's reactions.
wait_for = partial(wait_until, interval=0.01)


def test_a_waiting_tap_is_reported_not_an_error_and_logged_once(daemon_with, controller, caplog):
    caplog.set_level(logging.INFO, logger="agent.daemon")
    daemon = daemon_with(TapReconciler())
    assert controller.statuses(HOST)[-1]["errors"] == []
    assert daemon.health()[1]["taps"] == [{"vm": "TenantVM01", "device": TAP, "state": "waiting", "bridge": BRIDGE,
                                          "expected_mac": "fe:15:5d:00:00:01", "seen_mac": None,
                                          "reason": TapPort("", "", WAITING, None, "").reason}]
    wait_for(daemon.inbox.settled, 3, "the grace of the agent's own writes to end")
    daemon.inbox.note_kernel_event("RTM_DELLINK hnvt35f4210a")
    wait_for(lambda: daemon.reconcile_count >= 2, 3, "an event reconcile")
    waiting = [r.getMessage() for r in caplog.records if "event=tap_waiting" in r.getMessage()]
    assert waiting == [f"event=tap_waiting vm=TenantVM01 device={TAP} bridge={BRIDGE} mac=fe:15:5d:00:00:01"]


def test_a_tap_appearing_just_after_a_reconcile_skips_the_gap(daemon_with):
    reconciler = TapReconciler()
    daemon = daemon_with(reconciler)
    wait_for(daemon.inbox.settled, 3, "the grace of the agent's own writes to end")
    daemon.inbox.note_kernel_event("RTM_DELLINK hnvt35f4210a")  # an ordinary event: a reconcile now
    wait_for(lambda: len(reconciler.started) >= 2, 3, "the first event reconcile")
    reconciler.state = PLUGGED
    appeared = time.monotonic()
    daemon._on_kernel_event(f"RTM_NEWLINK {TAP}")  # what the event thread calls
    wait_for(lambda: len(reconciler.started) >= 3, 3, "the tap's reconcile")
    assert reconciler.started[2] - appeared < 0.7, "the tap waited for the gap between event reconciles"
    ((plugged_at, devices),) = reconciler.plugs  # the tap alone first, then the whole host
    assert devices == {TAP} and appeared < plugged_at <= reconciler.started[2]
    assert daemon.health()[1]["taps"][0]["state"] == "plugged"
    assert daemon.metrics.drift_repairs._value.get() == 0, "a VM starting is not drift"
    # the plugged tap's own notifications (our writes) are taken as ours: dropped
    dropped = daemon.inbox.own_events_dropped
    daemon._on_kernel_event(f"RTM_NEWLINK {TAP}")
    wait_for(lambda: daemon.inbox.own_events_dropped > dropped, 3, "the notification taken as our own")
    # ... and one after the grace is not urgent either: the gap between event reconciles holds
    wait_for(daemon.inbox.settled, 3, "the grace of the agent's own writes to end")
    daemon._on_kernel_event(f"RTM_NEWLINK {TAP}")
    wait_for(lambda: len(reconciler.started) >= 4, 3, "the ordinary event reconcile")
    assert reconciler.started[3] - reconciler.started[2] >= 0.95


def test_a_restarted_vms_tap_ends_a_gap_already_begun(daemon_with):
    reconciler = TapReconciler(state=PLUGGED)
    daemon = daemon_with(reconciler)
    wait_for(daemon.inbox.settled, 3, "the grace of the agent's own writes to end")
    daemon.inbox.note_kernel_event("RTM_DELLINK hnvt35f4210a")
    wait_for(lambda: len(reconciler.started) >= 2, 3, "the first event reconcile")
    daemon._on_kernel_event(f"RTM_DELLINK {TAP}")  # the VM stops: not urgent, the loop waits out the gap
    time.sleep(0.1)  # (without the urgent tap, the next reconcile would come ~0.9 s after it)
    appeared = time.monotonic()
    daemon._on_kernel_event(f"RTM_NEWLINK {TAP}")  # ... and starts again: urgent
    wait_for(lambda: len(reconciler.started) >= 3, 3, "the tap's reconcile")
    assert reconciler.started[2] - appeared < 0.6, "the new tap waited for the end of the gap"


def test_a_refused_tap_is_an_error_with_both_macs_and_logged(daemon_with, controller, caplog):
    caplog.set_level(logging.INFO, logger="agent.daemon")
    daemon = daemon_with(TapReconciler(state=REFUSED, seen_mac="52:54:00:12:34:56"))
    (error,) = controller.statuses(HOST)[-1]["errors"]
    assert error["kind"] == "tap" and error["object"] == TAP
    shown = daemon.health()[1]["taps"][0]
    assert (shown["state"], shown["expected_mac"], shown["seen_mac"]) == ("refused", "fe:15:5d:00:00:01",
                                                                          "52:54:00:12:34:56")
    (line,) = [r.getMessage() for r in caplog.records if "event=tap_refused" in r.getMessage()]
    assert f"device={TAP} expected_mac=fe:15:5d:00:00:01 seen_mac=52:54:00:12:34:56" in line


def test_a_tap_vms_name_needs_no_namespace_of_that_name():
    """A tap VM's name is free text: only a lab VM's names a network namespace."""
    assert tap_state(name="a/b VM").ports[0].name == "a/b VM"
    with pytest.raises(StateError) as caught:
        parse_host_state(json.dumps({**BASE, "ports": [{**BASE["ports"][0], "name": "a/b VM"}]}))
    assert any(p.startswith("ports[0].name:") for p in caught.value.problems), caught.value.problems
