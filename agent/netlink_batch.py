"""Batched netlink for lookup records: bridge FDB entries and permanent neighbours; and
the cheap read of every link's counters that /metrics needs.

Owns one rtnetlink socket per network namespace and the wire encoding of RTM_NEWNEIGH /
RTM_DELNEIGH / RTM_GETNEIGH for the two kinds of entry a lookup record becomes:

- ``FdbEntry``: a bridge FDB entry, MAC -> port. ``master=True`` (NTF_MASTER) programs the
  bridge's table for that port (a gretap or veth port); ``master=False`` (NTF_SELF)
  programs the device's own table, which is what a VXLAN device uses, with ``dst`` the
  remote VTEP (NDA_DST). ``static=True`` is NUD_NOARP ("static": forwarded, never aged);
  ``static=False`` is NUD_PERMANENT, which the bridge treats as *local* (frames to that
  MAC are delivered to the host, not forwarded) - the agent wants static. ``sticky=True``
  (NTF_STICKY, a bridge entry only) pins the entry to its port: a frame from that MAC
  arriving on another port never moves it there (see agent.kernel_model.Fdb).
- ``NeighEntry``: a permanent (NUD_PERMANENT) neighbour CA -> MAC on a device (the VSID
  bridge), IPv4 or IPv6 by the address.

It may not decide *what* to program (that is the plan) nor touch links, addresses or
routes. Use::

    sock = NeighbourSocket(netns="hnv-host1")          # one per namespace, reuse it
    errors = sock.replace_fdb([FdbEntry(ifindex=7, mac="00:15:5d:01:02:03")])
    errors += sock.replace_neigh([NeighEntry(ifindex=5, ip="192.168.0.3", mac="00:15:5d:01:02:03")])
    for e in errors:                                     # EntryError(entry, errno, message)
        log(e.entry, e.errno, e.message)
    present = sock.dump_fdb({7}), sock.dump_neigh({5})
    counters = sock.dump_link_counters()                # LinkCounters of every link
    sock.close()

Why not pyroute2's ``fdb()``/``neigh()`` calls: each sends one message and waits for its
ack, one system-call round trip per entry (~0.05x the speed of ``bridge -batch``). Here
many messages are packed into one ``sendmsg`` (the kernel processes an rtnetlink batch
synchronously inside that call, one message after the other), each with its own sequence
number and NLM_F_ACK; the acks are then drained from the receive queue in bulk and each
error is mapped back to its entry by sequence number. Messages are encoded with
``struct`` directly and dumps are parsed by unpacking the ndmsg header and only the
attributes we need (NDA_DST, NDA_LLADDR, NDA_VLAN), because pyroute2's generic
encoder/parser costs more than the kernel does at 10,000 entries (see bench/records.py).

Acks are small (NETLINK_CAP_ACK: the request is not echoed back) but every ack is its own
skb in the receive queue, charged at its truesize (~1 KiB), so a batch's acks must fit
the receive buffer: batches are sent in chunks of at most ``bufsize`` bytes and
``_MAX_MESSAGES_PER_SEND`` messages, the receive buffer is raised with SO_RCVBUFFORCE
(root) to hold them, and if the kernel still drops acks (ENOBUFS) the entries whose ack
never came are simply sent again in smaller chunks: replace is idempotent and a delete
whose entry is already gone counts as done (ENOENT is success).
"""

from __future__ import annotations

import errno as errno_codes
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.netns import in_netns

# --- netlink / rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h)

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow
NLM_F_DUMP_INTR = 0x10  # on a dump message: the table changed while it was being dumped
NLMSGERR_ATTR_MSG = 1

NDA_DST = 1
NDA_LLADDR = 2
NDA_VLAN = 5

IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_STATS64 = 23
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LOCAL6 = 17

NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_STICKY = 0x40

