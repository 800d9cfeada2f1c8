"""The lab's daemons: the controller (or its replicas) and one agent per host, as real processes.

Owns starting them inside their hosts' namespaces (so they talk HTTPS across the lab's
management network, as VMM and its hosts do; the controller's certificate names its lab
address, the agents verify it against the controller's CA file), waiting until they answer, and stopping
exactly the processes the lab record lists. A pid alone is not proof of identity after a
crash (pids are reused), so each entry also keeps the process's start time from
``/proc/<pid>/stat`` and only a process with both is signalled. Also owns
``stop_process``, the one way the labs, the tests and the benchmarks stop a child they
started with Popen (signal, grace period, SIGKILL, reap).

Work directory layout (``record.workdir``, on a local file system)::

    controller/            hnv-controller state dir: admin.token, hosts/<host>.token, store,
                           tls/ca.crt (what agents and hnvctl verify against), tls/server.*
    agents/<host>/         hnv-agent state dir: the last accepted state

and in ``record.artefacts_dir`` (the same directory, or the VM's shared one)::

    logs/controller.log    stdout+stderr of each daemon (replicas: controller-<i>.log)
    logs/agent-<host>.log
    logs/external-web.log  the external network's web server (topology ``external``)
    logs/prometheus.log    (hnv-lab up --prometheus: netns_lab.prometheus)

With ``controller.store: postgresql`` PostgreSQL is started first (``netns_lab.postgresql``)
and every replica and ``init`` get ``--store URL``; agents get every replica's URL.

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
import traceback
from collections.abc import Callable
from pathlib import Path

from agent.netns import enter_netns_for_good
from netns_lab.build import LabError, LabRecord, ProcessEntry, entered_netns
from netns_lab.topology import ControllerReplica, StoreKind, Topology


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
    from controller.cli import host_token_path

    return host_token_path(controller_dir(record), host)


def ca_file(record: LabRecord) -> Path:
    """The controller's CA certificate: agents and hnvctl verify the controller with it."""
    return controller_dir(record) / "tls" / "ca.crt"


def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; the fields after its closing ')' are plain:
    # [0] is field 3 (state), [19] is field 22 (start time).
    return stat.rpartition(")")[2].split()


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def is_alive(entry: ProcessEntry) -> bool:
    if entry.pid is None:
        return False
    fields = _stat(entry.pid)
    # A zombie (our own child that exited and was not reaped yet) is not running.
    return bool(fields) and fields[0] != "Z" and int(fields[19]) == entry.start_time


def _enter_host(netns: str) -> None:
    """Become a process of host ``netns`` for good: its network namespace, nothing else.

    Unlike ``ip netns exec`` the mount namespace stays the caller's: the agents create
    their VMs' namespaces (``/run/netns/<VM>`` bind mounts), and a bind mount made in a
    private mount namespace would leave an empty file behind for everyone else
    ("setting the network namespace failed: Invalid argument"). The daemons read
    /proc/sys/net, which follows the network namespace; nothing of theirs reads /sys.
    """
    enter_netns_for_good(netns)


def _main_of(entry: ProcessEntry) -> Callable[[list[str]], int]:
    """The daemon's own ``main`` (its console script's, or the external network's web
    server's), imported in the parent; for a program that is not ours (the lab's
    Prometheus), a function that execs it."""
    if entry.role == "web":  # python -m netns_lab.webserver ARGS
        from netns_lab import webserver

        return lambda args: webserver.main(args[2:])
    if entry.role not in ("controller", "agent"):
        return lambda args: os.execv(entry.argv[0], entry.argv)
    if entry.role == "controller":
        from controller import cli as controller_cli

        return controller_cli.main
    from agent import cli as agent_cli

    return agent_cli.main


def preload_daemons() -> None:
    """Import the daemons' code once, before forking them (see :func:`spawn`)."""
    from agent import cli as agent_cli, daemon  # noqa: F401
    from controller import api, cli as controller_cli  # noqa: F401


