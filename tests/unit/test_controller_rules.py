"""Address and name rules: what the controller refuses, with the field and the reason.

- A VM's CA is never its subnet's network, broadcast or gateway address, nor an address
  a pool of its subnet reserves: refused when asked for (`ca`), skipped when allocated.
- Names may not be '.' or '..' and, like descriptions, hold no control, format or
  bidirectional-override characters; descriptions are at most 1,024 characters.
- A VM's network namespace is one `ip netns` accepts and is not the lab's own (its
  switch's, or a host's).
- The agent refuses a namespace name the kernel would misread, whatever a controller sends.
"""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from agent.state import StateError, parse_host_state
from controller.models import Conflict, HostGroupSpec, Invalid, IpPoolSpec, Kind, VmNetworkSpec, VmSpec, VmSubnetSpec
from tests.unit.test_controller_fabric import small_fabric


@pytest.fixture
def fabric(tmp_path):
    return small_fabric(tmp_path)


def refused(call, kind, field, reason_part):
    with pytest.raises(kind) as caught:
        call()
    assert caught.value.field == field, caught.value.body()
    assert reason_part in caught.value.reason, caught.value.body()
    return caught.value


# --- customer addresses -------------------------------------------------------------------------


@pytest.mark.parametrize("ca, reason", [
    ("192.168.0.0", "192.168.0.0 is the network address of 192.168.0.0/24"),
    ("192.168.0.255", "192.168.0.255 is the broadcast address of 192.168.0.0/24"),
    ("192.168.0.1", "192.168.0.1 is the gateway"),
])
def test_an_explicit_ca_may_not_be_the_network_broadcast_or_gateway_address(fabric, ca, reason):
    refused(lambda: fabric.create(Kind.vm, VmSpec(name="V", vm_network="Red", host="A", ca=ca)),
            Invalid, "ca", reason)
    assert fabric.list(Kind.vm) == [] and fabric.leases(kind="CA") == []


def test_an_explicit_ca_may_not_be_reserved_by_a_pool_of_its_subnet(fabric):
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Green", logical_network="Virtualization"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Green", prefix="10.9.0.0/24"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Green", range_start="10.9.0.10",
                                           range_end="10.9.0.20", reserved=["10.9.0.11", "10.9.0.50"]))
    for ca in ("10.9.0.11", "10.9.0.50"):  # inside the range, and outside it
        refused(lambda: fabric.create(Kind.vm, VmSpec(name="V", vm_network="Green", host="A", ca=ca)),
                Invalid, "ca", f"{ca} is reserved in IP pool Green/Default/Default")
    vm = fabric.create(Kind.vm, VmSpec(name="V", vm_network="Green", host="A", ca="10.9.0.12"))
    assert str(vm.ca) == "10.9.0.12"


def test_an_allocated_ca_skips_network_gateway_and_reserved_addresses(fabric):
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Green", logical_network="Virtualization"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Green", prefix="10.9.0.0/24"))
    # A range that starts at the network address and covers the gateway and a reserved one.
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Green", range_start="10.9.0.0",
                                           range_end="10.9.0.3", reserved=["10.9.0.2"]))
    vm = fabric.create(Kind.vm, VmSpec(name="V1", vm_network="Green", host="A"))
    assert vm.ca == ipaddress.ip_address("10.9.0.3")
    refused(lambda: fabric.create(Kind.vm, VmSpec(name="V2", vm_network="Green", host="A")),
            Conflict, "ca", "every address of 10.9.0.0 - 10.9.0.3 is leased or reserved")


def test_the_broadcast_address_is_never_allocated(fabric):
    fabric.create(Kind.vm_network, VmNetworkSpec(name="Green", logical_network="Virtualization"))
    fabric.create(Kind.vm_subnet, VmSubnetSpec(vm_network="Green", prefix="10.9.0.0/30"))
    fabric.create(Kind.ip_pool, IpPoolSpec(name="Default", vm_network="Green", range_start="10.9.0.2",
                                           range_end="10.9.0.3"))
    assert str(fabric.create(Kind.vm, VmSpec(name="V1", vm_network="Green", host="A")).ca) == "10.9.0.2"
    refused(lambda: fabric.create(Kind.vm, VmSpec(name="V2", vm_network="Green", host="A")),
            Conflict, "ca", "leased or reserved")


# --- names, descriptions, namespaces through the API ----------------------------------------------


def assert_refused(response, field, reason_part):
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "field", "reason"}, body
    assert body["field"] == field, body
    assert reason_part in body["reason"], body


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from tests.lib.controller import LiveController

    with LiveController(tmp_path_factory.mktemp("rules") / "state") as ctl:
        yield ctl.admin


