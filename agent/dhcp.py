"""DHCP answered on the host: one dnsmasq per VSID bridge with local VMs (DHCPv4, or
router advertisements and DHCPv6 on an IPv6 VM subnet).

As VMM's DHCP switch extension does on a Hyper-V host, the host answers its own VMs'
DHCPv4 requests with what the controller allocated: the VM's MAC gets exactly its CA,
the subnet's gateway (option 3), the pool's DNS servers (option 6), the lease time and
the tenant MTU (option 26). dnsmasq (a well-kept server, Debian's ``dnsmasq-base``) does
the protocol; this module manages it like a kernel object:

- desired (`desired_servers`): one server per IPv4 VSID bridge with at least one local
  VM port that has a CA; its config and its hosts file are rendered from the HostState.
  Only this host's own VMs are in the hosts file, there is no dynamic range and unknown
  MACs are ignored (``dhcp-ignore=tag:!known``): they get nothing, not even a NAK.
- observed (`observe_servers`): the files under the run directory (``<bridge>.conf``,
  ``.hosts``, ``.pid``, ``.loaded``; the directory 0700, the files 0600) and the process
  named by the pid file, which counts as ours only while its command line is dnsmasq
  with our config file. A dnsmasq the agent did not start is never signalled.
- planned (`plan_servers`): start (none running: a new bridge, or killed by hand),
  restart (the config changed: address, gateway, DNS, MTU, lease time), reload (only the
  hosts changed: a VM arrived or left; SIGHUP re-reads the hosts file, no restart) and
  stop (the bridge has no VM left, or is gone). Operations are `agent.plan.Op`s of kind
  ``dhcp``.
- applied (`DhcpManager.apply`): each operation on its own; a failure is an
  `agent.apply.ObjectError` of kind ``dhcp`` and does not stop the others.

dnsmasq binds to the bridge alone (``interface`` + ``bind-interfaces``, so several
instances share port 67 and each is bound to its device, which works inside a VRF: the
socket is bound to the VRF's port, the bridge, which owns the gateway address the
replies come from). Replies to a client with no address yet are always broadcast (``dhcp-broadcast``): a
unicast reply would have dnsmasq write the VM's ARP entry itself, over the agent's
permanent neighbour for that CA. It leaves no lease file (``leasefile-ro``) and is
authoritative, so
a VM that renews or rebinds at a host whose server never saw it (after a migration, or
after a restart) is answered from the static entry and keeps its address.

Nothing DHCP, ARP or neighbour discovery enters a tunnel. A VM's broadcast never
reaches a tunnel port (bcast_flood off, see agent.kernel_model), but a bridge floods a
broadcast it sends itself (a reply to any client: see above; the host's own ARP for a CA
no record names) to every port whatever the flood flags say, and forwards a *unicast*
ARP request or neighbour solicitation (a VM re-validating a stale neighbour sends one to
the MAC it knows) through the tunnel port its FDB entry names, while neigh_suppress has
already answered it on the host from the lookup records. So, while the host has any VM
network (or any server runs), the nftables table ``bridge openhnv_tunnel_guard`` drops,
leaving through a tunnel port (``hnvt*``, ``hnvx*``, flow mode's ``hnvq*``), both what
the host sends and what it forwards: DHCP and DHCPv6 (UDP 67, 68, 546, 547), ARP, and
ICMPv6 router and neighbour discovery (types 133-137). As on a Hyper-V switch, every
tenant ARP and neighbour solicitation is answered on the host or not at all. The table
is checked and repaired like the servers (operations of kind ``tunnel-guard``).

dnsmasq runs with ``user=root`` and an empty ``group=``: it re-reads the hosts file on
SIGHUP after dropping privileges, and the file is owner-only (root) in a 0700 directory.
Without ``group=`` it would switch to group ``dip`` (``setgroups``, ``setgid``), which
needs CAP_SETGID; the agent's unit does not grant it, and dnsmasq exited 5 ("failed to
change group-id to dip") on every booted host. Its router advertisements open a raw
ICMPv6 socket, so the unit grants CAP_NET_RAW.

It may not touch netlink (agent.observe, agent.apply) nor decide what the kernel holds
(agent.plan); it only starts, signals and stops the processes it started.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from agent import naming
from agent.apply import ObjectError
from agent.netns import namespace_key, netns_exec_argv
from agent.plan import Op, tenant_mtu
from agent.state import HostState, Ipv6Assignment
from agent.text import printable

log = logging.getLogger("openhnv.agent.dhcp")

DNSMASQ = "dnsmasq"
NFT = "nft"
DEFAULT_RUN_DIR = Path("/run/openhnv")
DEFAULT_LEASE_TIME = 3600  # seconds, when the VM subnet names none
GUARD_TABLE = "openhnv_tunnel_guard"
LEGACY_GUARD_TABLE = "openhnv_dhcp"  # the guard's name when it kept out DHCP alone: replaced
DHCP_PORTS = (67, 68, 546, 547)  # DHCPv4 server, client; DHCPv6 client, server
TUNNEL_PORT_PATTERNS = (naming.PREFIX + "t*", naming.PREFIX + "x*", naming.PREFIX + "q*")  # gretap, VXLAN, flow
# Router solicitation and advertisement, neighbour solicitation and advertisement, redirect.
ND_TYPES = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert", "nd-redirect")
# Router advertisements: every 10 s unsolicited (a VM's solicitation is answered at once),
# the default router valid for 30 minutes, refreshed by every advertisement.
RA_INTERVAL_S = 10
RA_ROUTER_LIFETIME_S = 1800
STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0


def run_dir_for(netns: str | None, base: Path = DEFAULT_RUN_DIR) -> Path:
    """The DHCP run directory of the agent of one namespace (None: the agent's own), one per
    namespace: the servers' files are named by bridge (agent.netns.namespace_key)."""
    return base / "dhcp" / namespace_key(netns)


# --- desired ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DhcpServer:
    """One dnsmasq instance as it should run: its config and its hosts file, rendered."""

    bridge: str
    config: str
    hosts: str

    @property
    def config_hash(self) -> str:
        return _digest(self.config)

    @property
    def hosts_hash(self) -> str:
        return _digest(self.hosts)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServerFiles:
    """Where one bridge's server keeps its files in the run directory."""

    run_dir: Path
    bridge: str

    def _path(self, suffix: str) -> Path:
        return self.run_dir / f"{self.bridge}.{suffix}"

    @property
    def config(self) -> Path:
        return self._path("conf")

    @property
    def hosts(self) -> Path:
        return self._path("hosts")

    @property
    def pid(self) -> Path:
        return self._path("pid")

    @property
    def loaded(self) -> Path:  # the hash of the hosts file the running server has read
        return self._path("loaded")

    def all(self) -> tuple[Path, ...]:
        return (self.config, self.hosts, self.pid, self.loaded)


def desired_servers(state: HostState, run_dir: Path) -> dict[str, DhcpServer]:
    """bridge -> the server it needs: VSID bridges with a local VM port that has a CA
    (DHCPv4 on an IPv4 VM subnet; router advertisements and DHCPv6 on an IPv6 one)."""
    by_vsid: dict[int, list[tuple[str, IPv4Address | IPv6Address]]] = {}
    for port in state.ports:
        if port.vsid is None or port.ca is None:
            continue
        by_vsid.setdefault(port.vsid, []).append((port.mac, port.ca.ip))
    servers: dict[str, DhcpServer] = {}
    for vsid, vms in sorted(by_vsid.items()):
        subnet = state.subnet_of(vsid)
        if subnet is None or subnet.gateway is None:
            continue  # without the bridge's own address in the subnet there is nothing to answer from
        if subnet.ipv6_assignment is Ipv6Assignment.SLAAC:
            entries = [mac for mac, _ in vms]  # known (DNS servers), but no address to hand out
        else:
            entries = [f"{mac},{ca}" if ca.version == 4 else f"{mac},[{ca}]" for mac, ca in vms]
        bridge = naming.vsid_bridge(vsid)
        files = ServerFiles(run_dir, bridge)
        lease = subnet.lease_time or DEFAULT_LEASE_TIME
        common = [
            f"interface={bridge}",
            "bind-interfaces",
            "port=0",  # no DNS service: DHCP only
            "no-resolv",
            "no-hosts",
            "user=root",
            "group=",  # keep root's group: no setgid (the module's docstring says why)
            f"pid-file={files.pid}",
            "leasefile-ro",
            "dhcp-authoritative",
        ]
        if subnet.prefix.version == 4:
            options = [f"dhcp-option=option:router,{subnet.gateway}"]
            if subnet.dns_servers:
                options.append("dhcp-option=option:dns-server," + ",".join(map(str, subnet.dns_servers)))
            options.append(f"dhcp-option=option:mtu,{tenant_mtu(state, vsid)}")
            lines = [
                f"# openhnv: DHCP for VSID {vsid} on {bridge}; written by the agent, overwritten on change",
                *common,
                "no-ping",
                # Replies to a client without an address are broadcast: a unicast one would
                # make dnsmasq write the VM's ARP entry itself (SIOCSARP), turning the agent's
                # permanent neighbour for that CA stale: drift, repaired on every exchange.
                # The guard keeps these broadcasts out of the tunnels.
                "dhcp-broadcast",
                f"dhcp-range={subnet.prefix.network_address},static,{subnet.prefix.netmask},{lease}",
            ]
        else:
            # The distributed router advertises itself (the bridge's link-local address,
            # from the VSID's gateway MAC: the same on every host, so a migrated VM keeps
            # its default router) with the tenant MTU and the managed flag: the address
            # comes from DHCPv6, exactly the CA the controller allocated (static: no
            # dynamic range; a prefix without the autonomous flag, so no SLAAC address).
            # A SLAAC subnet (Ipv6Assignment.SLAAC) instead sets the autonomous flag and the
            # other-configuration flag (ra-stateless): each VM forms its CA from the /64 and
            # its MAC, which is the CA the controller derived the same way, and asks DHCPv6
            # only for the DNS servers.
            slaac = subnet.ipv6_assignment is Ipv6Assignment.SLAAC
            options = []
            if subnet.dns_servers:
                options.append("dhcp-option=option6:dns-server," + ",".join(f"[{a}]" for a in subnet.dns_servers))
            mode = "ra-stateless" if slaac else "static"
            lines = [
                f"# openhnv: router advertisements and {'stateless ' if slaac else ''}DHCPv6 for VSID {vsid} "
                f"on {bridge}; written by the agent, overwritten on change",
                *common,
                "enable-ra",
                f"ra-param={bridge},mtu:{tenant_mtu(state, vsid)},{RA_INTERVAL_S},{RA_ROUTER_LIFETIME_S}",
                f"dhcp-range={subnet.prefix.network_address},{mode},{subnet.prefix.prefixlen},{lease}",
            ]
        config = "\n".join([
            *lines,
            "dhcp-ignore=tag:!known",
            *options,
            f"dhcp-hostsfile={files.hosts}",
            "",
        ])
        hosts = "".join(f"{entry}\n" for entry in sorted(entries))
        servers[bridge] = DhcpServer(bridge, config, hosts)
    return servers


# --- observed --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningServer:
    """What the run directory and /proc say of one bridge's server."""

    bridge: str
    pid: int | None  # None: no process of ours (never started, exited or killed)
    config_hash: str | None
    hosts_hash: str | None  # of the hosts file the process last read (start or SIGHUP)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _our_pid(files: ServerFiles) -> int | None:
    """The pid in the pid file if that process is a dnsmasq running our config file."""
    text = _read(files.pid)
    if text is None or not text.strip().isdigit():
        return None
    pid = int(text.strip())
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or os.path.basename(argv[0].decode(errors="replace")) != DNSMASQ:
        return None
    if f"--conf-file={files.config}".encode() not in argv:
        return None
    return pid


def observe_servers(run_dir: Path) -> dict[str, RunningServer]:
    found: dict[str, RunningServer] = {}
    if not run_dir.is_dir():
        return found
    for config in sorted(run_dir.glob("*.conf")):
        files = ServerFiles(run_dir, config.name[: -len(".conf")])
        text = _read(files.config)
        found[files.bridge] = RunningServer(
            bridge=files.bridge,
            pid=_our_pid(files),
            config_hash=_digest(text) if text is not None else None,
            hosts_hash=(_read(files.loaded) or "").strip() or None,
        )
    return found


# --- planned ---------------------------------------------------------------------------


def plan_servers(desired: dict[str, DhcpServer], observed: dict[str, RunningServer]) -> list[Op]:
    ops: list[Op] = []
    for bridge, server in sorted(desired.items()):
        have = observed.get(bridge)
        if have is None or have.pid is None:
            detail = "not running" if have is not None else "new"
            ops.append(Op("start", "dhcp", bridge, server, have, detail))
        elif have.config_hash != server.config_hash:
            ops.append(Op("restart", "dhcp", bridge, server, have, "config changed"))
        elif have.hosts_hash != server.hosts_hash:
            ops.append(Op("reload", "dhcp", bridge, server, have,
                          f"{server.hosts.count(chr(10))} VM(s): hosts file re-read on SIGHUP"))
    for bridge, have in sorted(observed.items()):
        if bridge not in desired:
            ops.append(Op("stop", "dhcp", bridge, None, have, "no VM left on the bridge"))
    return ops


def guard_ruleset() -> str:
    """The nftables table keeping DHCP, ARP and neighbour discovery out of the tunnel ports."""
    ports = ", ".join(map(str, DHCP_PORTS))
    rules = "".join(f'\t\toifname "{pattern}" udp dport {{ {ports} }} drop\n'
                    f'\t\toifname "{pattern}" ether type arp drop\n'
                    f'\t\toifname "{pattern}" icmpv6 type {{ {", ".join(ND_TYPES)} }} drop\n'
                    for pattern in TUNNEL_PORT_PATTERNS)
    chains = "".join(
        f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority 0; policy accept;\n{rules}\t}}\n"
        for hook in ("output", "forward")
    )
    return f"table bridge {GUARD_TABLE} {{\n{chains}}}\n"


