"""Router advertisements and DHCPv6 from the host for an IPv6 VM subnet, on this kernel.

The agent's DHCP manager (agent.dhcp) starts its real dnsmasq on a VSID bridge holding
the distributed router's IPv6 gateway; a VM namespace behind a veth port of the bridge
is the client. Its own kernel takes the advertisement (default router: the bridge's
link-local address, from the VSID's gateway MAC; the tenant MTU; no SLAAC address), and
a DHCPv6 exchange sent from inside it (scapy's frames on a raw socket) gets exactly the CA the controller
allocated, while a MAC the host does not know gets nothing. The same tests run in the
kernel tier with the bridge in a VRF, as the agent builds it
(tests/kernel/test_dhcp6_vrf.py); DHCPv4 is tests/kernel/test_dhcp.py's.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import time

import pytest

from agent import naming
from agent.dhcp import DhcpManager
from agent.netns import in_netns
from agent.state import parse_host_state
from tests.lib.netns import veth_pair
from tests.lib.sample_states import IPV6_CA as CA, IPV6_GATEWAY as GATEWAY, VSID, ipv6_host_state
from tests.lib.wait import wait_until

BRIDGE = naming.vsid_bridge(VSID)
MAC, STRANGER = "00:15:5d:00:00:01", "00:15:5d:00:00:99"
TENANT_MTU = 1458  # provider 1500 - 42 of NVGRE over IPv4 PAs

TRID = 0x4242  # the Solicits' transaction id
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # sll_pkttype of a frame this socket's own host sent


def solicit(vm, mac: str, attempts: int = 3, wait: float = 2.0) -> list[str]:
    """A DHCPv6 Solicit from the VM namespace's eth0, made `mac` (its DUID-LL too): the
    addresses the first Advertise offers in IA_NA, [] if none came.

    Sent and read on a raw socket opened inside the namespace, from this process: a
    Python started in the VM namespace for scapy's sendp and sniffer paid scapy's import
    again (half a minute under emulation)."""
    from scapy.layers.dhcp6 import DHCP6_Advertise, DHCP6_Solicit, DHCP6OptClientId, DHCP6OptIA_NA, \
        DHCP6OptIAAddress, DUID_LL
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    vm.ip("link", "set", "eth0", "address", mac)
    frame = bytes(Ether(src=mac, dst="33:33:00:01:00:02") / IPv6(src=link_local(mac), dst="ff02::1:2")
                  / UDP(sport=546, dport=547) / DHCP6_Solicit(trid=TRID)
                  / DHCP6OptClientId(duid=DUID_LL(lladdr=mac)) / DHCP6OptIA_NA(iaid=1))

    def exchange() -> list[str]:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as raw:
            raw.bind(("eth0", 0))
            for _ in range(attempts):
                raw.send(frame)
                deadline = time.monotonic() + wait
                while select.select([raw], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    data, address = raw.recvfrom(65535)
                    packet = Ether(data)
                    if address[2] != PACKET_OUTGOING and packet.haslayer(DHCP6_Advertise) \
                            and packet[DHCP6_Advertise].trid == TRID:
                        if not packet.haslayer(DHCP6OptIA_NA):  # advertised, but no address
                            return []
                        return [o.addr for o in packet[DHCP6OptIA_NA].ianaopts if isinstance(o, DHCP6OptIAAddress)]
        return []

    return in_netns(vm.name, exchange)


def ipv6_state():
    return parse_host_state(ipv6_host_state("CON-HyperV-A", 1, mac=MAC))


def link_local(mac: str) -> str:
    """The EUI-64 link-local address the kernel gives a device with this MAC."""
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = octets[:3] + [0xFF, 0xFE] + octets[3:]
    return str(ipaddress.IPv6Address(bytes([0xFE, 0x80] + [0] * 6 + eui)))


def bridge_and_vm(make_netns, vrf: str | None = None):
    """The host namespace's VSID bridge (in VRF `vrf` if given, as the agent builds it)
    holding the IPv6 gateway, and the VM namespace behind a port: (host, vm)."""
    host, vm = make_netns(), make_netns()
    host.ip("link", "add", BRIDGE, "address", naming.gateway_mac(VSID), "type", "bridge")
    if vrf is not None:
        host.ip("link", "add", vrf, "type", "vrf", "table", str(naming.vrf_table(1)))
        host.ip("link", "set", vrf, "up")
        host.ip("link", "set", BRIDGE, "master", vrf)
    host.run("sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.accept_dad=0")
    host.ip("link", "set", BRIDGE, "up")
    host.ip("-6", "addr", "add", f"{GATEWAY}/64", "dev", BRIDGE, "nodad")
    veth_pair(host, "vmport", vm, "eth0")
    host.ip("link", "set", "vmport", "master", BRIDGE)
    vm.ip("link", "set", "eth0", "down")
    vm.ip("link", "set", "eth0", "address", MAC)
    vm.run("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
    vm.ip("link", "set", "eth0", "up")
    return host, vm


def serve(make_netns, tmp_path, vrf: str | None = None, state=None):
    """bridge_and_vm() and the host's server for `state` (default: ipv6_state());
    yields (host, vm), stops the server."""
    host, vm = bridge_and_vm(make_netns, vrf)
    manager = DhcpManager(host.name, tmp_path / "dhcp")
    state = state or ipv6_state()
    applied, errors = manager.apply(manager.plan(state))
    assert not errors and applied == 2, errors  # the guard, then the server
    try:
        yield host, vm
    finally:
        manager.apply(manager.plan(state.model_copy(update={"ports": ()})))


@pytest.fixture
def served(make_netns, tmp_path):
    yield from serve(make_netns, tmp_path)


def test_the_vm_takes_the_distributed_router_and_the_tenant_mtu_from_the_advertisement(served):
    host, vm = served
    router = link_local(naming.gateway_mac(VSID))

    def default_route():
        routes = json.loads(vm.ip("-6", "-j", "route", "show", "default").stdout or "[]")
        return [r for r in routes if r.get("gateway") == router and r.get("dev") == "eth0"]

    wait_until(default_route, 60, f"a default route via {router} learned from the advertisement", interval=0.5)
    assert vm.run("cat", "/proc/sys/net/ipv6/conf/eth0/mtu").stdout.strip() == str(TENANT_MTU)
    addresses = json.loads(vm.ip("-6", "-j", "addr", "show", "dev", "eth0").stdout)
    global_ones = [a["local"] for link in addresses for a in link["addr_info"] if a.get("scope") == "global"]
    assert global_ones == [], f"the advertisement made SLAAC addresses {global_ones}: the CA must come from DHCPv6"


def test_dhcpv6_offers_exactly_the_allocated_ca_and_nothing_to_an_unknown_mac(served):
    host, vm = served
    # The VM's own MAC, then the eth0 of a VM the host does not know.
    offered = {mac: solicit(vm, mac) for mac in (MAC, STRANGER)}
    assert offered == {MAC: [CA], STRANGER: []}


@pytest.fixture
def served_slaac(make_netns, tmp_path):
    state = parse_host_state(ipv6_host_state("CON-HyperV-A", 1, mac=MAC, ipv6_assignment="SLAAC"))
    yield from serve(make_netns, tmp_path, state=state)


def test_a_slaac_subnets_vm_forms_exactly_the_ca_the_controller_derived_from_its_mac(served_slaac):
    """Ipv6Assignment.SLAAC: the advertisement carries the autonomous flag, the VM's own
    kernel forms its address from the /64 and its MAC (EUI-64), and that is the CA the
    controller computes (controller.allocate.slaac_address); DHCPv6 hands out no address."""
    from controller.allocate import slaac_address

    host, vm = served_slaac
    ca = slaac_address(ipaddress.IPv6Network(f"{CA}/64", strict=False), MAC)

    def global_addresses():
        found = json.loads(vm.ip("-6", "-j", "addr", "show", "dev", "eth0").stdout)
        return [a["local"] for link in found for a in link["addr_info"] if a.get("scope") == "global"]

    wait_until(global_addresses, 60, "an address formed from the advertisement", interval=0.5)
    assert global_addresses() == [str(ca)]
    assert solicit(vm, MAC) == [], "a SLAAC subnet's server must hand out no address"