@pytest.mark.parametrize("name", [".", ".."])
@pytest.mark.parametrize("collection", ["host-groups", "logical-networks", "clusters"])
def test_dot_and_dot_dot_are_not_names(api, collection, name):
    assert_refused(api.post(f"/v1/{collection}", json={"name": name}), "name", f"{name!r} is not a name")


@pytest.mark.parametrize("text, found", [
    ("Tenant\u202eA", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("Tenant\u2066A", "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
    ("Tenant\x1b[2JA", "U+001B"),
    ("Tenant\u200bA", "U+200B (ZERO WIDTH SPACE)"),
    ("Tenant\u2028A", "U+2028 (LINE SEPARATOR)"),
])
def test_control_and_bidi_characters_are_refused_in_names_and_descriptions(api, text, found):
    assert_refused(api.post("/v1/host-groups", json={"name": text}), "name", found)
    assert_refused(api.post("/v1/host-groups", json={"name": "Plain", "description": text}), "description", found)
    assert api.get("/v1/host-groups/Plain").status_code == 404


def test_descriptions_are_at_most_1024_characters(api):
    assert_refused(api.post("/v1/host-groups", json={"name": "Long", "description": "x" * 1025}),
                   "description", "at most 1024 characters")
    response = api.post("/v1/host-groups", json={"name": "Long", "description": "x" * 1024})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("netns, reason", [
    ("..", "'..' is not a name"),
    ("lab-switch", "namespace lab-switch is the lab's own"),
    ("a" * 250 + "\u00e9" * 3, "at most 255 bytes, this one has 256"),
])
def test_vm_namespace_names_are_what_ip_netns_accepts_and_not_the_labs(api, netns, reason):
    body = {"name": "V", "vm_network": "Red", "netns": netns}
    assert_refused(api.post("/v1/vms", json=body), "netns", reason)


def test_a_vm_named_like_the_labs_switch_needs_another_namespace(api):
    assert_refused(api.post("/v1/vms", json={"name": "lab-switch", "vm_network": "Red"}), "name",
                   "namespace lab-switch is the lab's own (its switch); a VM may not join it; give the VM a netns")


def test_a_vm_namespace_may_not_be_a_hosts(fabric):
    refused(lambda: fabric.create(Kind.vm, VmSpec(name="V", vm_network="Red", host="A", netns="B")),
            Invalid, "netns", "host B is a namespace of that name in the lab")
    refused(lambda: fabric.create(Kind.vm, VmSpec(name="Bare", vm_network="Red", host="A")),
            Invalid, "name", "host Bare is a namespace of that name in the lab")
    fabric.create(Kind.vm, VmSpec(name="V", vm_network="Red", host="A"))
    refused(lambda: fabric.patch(Kind.vm, "V", {"netns": "A"}), Invalid, "netns", "host A is a namespace")


# --- the agent's own check -----------------------------------------------------------------------


def _state_with_port(**port) -> dict:
    return {"host": "A", "generation": 1, "switch": {"logical_switch": "s"},
            "vlan_networks": [{"name": "T", "vlan": 100}],
            "ports": [{"name": "V", "mac": "00:1d:d8:b7:1c:01", "vlan": 100, **port}]}


@pytest.mark.parametrize("port, message", [
    ({"netns": ".."}, "ports[0].netns: '..' cannot name a network namespace"),
    ({"netns": "a/b"}, "ports[0].netns: 'a/b' cannot name a network namespace: it contains '/'"),
    ({"name": ".."}, "ports[0].name: '..' cannot name a network namespace"),
])
def test_the_agent_refuses_a_namespace_the_kernel_would_misread(port, message):
    with pytest.raises(StateError) as caught:
        parse_host_state(_state_with_port(**port))
    assert any(line.startswith(message) for line in caught.value.problems), caught.value.problems
    parse_host_state(_state_with_port(netns="vm-V"))


def test_objects_stored_before_these_rules_still_load_and_new_ones_follow_them(tmp_path):
    from controller.fabric import Fabric
    from controller.store import ChangeSet, Store

    store = Store(tmp_path / "controller.db")
    old = '{"name": "..", "parent": "All Hosts", "description": "older \\u202e rules", "uuid": "u-1"}'
    store.commit(ChangeSet(put_objects={("host-groups", ".."): ("u-1", old)}))
    store.close()
    fabric = Fabric.open(tmp_path)
    assert fabric.get(Kind.host_group, "..").description == "older \u202e rules"
    with pytest.raises(ValidationError) as caught:
        HostGroupSpec(name="..")
    assert "'..' is not a name" in str(caught.value)
