"""The agent's DHCP servers start, and answer, under the agent unit's capabilities.

systemd starts hnv-agent as root with only the unit's ``CapabilityBoundingSet`` and
``NoNewPrivileges``; the dnsmasq servers the agent starts inherit that bound. Here the
agent's DhcpManager runs in a child process inside the host namespace under ``setpriv``
with exactly the set systemd/hnv-agent.service names (read from the file), and the VM
behind the VSID bridge must get its CA: by DHCPv4 (the lab guest's busybox client) and
by DHCPv6, from a server that also sends router advertisements (on a raw ICMPv6 socket:
without CAP_NET_RAW it does not start).

The booted hosts of the Vagrant lab found what a root-run test cannot: dnsmasq exited 5
on every host ("failed to change group-id to dip": its default group needs CAP_SETGID)
and could not have opened its ICMPv6 socket without CAP_NET_RAW.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from agent.dhcp import DhcpManager
from agent.guest import GuestDhcp, client_program
from agent.state import parse_host_state
from tests.lib.sample_states import IPV6_CA, host_state, ipv6_host_state
from tests.lib.units import SYSTEMD, capability_bounding_set
from tests.lib.wait import wait_until
from tests.netns.test_dhcp6 import bridge_and_vm, solicit
from tests.netns.test_guest_dhcp import CA, MAC, reaped, vm_behind_bridge

pytestmark = pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")

# The child: the agent's own DhcpManager, in the namespace it was started in (netns None,
# as on a host), applying the plan of the state given as JSON; prints applied and errors.
CHILD = """
import json, sys
from pathlib import Path
from agent.dhcp import DhcpManager
from agent.state import parse_host_state
manager = DhcpManager(None, Path(sys.argv[2]))
applied, errors = manager.apply(manager.plan(parse_host_state(json.loads(sys.argv[1]))))
print(json.dumps({"applied": applied, "errors": [str(e) for e in errors]}))
"""


def apply_as_the_unit(host, document: dict, run_dir) -> dict:
    caps = capability_bounding_set(SYSTEMD / "hnv-agent.service")
    bound = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    done = host.run("setpriv", "--bounding-set", bound, "--inh-caps", "-all", "--no-new-privs",
                    sys.executable, "-c", CHILD, json.dumps(document), str(run_dir), check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(client_program() is None, reason="busybox (udhcpc) is not installed")
def test_dhcpv4_answers_under_the_units_capabilities(make_netns, tmp_path):
    host, vm = vm_behind_bridge(make_netns)
    document = host_state("CON-HyperV-A", 1, mac=MAC, ca=CA)
    result = apply_as_the_unit(host, document, tmp_path / "dhcp")
    manager = DhcpManager(host.name, tmp_path / "dhcp")  # full capabilities: only to stop the server
    try:
        assert result == {"applied": 2, "errors": []}  # the guard, then the server
        guests = GuestDhcp(tmp_path / "guests")
        guests.start("TenantVM01", vm.name, "eth0")
        wait_until(lambda: reaped(guests), 60, "the client to finish", interval=0.2)
        addresses = json.loads(vm.ip("-4", "-j", "addr", "show", "dev", "eth0").stdout)
        assert [a["local"] for link in addresses for a in link["addr_info"]] == [CA]
    finally:
        state = parse_host_state(document)
        manager.apply(manager.plan(state.model_copy(update={"ports": ()})))


def test_router_advertisements_and_dhcpv6_answer_under_the_units_capabilities(make_netns, tmp_path):
    document = ipv6_host_state("CON-HyperV-A", 1, mac=MAC)
    host, vm = bridge_and_vm(make_netns)
    result = apply_as_the_unit(host, document, tmp_path / "dhcp")
    manager = DhcpManager(host.name, tmp_path / "dhcp")
    try:
        assert result == {"applied": 2, "errors": []}, result
        assert solicit(vm, MAC) == [IPV6_CA]
    finally:
        state = parse_host_state(document)
        manager.apply(manager.plan(state.model_copy(update={"ports": ()})))
