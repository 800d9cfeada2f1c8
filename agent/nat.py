"""NAT on a gateway host: the one nftables table the agent owns, ``inet openhnv``.

Owns building, reading back and replacing that table, through nft's JSON API
(``nft -j -f -``, the nftables project's own documented interface; the Debian Python
binding ``python3-nftables`` wraps the same library but lives outside the agent's venv, so
the ``nft`` binary is driven instead, one process per change). It never lists, flushes
or deletes any other table: the replacement is ``add table; delete table; add table ...``
on ``inet openhnv`` alone, in ONE transaction, so the kernel swaps the old rules for the
new ones atomically (or keeps the old ones if anything is refused).

What the table holds, per leg of the gateway role (agent.state.GatewayLeg):

- chain ``zone`` (prerouting, priority raw, before conntrack): ``ct zone set iifname
  map {...}`` puts every packet entering a routing domain's devices (its VRF, VSID
  bridges, back-end port and front-end leg) into the conntrack zone numbered like the
  routing domain. Why zones and not a namespace per tenant router: the VRFs already are
  the tenant routers (the same devices the distributed router uses), and a namespace per
  tenant would need a second copy of the VSID bridges or a veth into it per VM network;
  a zone is one map entry. Overlapping tenants (two VRFs with 192.168.0.0/24 and the same
  back-end address) then never share a conntrack entry, so a reply is de-NATed only
  into the VRF its connection came from. With a VRF, IPv4 prerouting runs twice, first
  with the enslaved device as iif, then with the VRF device; the map names both so the
  zone is the same on either pass. On Debian 12's kernel (6.1, since the 2021 revert of
  "vrf: Reset skb conntrack connection on VRF rcv") the entry made on the first pass is
  the one that counts, so NAT is done on it: DNAT rules match the leg as iif;
- chain ``dnat`` (prerouting, dstnat): per NAT rule of a ``nat`` leg,
  ``iifname <leg> ip daddr <leg address> <proto> dport <external> dnat to <CA>:<port>``;
- chain ``snat`` (postrouting, srcnat): per ``nat`` leg, ``oifname <leg> snat to <leg
  address>``: everything leaving the VM network through its leg. ``forwarding`` legs get
  no NAT rule, only their zone.

Drift: the first rule carries the comment ``openhnv:<digest of the document>``; the
table is read back as (digest, number of rules), so a table deleted or a rule added or
removed by hand is noticed and the table replaced. A rule edited in place under the same
count is not seen.

No netlink, no plan: agent.plan decides whether a table is wanted, agent.apply calls
`replace_table` / `delete_table`, agent.reconcile calls `observe_table`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from typing import Any

from agent.kernel_model import NatTable
from agent.netns import netns_exec_argv

FAMILY = "inet"
TABLE = "openhnv"
COMMENT_PREFIX = "openhnv:"
# One process, normally milliseconds; the first one on a host loads nf_tables, conntrack
# and NAT modules, which takes minutes on an emulated CPU under load.
NFT_TIMEOUT_S = 300
ZONE_PRIORITY = -300  # raw: before conntrack (-200) looks the packet up
DNAT_PRIORITY = -100  # dstnat
SNAT_PRIORITY = 100  # srcnat


class NftError(OSError):
    """nft refused a document or could not run; the message is nft's own."""


def _table() -> dict[str, str]:
    return {"family": FAMILY, "name": TABLE}


def _chain(name: str, kind: str, hook: str, priority: int) -> dict[str, Any]:
    return {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": name, "type": kind,
                              "hook": hook, "prio": priority, "policy": "accept"}}}


def _rule(chain: str, expr: list[dict[str, Any]], comment: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"family": FAMILY, "table": TABLE, "chain": chain, "expr": expr}
    if comment:
        rule["comment"] = comment
    return {"add": {"rule": rule}}


