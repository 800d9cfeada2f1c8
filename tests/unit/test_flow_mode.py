"""Flow mode planned from a HostState: the devices, the eBPF map entries and tc programs.

Pure: desired_kernel_state and diff (agent.plan), the map encodings of agent.flowmode.
What a kernel does with them is tests/kernel/test_flow_mode.py.
"""

from __future__ import annotations

import pytest

from agent import naming
from agent.flowmode import decode_remote, remote_key, remote_value
from agent.kernel_model import FlowPort, FlowRemote, KernelState, TcProgram
from agent.plan import desired_kernel_state, diff
from agent.state import StateError, parse_host_state
from tests.kernel.agentlab import F2_VSID, F2B_VSID, F3_VSID, F3B_VSID, PA, VMS, host_state

VM_NETNS = {vm.name: f"ns-{vm.name}" for vm in VMS}


def flow_doc(host: str = "a") -> dict:
    doc = host_state(host, VM_NETNS)
    doc["provider"]["tunnel_mode"] = "flow"
    return doc


def test_flow_mode_plans_one_tunnel_a_port_per_vsid_and_no_per_peer_gretap():
    want = desired_kernel_state(parse_host_state(flow_doc()))
    roles = [l.role for l in want.links.values()]
    assert naming.TUNNEL not in roles
    tunnel = want.links[naming.flow_tunnel(4)]
    assert tunnel.kind == "gretap" and tunnel.option("external") == 1 and tunnel.master is None
    for vsid in (F2_VSID, F2B_VSID, F3_VSID, F3B_VSID):
        port = want.links[naming.flow_port(vsid)]
        assert port.kind == "dummy" and port.master == naming.vsid_bridge(vsid)
        assert dict(port.port_flags)["unicast_flood"] == 0 and dict(port.port_flags)["learning"] == 0
        assert want.flow_ports[vsid] == FlowPort(vsid, port.name, tunnel.name)
        assert want.tc_programs[(port.name, "egress")] == TcProgram(port.name, "egress", "hnv_encap")
    assert want.tc_programs[(tunnel.name, "ingress")] == TcProgram(tunnel.name, "ingress", "hnv_decap")


def test_flow_mode_maps_each_remote_mac_to_its_pa_and_the_local_pa_of_its_network():
    want = desired_kernel_state(parse_host_state(flow_doc()))
    assert set(want.flow_remotes.values()) == {
        FlowRemote(F2_VSID, "00:15:5d:00:02:0b", PA[("b", "Fabrikam2")], PA[("a", "Fabrikam2")]),
        FlowRemote(F2B_VSID, "00:15:5d:00:02:1b", PA[("b", "Fabrikam2")], PA[("a", "Fabrikam2")]),
        FlowRemote(F3_VSID, "00:15:5d:00:03:0b", PA[("b", "Fabrikam3")], PA[("a", "Fabrikam3")]),
        FlowRemote(F3B_VSID, "00:15:5d:00:03:1b", PA[("b", "Fabrikam3")], PA[("a", "Fabrikam3")]),
    }
    # Local VMs and gateway records (the local bridge answers those) are not in the map;
    # the bridge sends a remote MAC to the VSID's tunnel port.
    assert want.fdb[(naming.vsid_bridge(F2_VSID), "00:15:5d:00:02:0b")].port == naming.flow_port(F2_VSID)


def test_device_mode_is_the_default_and_plans_no_flow_objects():
    want = desired_kernel_state(parse_host_state(host_state("a", VM_NETNS)))
    assert not want.flow_remotes and not want.flow_ports and not want.tc_programs
    assert any(l.role == naming.TUNNEL for l in want.links.values())


def test_flow_plan_orders_map_entries_after_links_and_before_programs_and_deletes_in_reverse():
    want = desired_kernel_state(parse_host_state(flow_doc()))
    kinds = [op.kind for op in diff(want, KernelState())]
    assert kinds.index("flowvsid") > max(i for i, k in enumerate(kinds) if k == naming.FLOW_PORT)
    assert kinds.index("flowremote") < kinds.index("tcprogram")
    undo = [op.kind for op in diff(KernelState(), want)]
    assert undo.index("tcprogram") < undo.index("flowremote") < undo.index("flowvsid")
    assert undo.index("flowvsid") < undo.index(naming.FLOW_PORT)


def test_a_moved_vm_is_one_map_replace():
    want = desired_kernel_state(parse_host_state(flow_doc()))
    have = desired_kernel_state(parse_host_state(flow_doc()))
    moved = FlowRemote(F2_VSID, "00:15:5d:00:02:0b", "10.80.2.99", PA[("a", "Fabrikam2")])
    have.add(moved)
    plan = diff(want, have)
    assert [op.describe() for op in plan] == [
        f"replace flowremote vsid {F2_VSID} 00:15:5d:00:02:0b -> 10.80.2.21 from 10.80.2.20 "
        f"(was vsid {F2_VSID} 00:15:5d:00:02:0b -> 10.80.2.99 from 10.80.2.20)"]


@pytest.mark.parametrize("remote,local", [("10.80.2.21", "10.80.2.20"), ("2001:db8::21", "2001:db8::20")])
def test_map_entries_round_trip_through_their_byte_layout(remote, local):
    key, value = remote_key(F2_VSID, "00:15:5d:00:02:0b"), remote_value(remote, local)
    assert len(key) == 12 and len(value) == 36  # struct remote_key / remote_value in hnv_flow.c
    assert key[:4] == F2_VSID.to_bytes(4, "little")
    assert decode_remote(key, value) == FlowRemote(F2_VSID, "00:15:5d:00:02:0b", remote, local)


def test_flow_mode_with_vxlan_is_refused_naming_the_field():
    doc = flow_doc()
    doc["provider"]["encapsulation"] = "vxlan"
    with pytest.raises(StateError) as refused:
        parse_host_state(doc)
    assert "tunnel_mode: flow mode is for NVGRE" in str(refused.value)
