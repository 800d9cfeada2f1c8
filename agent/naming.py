"""Kernel names and ownership markers of every object the agent creates.

Owns the rules that turn a HostState object into a deterministic kernel name (at most
15 bytes, IFNAMSIZ) and an ``ifalias`` ownership marker ``openhnv:<kind>:<key>``, and
the reverse: reading a marker back into (kind, key). Names are derived from ids only,
never from a counter, so an agent restarted with no memory finds its own objects again
(Calico Felix's "restartable at any moment"; Neutron's deterministic tap names).

    VSID bridge      hnvb<vsid>                  hnvb3535905
    VRF              hnvr<routing domain id>     hnvr1       (table VRF_TABLE_BASE + id)
    NVGRE tunnel     hnvt<10 hex of sha1(vsid, local PA, remote PA)>
    VXLAN device     hnvx<vsid>
    flow tunnel      hnvf<4|6>                   one collect-metadata gretap per PA family
    flow port        hnvq<vsid>                  the VSID bridge's port into the flow tunnel
    VM port          hnvp<10 hex of sha1(VM name)>   host end of a lab VM's veth
    VM tap           hnvn<10 hex of sha1(VM name)>   a real VM's tap, made by the hypervisor
    provider VLAN    <switch>.<vlan>             hnv-sw.802  (hash form when too long)
    front-end VLAN   <switch>.<vlan>             hnv-sw.30   (a gateway host's external network)
    gateway leg      hnvl<routing domain id>     hnvl2       macvlan on the front-end VLAN, in the VRF
    back-end port    hnvg<routing domain id>     hnvg2       macvlan on the leg's VSID bridge, in the VRF

Pure: no kernel access, no pyroute2.
"""

from __future__ import annotations

import hashlib

PREFIX = "hnv"
MARKER = "openhnv"
IFNAMSIZ = 15
VRF_TABLE_BASE = 10_000  # VRF routing table = base + routing domain id (1..65535)
VM_IFNAME = "eth0"  # the VM end of a lab (namespace) port, inside the VM's namespace
# ... and the name of the second one while a migrating lab VM has a NIC on two hosts.
VM_IFNAMES = (VM_IFNAME, "eth1")
DEFAULT_TTL = 64

# Link kinds in markers. "switch"/"team" are the host's fabric; the rest are per tenant.
TEAM, SWITCH, PROVIDER, VRF, BRIDGE, TUNNEL, VXLAN, PORT = (
    "team", "switch", "provider", "vrf", "bridge", "tunnel", "vxlan", "port",
)
# A gateway host's: the front-end VLAN, and per leg its front-end and back-end devices.
FRONTEND, LEG, BACKEND = "frontend", "leg", "backend"
FLOW_TUNNEL, FLOW_PORT = "flowtunnel", "flowport"  # tunnel_mode flow (agent.flowmode)


def _short_hash(*parts: object, size: int = 10) -> str:
    text = "|".join(str(p) for p in parts)
    return hashlib.sha1(text.encode()).hexdigest()[:size]


def marker(kind: str, key: str) -> str:
    """The ifalias that marks a link as ours: ``openhnv:<kind>:<key>``."""
    return f"{MARKER}:{kind}:{key}"


def parse_marker(alias: str | None) -> tuple[str, str] | None:
    """(kind, key) of an ownership marker, or None when the link is not ours."""
    if not alias or not alias.startswith(MARKER + ":"):
        return None
    kind, _, key = alias[len(MARKER) + 1 :].partition(":")
    return (kind, key) if kind else None


def is_owned(name: str, alias: str | None) -> bool:
    """Whether a link is the agent's: our name prefix and our marker in its ifalias."""
    return name.startswith(PREFIX) and parse_marker(alias) is not None


def vsid_bridge(vsid: int) -> str:
    return f"{PREFIX}b{vsid}"


def vrf(routing_domain_id: int) -> str:
    return f"{PREFIX}r{routing_domain_id}"


def vrf_table(routing_domain_id: int) -> int:
    return VRF_TABLE_BASE + routing_domain_id


def nvgre_tunnel(vsid: int, local: object, remote: object) -> str:
    """One gretap per (VSID, local PA, remote PA); the local PA is in the hash so that a
    changed PA yields a new tunnel next to the old one (make-before-break)."""
    return f"{PREFIX}t{_short_hash(vsid, local, remote)}"