NUD_REACHABLE = 0x02
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
# What `bridge fdb add ... static` sends. NOARP makes the entry static (never aged) on
# the bridge and on VXLAN; REACHABLE is there because the VXLAN driver refuses a state
# with neither PERMANENT nor REACHABLE (EINVAL), while the bridge ignores it.
_FDB_STATIC_STATE = NUD_NOARP | NUD_REACHABLE

AF_BRIDGE = 7

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, pad, pad16, ifindex, state, flags, type
_HEADER_AND_NDMSG = struct.Struct("=IHHIIBxxxiHBB")
_HEADER_AND_IFINFOMSG = struct.Struct("=IHHIIBxHiII")  # + ifinfomsg: family, type, index, flags, change
_IFINFOMSG_SIZE = 16
_STATS64_HEAD = struct.Struct("=QQQQ")  # rtnl_link_stats64: rx/tx packets, rx/tx bytes
_ATTR = struct.Struct("=HH")
_U16_ATTR = struct.Struct("=HHHxx")  # an NDA_VLAN attribute, padded to 4 bytes
_ERRNO = struct.Struct("=i")

_HEADER_SIZE = _HEADER.size  # 16
_NDMSG_SIZE = _NDMSG.size  # 12

# Acks per sendmsg: every ack is one skb of ~1 KiB truesize in our receive queue.
_MAX_MESSAGES_PER_SEND = 4096
# What we ask for with SO_RCVBUFFORCE / SO_SNDBUFFORCE (root); plain SO_*BUF otherwise.
_SOCKET_BUFFER = 32 << 20
_ZERO_MAC = "00:00:00:00:00:00"
# A dump the kernel marks as interrupted is taken again, this many times at most.
_DUMP_ATTEMPTS = 3


# --- the entries ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FdbEntry:
    """A bridge FDB entry: ``mac`` behind port ``ifindex`` (see the module docstring)."""

    ifindex: int
    mac: str
    master: bool = True
    dst: str | None = None
    vlan: int | None = None
    static: bool = True
    sticky: bool = False  # NTF_STICKY: learning never moves it (bridge entries only)


@dataclass(frozen=True, slots=True)
class NeighEntry:
    """A permanent neighbour entry ``ip`` -> ``mac`` on device ``ifindex``."""

    ifindex: int
    ip: str
    mac: str


@dataclass(frozen=True, slots=True)
class EntryError:
    """The kernel refused ``entry``: its errno and a message naming entry and reason."""

    entry: FdbEntry | NeighEntry
    errno: int
    message: str


@dataclass(frozen=True, slots=True)
class LinkCounters:
    """A link's name, ifalias, kind, VXLAN local address and first four counters."""

    ifindex: int
    name: str
    alias: str | None
    kind: str | None
    vxlan_local: str | None
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int


class NetlinkBatchError(OSError):
    """The socket itself failed (not one entry): the namespace is gone, a dump broke off."""


# --- encoding --------------------------------------------------------------------------


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address (six octets)")
    return raw