def spawn(record: LabRecord, entry: ProcessEntry) -> None:
    """Start one daemon: a forked child that enters its host and runs the daemon's main.

    Why fork rather than exec ``ip netns exec hnv-agent run ...``: a fresh Python that
    imports pydantic, FastAPI, pyroute2 costs tens of seconds of CPU under software
    emulation, eight times over on two CPUs. The parent imports the daemons' code once
    (:func:`preload_daemons`) and each child starts from that. The child is still a
    process of its own, in its host's namespaces, speaking HTTP to the controller over
    the management network, with its own log; ``entry.argv`` is the command line it
    runs, as a user would type it.
    """
    # Recorded before it exists (argv, log), completed with pid and start time after.
    record.processes.append(entry)
    record.save()
    Path(entry.log).parent.mkdir(parents=True, exist_ok=True)
    main = _main_of(entry)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            # A session of its own: the daemon outlives `hnv-lab up` and a Ctrl-C of the
            # terminal; down stops it by pid.
            os.setsid()
            log = os.open(entry.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            # The caller's sys.stdout/sys.stderr may not be its fds 1 and 2 (a test that
            # runs hnv-lab's main captures them): the daemon writes to its log.
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - for the child's life
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _enter_host(entry.netns)
            sys.argv = [Path(entry.argv[0]).name, *entry.argv[1:]]
            code = main(entry.argv[1:]) or 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - the child reports in its log and exits
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    entry.pid = pid
    entry.start_time = _start_time(pid)
    record.save()


def store_arguments(topology: Topology) -> list[str]:
    """``--store URL`` for the controller's commands: none for the embedded SQLite file."""
    if topology.controller.store is StoreKind.postgresql:
        return ["--store", topology.postgresql_url]
    return []


def init_controller(topology: Topology, record: LabRecord) -> bool:
    """``hnv-controller init``: the store, the admin and per-host tokens, the CA and the
    server certificate for the controller's lab address. False when the state directory
    already had them (nothing done), True when a new fabric was made.

    Called in this process (the command's own ``main``): under software emulation a
    Python start with its imports costs seconds. With ``store: postgresql`` the calling
    thread enters the controller's host for it (the database listens there).
    """
    state_dir = controller_dir(record)
    if admin_token_file(record).exists() and ca_file(record).exists():
        return False
    state_dir.mkdir(parents=True, exist_ok=True)
    from controller import cli as controller_cli

    # One certificate naming every replica's address (several replicas may share a host).
    addresses = dict.fromkeys(replica.address for replica in topology.controller_replicas)
    argv = ["init", "--state-dir", str(state_dir),
            *[arg for address in addresses for arg in ("--tls-address", address)],
            "--tls-address", "127.0.0.1", "--tls-name", "localhost",
            *store_arguments(topology),
            *[arg for host in topology.hosts for arg in ("--host", host.name)]]
    # PostgreSQL listens only on the lab's management network: init reaches it from the
    # controller's host (this thread only; the embedded SQLite file needs no namespace).
    where = (entered_netns(topology.controller.host) if topology.controller.store is StoreKind.postgresql
             else contextlib.nullcontext())
    with where, contextlib.redirect_stdout(io.StringIO()):
        code = controller_cli.main(argv)
    if code != 0:
        raise LabError(f"hnv-controller {' '.join(argv)} exited {code}")
    return True


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
# The lab agents' periodic reconcile (--resync-interval), seconds. Every drift the lab
# shows (a deleted tunnel, FDB entry, address) is a kernel event and repaired at once;
# the periodic pass is the safety net, and in the lab it planned nothing while costing
# each of nine agents 1-8 s of emulated CPU per pass (the seed walkthrough: 462 s with
# 10 s, 438 s with 60 s; one kernel-tier run each).
LAB_RESYNC_S = 60


def restart(record: LabRecord, entry: ProcessEntry) -> ProcessEntry:
    """Start a stopped daemon again with the command line and log it had (a lab host's
    agent coming back); its entry in the record is replaced. A running one is left."""
    if is_alive(entry):
        return entry
    if entry.role in ("controller", "agent"):
        preload_daemons()
    record.processes.remove(entry)
    again = ProcessEntry(role=entry.role, name=entry.name, netns=entry.netns, argv=entry.argv, log=entry.log)
    spawn(record, again)
    return again


def _replica_name(topology: Topology, replica: ControllerReplica) -> str:
    """A controller replica's process name: its host's, or host:port when there are several
    (one replica keeps the name the lab always had)."""
    return replica.host.name if len(topology.controller_replicas) == 1 else f"{replica.host.name}:{replica.port}"


def start_all(topology: Topology, record: LabRecord, timeout: float = START_TIMEOUT) -> None:
    """Start PostgreSQL (``store: postgresql``), the controller replicas, wait until the
    first listens, then every agent at once."""
    workdir = Path(record.workdir)
    logs = record.artefacts_dir / "logs"
    if topology.controller.store is StoreKind.postgresql:
        # Why first: init creates the schema and the tokens in the database.
        from netns_lab import postgresql

        if postgresql.start(topology, record):
            # An empty database: token files and certificates left in the state directory
            # by an earlier lab would name tokens it does not hold; init makes new ones.
            shutil.rmtree(controller_dir(record), ignore_errors=True)
    if init_controller(topology, record):
        # A new fabric: what the agents held came from another one. They would take the
        # new fabric's states anyway (its fabric id differs), but would first re-apply the
        # old one at start-up.
        shutil.rmtree(workdir / "agents", ignore_errors=True)
    running = {(p.role, p.name) for p in record.processes if is_alive(p)}
    wanted = ({("controller", _replica_name(topology, r)) for r in topology.controller_replicas}
              | {("agent", host.name) for host in topology.hosts})
    if wanted - running:  # a lab already running (`demo` on a lab that is up) forks nothing
        preload_daemons()

    controllers = []
    for i, replica in enumerate(topology.controller_replicas):
        name = _replica_name(topology, replica)
        entry = ProcessEntry(
            role="controller", name=name, netns=replica.host.name,
            argv=[executable("hnv-controller"), "run", "--state-dir", str(controller_dir(record)),
                  *store_arguments(topology), "--listen", f"{replica.address}:{replica.port}",
                  "--gateway-failover-after", f"{topology.controller.gateway_failover_after:g}"],
            log=str(logs / ("controller.log" if len(topology.controller_replicas) == 1
                            else f"controller-{i + 1}.log")),
        )
        if ("controller", name) not in running:
            spawn(record, entry)
        else:
            entry = next(p for p in record.processes if p.role == "controller" and p.name == name and is_alive(p))
        controllers.append(entry)

    # Agents start in parallel with the controller's own start-up: each retries its
    # connection, so nothing waits for anything but the slowest process.
    agent_bin = executable("hnv-agent")
    for host in topology.hosts:
        if ("agent", host.name) in running:
            continue
        state_dir = workdir / "agents" / host.name
        state_dir.mkdir(parents=True, exist_ok=True)
        spawn(record, ProcessEntry(
            role="agent", name=host.name, netns=host.name,
            argv=[agent_bin, "run",
                  # Every replica: the agent ranks them in an order of its own, watches the
                  # first that answers and moves to the next when it stops answering.
                  *[arg for url in topology.controller_urls for arg in ("--controller", url)],
                  "--host", host.name, "--token-file", str(host_token_file(record, host.name)),
                  "--ca-file", str(ca_file(record)),
                  "--state-dir", str(state_dir),
                  "--metrics-address", f"{host.address}:{topology.agent.metrics_port}",
                  # The controller is one hop away: retry soon after it answers "not yet"
                  # (a host is known only once hnvctl adds it). Drift repair is
                  # event-driven; the periodic pass is only its safety net (LAB_RESYNC_S).
                  "--reconnect-max-delay", "2", "--resync-interval", str(LAB_RESYNC_S),
                  *(["--vm-dhcp"] if topology.agent.vm_dhcp else [])],
            log=str(logs / f"agent-{host.name}.log"),
        ))
    external = topology.external
    if external is not None and ("web", external.namespace) not in running:
        spawn(record, ProcessEntry(
            role="web", name=external.namespace, netns=external.namespace,
            argv=[sys.executable, "-m", "netns_lab.webserver", "--listen",
                  f"{external.address.ip}:{external.web_port}"],
            log=str(logs / "external-web.log"),
        ))
    for replica, entry in zip(topology.controller_replicas, controllers):
        _wait_for_tcp(entry.netns, replica.address, replica.port, entry, timeout)
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
        _reap(entry.pid)
        time.sleep(0.05)
    if is_alive(entry):
        os.kill(entry.pid, signal.SIGKILL)
    _reap(entry.pid)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status of a daemon this process forked (nothing if not ours)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> int:
    """Stop a child started with Popen: ``sig``, ``grace`` seconds to exit, then SIGKILL.

    The one way the labs, the tests and the benchmarks stop a process they started
    (SIGINT lets tcpdump flush its capture file; SIGTERM lets a daemon finish its
    request). Always reaps it; returns its exit status (negative: the signal that ended
    it). A process that already exited is only reaped.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return proc.wait()


# The order processes stop in: agents (and Prometheus), then the controllers, then the
# database they write to (a controller stopping may still commit; PostgreSQL's shutdown
# waits for its clients).
_STOP_RANK = {"controller": 1, "postgresql": 2}


def stop_all(record: LabRecord) -> list[str]:
    """Stop every recorded process that is still the one we started; agents first,
    PostgreSQL last."""
    stopped = []
    ordered = sorted(record.processes, key=lambda p: _STOP_RANK.get(p.role, 0))
    for rank in sorted({_STOP_RANK.get(p.role, 0) for p in ordered}):
        alive = [p for p in ordered if _STOP_RANK.get(p.role, 0) == rank and is_alive(p)]
        # SIGTERM to all of a rank at once, then wait: seven agents stop in parallel, not in turn.
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