def tunnel_key(vsid: int, local: object, remote: object) -> str:
    """Marker key of a tunnel; "/" separates because IPv6 PAs contain ":"."""
    return f"{vsid}/{local}/{remote}"


def vxlan_device(vsid: int) -> str:
    return f"{PREFIX}x{vsid}"


def flow_tunnel(family: int) -> str:
    return f"{PREFIX}f{family}"


def flow_port(vsid: int) -> str:
    return f"{PREFIX}q{vsid}"


def vm_port(vm_name: str) -> str:
    """Host end of a VM's port. Hashed: VM names are free text of up to 256 characters."""
    return f"{PREFIX}p{_short_hash(vm_name)}"


def vm_tap(vm_name: str) -> str:
    """The tap of a real VM's NIC when the fabric names no device: what the operator puts
    in libvirt's ``<target dev=.../>`` or qemu's ``ifname=``, and the agent plugs.

    The agent does not create it (the hypervisor does) and does not own it: it has no
    ownership marker, so it is never deleted, only released. The same hash as the VM's
    lab port (`vm_port`), another letter: one VM, one name either way."""
    return f"{PREFIX}n{_short_hash(vm_name)}"


TAP_MAC_FIRST_OCTET = 0xFE  # libvirt's, for a VM MAC that does not begin with fe
TAP_MAC_FIRST_OCTET_FOR_FE = 0xFA  # ... and for one that does


def tap_mac(vm_mac: str) -> str:
    """The address a VM's tap must have to be plugged: the VM's MAC with its first octet
    replaced by fe (fa when the VM's MAC begins with fe), which is what libvirt gives the
    host end of every tap it creates (the guest keeps the VM's MAC). Never the VM's own
    MAC: a bridge takes the address of each port as its own (a local FDB entry), so the
    VM's frames would go to the host instead of the VM."""
    octets = vm_mac.lower().split(":")
    first = TAP_MAC_FIRST_OCTET_FOR_FE if int(octets[0], 16) == TAP_MAC_FIRST_OCTET else TAP_MAC_FIRST_OCTET
    return ":".join([f"{first:02x}", *octets[1:]])


def provider_vlan(switch: str, vlan: int) -> str:
    name = f"{switch}.{vlan}"
    if len(name.encode()) <= IFNAMSIZ:
        return name
    return f"{PREFIX}v{_short_hash(switch, vlan, size=6)}.{vlan}"


def gateway_leg(routing_domain_id: int) -> str:
    return f"{PREFIX}l{routing_domain_id}"


def gateway_back_end(routing_domain_id: int) -> str:
    return f"{PREFIX}g{routing_domain_id}"


def gateway_mac(vsid: int) -> str:
    """The VSID bridge's MAC when no Gateway record names one: locally administered,
    derived from the VSID alone, so that every host answers the gateway with the same
    MAC and a migrated VM's ARP cache stays right."""
    return "02:48:4e:%02x:%02x:%02x" % ((vsid >> 16) & 0xFF, (vsid >> 8) & 0xFF, vsid & 0xFF)


# A lab VM's namespace that the agent created carries this mark on its loopback device:
# ``openhnv:netns:<port device>@<host>``. The port device names the VM (hashed), the host
# lets a lab tell its own VMs from another lab's on the same kernel.
NETNS = "netns"
_HOST_TAG_MAX = 200  # keeps the whole mark within IFALIASZ (256 bytes with its NUL)


def host_tag(host: str) -> str:
    """The host part of a VM namespace mark: the name, or a hash when it is too long."""
    return host if len(host.encode()) <= _HOST_TAG_MAX else "sha1-" + _short_hash(host)


def vm_netns_marker(port_device: str, host: str) -> str:
    return marker(NETNS, f"{port_device}@{host_tag(host)}")


def parse_vm_netns_marker(alias: str | None) -> tuple[str, str] | None:
    """(port device, host tag) of a VM namespace mark, or None when it is not one."""
    owner = parse_marker(alias)
    if owner is None or owner[0] != NETNS or "@" not in owner[1]:
        return None
    port, _, host = owner[1].partition("@")
    return port, host