def _address_attr(kind: int, ip: str) -> tuple[int, bytes]:
    """(family, NDA_DST attribute) for an IPv4 or IPv6 address."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    return family, _ATTR.pack(4 + len(raw), kind) + raw


_LLADDR_HEADER = _ATTR.pack(4 + 6, NDA_LLADDR)
_LLADDR_PAD = b"\0\0"


def _encode_fdb(entry: FdbEntry, msg_type: int, flags: int, seq: int) -> bytes:
    body = _LLADDR_HEADER + _mac_bytes(entry.mac) + _LLADDR_PAD
    if entry.dst is not None:
        body += _address_attr(NDA_DST, entry.dst)[1]
    if entry.vlan is not None:
        body += _U16_ATTR.pack(6, NDA_VLAN, entry.vlan)
    if msg_type == RTM_NEWNEIGH and not entry.master and entry.mac == _ZERO_MAC:
        # A VXLAN device's all-zeros entry is its flood list: one entry per remote,
        # added with APPEND (REPLACE would leave only the last remote).
        flags = (flags & ~NLM_F_REPLACE) | NLM_F_APPEND
    state = _FDB_STATIC_STATE if entry.static else NUD_PERMANENT
    ntf = (NTF_MASTER | (NTF_STICKY if entry.sticky else 0)) if entry.master else NTF_SELF
    return _HEADER_AND_NDMSG.pack(
        _HEADER_SIZE + _NDMSG_SIZE + len(body), msg_type, flags, seq, 0,
        AF_BRIDGE, entry.ifindex, state, ntf, 0,
    ) + body


def _encode_neigh(entry: NeighEntry, msg_type: int, flags: int, seq: int) -> bytes:
    family, dst = _address_attr(NDA_DST, entry.ip)
    body = dst
    if msg_type == RTM_NEWNEIGH:
        body += _LLADDR_HEADER + _mac_bytes(entry.mac) + _LLADDR_PAD
    return _HEADER_AND_NDMSG.pack(
        _HEADER_SIZE + _NDMSG_SIZE + len(body), msg_type, flags, seq, 0,
        family, entry.ifindex, NUD_PERMANENT, 0, 0,
    ) + body


def describe_entry(entry: FdbEntry | NeighEntry) -> str:
    """'fdb 00:15:5d:01:02:03 dev #7 master vlan 10' / 'neighbour 192.168.0.3 lladdr ... dev #5'."""
    if isinstance(entry, NeighEntry):
        return f"neighbour {entry.ip} lladdr {entry.mac} dev #{entry.ifindex}"
    text = f"fdb {entry.mac} dev #{entry.ifindex} {'master' if entry.master else 'self'}"
    if entry.dst is not None:
        text += f" dst {entry.dst}"
    if entry.vlan is not None:
        text += f" vlan {entry.vlan}"
    if entry.sticky:
        text += " sticky"
    return text


# --- the namespace ---------------------------------------------------------------------


def _create_in_netns(netns: str | None, factory: Callable[[], socket.socket]) -> socket.socket:
    """Run ``factory`` inside ``netns``: a socket keeps the namespace it was created in."""
    try:
        return in_netns(netns, factory)
    except NetlinkBatchError:
        raise
    except OSError as exc:  # the namespace cannot be opened or entered
        raise NetlinkBatchError(exc.errno, str(exc.strerror or exc)) from None


def _open_rtnetlink(receive_buffer: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    for force, plain, size in ((33, socket.SO_RCVBUF, receive_buffer),  # SO_RCVBUFFORCE
                               (32, socket.SO_SNDBUF, _SOCKET_BUFFER)):  # SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    # CAP_ACK: acks carry only the failed request's header, not the whole request.
    # EXT_ACK: errors carry the kernel's own one-line reason ("FDB entry ... ").
    for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
        try:
            sock.setsockopt(SOL_NETLINK, option, 1)
        except OSError:
            pass  # older kernels: plain acks still work
    sock.bind((0, 0))
    return sock


# --- the socket ------------------------------------------------------------------------

Encoder = Callable[[object, int, int, int], bytes]


class NeighbourSocket:
    """One rtnetlink socket in one namespace, batching neighbour/FDB writes and dumps.

    Not thread-safe: one caller at a time (the agent's applier).
    """

    def __init__(self, netns: str | None = None, bufsize: int = 1 << 20, *,
                 receive_buffer: int = _SOCKET_BUFFER):
        """``netns``: a name in /run/netns or a path (/proc/PID/ns/net); None: ours.
        ``bufsize``: bytes per sendmsg and per receive. ``receive_buffer``: the socket's
        receive queue (acks); the kernel may round it."""
        self.netns = netns
        self.bufsize = bufsize
        self._sock = _create_in_netns(netns, lambda: _open_rtnetlink(receive_buffer))
        self._recv_buffer = bytearray(max(bufsize, 1 << 16))
        self._seq = 0
        self._interrupted = False  # set by _dump when the kernel flags NLM_F_DUMP_INTR

    # -- writes -------------------------------------------------------------------------

    def replace_fdb(self, entries: Iterable[FdbEntry]) -> list[EntryError]:
        """Create or replace each entry; returns one EntryError per refused entry."""
        return self._batch(entries, _encode_fdb, RTM_NEWNEIGH,
                           NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)

    def delete_fdb(self, entries: Iterable[FdbEntry]) -> list[EntryError]:
        """Delete each entry; an entry already gone (ENOENT) is not an error."""
        return self._batch(entries, _encode_fdb, RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK)

    def replace_neigh(self, entries: Iterable[NeighEntry]) -> list[EntryError]:
        """Create or replace each permanent neighbour; one EntryError per refused entry."""
        return self._batch(entries, _encode_neigh, RTM_NEWNEIGH,
                           NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)

    def delete_neigh(self, entries: Iterable[NeighEntry]) -> list[EntryError]:
        """Delete each neighbour; an entry already gone (ENOENT) is not an error."""
        return self._batch(entries, _encode_neigh, RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK)

    def _next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < 0xFFFFFFFF else 1
        return self._seq

    def _batch(self, entries: Iterable, encode: Encoder, msg_type: int, flags: int) -> list[EntryError]:
        pending = list(entries)
        errors: list[EntryError] = []
        limit = _MAX_MESSAGES_PER_SEND
        while pending:
            dropped: list = []
            for start in range(0, len(pending), limit):
                chunk = pending[start : start + limit]
                dropped += self._send_chunk(chunk, encode, msg_type, flags, errors)
            if dropped and limit == 1:
                raise NetlinkBatchError(errno_codes.ENOBUFS, "netlink acks lost even one at a time")
            # The kernel dropped some acks (receive queue full): send those entries again,
            # in smaller chunks. Safe because every verb here is idempotent.
            pending, limit = dropped, max(1, limit // 4)
        return errors

    def _send_chunk(self, chunk: Sequence, encode: Encoder, msg_type: int, flags: int,
                    errors: list[EntryError]) -> list:
        """Send ``chunk`` in as few sendmsg calls as ``bufsize`` allows, gather its acks.

        Returns the entries whose ack never arrived (dropped by the kernel).
        """
        by_seq: dict[int, object] = {}
        buffers: list[bytes] = []
        size = 0
        for entry in chunk:
            seq = self._next_seq()
            try:
                message = encode(entry, msg_type, flags, seq)
            except (ValueError, OSError) as exc:  # a malformed MAC or address: refuse it alone
                errors.append(EntryError(entry, errno_codes.EINVAL, f"{entry!r}: {exc}"))
                continue
            if size + len(message) > self.bufsize and buffers:
                self._send(buffers)
                buffers, size = [], 0
            buffers.append(message)
            size += len(message)
            by_seq[seq] = entry
        if buffers:
            self._send(buffers)
        self._gather_acks(by_seq, msg_type, errors)
        return list(by_seq.values())

    def _send(self, buffers: list[bytes]) -> None:
        data = b"".join(buffers)
        try:
            sent = self._sock.send(data)
        except OSError as exc:
            raise NetlinkBatchError(exc.errno, f"netlink send of {len(buffers)} messages: {exc.strerror}") from None
        if sent != len(data):
            raise NetlinkBatchError(errno_codes.EMSGSIZE, f"netlink sent {sent} of {len(data)} bytes")

    def _gather_acks(self, by_seq: dict[int, object], msg_type: int, errors: list[EntryError]) -> None:
        """Drain the acks for ``by_seq`` (removing each acked seq from it).

        rtnetlink handles a batch inside sendmsg, so by now every ack is queued or was
        dropped; a non-blocking read that finds the queue empty means the rest were lost.
        """
        buffer = self._recv_buffer
        view = memoryview(buffer)
        deleting = msg_type == RTM_DELNEIGH
        while by_seq:
            try:
                length = self._sock.recv_into(buffer, len(buffer), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno_codes.ENOBUFS:
                    continue  # acks were dropped; collect what is still queued
                raise NetlinkBatchError(exc.errno, f"netlink receive: {exc.strerror}") from None
            offset = 0
            while offset + _HEADER_SIZE <= length:
                msg_len, kind, msg_flags, seq, _pid = _HEADER.unpack_from(buffer, offset)
                if msg_len < _HEADER_SIZE:
                    break
                if kind == NLMSG_ERROR:
                    (code,) = _ERRNO.unpack_from(buffer, offset + _HEADER_SIZE)
                    entry = by_seq.pop(seq, None)
                    if entry is not None and code != 0 and not (deleting and code == -errno_codes.ENOENT):
                        reason = ""
                        if msg_flags & NLM_F_ACK_TLVS:
                            reason = _extack_message(view, offset, msg_len)
                        errors.append(_entry_error(entry, -code, reason))
                offset += (msg_len + 3) & ~3

    # -- dumps ---------------------------------------------------------------------------

    def dump_fdb(self, ifindexes: set[int] | None = None) -> list[FdbEntry]:
        """Static FDB entries, bridge (master) and device (self) ones, on the ports in
        ``ifindexes`` (all ports if None): what ``bridge fdb show`` lists as "static",
        plus a VXLAN device's "permanent" remote entries (``static=False``).

        Left out: the bridge's local entries (master + "permanent": the ports' own
        addresses, which the bridge makes itself) and a device's own address list (self
        + "permanent" without a ``dst``: multicast and unicast filters). The agent never
        owns those.
        """
        return self._consistent("FDB", lambda: self._parse_fdb(ifindexes))

    def dump_neigh(self, ifindexes: set[int] | None = None, family: int | None = None) -> list[NeighEntry]:
        """Permanent (NUD_PERMANENT) neighbours on the devices in ``ifindexes`` (all if
        None), IPv4 and IPv6 unless ``family`` (socket.AF_INET / AF_INET6) says which."""
        return self._consistent("neighbour", lambda: self._parse_neigh(ifindexes, family))

    def _consistent(self, what: str, parse: Callable[[], list]) -> list:
        """``parse()`` again while the kernel says the table changed during the dump: a
        plan made from a torn view could delete an entry that exists."""
        for _attempt in range(_DUMP_ATTEMPTS):
            self._interrupted = False
            entries = parse()
            if not self._interrupted:
                return entries
        raise NetlinkBatchError(errno_codes.EAGAIN, f"the {what} table kept changing during "
                                f"{_DUMP_ATTEMPTS} dumps in a row; try again")

    def _parse_fdb(self, ifindexes: set[int] | None) -> list[FdbEntry]:
        entries: list[FdbEntry] = []
        append = entries.append
        unpack_ndmsg = _NDMSG.unpack_from
        unpack_attr = _ATTR.unpack_from
        for buffer, offset, end in self._dump(AF_BRIDGE):
            _family, ifindex, state, ntf, _type = unpack_ndmsg(buffer, offset + _HEADER_SIZE)
            if ifindexes is not None and ifindex not in ifindexes:
                continue
            if not state & (NUD_NOARP | NUD_PERMANENT):
                continue
            mac = dst = vlan = None
            pos = offset + _HEADER_SIZE + _NDMSG_SIZE
            while pos + 4 <= end:
                attr_len, attr_type = unpack_attr(buffer, pos)
                if attr_len < 4:
                    break
                attr_type &= 0x3FFF  # NLA_F_NESTED / NLA_F_NET_BYTEORDER
                if attr_type == NDA_LLADDR:
                    mac = buffer[pos + 4 : pos + attr_len].hex(":")
                elif attr_type == NDA_DST:
                    raw = bytes(buffer[pos + 4 : pos + attr_len])
                    dst = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
                elif attr_type == NDA_VLAN:
                    (vlan,) = struct.unpack_from("=H", buffer, pos + 4)
                pos += (attr_len + 3) & ~3
            if mac is None:
                continue
            # The bridge dumps its own table's entries with NTF_SELF clear (and NDA_MASTER
            # set); a device's own table (VXLAN, or a port's address list) with NTF_SELF.
            master = not ntf & NTF_SELF
            static = not state & NUD_PERMANENT
            if not static and (master or dst is None):
                continue  # the bridge's or a device's own address (local / permanent)
            append(FdbEntry(ifindex, mac, master, dst, vlan, static, bool(ntf & NTF_STICKY)))
        return entries

    def _parse_neigh(self, ifindexes: set[int] | None, family: int | None) -> list[NeighEntry]:
        entries: list[NeighEntry] = []
        append = entries.append
        unpack_ndmsg = _NDMSG.unpack_from
        unpack_attr = _ATTR.unpack_from
        families = (family,) if family is not None else (socket.AF_INET, socket.AF_INET6)
        for dump_family in families:
            for buffer, offset, end in self._dump(dump_family):
                fam, ifindex, state, _ntf, _type = unpack_ndmsg(buffer, offset + _HEADER_SIZE)
                if not state & NUD_PERMANENT:
                    continue
                if ifindexes is not None and ifindex not in ifindexes:
                    continue
                ip = mac = None
                pos = offset + _HEADER_SIZE + _NDMSG_SIZE
                while pos + 4 <= end:
                    attr_len, attr_type = unpack_attr(buffer, pos)
                    if attr_len < 4:
                        break
                    attr_type &= 0x3FFF
                    if attr_type == NDA_DST:
                        ip = socket.inet_ntop(fam, bytes(buffer[pos + 4 : pos + attr_len]))
                    elif attr_type == NDA_LLADDR:
                        mac = buffer[pos + 4 : pos + attr_len].hex(":")
                    pos += (attr_len + 3) & ~3
                if ip is not None and mac is not None:
                    append(NeighEntry(ifindex, ip, mac))
        return entries

    def dump_link_counters(self) -> list[LinkCounters]:
        """Every link's name, alias, kind, VXLAN local address and packet/byte counters.

        Why not pyroute2's get_links(): it parses every attribute of every link (~1 ms of
        CPU a link here, most of it the per-protocol settings), and a /metrics scrape
        needs five; this reads those and skips the rest.
        """
        return self._consistent("link", self._parse_links)

    def _parse_links(self) -> list[LinkCounters]:
        links: list[LinkCounters] = []

        def request(seq: int) -> bytes:
            return _HEADER_AND_IFINFOMSG.pack(_HEADER_SIZE + _IFINFOMSG_SIZE, RTM_GETLINK,
                                              NLM_F_REQUEST | NLM_F_DUMP, seq, 0, socket.AF_UNSPEC, 0, 0, 0, 0)

        for buffer, offset, end in self._dump(request, RTM_NEWLINK, "links"):
            (ifindex,) = struct.unpack_from("=i", buffer, offset + _HEADER_SIZE + 4)
            name = alias = kind = local = None
            counters = (0, 0, 0, 0)
            for attr_type, start, stop in _attributes(buffer, offset + _HEADER_SIZE + _IFINFOMSG_SIZE, end):
                if attr_type == IFLA_IFNAME:
                    name = _text(buffer, start, stop)
                elif attr_type == IFLA_IFALIAS:
                    alias = _text(buffer, start, stop)
                elif attr_type == IFLA_STATS64 and stop - start >= _STATS64_HEAD.size:
                    counters = _STATS64_HEAD.unpack_from(buffer, start)
                elif attr_type == IFLA_LINKINFO:
                    kind, local = _parse_linkinfo(buffer, start, stop)
            links.append(LinkCounters(ifindex, name or "", alias, kind, local, *counters))
        return links

    def _dump(self, request: int | Callable[[int], bytes], reply_type: int = RTM_NEWNEIGH, what: str = ""):
        """Yield (buffer, offset, end) of each reply of a dump: of the neighbour table of
        family ``request`` (an int), or of the request ``request(seq)`` builds.

        The buffer is reused between receives, so a caller parses each message before
        asking for the next (as the dump parsers above do).
        """
        seq = self._next_seq()
        if isinstance(request, int):
            family = request
            what = what or f"family {family}"
            message = _HEADER_AND_NDMSG.pack(
                _HEADER_SIZE + _NDMSG_SIZE, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, 0,
                family, 0, 0, 0, 0,
            )
        else:
            message = request(seq)
        self._send([message])
        buffer = self._recv_buffer
        unpack_header = _HEADER.unpack_from
        while True:
            try:
                length = self._sock.recv_into(buffer, len(buffer))
            except OSError as exc:
                raise NetlinkBatchError(exc.errno, f"netlink dump of {what}: {exc.strerror}") from None
            offset = 0
            while offset + _HEADER_SIZE <= length:
                msg_len, kind, msg_flags, msg_seq, _pid = unpack_header(buffer, offset)
                if msg_len < _HEADER_SIZE:
                    break
                if msg_seq == seq:
                    if msg_flags & NLM_F_DUMP_INTR:
                        self._interrupted = True
                    if kind == NLMSG_DONE:
                        return
                    if kind == NLMSG_ERROR:
                        (code,) = _ERRNO.unpack_from(buffer, offset + _HEADER_SIZE)
                        if code:
                            raise NetlinkBatchError(-code, f"netlink dump of {what}: {os.strerror(-code)}")
                        return
                    if kind == reply_type:
                        yield buffer, offset, offset + msg_len
                offset += (msg_len + 3) & ~3

    # -- life cycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NeighbourSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _attributes(buffer, pos: int, end: int):
    """(type without the NLA_F_* bits, payload start, payload end) of each attribute in
    buffer[pos:end]. For the link dump; the neighbour parsers above walk their attributes
    inline, as a generator costs them a measurable share at 50,000 entries."""
    while pos + 4 <= end:
        attr_len, attr_type = _ATTR.unpack_from(buffer, pos)
        if attr_len < 4:
            return
        yield attr_type & 0x3FFF, pos + 4, pos + attr_len
        pos += (attr_len + 3) & ~3


def _text(buffer, start: int, stop: int) -> str:
    return bytes(buffer[start:stop]).split(b"\0", 1)[0].decode(errors="replace")


def _parse_linkinfo(buffer, pos: int, end: int) -> tuple[str | None, str | None]:
    """(IFLA_INFO_KIND, the VXLAN local address if any) of a nested IFLA_LINKINFO."""
    kind = local = None
    for attr_type, start, stop in _attributes(buffer, pos, end):
        if attr_type == IFLA_INFO_KIND:
            kind = _text(buffer, start, stop)
        elif attr_type == IFLA_INFO_DATA and kind == "vxlan":
            for inner_type, inner_start, inner_stop in _attributes(buffer, start, stop):
                if inner_type in (IFLA_VXLAN_LOCAL, IFLA_VXLAN_LOCAL6):
                    raw = bytes(buffer[inner_start:inner_stop])
                    local = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return kind, local


def _extack_message(view: memoryview, offset: int, msg_len: int) -> str:
    """The NLMSGERR_ATTR_MSG string of an error ack, if the kernel sent one."""
    # nlmsghdr, then nlmsgerr: errno + the request's nlmsghdr (capped: no payload).
    pos = offset + _HEADER_SIZE + 4 + _HEADER_SIZE
    end = offset + msg_len
    while pos + 4 <= end:
        attr_len, attr_type = _ATTR.unpack_from(view, pos)
        if attr_len < 4:
            break
        if attr_type == NLMSGERR_ATTR_MSG:
            return bytes(view[pos + 4 : pos + attr_len]).rstrip(b"\0").decode(errors="replace")
        pos += (attr_len + 3) & ~3
    return ""


def _entry_error(entry: object, code: int, reason: str) -> EntryError:
    text = f"{describe_entry(entry)}: {os.strerror(code)}"  # type: ignore[arg-type]
    if reason:
        text += f" ({reason})"
    return EntryError(entry, code, text)  # type: ignore[arg-type]
