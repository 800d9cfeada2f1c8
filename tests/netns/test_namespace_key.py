"""Agents sharing one machine keep their files apart (agent.netns.namespace_key).

The netns lab runs every host's agent on one machine, each forked into its host's
namespace with no `--netns`, and their DHCP servers' files are named by bridge, which has
the same name on every host: seven agents once shared /run/openhnv/dhcp/host and deleted
each other's dnsmasq configuration. Each namespace now has a directory of its own, the
same for every process in it.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.dhcp import run_dir_for
from agent.netns import in_netns, namespace_key


def test_agents_in_two_namespaces_get_two_run_directories_and_one_each(make_netns):
    a, b = make_netns(), make_netns()
    base = Path("/run/openhnv")
    here_a, here_b = (in_netns(ns.name, lambda: run_dir_for(None, base)) for ns in (a, b))
    assert here_a != here_b
    assert here_a == in_netns(a.name, lambda: run_dir_for(None, base)), "not stable within one namespace"
    inode = in_netns(a.name, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert here_a == base / "dhcp" / f"net-{inode}"
    # An agent given --netns is named by it, wherever it runs.
    assert run_dir_for(a.name, base) == base / "dhcp" / a.name == base / "dhcp" / namespace_key(a.name)
