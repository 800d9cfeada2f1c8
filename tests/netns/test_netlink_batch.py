"""agent.netlink_batch against this kernel: what it programs is what `bridge` and `ip` show.

Every test builds a bridge with a veth port (and a VXLAN device where needed) in a fresh
namespace, writes through NeighbourSocket, and reads back with iproute2 — the tool a
person would use to check — or writes with iproute2 and reads back with the dump.
"""

from __future__ import annotations

import json
import socket

import pytest

from agent.netlink_batch import FdbEntry, NeighbourSocket, NeighEntry
from tests.lib.netns import Namespace


def _ifindex(ns: Namespace, name: str) -> int:
    return json.loads(ns.ip("-j", "link", "show", "dev", name).stdout)[0]["ifindex"]


@pytest.fixture
def bridge_ns(make_netns) -> Namespace:
    """A namespace with bridge br0, its port veth0 (peer veth1 outside it) and vx0."""
    ns = make_netns()
    ns.ip("link", "add", "br0", "type", "bridge")
    ns.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    ns.ip("link", "set", "veth0", "master", "br0")
    ns.ip("link", "add", "vx0", "type", "vxlan", "id", "5000", "dstport", "4789",
          "local", "10.80.2.20", "nolearning")
    for dev in ("br0", "veth0", "veth1", "vx0"):
        ns.ip("link", "set", dev, "up")
    return ns


def _mac(i: int, tag: int = 1) -> str:
    return f"02:{tag:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"


def _bridge_fdb(ns: Namespace, dev: str) -> list[dict]:
    return json.loads(ns.run("bridge", "-j", "fdb", "show", "dev", dev).stdout)


def _static_master_macs(ns: Namespace, dev: str) -> set[str]:
    return {
        row["mac"] for row in _bridge_fdb(ns, dev)
        if row.get("master") == "br0" and row.get("state") == "static"
    }


def _permanent_neigh(ns: Namespace, dev: str, *family: str) -> set[tuple[str, str]]:
    rows = json.loads(ns.ip("-j", *family, "neigh", "show", "dev", dev, "nud", "permanent").stdout)
    return {(row["dst"], row["lladdr"]) for row in rows}


