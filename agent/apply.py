"""Apply: the only code that writes to the kernel.

Owns carrying out a `Plan` (agent.plan) on one namespace's sockets: a pyroute2 IPRoute
for links, VLANs, addresses and routes, and a netlink_batch NeighbourSocket for FDB and
neighbour entries (batched: 10,000 lookup records in one round of sends). Both are
opened once per namespace by the caller and reused.
A gateway host's nftables table is written through agent.nat (nft's JSON API, one
transaction), the one write that is not netlink.

Rules:
- idempotent verbs: ``replace`` for routes, FDB and neighbours; EEXIST on an add means
  "already there" and the link is converged with ``set``; ENODEV/ENOENT on a delete
  means "already gone";
- kernel errno values become typed errors at this boundary (ENODEV -> InterfaceNotFound,
  ...), recorded per object as an `ObjectError`, never escaping the loop: one refused
  tunnel does not stop the other 999;
- a link is converged in a fixed order: alias, MTU and MAC, kind settings, master, port
  flags, then up. MTU before master, because a port with a bigger MTU than its bridge
  would raise nothing but a smaller one lowers the bridge's; master before port flags,
  because port flags only exist on a port; up last, so nothing forwards half-configured.
- a NIC joins a bond only while down (the bonding driver refuses an up device with
  EPERM), so a team member is set down, enslaved, then up again.

It may not decide what to do (that is the plan) and never deletes what the plan did not
name. Lab ports (kind namespace): the agent plays the hypervisor and builds the VM's end
in the VM's namespace: a veth whose host end is the port and whose VM end is ``eth0``
with the VM's MAC, CA and a default route via the gateway. A namespace the agent had to
create is marked as openhnv's (agent.netns.ensure_vm_netns); when the plan deletes the
port (the VM left the host), a namespace bearing that mark for this port is removed with
it, and a namespace that was there before the agent is only emptied of ``eth0``. A VM
migrating between two hosts of one lab has a NIC on both for a while (make-before-break):
the destination adds its NIC (``eth1`` when ``eth0`` is the source's) and never deletes
the source's, which goes when the source deletes its port.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent import naming, nat
from agent.flowmode import PORTS, REMOTES, VSIDS, FlowDatapath, FlowModeError, MapWrite, port_value, remote_key, remote_value, u32
from agent.kernel_model import Address, BridgeVlan, Fdb, Link, Neighbour, Route
from agent.netlink_batch import EntryError, FdbEntry, NeighbourSocket, NeighEntry
from agent.netns import ensure_vm_netns, in_netns, netns_name_of_nsid, remove_netns, vm_netns_marker_of
from agent.plan import Op, Plan
from agent.tunnels import ENCAPLIMIT_NONE, GRE_KEY_FLAG, IP6_TNL_F_IGN_ENCAP_LIMIT

log = logging.getLogger("openhnv.agent.apply")


def gre_tunnel_spec(link: Link) -> dict[str, Any]:
    """pyroute2 `link add` arguments of an NVGRE tunnel (a gretap or an ip6gretap).

    pyroute2 names the attributes of an ip6gretap ``ip6gre_*`` and silently leaves out
    ``gre_*`` ones, and types its flags as a host-order u16 where a gretap's are
    big-endian: hence the two shapes, and htons on the ip6gretap's GRE_KEY flag."""
    opt = dict(link.options)
    if link.kind == "gretap":
        return dict(gre_local=opt["local"], gre_remote=opt["remote"],
                    gre_ikey=opt["ikey"], gre_okey=opt["okey"],
                    gre_iflags=GRE_KEY_FLAG, gre_oflags=GRE_KEY_FLAG,
                    gre_ttl=opt["ttl"], gre_pmtudisc=opt["pmtudisc"])
    key_flag = socket.htons(GRE_KEY_FLAG)
    spec = dict(ip6gre_local=opt["local"], ip6gre_remote=opt["remote"],
                ip6gre_ikey=opt["ikey"], ip6gre_okey=opt["okey"],
                ip6gre_iflags=key_flag, ip6gre_oflags=key_flag, ip6gre_ttl=opt["ttl"])
    if opt.get("encaplimit") == ENCAPLIMIT_NONE:
        spec["ip6gre_flags"] = IP6_TNL_F_IGN_ENCAP_LIMIT
    return spec

