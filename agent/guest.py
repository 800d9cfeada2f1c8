"""The lab's guests asking DHCP for their address (``hnv-agent run --vm-dhcp``).

In the lab the agent plays the hypervisor of namespace VMs. By default it also sets each
VM's address, default route and MTU, as a guest's static configuration would. With
``--vm-dhcp`` a VM of an IPv4 VM subnet is left as a freshly booted guest is, with its NIC
up and no address, and the agent starts that guest's DHCP client (busybox udhcpc) in the
VM's namespace once the NIC exists and the host's DHCP server (agent.dhcp) is running: the
VM gets exactly the CA VMM allocated, the gateway and the tenant MTU the way a Hyper-V VM
does. The client exits once bound (the address stays; it never outlives the exchange, so
no process of ours holds a deleted VM's namespace) and is started again whenever the agent
makes the NIC again (a VM migrated here gets its second NIC, a deleted one is rebuilt).
One that got no lease is started again, CLIENT_ATTEMPTS times in all. It never delays a
reconcile: each reconcile only reaps the clients that finished and logs each outcome
(``event=guest_dhcp``).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.logfmt import quote
from agent.netns import netns_exec_argv

log = logging.getLogger(__name__)

# What the guest's client does with its lease: the busybox udhcpc script protocol ($1 the
# event; $ip, $subnet (a netmask), $router, $mtu, $dns, $lease from the offer).
CLIENT_SCRIPT = """#!/bin/sh
# openhnv lab guest: a VM's DHCP client configuring its NIC (written by hnv-agent)
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "$1 ip=$ip/$subnet router=$router mtu=$mtu dns=$dns lease=$lease" ;;
esac
"""
DISCOVER_TRIES = 15  # one a second: the host's server may start a moment after the NIC
CLIENT_ATTEMPTS = 3


def client_program() -> str | None:
    """busybox (for its udhcpc applet), or None where it is not installed."""
    return shutil.which("busybox")


@dataclass
class _Client:
    vm: str
    namespace: str
    nic: str
    process: subprocess.Popen
    attempt: int = 1


class GuestDhcp:
    """Starts the guests' DHCP clients and reaps them; files under ``run_dir``."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._clients: list[_Client] = []
        self._script_written = False

    def _script(self) -> Path:
        """The client script, written (over whatever was there) once per agent."""
        path = self.run_dir / "guest-dhcp-client.sh"
        if not self._script_written:
            self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(CLIENT_SCRIPT)
            path.chmod(0o700)
            self._script_written = True
        return path

    def start(self, vm: str, namespace: str, nic: str, attempt: int = 1) -> None:
        """The client of the guest `vm`, on `nic` in `namespace`, in the background."""
        program = client_program()
        if program is None:
            log.error("event=guest_dhcp vm=%s nic=%s result=failed reason=%s", quote(vm), nic,
                      quote("busybox is not installed: no DHCP client for the lab's guests"))
            return
        argv = netns_exec_argv(namespace, [program, "udhcpc", "-i", nic, "-f", "-q", "-n", "-O", "mtu",
                                           "-t", str(DISCOVER_TRIES), "-T", "1", "-s", str(self._script())])
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._clients.append(_Client(vm, namespace, nic, process, attempt))
        log.info("event=guest_dhcp vm=%s nic=%s result=started attempt=%d", quote(vm), nic, attempt)

    @property
    def running(self) -> int:
        """Clients not reaped yet."""
        return len(self._clients)

    def reap(self) -> None:
        """Log the outcome of every client that finished (starting a failed one again);
        keep the others."""
        finished = [client for client in self._clients if client.process.poll() is not None]
        self._clients = [client for client in self._clients if client.process.returncode is None]
        for client in finished:
            output = ""
            if client.process.stdout is not None:
                output = client.process.stdout.read()
                client.process.stdout.close()
            bound = [line for line in output.splitlines() if line.startswith(("bound ", "renew "))]
            if client.process.returncode == 0 and bound:
                log.info("event=guest_dhcp vm=%s nic=%s result=bound lease=%s", quote(client.vm), client.nic,
                         quote(bound[-1]))
                continue
            log.warning("event=guest_dhcp vm=%s nic=%s result=failed attempt=%d exit=%s output=%s",
                        quote(client.vm), client.nic, client.attempt, client.process.returncode,
                        quote(output.strip()[-300:]))
            if client.attempt < CLIENT_ATTEMPTS:
                self.start(client.vm, client.namespace, client.nic, client.attempt + 1)
