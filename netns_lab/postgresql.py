"""The lab's PostgreSQL (``controller.store: postgresql``): a throw-away cluster for the
controller replicas, in the lab's work directory, inside the controller host's namespace.

Owns creating that cluster (Debian's ``initdb``, run as ``nobody``: PostgreSQL refuses
root), starting its postmaster in the controller host's network namespace listening on
that host's management address, creating the ``hnv`` database, recording the postmaster
in the lab record (pid and start time, as every lab process) and removing the cluster's
directory at ``down``. Authentication is ``trust`` for the lab's management subnet: no
password exists, so none crosses the lab network, and nothing outside the lab's
namespaces can reach that address.

It does not start the controllers (``netns_lab.processes``) nor touch links.

Work directory layout: ``postgresql/data`` (the cluster, owned by nobody, 0700) and
``postgresql/postgresql.log``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import time
from pathlib import Path

from netns_lab.build import LabError, LabRecord, ProcessEntry, run
from netns_lab.topology import Topology

RUN_AS = "nobody"
ROLE = "postgresql"
START_TIMEOUT = 300


def installed_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None.
    (Also what the PostgreSQL test tier's throw-away clusters use.)"""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def bin_dir() -> Path:
    found = installed_bin_dir()
    if found is None:
        raise LabError("store postgresql: PostgreSQL's initdb/pg_ctl are not installed "
                       "(Debian package postgresql: make setup)")
    return found


def directory(record: LabRecord) -> Path:
    return Path(record.workdir) / "postgresql"


def _as_nobody(argv: list[str]) -> list[str]:
    entry = pwd.getpwnam(RUN_AS)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", *argv]


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start(topology: Topology, record: LabRecord) -> bool:
    """Create (once) and start the cluster on the controller host's address; idempotent.
    True when the cluster was created now (an empty database: the controller needs init)."""
    from netns_lab.processes import _start_time, is_alive

    running = [p for p in record.processes if p.role == ROLE and is_alive(p)]
    if running:
        return False
    tools = bin_dir()
    root = directory(record)
    data = root / "data"
    log = root / "postgresql.log"
    user = pwd.getpwnam(RUN_AS)
    host = topology.controller.host
    entry = ProcessEntry(role=ROLE, name=host, netns=host,
                         argv=[str(tools / "postgres"), "-D", str(data)], log=str(log))
    # Recorded before it exists, as every lab process (down finds it after a crash).
    record.processes.append(entry)
    record.save()
    created = not (data / "PG_VERSION").exists()
    if created:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, mode=0o700)
        os.chown(root, user.pw_uid, user.pw_gid)
        run(_as_nobody([str(tools / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-instructions"]), timeout=START_TIMEOUT)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '{topology.controller_address}'\n"
                       f"port = {topology.controller.postgresql_port}\n"
                       f"unix_socket_directories = '{root}'\nmax_connections = 100\n"
                       # Small: the lab's VM has 2 GiB for PostgreSQL, three replicas and seven agents.
                       "shared_buffers = 32MB\n")
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {topology.management.subnet} trust\n")
    # pg_ctl forks the postmaster, which stays in the namespace pg_ctl was started in.
    run(_as_nobody([str(tools / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT),
                    "start"]), netns=host, timeout=START_TIMEOUT + 10)
    pid = _postmaster_pid(data)
    if pid is None:
        raise LabError(f"PostgreSQL on {host} started but wrote no postmaster.pid; see {log}")
    entry.pid, entry.start_time = pid, _start_time(pid)
    record.save()
    exists = run(_as_nobody([str(tools / "psql"), "-h", str(root), "-p", str(topology.controller.postgresql_port),
                             "-U", "postgres", "-At", "-c", "SELECT 1 FROM pg_database WHERE datname = 'hnv'"]))
    if exists.stdout.strip() != "1":
        run(_as_nobody([str(tools / "createdb"), "-h", str(root), "-p", str(topology.controller.postgresql_port),
                        "-U", "postgres", "hnv"]))
    return created


def wait_stopped(entry: ProcessEntry, timeout: float = 30.0) -> None:
    from netns_lab.processes import is_alive

    deadline = time.monotonic() + timeout
    while is_alive(entry) and time.monotonic() < deadline:
        time.sleep(0.05)


def remove(record: LabRecord) -> bool:
    """Delete the cluster's directory (after its postmaster stopped); True if there was one."""
    root = directory(record)
    if not root.exists():
        return False
    shutil.rmtree(root)
    return True