BRIDGE_FLAGS_SELF = 2
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
LINK_ROLES = {naming.TEAM, "member", naming.SWITCH, naming.PROVIDER, naming.VRF,
              naming.BRIDGE, naming.TUNNEL, naming.VXLAN, naming.FLOW_TUNNEL, naming.FLOW_PORT,
              naming.PORT, "external", naming.FRONTEND, naming.LEG, naming.BACKEND}
# Per-device IPv4 settings written through /proc/sys/net/ipv4/conf/<device>/<name>.
IPV4_CONF_SETTINGS = ("forwarding", "rp_filter", "arp_notify")
# And IPv6 ones, through /proc/sys/net/ipv6/conf/<device>/<name>.
IPV6_CONF_SETTINGS = ("disable_ipv6", "accept_ra")
FLOW_MAP_KINDS = ("flowvsid", "flowremote")  # map ops; "flowport" is the link role


# --- typed errors ----------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectError:
    """One object the kernel refused: its kind, name, errno and a readable reason."""

    kind: str
    object: str
    errno: int | None
    message: str


class KernelError(Exception):
    """A kernel refusal, typed by errno at the netlink boundary."""

    errno: int | None = None

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class InterfaceNotFound(KernelError):
    errno = errno_codes.ENODEV


class ObjectExists(KernelError):
    errno = errno_codes.EEXIST


class NotPermitted(KernelError):
    errno = errno_codes.EPERM


class DeviceBusy(KernelError):
    errno = errno_codes.EBUSY


class InvalidArgument(KernelError):
    errno = errno_codes.EINVAL


class NotSupported(KernelError):
    errno = errno_codes.EOPNOTSUPP


_BY_ERRNO: dict[int, type[KernelError]] = {
    errno_codes.ENODEV: InterfaceNotFound, errno_codes.ENOENT: InterfaceNotFound,
    errno_codes.EEXIST: ObjectExists, errno_codes.EPERM: NotPermitted,
    errno_codes.EBUSY: DeviceBusy, errno_codes.EINVAL: InvalidArgument,
    errno_codes.EOPNOTSUPP: NotSupported,
}


def typed_error(code: int, what: str) -> KernelError:
    """The KernelError subclass for errno `code`, its message naming `what`."""
    cls = _BY_ERRNO.get(code, KernelError)
    name = errno_codes.errorcode.get(code, str(code))
    return cls(f"{what}: {os.strerror(code)} ({name})", code)


_GONE = (errno_codes.ENODEV, errno_codes.ENOENT, errno_codes.EADDRNOTAVAIL, errno_codes.ESRCH)


# --- namespaces ----------------------------------------------------------------------------


def write_sysctl(netns: str | None, path: str, value: int) -> None:
    def write() -> None:
        with open(path, "w") as handle:
            handle.write(str(value))
    in_netns(netns, write)


# --- the applier -----------------------------------------------------------------------


