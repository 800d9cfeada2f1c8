"""NVGRE over IPv6 PAs: what the agent asks of pyroute2 for an ip6gretap, and what it reads back.

No root and no kernel: the netlink request pyroute2 builds from the agent's arguments is
read as the kernel would receive it, and an ip6gretap as the kernel dumps it (encoded by
pyroute2 with the kernel's attributes) goes through the agent's observer. The kernel tier
(tests/kernel/test_ipv6.py) proves the same tunnels on the wire.
"""

from __future__ import annotations

import socket

from pyroute2.iproute.linux import get_arguments_processor
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from agent import naming
from agent.apply import gre_tunnel_spec
from agent.observe import _link_from_msg
from agent.plan import option_changes
from agent.tunnels import nvgre_tunnel

VSID = 7001
LOCAL, REMOTE = "fd00:80::20", "fd00:80::21"
KEY_FLAG_ON_THE_WIRE = b"\x20\x00"  # GRE_KEY, big-endian, as the kernel reads IFLA_GRE_IFLAGS


def tunnel():
    return nvgre_tunnel(VSID, LOCAL, REMOTE, naming.vsid_bridge(VSID), 1438)


def info_data(spec: dict) -> dict:
    """The IFLA_INFO_DATA attributes pyroute2 puts in the `link add` request for `spec`."""
    request = dict(get_arguments_processor("link", "add", {"ifname": "x", "kind": "ip6gretap", **spec}).items())
    linkinfo = dict((name, value) for name, value in request["IFLA_LINKINFO"]["attrs"])
    return dict(linkinfo.get("IFLA_INFO_DATA", {"attrs": []})["attrs"])


def test_an_ipv6_tunnel_is_created_with_its_addresses_key_and_no_encapsulation_limit():
    link = tunnel()
    assert link.kind == "ip6gretap"
    data = info_data(gre_tunnel_spec(link))
    assert data["IFLA_IP6GRE_LOCAL"] == LOCAL and data["IFLA_IP6GRE_REMOTE"] == REMOTE
    assert data["IFLA_IP6GRE_IKEY"] == data["IFLA_IP6GRE_OKEY"] == VSID << 8
    for direction in ("IFLA_IP6GRE_IFLAGS", "IFLA_IP6GRE_OFLAGS"):
        assert data[direction].to_bytes(2, "little" if socket.htons(1) != 1 else "big") == KEY_FLAG_ON_THE_WIRE
    assert data["IFLA_IP6GRE_FLAGS"] & 1, "without IP6_TNL_F_IGN_ENCAP_LIMIT the outer next header is 60, not GRE"
    assert data["IFLA_IP6GRE_TTL"] == naming.DEFAULT_TTL


def test_gre_names_would_reach_the_kernel_as_nothing():
    """Why the ip6gretap has its own shape: the gretap's argument names are dropped."""
    assert info_data({"gre_local": LOCAL, "gre_remote": REMOTE, "gre_ikey": VSID << 8}) == {}


def kernel_dump(link) -> ifinfmsg:
    """An RTM_NEWLINK for `link` as the kernel dumps an ip6gretap made from the agent's
    arguments (flags as given, plus the transmit/receive capability bits it adds)."""
    spec = gre_tunnel_spec(link)
    data = [(f"IFLA_IP6GRE_{k.removeprefix('ip6gre_').upper()}", v) for k, v in spec.items()]
    data = [(k, v | 0x30000) if k == "IFLA_IP6GRE_FLAGS" else (k, v) for k, v in data]
    data.append(("IFLA_IP6GRE_ENCAP_LIMIT", 0))
    msg = ifinfmsg()
    msg["index"] = 7
    msg["attrs"] = [("IFLA_IFNAME", link.name), ("IFLA_IFALIAS", link.alias), ("IFLA_MTU", 1438),
                    ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "ip6gretap"),
                                                 ("IFLA_INFO_DATA", {"attrs": data})]})]
    msg.encode()
    back = ifinfmsg(msg.data)
    back.decode()
    return back


def test_an_ipv6_tunnel_read_back_matches_the_desired_one():
    """Otherwise every reconcile would delete and recreate every IPv6 tunnel."""
    want = tunnel()
    have = _link_from_msg(kernel_dump(want), {})
    assert have.option("local") == LOCAL and have.option("remote") == REMOTE
    assert have.option("ikey") == have.option("okey") == VSID << 8
    assert option_changes(want, have) == []
