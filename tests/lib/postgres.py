"""A throw-away PostgreSQL cluster for tests and the bench: Debian's initdb and pg_ctl,
run as an unprivileged user (PostgreSQL refuses root), in a temporary directory,
listening on 127.0.0.1 at a free port, trust authentication (nothing leaves the machine).

    cluster = PgCluster.create()           # initdb + start
    url = cluster.new_database()           # postgresql://postgres@127.0.0.1:PORT/hnv_1
    cluster.stop(); cluster.start()        # an outage, as the controller sees one
    standby = cluster.standby()            # pg_basebackup -R, started: a streaming standby
    cluster.destroy()

`missing()` says why no cluster can be made here (no binaries), for a skip reason.
Owns nothing but its directory and its postmaster.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from netns_lab.postgresql import installed_bin_dir as bin_dir
from tests.lib.controller import free_port

RUN_AS = "nobody"


def missing() -> str | None:
    if bin_dir() is None:
        return "PostgreSQL's initdb/pg_ctl are not installed (Debian package postgresql: make setup)"
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        return f"no user {RUN_AS} to run PostgreSQL as"
    return None


def _as_user() -> dict:
    entry = pwd.getpwnam(RUN_AS)
    if os.geteuid() != 0:
        return {}  # already unprivileged: run as ourselves

    def demote() -> None:
        os.setgid(entry.pw_gid)
        os.setgroups([])
        os.setuid(entry.pw_uid)

    return {"preexec_fn": demote}


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(RUN_AS)
        os.chown(path, entry.pw_uid, entry.pw_gid)


class PgCluster:
    def __init__(self, root: Path, port: int, data: Path):
        self.root, self.port, self.data = root, port, data
        self.bin = bin_dir()
        self._databases = 0

    @classmethod
    def create(cls, root: Path | None = None) -> PgCluster:
        root = Path(root or tempfile.mkdtemp(prefix="openhnv-pg-"))
        root.chmod(0o755)
        _chown(root)
        cluster = cls(root, free_port(), root / "primary")
        cluster._run("initdb", "-D", str(cluster.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-instructions")
        cluster._configure(cluster.data)
        cluster.start()
        return cluster

    def _configure(self, data: Path) -> None:
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                "max_connections = 200\nwal_level = replica\nmax_wal_senders = 4\nhot_standby = on\n")
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / tool), *args], cwd=self.root, capture_output=True, text=True,
                              check=check, timeout=120, **_as_user())

    @property
    def log(self) -> Path:
        return self.root / f"{self.data.name}.log"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster (a machine lost, as far as clients can tell)."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 9)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        self._databases += 1
        name = f"hnv_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {name}")
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def standby(self) -> PgCluster:
        """A streaming standby of this cluster (pg_basebackup -R), started."""
        standby = PgCluster(self.root, free_port(), self.root / f"standby-{self._databases}")
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-D",
                  str(standby.data), "-R", "-X", "stream", "-c", "fast")
        with open(standby.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {standby.port}\n")
        standby.start()
        return standby

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
