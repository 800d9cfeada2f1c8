"""Network namespaces: entering one, and the life cycle of the lab VM namespaces the agent makes.

Owns the one way the project moves into a named network namespace (``/run/netns/<name>``,
as ``ip netns`` makes them) and the ``ip netns exec`` command prefix, for the agent, the
labs, the tests and the benchmarks alike:

- ``in_netns(name, func)``: run ``func`` in a short-lived thread that entered ``name``
  (setns(2) moves only the calling thread, so the caller never changes namespace);
- ``entered_netns(name)``: the calling thread inside ``name`` for a ``with`` block, and
  back where it was afterwards, also on error;
- ``enter_netns_for_good(name)``: the calling thread (a freshly forked daemon) moves for good;
- ``netns_exec_argv(name, argv)``: ``argv`` prefixed with ``ip netns exec <name>``;
- ``namespace_key(name)``: the name of the directory where an agent keeps what belongs
  to its namespace (DHCP servers' files, pinned eBPF objects).

And the lab VM namespaces (ports of kind ``namespace``, where the agent plays the
hypervisor): ``ensure_vm_netns`` creates one when missing and marks it as openhnv's by
setting the ifalias of its loopback device to ``openhnv:netns:<port>@<host>``
(agent.naming.vm_netns_marker); a namespace that existed before is never marked, so it is
never removed. ``vm_netns_marker_of`` reads the mark back, ``remove_netns`` removes the name.

Pure mechanism: it never decides which namespace should exist (agent.plan) and never
imports the controller or the labs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from agent import naming

# pyroute2 is imported where it is used: the labs and tests import this module for
# entered_netns alone, and pyroute2's import costs seconds under software emulation.
NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def netns_path(name: str) -> str:
    """``/run/netns/<name>``; an absolute path is taken as it is."""
    return name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)


def namespace_key(name: str | None) -> str:
    """What names one agent's files among others on the machine: the namespace's name, or
    (None: the agent's own namespace) ``net-<inode>`` of the calling thread's namespace.

    Why not a fixed name such as "host": several agents can share one machine's /run and
    bpffs, each in its own network namespace entered before it started (the netns lab's
    forked daemons), and their objects are named by bridge and VSID alike on every host.
    The inode is the same for every process in the namespace while it exists (the daemon,
    `hnv-agent show`), with or without the privileges to look at PID 1's namespace, and
    /run and bpffs start empty at boot, as the namespace does."""
    return name or f"net-{os.stat('/proc/thread-self/ns/net').st_ino}"


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns into network namespace {what}: {os.strerror(code)}")


def _open_netns(name: str) -> int:
    try:
        return os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"network namespace {name}: {exc.strerror}") from None


def enter_netns_for_good(name: str) -> None:
    """Move the calling thread into ``name`` and leave it there (a daemon just forked)."""
    fd = _open_netns(name)
    try:
        _setns(fd, name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """The calling thread inside ``name`` for the ``with`` block; restored on exit, also on error.

    Sockets opened inside the block live in that namespace and keep it after the block.
    """
    original = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = _open_netns(name)
        try:
            _setns(target, name)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original, "of the caller (restoring)")
    finally:
        os.close(original)


def in_netns(name: str | None, func: Callable[[], T]) -> T:
    """``func()`` run with the thread in network namespace ``name`` (None: right here).

    A short-lived thread enters the namespace and runs ``func``, so the caller's thread
    (and every other thread of the agent) never changes namespace. /proc/sys/net follows
    the thread's namespace, so sysctl writes inside ``func`` land in ``name``. An exception
    of ``func`` (or an OSError naming the namespace when it cannot be entered) is raised
    in the caller's thread.
    """
    if name is None:
        return func()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            enter_netns_for_good(name)  # this short-lived thread only
            result["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def netns_exec_argv(name: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` to run inside ``name`` with ``ip netns exec`` (which also remounts /sys for it)."""
    return ["ip", "netns", "exec", name, *argv] if name else list(argv)


def netns_names() -> set[str]:
    """Names of the namespaces in /run/netns."""
    try:
        return set(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return set()


# --- lab VM namespaces ---------------------------------------------------------------------


def _loopback_alias(ipr: Any) -> str | None:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        return None
    return ipr.link("get", index=found[0])[0].get_attr("IFLA_IFALIAS")


def ensure_vm_netns(name: str, marker: str) -> bool:
    """Create namespace ``name`` when missing and mark it (lo's ifalias); True if created.

    Why create then mark in one call: the mark is what lets the agent remove the namespace
    when its VM goes, and only a namespace the agent made itself may be removed. A
    namespace that was already there is left unmarked (someone else's), unless it already
    bears an openhnv mark (a VM migrating between two hosts of one lab: the new host takes
    it over).
    """
    from pyroute2 import IPRoute, netns as pyroute2_netns

    created = False
    if name not in netns_names():
        pyroute2_netns.create(name)
        created = True

    def mark() -> None:
        with IPRoute() as ipr:
            current = _loopback_alias(ipr)
            ours = created or naming.parse_vm_netns_marker(current) is not None
            if ours and current != marker:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], ifalias=marker)

    in_netns(name, mark)
    return created


def vm_netns_marker_of(name: str) -> str | None:
    """The ifalias of the loopback device in namespace ``name`` (the openhnv mark, if any)."""
    from pyroute2 import IPRoute

    def read() -> str | None:
        with IPRoute() as ipr:
            return _loopback_alias(ipr)

    return in_netns(name, read)


def remove_netns(name: str) -> None:
    """Remove the name ``name`` (``ip netns del``); the namespace dies with its last user."""
    from pyroute2 import netns as pyroute2_netns

    pyroute2_netns.remove(name)


def netns_name_of_nsid(ipr: Any, nsid: int) -> str | None:
    """The name in /run/netns of the namespace that ``ipr``'s namespace calls ``nsid``.

    ``nsid`` is a peer id as a veth reports it (IFLA_LINK_NETNSID); ids are local to the
    namespace of the asking socket, so each named namespace is asked for its id there.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    for name in sorted(netns_names()):
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # removed meanwhile, or a stale file
        try:
            found = ipr.get_netnsid(fd=fd)
        except (NetlinkError, OSError):
            found = None
        finally:
            os.close(fd)
        if found and found.get("nsid") == nsid:
            return name
    return None
