"""Network namespaces for tests: create, run commands in, ping from, capture on, tear down.

Owns the life cycle of the namespaces a test makes and of every process the test starts
in them. A namespace is named ``<prefix>-<8 hex>`` (``t-1f2e3d4c``), so concurrent test
runs on one machine never collide, and lives in ``/run/netns`` like any ``ip netns``
namespace, so pyroute2 (``NetNS(name)``), ``ip -n`` and ``tcpdump`` can all reach it.

Teardown order matters: processes first (a process holding a namespace keeps it and its
devices alive after ``ip netns del``), then the namespace. Deleting the namespace
destroys the devices in it; a veth whose peer lives elsewhere takes its peer with it.

Typical use, through the ``make_netns`` fixture of ``tests/conftest.py``::

    a, b = make_netns(), make_netns()
    a.ip("link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", b.name)
    a.ip("addr", "add", "10.99.0.1/24", "dev", "veth-a"); a.ip("link", "set", "veth-a", "up")
    ...
    assert a.ping("10.99.0.2")
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.netns import netns_exec_argv
from netns_lab.processes import stop_process
from netns_lab.tcpdump import tcpdump_argv


class CommandFailed(Exception):
    """A command in a namespace exited non-zero; carries what ran, where, and its stderr."""

    def __init__(self, namespace: str | None, argv: Sequence[str], returncode: int, stderr: str):
        where = f"in namespace {namespace}" if namespace else "on the host"
        super().__init__(f"{' '.join(argv)} {where} exited {returncode}: {stderr.strip()}")
        self.namespace = namespace
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
        namespace: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (in ``namespace`` if given), capture text output, raise CommandFailed."""
    full = netns_exec_argv(namespace, argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(namespace, argv, proc.returncode, proc.stderr)
    return proc


class Namespace:
    """One named network namespace made for a test. Create through :class:`NamespaceFactory`."""

    def __init__(self, name: str):
        self.name = name
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (``ip netns exec``, which also gives it the
        namespace's view of /sys)."""
        return run(argv, check=check, timeout=timeout, namespace=self.name)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <ns> ARGS`` (no exec, cheaper than :meth:`run`)."""
        return run(["ip", "-n", self.name, *args], check=check)

    def tx_packets(self, *ifnames: str) -> int:
        """Packets the kernel counts as sent on these links of the namespace, summed."""
        links = {link["ifname"]: link for link in json.loads(self.ip("-j", "-s", "link", "show").stdout)}
        return sum(links[name]["stats64"]["tx"]["packets"] for name in ifnames)

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        """Start a long-running process in the namespace; it is stopped at teardown."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(netns_exec_argv(self.name, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def ping(self, address: str, *, count: int = 1, wait: float = 1.0,
             interface: str | None = None) -> bool:
        """Real ICMP echo from inside the namespace; True if ``address`` answered.

        ``wait`` is how long to wait per reply; the first ping may also wait for ARP.
        """
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait)]
        if interface:
            argv += ["-I", interface]
        timeout = count * (wait + 1) + 5
        return self.run(*argv, address, check=False, timeout=timeout).returncode == 0

    @contextlib.contextmanager
    def capture(self, interface: str, pcap: Path, bpf_filter: str = "") -> Iterator[Path]:
        """Capture on ``interface`` into ``pcap`` while the ``with`` block runs.

        Waits until tcpdump says it is listening before yielding, so no packet sent in
        the block is missed; netns_lab.tcpdump's flags keep every packet, and SIGINT makes
        tcpdump flush and close the file before the block's caller reads it.
        """
        argv = tcpdump_argv(interface, pcap, bpf_filter)
        proc = self.popen(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        banner = proc.stderr.readline()  # "tcpdump: listening on <if>, ..." once the socket is bound
        if "listening on" not in banner:
            proc.kill()
            proc.wait()
            raise CommandFailed(self.name, argv, proc.returncode or -1, banner + proc.stderr.read())
        try:
            yield pcap
        finally:
            stop_process(proc, signal.SIGINT)

    def stop_processes(self) -> None:
        """Stop what :meth:`popen` started, then anything else still in the namespace."""
        for proc in self._procs:
            stop_process(proc, grace=5)
        self._procs.clear()
        # Processes started some other way (a daemon that forked, `ip netns exec` by hand).
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        if pids:
            subprocess.run(["kill", "-KILL", *pids], capture_output=True, check=False)


class NamespaceFactory:
    """Creates uniquely named namespaces and deletes every one of them on :meth:`close`."""

    def __init__(self, prefix: str = "t"):
        self.prefix = prefix
        self.namespaces: list[Namespace] = []

    def create(self, prefix: str | None = None) -> Namespace:
        """A fresh namespace ``<prefix>-<8 hex>`` with loopback up."""
        name = f"{prefix or self.prefix}-{secrets.token_hex(4)}"
        run(["ip", "netns", "add", name])
        ns = Namespace(name)
        self.namespaces.append(ns)
        # Loopback starts down in a new namespace; tests expect 127.0.0.1 to work.
        ns.ip("link", "set", "lo", "up")
        return ns

    __call__ = create

    def close(self) -> None:
        errors = []
        for ns in reversed(self.namespaces):
            ns.stop_processes()
            proc = run(["ip", "netns", "del", ns.name], check=False)
            if proc.returncode != 0 and Path("/run/netns", ns.name).exists():
                errors.append(f"{ns.name}: {proc.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> NamespaceFactory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def veth_pair(a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
    """Join two namespaces with a veth pair, both ends up (no addresses)."""
    a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")