def test_thousands_of_records_land_as_bridge_and_ip_show_them(bridge_ns):
    port, bridge = _ifindex(bridge_ns, "veth0"), _ifindex(bridge_ns, "br0")
    count = 3000
    fdb = [FdbEntry(port, _mac(i)) for i in range(count)]
    neigh4 = [NeighEntry(bridge, f"192.168.{i >> 8}.{i & 255}", _mac(i)) for i in range(count // 2)]
    neigh6 = [NeighEntry(bridge, f"fd00::{i:x}", _mac(i)) for i in range(count // 2, count)]

    with NeighbourSocket(bridge_ns.name) as sock:
        assert sock.replace_fdb(fdb) == []
        assert sock.replace_neigh(neigh4 + neigh6) == []

    assert _static_master_macs(bridge_ns, "veth0") == {e.mac for e in fdb}
    assert _permanent_neigh(bridge_ns, "br0", "-4") == {(e.ip, e.mac) for e in neigh4}
    assert _permanent_neigh(bridge_ns, "br0", "-6") == {(e.ip, e.mac) for e in neigh6}


def test_socket_writes_into_its_own_namespace_only(bridge_ns, make_netns):
    other = make_netns()
    other.ip("link", "add", "br0", "type", "bridge")
    other.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    other.ip("link", "set", "veth0", "master", "br0")
    entry = FdbEntry(_ifindex(bridge_ns, "veth0"), _mac(7))
    with NeighbourSocket(bridge_ns.name) as sock:
        assert sock.replace_fdb([entry]) == []
    assert _static_master_macs(bridge_ns, "veth0") == {entry.mac}
    assert _static_master_macs(other, "veth0") == set()


def test_error_names_the_entry_that_caused_it_and_the_others_land(bridge_ns):
    port, bridge = _ifindex(bridge_ns, "veth0"), _ifindex(bridge_ns, "br0")
    missing = 999_999  # no such ifindex in a fresh namespace
    fdb = [FdbEntry(port, _mac(1)), FdbEntry(missing, _mac(2)), FdbEntry(port, _mac(3))]
    neigh = [NeighEntry(bridge, "192.168.0.10", _mac(1)), NeighEntry(missing, "192.168.0.11", _mac(2)),
             NeighEntry(bridge, "192.168.0.12", _mac(3))]
    with NeighbourSocket(bridge_ns.name) as sock:
        fdb_errors = sock.replace_fdb(fdb)
        neigh_errors = sock.replace_neigh(neigh)

    assert [(e.entry, e.errno) for e in fdb_errors] == [(fdb[1], 19)]  # ENODEV
    assert [(e.entry, e.errno) for e in neigh_errors] == [(neigh[1], 19)]
    assert _mac(2) in fdb_errors[0].message and "No such device" in fdb_errors[0].message
    assert "192.168.0.11" in neigh_errors[0].message
    assert _static_master_macs(bridge_ns, "veth0") == {_mac(1), _mac(3)}
    assert _permanent_neigh(bridge_ns, "br0") == {("192.168.0.10", _mac(1)), ("192.168.0.12", _mac(3))}


def test_malformed_entry_is_refused_alone(bridge_ns):
    port = _ifindex(bridge_ns, "veth0")
    good, bad = FdbEntry(port, _mac(1)), FdbEntry(port, "02:00:00:zz:00:01")
    with NeighbourSocket(bridge_ns.name) as sock:
        errors = sock.replace_fdb([bad, good])
    assert [e.entry for e in errors] == [bad]
    assert _static_master_macs(bridge_ns, "veth0") == {good.mac}


def test_delete_removes_and_an_entry_already_gone_is_success(bridge_ns):
    port, bridge = _ifindex(bridge_ns, "veth0"), _ifindex(bridge_ns, "br0")
    fdb = [FdbEntry(port, _mac(i)) for i in range(100)]
    neigh = [NeighEntry(bridge, f"192.168.1.{i}", _mac(i)) for i in range(100)]
    never_added = [FdbEntry(port, _mac(i, tag=9)) for i in range(5)]
    with NeighbourSocket(bridge_ns.name) as sock:
        assert sock.replace_fdb(fdb) == [] and sock.replace_neigh(neigh) == []
        assert sock.delete_fdb(fdb[:60] + never_added) == []
        assert sock.delete_neigh(neigh[:60]) == []
        assert sock.delete_neigh(neigh[:60]) == []  # again: every one is ENOENT now
    assert _static_master_macs(bridge_ns, "veth0") == {e.mac for e in fdb[60:]}
    assert _permanent_neigh(bridge_ns, "br0") == {(e.ip, e.mac) for e in neigh[60:]}


def test_replace_moves_a_mac_to_another_port_and_an_address_to_another_mac(bridge_ns):
    bridge_ns.ip("link", "add", "veth2", "type", "veth", "peer", "name", "veth3")
    bridge_ns.ip("link", "set", "veth2", "master", "br0")
    old_port, new_port = _ifindex(bridge_ns, "veth0"), _ifindex(bridge_ns, "veth2")
    bridge = _ifindex(bridge_ns, "br0")
    with NeighbourSocket(bridge_ns.name) as sock:
        assert sock.replace_fdb([FdbEntry(old_port, _mac(1))]) == []
        assert sock.replace_neigh([NeighEntry(bridge, "192.168.0.3", _mac(1))]) == []
        # A migration: same MAC behind another port; same CA behind another MAC.
        assert sock.replace_fdb([FdbEntry(new_port, _mac(1))]) == []
        assert sock.replace_neigh([NeighEntry(bridge, "192.168.0.3", _mac(2))]) == []
    assert _static_master_macs(bridge_ns, "veth0") == set()
    assert _static_master_macs(bridge_ns, "veth2") == {_mac(1)}
    assert _permanent_neigh(bridge_ns, "br0") == {("192.168.0.3", _mac(2))}


def test_vxlan_remote_entries_and_flood_list(bridge_ns):
    vxlan = _ifindex(bridge_ns, "vx0")
    entries = [
        FdbEntry(vxlan, "00:00:00:00:00:00", master=False, dst="10.80.2.21"),
        FdbEntry(vxlan, "00:00:00:00:00:00", master=False, dst="10.80.2.22"),
        FdbEntry(vxlan, _mac(1), master=False, dst="10.80.2.22"),
    ]
    with NeighbourSocket(bridge_ns.name) as sock:
        assert sock.replace_fdb(entries) == []
        assert sock.replace_fdb(entries) == []  # idempotent, flood list not doubled
        shown = {(row["mac"], row["dst"], row["state"]) for row in _bridge_fdb(bridge_ns, "vx0")}
        assert shown == {(e.mac, e.dst, "static") for e in entries}
        assert set(sock.dump_fdb({vxlan})) == set(entries)
        # Deleting one remote of the flood list leaves the other.
        assert sock.delete_fdb(entries[:1]) == []
        assert set(sock.dump_fdb({vxlan})) == set(entries[1:])


def test_dump_sees_exactly_what_bridge_and_ip_show(bridge_ns):
    port, bridge = _ifindex(bridge_ns, "veth0"), _ifindex(bridge_ns, "br0")
    vxlan = _ifindex(bridge_ns, "vx0")
    # Entries made by iproute2, not by us, so the dump is checked against another writer.
    for i in range(50):
        bridge_ns.run("bridge", "fdb", "add", _mac(i), "dev", "veth0", "master", "static")
        bridge_ns.ip("neigh", "add", f"192.168.2.{i}", "lladdr", _mac(i), "dev", "br0", "nud", "permanent")
    bridge_ns.run("bridge", "fdb", "add", _mac(1, tag=7), "dev", "vx0", "dst", "10.80.2.30", "static")
    bridge_ns.run("bridge", "fdb", "add", _mac(2, tag=7), "dev", "vx0", "dst", "10.80.2.31")
    bridge_ns.ip("neigh", "add", "fd00::5", "lladdr", _mac(5), "dev", "br0", "nud", "permanent")
    # Neither of these is a record: a reachable (learnt) neighbour, a local bridge entry.
    bridge_ns.ip("neigh", "add", "192.168.3.1", "lladdr", _mac(1, tag=8), "dev", "br0", "nud", "reachable")
    bridge_ns.run("bridge", "fdb", "add", _mac(2, tag=8), "dev", "veth0", "master", "permanent")

    with NeighbourSocket(bridge_ns.name) as sock:
        fdb = sock.dump_fdb({port, vxlan})
        neigh4 = sock.dump_neigh({bridge}, family=socket.AF_INET)
        every_neigh = sock.dump_neigh()
        assert sock.dump_fdb({bridge}) == []  # only the bridge's own multicast filters

    expected_fdb = {FdbEntry(port, _mac(i)) for i in range(50)} | {
        FdbEntry(vxlan, _mac(1, tag=7), master=False, dst="10.80.2.30", static=True),
        FdbEntry(vxlan, _mac(2, tag=7), master=False, dst="10.80.2.31", static=False),
    }
    assert set(fdb) == expected_fdb and len(fdb) == len(expected_fdb)
    assert {(e.ip, e.mac) for e in neigh4} == _permanent_neigh(bridge_ns, "br0", "-4")
    assert {(e.ip, e.mac) for e in every_neigh} == _permanent_neigh(bridge_ns, "br0")
    assert ("fd00::5", _mac(5)) in {(e.ip, e.mac) for e in every_neigh}


def test_acks_dropped_by_a_full_receive_queue_are_recovered(bridge_ns):
    # A receive queue of a few KiB holds only a handful of acks, so the kernel drops
    # most of a 2,000-message batch's acks (ENOBUFS); every entry must still land and
    # a real error must still be reported.
    port = _ifindex(bridge_ns, "veth0")
    fdb = [FdbEntry(port, _mac(i)) for i in range(2000)]
    broken = FdbEntry(999_999, _mac(1, tag=9))
    with NeighbourSocket(bridge_ns.name, receive_buffer=4096) as sock:
        errors = sock.replace_fdb(fdb[:1000] + [broken] + fdb[1000:])
        assert [e.entry for e in errors] == [broken]
        assert sock.delete_fdb(fdb[:500]) == []
    assert _static_master_macs(bridge_ns, "veth0") == {e.mac for e in fdb[500:]}


def test_unknown_namespace_is_refused_with_its_name():
    with pytest.raises(OSError, match="no-such-namespace-x1"):
        NeighbourSocket("no-such-namespace-x1")


@pytest.mark.parametrize("sticky", [False, True], ids=["static", "sticky"])
def test_a_sticky_entry_stays_on_its_port_when_the_mac_sends_by_its_old_port(bridge_ns, make_netns, sticky):
    """A migration's source: the VM's entry moved to the tunnel (veth2 stands in for it,
    learning off as on a tunnel port) while the VM still sends by its old port (veth0)
    until that port is deleted. A static entry is learnt back onto the old port and
    flushed with it (the MAC is then unknown: flooded, which tunnel ports refuse); a
    sticky one, as the agent writes them (agent.kernel_model.Fdb), stays on the tunnel."""
    vm = make_netns()
    bridge_ns.ip("link", "add", "veth2", "type", "veth", "peer", "name", "veth3")
    bridge_ns.ip("link", "set", "veth2", "master", "br0")
    bridge_ns.run("bridge", "link", "set", "dev", "veth2", "learning", "off")
    for dev in ("veth2", "veth3"):
        bridge_ns.ip("link", "set", dev, "up")
    bridge_ns.ip("link", "set", "veth1", "netns", vm.name)
    vm_mac, tunnel = _mac(1), _ifindex(bridge_ns, "veth2")
    vm.ip("link", "set", "veth1", "address", vm_mac, "up")
    vm.ip("addr", "add", "192.168.9.2/24", "dev", "veth1")
    with NeighbourSocket(bridge_ns.name) as sock:
        assert sock.replace_fdb([FdbEntry(_ifindex(bridge_ns, "veth0"), vm_mac, sticky=sticky)]) == []
        assert sock.replace_fdb([FdbEntry(tunnel, vm_mac, sticky=sticky)]) == []  # the record moved
        vm.ping("192.168.9.9", count=2, wait=0.3)  # ARP requests from the VM's MAC, unanswered
        pulled_back = _static_master_macs(bridge_ns, "veth0") == {vm_mac}
        bridge_ns.ip("link", "del", "veth0")  # the source deletes the VM's port
        left = {(e.ifindex, e.mac, e.sticky) for e in sock.dump_fdb({tunnel})}
    if sticky:
        assert not pulled_back and left == {(tunnel, vm_mac, True)}, left
    else:  # the kernel's behaviour the agent must not rely on; also proves the VM's frames arrived
        assert pulled_back and left == set(), left