def _match(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def table_rules(zones: dict[str, int], snat: list[tuple[str, str]],
                dnat: list[tuple[str, str, str, int, str, int]]) -> list[dict[str, Any]]:
    """The rules (nft JSON commands, chains included) for `zones` (device -> conntrack
    zone), `snat` ((leg device, leg address)) and `dnat` ((leg device, leg address,
    protocol, external port, CA, port)). Sorted inputs give the same document every time."""
    commands: list[dict[str, Any]] = [_chain("zone", "filter", "prerouting", ZONE_PRIORITY)]
    if zones:
        commands.append(_rule("zone", [{"mangle": {
            "key": {"ct": {"key": "zone"}},
            "value": {"map": {"key": _meta("iifname"),
                              "data": {"set": [[device, zone] for device, zone in sorted(zones.items())]}}},
        }}]))
    commands.append(_chain("dnat", "nat", "prerouting", DNAT_PRIORITY))
    for leg, address, protocol, external_port, target, port in sorted(dnat):
        commands.append(_rule("dnat", [
            _match(_meta("iifname"), leg),
            _match(_payload("ip", "daddr"), address),
            _match(_payload(protocol, "dport"), external_port),
            {"dnat": {"family": "ip", "addr": target, "port": port}},
        ]))
    commands.append(_chain("snat", "nat", "postrouting", SNAT_PRIORITY))
    for leg, address in sorted(snat):
        commands.append(_rule("snat", [_match(_meta("oifname"), leg),
                                       {"snat": {"family": "ip", "addr": address}}]))
    return commands


def nat_table(zones: dict[str, int], snat: list[tuple[str, str]],
              dnat: list[tuple[str, str, str, int, str, int]]) -> NatTable:
    """The desired table: its digest, its rule count and the commands that build it."""
    commands = table_rules(zones, snat, dnat)
    digest = hashlib.sha1(json.dumps(commands, sort_keys=True).encode()).hexdigest()[:12]
    # The digest rides on the first rule as its comment: a chain-only table (no zone,
    # no NAT) is never wanted, a gateway role always has a leg, so there is a zone rule.
    rules = [c for c in commands if "rule" in c["add"]]
    if rules:
        rules[0]["add"]["rule"]["comment"] = COMMENT_PREFIX + digest
    summary = f"{len(zones)} zone devices, {len(snat)} snat, {len(dnat)} dnat"
    return NatTable(digest=digest, rules=len(rules), commands=tuple(json.dumps(c) for c in commands),
                    summary=summary)


def _run(netns: str | None, argv: list[str], document: str | None = None) -> subprocess.CompletedProcess[str]:
    full = netns_exec_argv(netns, argv)
    try:
        return subprocess.run(full, input=document, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"{' '.join(argv)}: {exc}") from exc


def replace_table(netns: str | None, table: NatTable) -> None:
    """Swap the agent's table for `table`, atomically (one nft transaction)."""
    commands = [{"add": {"table": _table()}}, {"delete": {"table": _table()}},
                {"add": {"table": _table()}}, *(json.loads(c) for c in table.commands)]
    proc = _run(netns, ["nft", "-j", "-f", "-"], json.dumps({"nftables": commands}))
    if proc.returncode != 0:
        raise NftError(f"nft refused the {FAMILY} {TABLE} table: {proc.stderr.strip()}")


def delete_table(netns: str | None) -> None:
    """Delete the agent's table (and only it); already gone is fine."""
    commands = [{"add": {"table": _table()}}, {"delete": {"table": _table()}}]
    proc = _run(netns, ["nft", "-j", "-f", "-"], json.dumps({"nftables": commands}))
    if proc.returncode != 0:
        raise NftError(f"nft could not delete the {FAMILY} {TABLE} table: {proc.stderr.strip()}")


def observe_table(netns: str | None) -> NatTable | None:
    """The agent's table as the kernel holds it (digest from the first rule's comment,
    rule count), or None when there is none. A host without nft cannot hold one."""
    if shutil.which("nft") is None:
        return None
    proc = _run(netns, ["nft", "-j", "list", "table", FAMILY, TABLE])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NftError(f"nft could not read the {FAMILY} {TABLE} table: {proc.stderr.strip()}")
    items = json.loads(proc.stdout).get("nftables", [])
    rules = [item["rule"] for item in items if "rule" in item]
    comments = [r.get("comment", "") for r in rules if str(r.get("comment", "")).startswith(COMMENT_PREFIX)]
    digest = comments[0][len(COMMENT_PREFIX):] if comments else ""
    return NatTable(digest=digest, rules=len(rules))
