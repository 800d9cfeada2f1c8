"""systemd's notify protocol (``sd_notify(3)``), for the agent and the controller alike.

Owns telling the service manager how the process is doing: ``READY=1`` once it serves,
``WATCHDOG=1`` while it is healthy, ``STOPPING=1`` on the way out, ``STATUS=...`` for
``systemctl status``. It decides nothing itself (when to send what is the daemon's
call) and never raises into the daemon: a service manager that went away must not take
the data plane's agent with it.

Outside systemd (``NOTIFY_SOCKET`` unset: a shell, the lab, a test) every call is a
no-op that returns False.

Why hand-written rather than a library: the protocol is one datagram of ``KEY=VALUE``
lines to the AF_UNIX socket named in ``$NOTIFY_SOCKET`` (a leading '@' names an abstract
socket), a dozen lines here. The PyPI options are either the C binding
``systemd-python`` (needs libsystemd headers and a compiler to install) or small
pure-Python packages (``sdnotify``, last released in 2017, which does not handle the
abstract '@' form nor ``WATCHDOG_PID``); neither is worth a dependency for this.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

_warned = False


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` assignments in one datagram; True if a service manager got them.

        notify("READY=1", "STATUS=generation 7 applied")
    """
    global _warned
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not assignments:
        return False
    if address.startswith("@"):  # abstract namespace: the name starts with a NUL byte
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # systemd 253 also accepts vsock:CID:PORT (for VMs); a host daemon never gets it.
        if not _warned:
            log.warning("event=sd_notify_unsupported socket=%r", address)
            _warned = True
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        if not _warned:  # once: a missing socket would otherwise log every second
            log.warning("event=sd_notify_failed socket=%r reason=%r", address, exc.strerror or str(exc))
            _warned = True
        return False
    return True


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1 (half of ``WatchdogSec=``), or None when no watchdog.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it watches: a
    child that inherited the environment is not the one watched).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2
