"""Flow mode's eBPF datapath: loading agent/bpf/hnv_flow.c, its maps and tc attachments.

Owns, for one host (one network namespace), the pinned eBPF objects of tunnel_mode flow
(the kernel mapping is agent.tunnels'): the programs and maps under
``/sys/fs/bpf/openhnv/<namespace or "host">/{progs/<object digest>,maps}``, reading them back for
agent.observe and writing them for agent.apply. Everything goes through maintained
tools rather than hand-rolled bpf(2) syscalls: ``bpftool`` loads the object (compiled by
``make bpf`` with the distribution's clang) and reads and writes the maps (one ``bpftool
batch`` per plan step, so 10,000 entries cost one process), iproute2's ``tc`` attaches
a pinned program to a device's clsact hook (pyroute2 attaches only by file descriptor,
which would need a bpf(2) BPF_OBJ_GET of our own). Pinned objects outlive the agent:
a restarted agent finds its programs, maps and filters in place and forwarding goes on.

Map layouts mirror the structs in hnv_flow.c (host byte order for numbers, network order
for addresses) and must change with them. Owns nothing else: it never touches a device,
a filter at another priority, or a pin outside its own directory.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.kernel_model import FlowPort, FlowRemote, TcProgram
from agent.netns import namespace_key, netns_path
from agent.tunnels import DECAP_PROGRAM, ENCAP_PROGRAM

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "openhnv"
OBJECT = Path(__file__).parent / "bpf" / "hnv_flow.o"
REMOTES, PORTS, VSIDS = "hnv_remotes", "hnv_ports", "hnv_vsids"
PROGRAMS = (ENCAP_PROGRAM, DECAP_PROGRAM)
FILTER_PREF = 49_000  # our filters' priority on a device: replaced and deleted by it alone
TOOL_TIMEOUT_S = 120  # bpftool/tc under an emulated CPU

_U32 = struct.Struct("=I")
_REMOTE_KEY = struct.Struct("=I6sH")
_REMOTE_VALUE = struct.Struct("=I16s16s")
_PORT_VALUE = struct.Struct("=II")


class FlowModeError(Exception):
    """bpftool or tc refused; the message says which command and why."""


# --- map encodings (pure) --------------------------------------------------------------


def _address_bytes(address: str) -> bytes:
    return ipaddress.ip_address(address).packed.ljust(16, b"\0")


def _address_text(family: int, raw: bytes) -> str:
    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw))


def remote_key(vsid: int, mac: str) -> bytes:
    return _REMOTE_KEY.pack(vsid, bytes.fromhex(mac.replace(":", "")), 0)


def remote_value(remote: str, local: str) -> bytes:
    family = ipaddress.ip_address(remote).version
    return _REMOTE_VALUE.pack(family, _address_bytes(remote), _address_bytes(local))


def decode_remote(key: bytes, value: bytes) -> FlowRemote:
    vsid, mac, _pad = _REMOTE_KEY.unpack(key)
    family, remote, local = _REMOTE_VALUE.unpack(value)
    return FlowRemote(vsid, ":".join(f"{b:02x}" for b in mac),
                      _address_text(family, remote), _address_text(family, local))


def u32(value: int) -> bytes:
    return _U32.pack(value)


def port_value(vsid: int, tunnel_ifindex: int) -> bytes:
    return _PORT_VALUE.pack(vsid, tunnel_ifindex)


def _hex(data: bytes) -> str:
    return "hex " + " ".join(f"{b:02x}" for b in data)


def _bytes(dumped: list[str]) -> bytes:
    return bytes(int(b, 16) for b in dumped)


# --- the pinned datapath of one host ----------------------------------------------------


@dataclass(frozen=True)
class MapWrite:
    """One map update (value set) or delete (value None)."""

    map: str
    key: bytes
    value: bytes | None = None


class FlowDatapath:
    """The pinned programs and maps of one host; `netns` None is the agent's own."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self.pins = PIN_ROOT / namespace_key(netns)  # one directory per namespace

    # -- running the tools ------------------------------------------------------------

    def _run(self, argv: list[str], what: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FlowModeError(f"{what}: {argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            reason = (proc.stderr or proc.stdout).strip().splitlines()
            raise FlowModeError(f"{what}: {reason[-1] if reason else f'exit {proc.returncode}'}")
        return proc.stdout

    def _tc(self, *args: str, what: str) -> str:
        # nsenter, not `tc -n` (or `ip netns exec`): those also remount /sys for the
        # namespace, which hides bpffs at /sys/fs/bpf and with it the pinned programs.
        netns = ["nsenter", f"--net={netns_path(self.netns)}"] if self.netns else []
        return self._run([*netns, "tc", *args], what)

    def _map(self, name: str) -> Path:
        return self.pins / "maps" / name

    def programs_dir(self) -> Path:
        """Where this agent's build of the object pins its programs. One directory per
        build: an upgraded agent does not find its predecessor's programs here, so what
        is attached reads as stale and is replaced. (The digest is in the path because
        bpffs holds pins and directories, no files.)"""
        return self.pins / "progs" / (object_digest()[:16] or "unbuilt")

    def _program(self, name: str) -> Path:
        return self.programs_dir() / name

    # -- load -------------------------------------------------------------------------

    def present(self) -> bool:
        return all(self._map(m).exists() for m in (REMOTES, PORTS, VSIDS))

    def ensure_loaded(self) -> None:
        """Programs and maps pinned, the programs from this agent's object; maps already
        pinned are reused (their entries are what keeps forwarding across an agent
        restart, an upgrade or a program reload)."""
        if self.present() and all(self._program(p).exists() for p in PROGRAMS):
            return
        if not OBJECT.exists():
            raise FlowModeError(f"flow mode: {OBJECT.name} is not built (run `make bpf`)")
        _mount_bpffs()
        self.pins.mkdir(parents=True, exist_ok=True, mode=0o700)
        progs = self.pins / "progs"
        if progs.exists():
            shutil.rmtree(progs)  # pins of programs only: removing them unloads nothing attached
        progs.mkdir(mode=0o700)
        argv = ["bpftool", "prog", "loadall", str(OBJECT), str(self.programs_dir()), "type", "classifier"]
        if self.present():
            for name in (REMOTES, PORTS, VSIDS):
                argv += ["map", "name", name, "pinned", str(self._map(name))]
        else:
            shutil.rmtree(self.pins / "maps", ignore_errors=True)
            argv += ["pinmaps", str(self.pins / "maps")]
        self._run(argv, f"loading {OBJECT.name}")

    def program_id(self, name: str) -> int | None:
        if not self._program(name).exists():
            return None
        info = json.loads(self._run(["bpftool", "-j", "prog", "show", "pinned", str(self._program(name))],
                                    f"reading program {name}"))
        return info.get("id")

    # -- maps -------------------------------------------------------------------------

    def dump(self, name: str) -> list[tuple[bytes, bytes]]:
        out = self._run(["bpftool", "-j", "map", "dump", "pinned", str(self._map(name))],
                        f"reading map {name}")
        return [(_bytes(e["key"]), _bytes(e["value"])) for e in json.loads(out or "[]")]

    def observe(self, names: dict[int, str]) -> tuple[list[FlowRemote], list[FlowPort]]:
        """The map entries in kernel terms; `names` maps this namespace's ifindexes to
        names (an entry naming a device that is gone reads as "?", so it is rewritten)."""
        if not self.present():
            return [], []
        remotes = [decode_remote(k, v) for k, v in self.dump(REMOTES)]
        ports = {_U32.unpack(k)[0]: _PORT_VALUE.unpack(v) for k, v in self.dump(PORTS)}
        flow_ports = []
        for key, value in self.dump(VSIDS):
            vsid, ifindex = _U32.unpack(key)[0], _U32.unpack(value)[0]
            port_vsid, tunnel = ports.get(ifindex, (None, 0))
            flow_ports.append(FlowPort(
                vsid, names.get(ifindex, "?"),
                names.get(tunnel, "?") if port_vsid == vsid else "?"))
        return remotes, flow_ports

    def write(self, writes: list[MapWrite]) -> list[tuple[MapWrite, str]]:
        """All `writes` in one ``bpftool batch``; when the batch stops at a refusal (it
        does at the first), each write is retried alone so one bad entry costs only
        itself. Returns the refused writes with bpftool's reason; a delete of an entry
        that is already gone is not a refusal."""
        if not writes:
            return []
        if self._batch(writes) is None:
            return []
        failed = []
        for w in writes:
            reason = self._batch([w])
            if reason is not None and not (w.value is None and "No such file" in reason):
                failed.append((w, reason))
        return failed

    def _batch(self, writes: list[MapWrite]) -> str | None:
        lines = []
        for w in writes:
            path = self._map(w.map)
            if w.value is None:
                lines.append(f"map delete pinned {path} key {_hex(w.key)}")
            else:
                lines.append(f"map update pinned {path} key {_hex(w.key)} value {_hex(w.value)}")
        with tempfile.NamedTemporaryFile("w", suffix=".bpftool") as batch:
            batch.write("\n".join(lines) + "\n")
            batch.flush()
            try:
                self._run(["bpftool", "batch", "file", batch.name], "writing the flow maps")
            except FlowModeError as exc:
                return str(exc)
        return None

    # -- tc attachments ---------------------------------------------------------------

    def program_ids(self) -> dict[str, int | None]:
        """The id of each pinned program (None: not pinned from this object), read once per observe."""
        return {name: self.program_id(name) for name in PROGRAMS}

    def attached(self, device: str, direction: str, pinned: dict[str, int | None]) -> TcProgram | None:
        """Our program on `device` at `direction`: its name when it is the pinned one
        (`pinned`: program_ids()), "<name> id <n>" when another (a stale load), None when
        no filter of ours."""
        try:
            out = self._tc("-j", "filter", "show", "dev", device, direction, "pref", str(FILTER_PREF),
                           what=f"reading filters of {device}")
        except FlowModeError:
            return None  # no clsact qdisc: nothing attached
        for entry in json.loads(out or "[]"):
            prog = (entry.get("options") or {}).get("prog") or {}
            if "id" not in prog:
                continue
            name = prog.get("name", "?")
            if prog["id"] == pinned.get(name):
                return TcProgram(device, direction, name)
            return TcProgram(device, direction, f"{name} id {prog['id']}")
        return None

    def attach(self, program: TcProgram) -> None:
        self.ensure_loaded()
        self._tc("qdisc", "replace", "dev", program.device, "clsact",
                 what=f"clsact on {program.device}")
        self._tc("filter", "replace", "dev", program.device, program.direction,
                 "pref", str(FILTER_PREF), "handle", "1", "bpf",
                 "object-pinned", str(self._program(program.program)), "direct-action",
                 what=f"attaching {program.program} to {program.device} {program.direction}")

    def detach(self, program: TcProgram) -> None:
        try:
            self._tc("filter", "del", "dev", program.device, program.direction,
                     "pref", str(FILTER_PREF), what=f"detaching from {program.device}")
        except FlowModeError as exc:
            if "Cannot find device" not in str(exc) and "No such file" not in str(exc):
                raise


@functools.cache
def object_digest() -> str:
    """The built object's SHA-256: what the pinned programs were loaded from."""
    try:
        return hashlib.sha256(OBJECT.read_bytes()).hexdigest()
    except OSError:
        return ""


def _mount_bpffs() -> None:
    """bpffs on /sys/fs/bpf, as systemd mounts it; mounted here when a minimal system
    (a VM, a container) has not."""
    with open("/proc/mounts") as mounts:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in mounts):
            return
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True, capture_output=True,
                   timeout=TOOL_TIMEOUT_S)
