"""The lab's daemons: the controller and one agent per host, as real processes.

Owns starting them inside their hosts' namespaces (so they talk HTTP across the lab's
management network, as VMM and its hosts do), waiting until they answer, and stopping
exactly the processes the lab record lists. A pid alone is not proof of identity after a
crash (pids are reused), so each entry also keeps the process's start time from
``/proc/<pid>/stat`` and only a process with both is signalled.

Work directory layout (``record.workdir``, on a local file system)::

    controller/            hnv-controller state dir: admin.token, hosts/<host>.token, store
    agents/<host>/         hnv-agent state dir: the last accepted state

and in ``record.artefacts_dir`` (the same directory, or the VM's shared one)::

    logs/controller.log    stdout+stderr of each daemon
    logs/agent-<host>.log

It never touches links or namespaces (``netns_lab.build``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from netns_lab.build import LabError, LabRecord, ProcessEntry, entered_netns
from netns_lab.topology import Topology


def executable(name: str) -> str:
    """A console script of this project: next to the running Python first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} not found: install the project (pip install -e .)")
    return found


def controller_dir(record: LabRecord) -> Path:
    return Path(record.workdir) / "controller"


def admin_token_file(record: LabRecord) -> Path:
    return controller_dir(record) / "admin.token"


def host_token_file(record: LabRecord, host: str) -> Path:
    return controller_dir(record) / "hosts" / f"{host}.token"


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; the fields after its closing ')' are plain.
    return int(stat.rpartition(")")[2].split()[19])


def is_alive(entry: ProcessEntry) -> bool:
    return entry.pid is not None and _start_time(entry.pid) == entry.start_time


def _spawn(record: LabRecord, entry: ProcessEntry) -> None:
    # Recorded before it exists (argv, log), completed with pid and start time after.
    record.processes.append(entry)
    record.save()
    Path(entry.log).parent.mkdir(parents=True, exist_ok=True)
    with open(entry.log, "ab") as log:
        # `ip netns exec` execs the daemon in place: the pid is the daemon's. A session of
        # its own so the daemon outlives `hnv-lab up` and a Ctrl-C of the terminal.
        proc = subprocess.Popen(["ip", "netns", "exec", entry.netns, *entry.argv],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    entry.pid = proc.pid
    entry.start_time = _start_time(proc.pid)
    record.save()


def init_controller(topology: Topology, record: LabRecord) -> None:
    """``hnv-controller init``: the store and the admin and per-host tokens.

    Called in this process (the command's own ``main``): under software emulation a
    Python start with its imports costs seconds, and nothing here needs a namespace.
    """
    state_dir = controller_dir(record)
    if admin_token_file(record).exists():
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    from controller import cli as controller_cli

    argv = ["init", "--state-dir", str(state_dir),
            *[arg for host in topology.hosts for arg in ("--host", host.name)]]
    with contextlib.redirect_stdout(io.StringIO()):
        code = controller_cli.main(argv)
    if code != 0:
        raise LabError(f"hnv-controller {' '.join(argv)} exited {code}")


def _wait_for_tcp(netns: str, address: str, port: int, entry: ProcessEntry, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with entered_netns(netns):
        while True:
            try:
                with socket.create_connection((address, port), timeout=1):
                    return
            except OSError as exc:
                if not is_alive(entry):
                    raise LabError(f"{entry.role} on {entry.name} exited before listening on "
                                   f"{address}:{port}; see {entry.log}") from None
                if time.monotonic() > deadline:
                    raise LabError(f"{entry.role} on {entry.name} is not listening on "
                                   f"{address}:{port} after {timeout:.0f} s ({exc}); see {entry.log}") from None
            time.sleep(0.2)


# Generous: under software emulation on a busy machine a daemon's imports alone can take
# a minute or more. Readiness is polled, so a fast machine does not wait for it.
START_TIMEOUT = 900.0


def start_all(topology: Topology, record: LabRecord, timeout: float = START_TIMEOUT) -> None:
    """Start the controller, wait until it listens, then every agent at once."""
    workdir = Path(record.workdir)
    logs = record.artefacts_dir / "logs"
    init_controller(topology, record)
    controller_host = topology.host(topology.controller.host)
    assert controller_host is not None
    running = {(p.role, p.name) for p in record.processes if is_alive(p)}

    controller = ProcessEntry(
        role="controller", name=controller_host.name, netns=controller_host.name,
        argv=[executable("hnv-controller"), "run", "--state-dir", str(controller_dir(record)),
              "--listen", f"{topology.controller_address}:{topology.controller.port}"],
        log=str(logs / "controller.log"),
    )
    if ("controller", controller.name) not in running:
        _spawn(record, controller)
    else:
        controller = next(p for p in record.processes if p.role == "controller" and is_alive(p))

    # Agents start in parallel with the controller's own start-up: each retries its
    # connection, so nothing waits for anything but the slowest process.
    agent_bin = executable("hnv-agent")
    for host in topology.hosts:
        if ("agent", host.name) in running:
            continue
        state_dir = workdir / "agents" / host.name
        state_dir.mkdir(parents=True, exist_ok=True)
        _spawn(record, ProcessEntry(
            role="agent", name=host.name, netns=host.name,
            argv=[agent_bin, "run", "--controller", topology.controller_url,
                  "--host", host.name, "--token-file", str(host_token_file(record, host.name)),
                  "--state-dir", str(state_dir),
                  "--metrics-address", f"{host.address}:{topology.agent.metrics_port}",
                  # The controller is one hop away: retry soon after it answers "not yet"
                  # (a host is known only once hnvctl adds it). Drift repair is also
                  # event-driven, so a slower periodic pass spares seven agents' CPU
                  # under emulation.
                  "--reconnect-max-delay", "2", "--resync-interval", "10"],
            log=str(logs / f"agent-{host.name}.log"),
        ))
    _wait_for_tcp(controller.netns, topology.controller_address, topology.controller.port,
                  controller, timeout)
    dead = [p for p in record.processes if not is_alive(p)]
    if dead:
        raise LabError(f"{dead[0].role} on {dead[0].name} exited; see {dead[0].log}")


def stop(entry: ProcessEntry, grace: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds; True if it was running."""
    if not is_alive(entry):
        return False
    assert entry.pid is not None
    os.kill(entry.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while is_alive(entry) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(entry):
        os.kill(entry.pid, signal.SIGKILL)
    return True


def stop_all(record: LabRecord) -> list[str]:
    """Stop every recorded process that is still the one we started; agents first."""
    stopped = []
    ordered = sorted(record.processes, key=lambda p: p.role == "controller")
    alive = [p for p in ordered if is_alive(p)]
    # SIGTERM to all at once, then wait: seven agents stop in parallel, not in turn.
    for entry in alive:
        try:
            os.kill(entry.pid, signal.SIGTERM)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass
    for entry in alive:
        stop(entry)
        stopped.append(f"{entry.role} {entry.name} (pid {entry.pid})")
    return stopped


def tail(path: str, lines: int = 5) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
