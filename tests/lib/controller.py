"""A real controller for tests, on a free port of 127.0.0.1, state under tmp_path.

    with LiveController(tmp_path / "state", hosts=["CON-HyperV6"]) as ctl:
        ctl.admin.get("/v1/hosts")                   # httpx.Client with the admin token
        ctl.client_for("CON-HyperV6").get(...)       # ... with that host's token
        ctl.restart()                                # stop it, start it again on the same state

`store="postgresql://..."` runs it on that store (`--store`); replicas on one PostgreSQL
database may share one state directory (its TLS files and token files): init the first.
Two ways to run it, same HTTP server, same store:
- `process=True`: `hnv-controller init` and `hnv-controller run` as a child process (the
  installed CLI, exactly as systemd starts it); `stop()` ends exactly that process;
- `process=False` (default): `controller.cli`'s init in-process and uvicorn serving
  `controller.api.create_app` in a thread - no interpreter start-up (seconds on a busy
  machine), so fixtures can afford a fresh controller per test.
`tls=True` serves HTTPS with the certificate `init` made (base_url is https://, the
clients verify against `ca_file`); without it the controller serves plain HTTP
(`--insecure-http` in process mode).
Used by the controller's unit tests, and by anyone who needs a controller with a real
fabric.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from netns_lab.processes import stop_process

CHECKOUT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=CHECKOUT, capture_output=True, text=True, check=True, env=_env(),
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(CHECKOUT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


class LiveController:
    def __init__(
        self,
        state_dir: Path,
        hosts: list[str] | tuple[str, ...] = (),
        log_level: str = "warning",
        process: bool = False,
        tls: bool = False,
        run_args: tuple[str, ...] = (),
        store: str | None = None,
        app_options: dict | None = None,
        address: str = "127.0.0.1",
    ):
        self.process_mode = process
        # Where it listens (process mode; start it inside a namespace to listen there).
        self.address = address
        self.app_options = dict(app_options or {})  # create_app's keywords (thread mode)
        self.tls = tls
        self.store = store  # a store URL (`--store`); None: the state directory's SQLite file
        self.run_args = tuple(run_args) + (("--store", store) if store else ())
        self.server = None
        self.thread: threading.Thread | None = None
        self.state_dir = Path(state_dir)
        self.hosts = list(hosts)
        self.log_level = log_level
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._clients: list[httpx.Client] = []
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-{self.port}.log"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.crt"

    @property
    def verify(self):
        import ssl

        return ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else True

    # --- life cycle -------------------------------------------------------------------

    def init(self) -> None:
        args = ["init", "--state-dir", str(self.state_dir), *(("--store", self.store) if self.store else ())]
        for host in self.hosts:
            args += ["--host", host]
        if self.process_mode:
            run_cli(*args)
        else:
            from controller.cli import main

            with contextlib.redirect_stdout(io.StringIO()):
                main(args)

    def start(self, timeout: float = 30.0) -> None:
        if not self.process_mode:
            self._start_thread(timeout)
            return
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "run", "--state-dir", str(self.state_dir),
             "--listen", f"{self.address}:{self.port}", "--log-level", self.log_level, "--synchronous", "NORMAL",
             *(() if self.tls else ("--insecure-http",)), *self.run_args],
            cwd=CHECKOUT, stdout=log, stderr=subprocess.STDOUT, env=_env(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"controller exited with {self.process.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=0.5, verify=self.verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"controller did not answer on {self.base_url}: {self.log_path.read_text()}")

    def _start_thread(self, timeout: float) -> None:
        import uvicorn

        from controller.api import create_app
        from controller.fabric import Fabric

        if self.store:
            from controller.store import open_store

            self.fabric = Fabric(open_store(self.store))
        else:
            self.fabric = Fabric.open(self.state_dir, synchronous="NORMAL")
        tls = {"ssl_certfile": str(self.state_dir / "tls" / "server.crt"),
               "ssl_keyfile": str(self.state_dir / "tls" / "server.key")} if self.tls else {}
        config = uvicorn.Config(create_app(self.fabric, **self.app_options), host="127.0.0.1", port=self.port,
                                log_level=self.log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2, **tls)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"controller-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"controller did not start on {self.base_url}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
            self.fabric.close()
            self.fabric.store.close()
            self.server = self.thread = None
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> LiveController:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self._clients:
            client.close()
        self.stop()

    # --- clients ----------------------------------------------------------------------

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    def host_token(self, host: str) -> str:
        from controller.cli import host_token_path

        return host_token_path(self.state_dir, host).read_text().strip()

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, verify=self.verify)
        self._clients.append(client)
        return client

    @property
    def admin(self) -> httpx.Client:
        if not hasattr(self, "_admin"):
            self._admin = self.client(self.admin_token)
        return self._admin

    def client_for(self, host: str) -> httpx.Client:
        return self.client(self.host_token(host))


def start_replicas(state_dir: Path, store: str, count: int, hosts: list[str] | tuple[str, ...] = (),
                   **options) -> list[LiveController]:
    """`count` controller processes on one shared store and one state directory: the
    first initialises it (tokens for `hosts`), all are started. Stop each (`__exit__`)."""
    first = LiveController(state_dir, hosts=hosts, process=True, store=store, **options)
    first.init()
    group = [first] + [LiveController(state_dir, process=True, store=store, **options) for _ in range(count - 1)]
    try:
        for controller in group:
            controller.start(timeout=120)
    except BaseException:
        for controller in group:
            controller.__exit__(None, None, None)
        raise
    return group