class Applier:
    """Carries out plans on one namespace. Not thread-safe: one reconcile at a time."""

    def __init__(self, ipr: IPRoute, records: NeighbourSocket, netns: str | None = None, host: str = ""):
        self.ipr = ipr
        self.records = records
        self.netns = netns
        self.host = host  # the HostState's host: part of the mark on a VM namespace made here
        self._index: dict[str, int] = {}
        self.flow = FlowDatapath(netns)
        # (VM, namespace, NIC) of each lab VM end made here whose guest asks DHCP for its
        # address: the reconciler starts their clients once the DHCP servers run (agent.guest).
        self.dhcp_guests: list[tuple[str, str, str]] = []

    # -- the loop --------------------------------------------------------------------

    def apply(self, plan: Plan, indexes: dict[str, int] | None = None) -> tuple[int, list[ObjectError]]:
        """Carry out every op; returns (ops applied, errors). Never raises for a kernel
        refusal of one object. `indexes` (name -> ifindex) spares the dump of every link
        that otherwise fills the index: a plan of a few links (agent.plan.tap_plan) knows
        them; any other name is looked up when needed."""
        if indexes is not None:
            self._index = dict(indexes)
        else:
            self._index = {m.get_attr("IFLA_IFNAME"): m["index"] for m in self.ipr.get_links()}
        errors: list[ObjectError] = []
        applied = 0
        ops = list(plan.ops)
        i = 0
        while i < len(ops):
            op = ops[i]
            batch = None
            if op.kind in ("fdb", "neighbour"):
                # Consecutive FDB/neighbour ops of one action go to the kernel as a batch.
                j = _run_end(ops, i, lambda o: o.kind == op.kind and _is_delete(o) == _is_delete(op))
                batch = self._apply_records
            elif op.kind in FLOW_MAP_KINDS:
                # Consecutive flow-mode map writes go to bpftool as one batch.
                j = _run_end(ops, i, lambda o: o.kind in FLOW_MAP_KINDS)
                batch = self._apply_flow_maps
            if batch is not None:
                done, failed = batch(ops[i:j])
                applied += done
                errors.extend(failed)
                i = j
                continue
            log.debug("%s", op.describe())
            try:
                self._apply_one(op)
                applied += 1
            except KernelError as exc:
                errors.append(ObjectError(op.kind, op.name, exc.errno, str(exc)))
            except NetlinkError as exc:
                err = typed_error(exc.code, op.describe())
                errors.append(ObjectError(op.kind, op.name, err.errno, str(err)))
            except OSError as exc:
                errors.append(ObjectError(op.kind, op.name, exc.errno, f"{op.describe()}: {exc}"))
            i += 1
        for error in errors:
            log.warning("apply failed: %s %s: %s", error.kind, error.object, error.message)
        return applied, errors

    def _apply_one(self, op: Op) -> None:
        if op.kind in LINK_ROLES:
            self._apply_link(op)
        elif op.kind == "vlan":
            self._apply_vlan(op)
        elif op.kind == "address":
            self._apply_address(op)
        elif op.kind == "route":
            self._apply_route(op)
        elif op.kind == "nat":
            # nftables, not netlink: the whole table in one nft transaction (agent.nat).
            if op.action == "delete":
                nat.delete_table(self.netns)
            else:
                nat.replace_table(self.netns, op.desired)
        elif op.kind == "tcprogram":
            self._apply_tc_program(op)
        else:
            raise InvalidArgument(f"{op.describe()}: unknown object kind {op.kind}")

    def index(self, name: str | None) -> int:
        if name is None:
            return 0
        index = self._index.get(name)
        if index is None:
            found = self.ipr.link_lookup(ifname=name)
            if not found:
                raise InterfaceNotFound(f"interface {name} not found", errno_codes.ENODEV)
            index = self._index[name] = found[0]
        return index

    # -- links ------------------------------------------------------------------------

    def _apply_link(self, op: Op) -> None:
        if op.action in ("delete", "release"):
            self._remove_link(op)
            return
        link: Link = op.desired
        old: Link | None = op.observed
        if op.action == "add" and old is not None and link.owned and not old.owned:
            raise ObjectExists(
                f"{link.role} {link.name}: the name is taken by a device openhnv does not "
                "own; rename or remove it", errno_codes.EEXIST)
        if not link.owned and old is None:
            what = "NIC" if link.role == "member" else "device"
            raise InterfaceNotFound(
                f"{link.role} {link.name}: {what} {link.name} not found on this host", errno_codes.ENODEV)
        if op.action == "replace" and old is not None:
            self._delete_link(old.name)
            old = None
        if old is None:
            self._create_link(link)
        self._converge_link(link, old)

    def _create_link(self, link: Link) -> None:
        spec: dict[str, Any] = {"ifname": link.name, "kind": link.kind}
        opt = dict(link.options)
        if link.kind == "bond":
            spec.update(bond_mode=opt["mode"])
        elif link.kind == "bridge":
            if "vlan_default_pvid" in opt:
                spec.update(br_vlan_default_pvid=opt["vlan_default_pvid"])
            if link.setting("vlan_filtering") is not None:
                spec.update(br_vlan_filtering=link.setting("vlan_filtering"))
        elif link.kind == "vlan":
            spec.update(vlan_id=opt["vlan_id"], link=self.index(opt["link"]))
        elif link.kind == "vrf":
            spec.update(vrf_table=opt["table"])
        elif link.kind == "macvlan":
            spec.update(link=self.index(opt["link"]), macvlan_mode=opt["mode"])
        elif link.kind in ("gretap", "ip6gretap") and opt.get("external"):
            spec.update(gre_collect_metadata=True)
        elif link.kind in ("gretap", "ip6gretap"):
            spec.update(gre_tunnel_spec(link))
        elif link.kind == "vxlan":
            spec.update(vxlan_id=opt["vni"], vxlan_local=opt["local"], vxlan_port=opt["port"],
                        vxlan_learning=opt["learning"], vxlan_ttl=opt["ttl"])
        elif link.kind == "veth":
            self._create_vm_port(link)
            return
        if link.mtu is not None and link.kind != "vrf":
            spec["mtu"] = link.mtu
        self.ipr.link("add", **spec)
        self._index.pop(link.name, None)

    def _converge_link(self, link: Link, old: Link | None) -> None:
        index = self.index(link.name)
        if link.owned and (old is None or old.alias != link.alias):
            self.ipr.link("set", index=index, ifalias=link.alias)
        changes: dict[str, Any] = {}
        if link.mtu is not None and (old is None or old.mtu != link.mtu):
            changes["mtu"] = link.mtu
        if link.mac is not None and (old is None or old.mac != link.mac):
            changes["address"] = link.mac
        if changes:
            self.ipr.link("set", index=index, **changes)
        self._converge_settings(link, old, index)
        if old is None or old.master != link.master:
            if link.role == "member" and link.master is not None:
                # The bonding driver refuses to enslave an up device (EPERM).
                self.ipr.link("set", index=index, state="down")
            self.ipr.link("set", index=index, master=self.index(link.master))
        if link.port_flags:
            have = dict(old.port_flags) if old is not None and old.master == link.master else {}
            flags = {k: v for k, v in link.port_flags if have.get(k) != v}
            if flags:
                self.ipr.brport("set", index=index, **flags)
        self.ipr.link("set", index=index, state="up" if link.up else "down")

    def _converge_settings(self, link: Link, old: Link | None, index: int) -> None:
        wanted = {k: v for k, v in link.settings if old is None or old.setting(k) != v}
        for name in IPV4_CONF_SETTINGS:
            value = wanted.pop(name, None)
            if value is not None:
                # Per-device IPv4 forwarding on a VSID bridge (or a gateway leg): routing
                # between the VM subnets of one VRF needs it on the ingress device only,
                # and leaves the host's global ip_forward (and every other device) alone.
                write_sysctl(self.netns, f"/proc/sys/net/ipv4/conf/{link.name}/{name}", value)
        for name in IPV6_CONF_SETTINGS:
            value = wanted.pop(name, None)
            if value is not None:
                write_sysctl(self.netns, f"/proc/sys/net/ipv6/conf/{link.name}/{name}", value)
        if not wanted:
            return
        if link.kind == "bond":
            self.ipr.link("set", index=index, kind="bond",
                          **{f"bond_{k}": v for k, v in wanted.items()})
        elif link.kind == "bridge":
            self.ipr.link("set", index=index, kind="bridge",
                          **{f"br_{k}": v for k, v in wanted.items()})

    def _remove_link(self, op: Op) -> None:
        old: Link = op.observed
        if op.action == "delete" and old.role == naming.PORT and old.kind == "veth":
            self._remove_vm_port(old)
            return
        if op.action == "release":
            try:
                self.ipr.link("set", index=self.index(old.name), master=0)
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise
            return
        self._delete_link(old.name)

    def _delete_link(self, name: str) -> None:
        try:
            self.ipr.link("del", index=self.index(name))
        except InterfaceNotFound:
            pass
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise
        self._index.pop(name, None)

    # -- lab VM ports -----------------------------------------------------------------

    def _remove_vm_port(self, port: Link) -> None:
        """Delete a VM port, and the VM's namespace with it when the agent made that namespace.

        Why the namespace goes first: it is found through the port (the host end's veth
        peer lives in it); deleting the port first and failing before the namespace would
        leave a namespace nothing points to any more. Removing the name first and failing
        before the port leaves the port, which the next reconcile deletes as before.
        """
        namespace = self._vm_netns_of(port)
        if namespace is not None:
            log.info("VM port %s: removing namespace %s, which this agent created for its VM",
                     port.name, namespace)
            remove_netns(namespace)
        self._delete_link(port.name)

    def _vm_netns_of(self, port: Link) -> str | None:
        """The named namespace of ``port``'s VM end, if it bears openhnv's mark for this
        port and this host.

        A namespace without the mark (one the agent found already there) is never named here.
        """
        try:
            message = self.ipr.link("get", index=self.index(port.name))[0]
        except (KernelError, NetlinkError):
            return None  # the port is already gone, its VM end with it
        nsid = message.get_attr("IFLA_LINK_NETNSID")
        name = netns_name_of_nsid(self.ipr, nsid) if nsid is not None else None
        if name is None:
            return None
        try:
            mark = naming.parse_vm_netns_marker(vm_netns_marker_of(name))
        except (OSError, NetlinkError):
            return None
        # Only a mark naming this host as well: in the lab's live migration the destination
        # takes the namespace over (re-marks it for itself) and the source, hearing of the
        # move later, must not remove what is now the destination's VM.
        return name if mark == (port.name, naming.host_tag(self.host)) else None

    def _create_vm_port(self, link: Link) -> None:
        end = link.vm
        assert end is not None
        ensure_vm_netns(end.namespace, naming.vm_netns_marker(link.name, self.host))
        vm_name = link.key.rpartition(":")[0]
        # flags=0: never create the namespace here (pyroute2 would, by default). If it was
        # removed since ensure_vm_netns (the VM's previous host letting it go), this fails
        # and the next reconcile makes and marks a new one; created here it would carry no
        # mark, and the agent would never remove it.
        with IPRoute(netns=end.namespace, flags=0) as vm:
            # A NIC already in the VM's namespace is not ours (our port is missing, and
            # with it its veth peer): the VM runs on another host too, the source of the
            # lab's live migration. Why keep it (make-before-break): the source delivers
            # to it until the controller switches the peers, and deleting it would delete
            # the source's port, which the source's agent, still told to hold it, would
            # build again (taking the NIC back). The VM gets a second NIC; the first
            # goes when the source deletes its port. Only with both names taken is one
            # taken over (deleting one end of a veth removes the other on its host).
            ifname = next((name for name in naming.VM_IFNAMES if not vm.link_lookup(ifname=name)), None)
            homed_elsewhere = ifname != naming.VM_IFNAME or bool(vm.link_lookup(ifname=naming.VM_IFNAMES[1]))
            if ifname is None:
                ifname = naming.VM_IFNAME
                log.warning("VM %s: taking over %s in namespace %s from its previous host",
                            vm_name, ifname, end.namespace)
                vm.link("del", index=vm.link_lookup(ifname=ifname)[0])
            elif homed_elsewhere:
                log.info("VM %s: adding %s in namespace %s beside its NIC on its previous host",
                         vm_name, ifname, end.namespace)
            peer: dict[str, Any] = {"ifname": ifname, "net_ns_fd": end.namespace,
                                    "address": end.mac}
            if end.mtu is not None:
                peer["mtu"] = end.mtu
            spec: dict[str, Any] = {"ifname": link.name, "kind": "veth", "peer": peer}
            if link.mtu is not None:
                spec["mtu"] = link.mtu
            self.ipr.link("add", **spec)
            self._index.pop(link.name, None)
            try:
                nic = vm.link_lookup(ifname=ifname)[0]
                for lo in vm.link_lookup(ifname="lo"):
                    vm.link("set", index=lo, state="up")
                if homed_elsewhere:
                    # The peers' echoes may arrive on one NIC while the replies leave by
                    # the other: loose reverse-path filtering, whatever the namespace inherited.
                    write_sysctl(end.namespace, "/proc/sys/net/ipv4/conf/all/rp_filter", 2)
                if end.ca:
                    address, _, prefixlen = end.ca.partition("/")
                    vm.addr("add", index=nic, address=address, prefixlen=int(prefixlen))
                vm.link("set", index=nic, state="up")
                if end.gateway:
                    # Beside the other NIC's default route (kept first, so the VM keeps
                    # sending by the NIC every peer already receives from); it takes over
                    # when that NIC goes.
                    vm.route("append" if homed_elsewhere else "replace", dst="default", gateway=end.gateway, oif=nic)
                if end.dhcp:
                    self.dhcp_guests.append((vm_name, end.namespace, ifname))
            except Exception:
                # The VM end is only known through the port's marker, which is written
                # after this returns: a half-configured port would be read back as a
                # foreign device (never repaired) or, marked, as a finished one. Remove
                # the pair (deleting the host end removes the VM end) so that the next
                # reconcile builds the port again from scratch.
                self._delete_link(link.name)
                raise

    # -- VLANs, addresses, routes --------------------------------------------------------

    def _apply_vlan(self, op: Op) -> None:
        vlan: BridgeVlan = op.desired or op.observed
        index = self.index(vlan.device)
        flags = (BRIDGE_VLAN_INFO_PVID if vlan.pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if vlan.untagged else 0)
        spec: dict[str, Any] = {"index": index, "vlan_info": {"vid": vlan.vid, "flags": flags}}
        if self._is_bridge(vlan.device):
            # The bridge's own VLANs (what its upper devices see) need BRIDGE_FLAGS_SELF.
            spec["IFLA_AF_SPEC"] = {"attrs": [["IFLA_BRIDGE_FLAGS", BRIDGE_FLAGS_SELF]]}
        try:
            self.ipr.vlan_filter("del" if op.action == "delete" else "add", **spec)
        except NetlinkError as exc:
            if not (op.action == "delete" and exc.code in _GONE):
                raise

    def _is_bridge(self, name: str) -> bool:
        link = self.ipr.link("get", index=self.index(name))[0]
        info = link.get_attr("IFLA_LINKINFO")
        return info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge"

    def _apply_address(self, op: Op) -> None:
        address: Address = op.desired or op.observed
        ip, _, prefixlen = address.cidr.partition("/")
        try:
            self.ipr.addr("del" if op.action == "delete" else "add", index=self.index(address.device),
                          address=ip, prefixlen=int(prefixlen))
        except NetlinkError as exc:
            if op.action == "delete" and exc.code in _GONE:
                return
            if op.action != "delete" and exc.code == errno_codes.EEXIST:
                return
            raise

    def _apply_route(self, op: Op) -> None:
        route: Route = op.desired or op.observed
        default = "0.0.0.0/0" if route.family == 4 else "::/0"
        spec: dict[str, Any] = {
            "dst": default if route.dst == "default" else route.dst,
            "table": route.table, "family": 2 if route.family == 4 else 10,
        }
        if route.type == "unreachable":
            spec.update(type="unreachable", priority=route.metric)
        else:
            if route.gateway:
                spec["gateway"] = route.gateway
            if route.device:
                spec["oif"] = self.index(route.device)
            if route.metric:
                spec["priority"] = route.metric
        try:
            self.ipr.route("del" if op.action == "delete" else "replace", **spec)
        except NetlinkError as exc:
            if not (op.action == "delete" and exc.code in _GONE):
                raise

    # -- FDB and neighbours, batched ----------------------------------------------------

    def _apply_records(self, ops: list[Op]) -> tuple[int, list[ObjectError]]:
        delete = _is_delete(ops[0])
        kind = ops[0].kind
        entries: list[Any] = []
        owners: dict[Any, Op] = {}
        errors: list[ObjectError] = []
        for op in ops:
            try:
                entry = self._entry(op.desired or op.observed)
            except KernelError as exc:
                errors.append(ObjectError(op.kind, op.name, exc.errno, f"{op.describe()}: {exc}"))
                continue
            entries.append(entry)
            owners[entry] = op
        if kind == "fdb":
            refused = (self.records.delete_fdb if delete else self.records.replace_fdb)(entries)
        else:
            refused = (self.records.delete_neigh if delete else self.records.replace_neigh)(entries)
        for failure in refused:
            op = owners[failure.entry]
            errors.append(_record_error(op, failure))
        return len(entries) - len(refused), errors

    # -- flow mode (agent.flowmode) ---------------------------------------------------

    def _apply_tc_program(self, op: Op) -> None:
        try:
            if _is_delete(op):
                self.flow.detach(op.observed)
            else:
                self.flow.attach(op.desired)
        except FlowModeError as exc:
            raise KernelError(f"{op.describe()}: {exc}") from exc

    def _flow_writes(self, op: Op) -> list[MapWrite]:
        if op.kind == "flowremote":
            obj = op.observed if _is_delete(op) else op.desired
            key = remote_key(obj.vsid, obj.mac)
            if _is_delete(op):
                return [MapWrite(REMOTES, key)]
            return [MapWrite(REMOTES, key, remote_value(obj.remote, obj.local))]
        if _is_delete(op):
            writes = [MapWrite(VSIDS, u32(op.observed.vsid))]
            if op.observed.port in self._index:
                writes.append(MapWrite(PORTS, u32(self._index[op.observed.port])))
            return writes
        port = op.desired
        index = self.index(port.port)
        return [MapWrite(PORTS, u32(index), port_value(port.vsid, self.index(port.tunnel))),
                MapWrite(VSIDS, u32(port.vsid), u32(index))]

    def _apply_flow_maps(self, ops: list[Op]) -> tuple[int, list[ObjectError]]:
        errors: list[ObjectError] = []
        writes: list[MapWrite] = []
        owner: dict[int, Op] = {}
        for op in ops:
            try:
                for w in self._flow_writes(op):
                    owner[id(w)] = op
                    writes.append(w)
            except KernelError as exc:
                errors.append(ObjectError(op.kind, op.name, exc.errno, f"{op.describe()}: {exc}"))
        try:
            if writes:
                self.flow.ensure_loaded()
            refused = self.flow.write(writes)
        except FlowModeError as exc:
            errors.extend(ObjectError(op.kind, op.name, None, str(exc)) for op in ops)
            return 0, errors
        failed_ops = {id(owner[id(w)]): (owner[id(w)], reason) for w, reason in refused}
        errors.extend(ObjectError(op.kind, op.name, None, f"{op.describe()}: {reason}")
                      for op, reason in failed_ops.values())
        return len(ops) - len(errors), errors

    def _entry(self, obj: Fdb | Neighbour) -> FdbEntry | NeighEntry:
        if isinstance(obj, Neighbour):
            return NeighEntry(self.index(obj.device), obj.ip, obj.mac)
        if obj.port is not None:
            return FdbEntry(self.index(obj.port), obj.mac, master=True, sticky=obj.sticky)
        return FdbEntry(self.index(obj.device), obj.mac, master=False, dst=obj.dst)


def _run_end(ops: list[Op], start: int, same) -> int:
    """The end of the run of ops from `start` on for which `same(op)` holds."""
    end = start
    while end < len(ops) and same(ops[end]):
        end += 1
    return end


def _is_delete(op: Op) -> bool:
    return op.action == "delete"


def _record_error(op: Op, failure: EntryError) -> ObjectError:
    return ObjectError(op.kind, op.name, failure.errno, f"{op.describe()}: {failure.message}")