# --- applied ---------------------------------------------------------------------------


class DhcpManager:
    """Observe, plan and apply the DHCP servers of one namespace's agent."""

    def __init__(self, netns: str | None, run_dir: Path):
        self.netns = netns
        self.run_dir = run_dir
        # Whether the guard may be in the kernel: unknown (listed once) until a plan saw it
        # absent and unwanted; a host without VM networks then runs no nft per reconcile.
        self._guard_maybe = True

    def plan(self, state: HostState) -> list[Op]:
        desired = desired_servers(state, self.run_dir)
        ops = plan_servers(desired, observe_servers(self.run_dir))
        guard = self._guard_op(bool(desired) or any(domain.subnets for domain in state.routing_domains))
        # The guard before any server starts, and removed only after the last one stopped.
        return ([guard] if guard and guard.action == "add" else []) + ops + \
            ([guard] if guard and guard.action == "delete" else [])

    def apply(self, ops: list[Op]) -> tuple[int, list[ObjectError]]:
        applied, errors = 0, []
        for op in ops:
            try:
                getattr(self, f"_{op.action}_{op.kind}".replace("-", "_"))(op)
                applied += 1
                log.info("dhcp: %s", op.describe())
            except (OSError, subprocess.SubprocessError, DhcpError) as exc:
                errors.append(ObjectError(op.kind, op.name, getattr(exc, "errno", None),
                                          f"{op.action}: {printable(exc)}"))
        return applied, errors

    # --- the nftables guard ------------------------------------------------------------

    def _nft(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = netns_exec_argv(self.netns, [NFT, *args])
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        except OSError as exc:  # nft (or ip) not installed: a failed command, reported by apply
            return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: {exc.strerror}")
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"{NFT}: no answer within {START_TIMEOUT_S:g} s")

    def _guard_op(self, wanted: bool) -> Op | None:
        if not wanted and not self._guard_maybe:
            return None
        listed = self._nft("list", "table", "bridge", GUARD_TABLE)
        present = listed.returncode == 0
        complete = present and listed.stdout.count(" drop") == guard_ruleset().count(" drop")
        self._guard_maybe = wanted or present
        if wanted and not complete:
            return Op("add", "tunnel-guard", GUARD_TABLE,
                      detail="drop DHCP, ARP and neighbour discovery leaving through tunnel ports")
        if not wanted and present:
            return Op("delete", "tunnel-guard", GUARD_TABLE)
        return None

    def _add_tunnel_guard(self, op: Op) -> None:
        # One nft transaction: an old or partial table (or the guard's former name) is
        # replaced atomically.
        script = "".join(f"table bridge {table}\ndelete table bridge {table}\n"
                         for table in (GUARD_TABLE, LEGACY_GUARD_TABLE)) + guard_ruleset()
        self._check(self._nft("-f", "-", stdin=script), "nft")

    def _delete_tunnel_guard(self, op: Op) -> None:
        self._check(self._nft("delete", "table", "bridge", GUARD_TABLE), "nft")

    # --- the servers -------------------------------------------------------------------

    def _files(self, bridge: str) -> ServerFiles:
        return ServerFiles(self.run_dir, bridge)

    def _write(self, path: Path, text: str) -> None:
        """Owner-only, replaced atomically (a reader never sees half a file)."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        partial = path.with_name(path.name + ".new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(partial, path)

    def _start_dhcp(self, op: Op) -> None:
        server: DhcpServer = op.desired
        files = self._files(server.bridge)
        files.pid.unlink(missing_ok=True)
        self._write(files.config, server.config)
        self._write(files.hosts, server.hosts)
        # dnsmasq forks into the background and its first process exits once the server
        # is bound (or with the reason it could not start).
        argv = netns_exec_argv(self.netns, [DNSMASQ, f"--conf-file={files.config}"])
        self._check(subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S), DNSMASQ)
        self._write(files.loaded, server.hosts_hash)

    def _restart_dhcp(self, op: Op) -> None:
        self._signal_and_wait(op.observed.pid)
        self._start_dhcp(op)

    def _reload_dhcp(self, op: Op) -> None:
        server: DhcpServer = op.desired
        files = self._files(server.bridge)
        self._write(files.hosts, server.hosts)
        os.kill(op.observed.pid, signal.SIGHUP)
        self._write(files.loaded, server.hosts_hash)

    def _stop_dhcp(self, op: Op) -> None:
        if op.observed.pid is not None:
            self._signal_and_wait(op.observed.pid)
        for path in self._files(op.name).all():
            path.unlink(missing_ok=True)

    def _signal_and_wait(self, pid: int) -> None:
        """SIGTERM our dnsmasq and wait until it is gone (its socket freed for the next one)."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return
            time.sleep(0.05)
        raise DhcpError(f"dnsmasq {pid} did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM")

    @staticmethod
    def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            reason = (result.stderr or result.stdout).strip().splitlines()
            raise DhcpError(f"{what} exited {result.returncode}: {reason[-1] if reason else 'no message'}")


class DhcpError(Exception):
    """dnsmasq or nft refused, or a server would not stop."""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
