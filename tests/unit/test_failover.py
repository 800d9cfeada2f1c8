"""Agents and hnvctl with several controllers (replicas of one fabric).

The agent test runs two real `hnv-controller run` processes on two state directories
holding the same fabric (the second a copy of the first, taken while it was stopped), an
AgentDaemon with the real watch stream and status reporter (only the reconciler is a
stand-in, as in test_daemon.py: this tier does not claim the kernel), and kills the
controller it watches with SIGKILL. hnvctl and ControllerClient run against a real
controller behind URLs that refuse connections, answer 503, or take a request and never
answer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from agent.daemon import AgentDaemon, DaemonConfig
from agent.watch import ControllerEndpoint, controller_urls
from controller.client import ControllerClient, ControllerUnavailable
from controller.hnvctl import main as hnvctl
from controller.models import Kind
from tests.lib.controller import CHECKOUT, LiveController, _env, free_port
from tests.lib.seed_fabric import VIRTUAL_HOSTS, add_tenants, build_seed_fabric
from tests.unit.test_daemon import FakeReconciler, wait_until

HOST = "CON-HyperV6"


def dead_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


# --- URLs ----------------------------------------------------------------------------------


def test_several_urls_in_one_value_or_repeated_keep_their_order_once_each():
    assert controller_urls(["https://10.0.0.11:8080/, https://10.0.0.12:8080  https://10.0.0.13:8080",
                            "https://10.0.0.11:8080"]) == (
        "https://10.0.0.11:8080", "https://10.0.0.12:8080", "https://10.0.0.13:8080")


@pytest.mark.parametrize("value, reason", [
    ("10.0.0.11:8080", "controller URL '10.0.0.11:8080' must start with http:// or https://"),
    ("https://10.0.0.11:8080,ftp://10.0.0.12", "controller URL 'ftp://10.0.0.12' must start with http:// or https://"),
    ("https://", "controller URL 'https://' names no host"),
    ("https://10.0.0.11:80800", "controller URL 'https://10.0.0.11:80800': Port out of range 0-65535"),
    ("https://admin:s3cret@10.0.0.11", "controller URL https://...@10.0.0.11 must not hold credentials"),
    ("https://10.0.0.11/?token=x", "controller URL 'https://10.0.0.11/?token=x' must not have a query or a fragment"),
    ("https://10.0.0.11\x1b[2J", "controller URL 'https://10.0.0.11\\x1b[2J' holds a control character"),
    (" , ", "no controller URL given"),
])
def test_a_bad_url_is_named_with_its_reason(value, reason):
    with pytest.raises(ValueError) as refused:
        controller_urls(value)
    assert str(refused.value).startswith(reason)
    assert "s3cret" not in str(refused.value)


def run_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "run", *args], cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=60, env={**_env(), **(env or {})})


def test_hnv_agent_run_refuses_a_bad_url_in_one_line_with_exit_2(tmp_path):
    token = tmp_path / "host.token"
    token.write_text("t0ken\n")
    common = ("--host", HOST, "--token-file", str(token), "--state-dir", str(tmp_path / "state"))
    refused = run_agent("--controller", "https://10.0.0.11:8080", "--controller", "https://10.0.0.12:8080,10.0.0.13",
                        *common)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == "hnv-agent run: --controller: controller URL '10.0.0.13' must start with http:// or https://\n"
    assert not (tmp_path / "state").exists()  # refused before anything was done
    # The env file's variable, when --controller is not given.
    refused = run_agent(*common, env={"HNV_CONTROLLER_URL": "https://10.0.0.11:8080 https://u:p@10.0.0.12"})
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "must not hold credentials" in refused.stderr and "u:p" not in refused.stderr
    refused = run_agent(*common, env={"HNV_CONTROLLER_URL": ""})
    assert (refused.returncode, refused.stderr) == (
        2, "hnv-agent run: --controller: required (or HNV_CONTROLLER_URL in the environment)\n")


def test_the_endpoint_moves_round_the_urls_and_says_so(caplog):
    switches = []
    endpoint = ControllerEndpoint("http://10.0.0.11:8080,http://10.0.0.12:8080,http://10.0.0.13:8080", HOST, "t",
                                  on_switch=lambda old, new, reason: switches.append((old, new)))
    first = endpoint.url
    seen = [first]
    with caplog.at_level(logging.WARNING, logger="agent.watch"):
        for _ in range(3):
            seen.append(endpoint.move_on("ConnectError: refused"))
    assert seen[-1] == first and sorted(seen[:3]) == list(endpoint.urls)
    assert switches == list(zip(seen, seen[1:]))
    assert f"event=controller_switch from={seen[0]} to={seen[1]} reason=\"ConnectError: refused\"" in caplog.text
    # One URL: moving on is staying, and nothing is logged or counted.
    single = ControllerEndpoint("http://10.0.0.11:8080", HOST, "t", on_switch=lambda *a: switches.append(a))
    assert single.move_on("timeout") == "http://10.0.0.11:8080" and len(switches) == 3


def test_hosts_spread_over_the_controllers_and_a_dead_ones_hosts_over_the_others():
    urls = controller_urls("http://10.0.0.11:8080,http://10.0.0.12:8080,http://10.0.0.13:8080")
    endpoints = [ControllerEndpoint(urls, f"CON-HyperV{n}", "t") for n in range(300)]
    on = {url: [e for e in endpoints if e.url == url] for url in urls}
    assert all(70 <= len(hosts) <= 130 for hosts in on.values()), {u: len(h) for u, h in on.items()}
    # The first replica dies: its hosts move on, and not all to the same replica.
    moved = {endpoint.move_on("refused") for endpoint in on[urls[0]]}
    assert moved == set(urls[1:])
    # Stable: a restarted agent starts where it was.
    assert ControllerEndpoint(urls, "CON-HyperV6", "t").url == ControllerEndpoint(urls, "CON-HyperV6", "t").url


# --- the agent with two real controller processes -----------------------------------------


@pytest.fixture
def replicas(tmp_path):
    """Two `hnv-controller run` processes serving the same fabric from two state dirs."""
    first = LiveController(tmp_path / "replica0", hosts=VIRTUAL_HOSTS, process=True)
    first.__enter__()
    second = LiveController(tmp_path / "replica1", process=True)
    try:
        build_seed_fabric(first.admin)
        add_tenants(first.admin)
        first.stop()  # a consistent copy: SQLite file and tokens, as the shared store will hold them
        shutil.copytree(first.state_dir, second.state_dir)
        first.start()
        second.start()
        yield first, second
    finally:
        second.__exit__(None, None, None)
        first.__exit__(None, None, None)


def switches(daemon: AgentDaemon) -> float:
    return daemon.metrics.registry.get_sample_value("hnv_agent_controller_switches_total")


def host_view(ctl: LiveController) -> dict:
    return ctl.admin.get(f"/v1/hosts/{HOST}").json()


def in_sync_on(ctl: LiveController, generation: int | None = None) -> bool:
    view = host_view(ctl)
    return view["sync"] == "InSync" and (generation is None or view["applied_generation"] == generation)


def test_agent_moves_to_the_other_controller_when_the_watched_one_is_killed(replicas, tmp_path, caplog):
    by_url = {ctl.base_url: ctl for ctl in replicas}
    reconciler = FakeReconciler()
    daemon = AgentDaemon(DaemonConfig(
        host=HOST, state_dir=tmp_path / "agent", controller_url=tuple(by_url), token=replicas[0].host_token(HOST),
        metrics_address="127.0.0.1:0", resync_interval=0.2, heartbeat=0.5, reconnect_max_delay=0.5,
        watch_kernel_events=False,
    ), reconciler)
    caplog.set_level(logging.INFO, logger="agent")
    daemon.start()
    try:
        watched = by_url[daemon.endpoint.url]
        (other,) = set(replicas) - {watched}
        wait_until(lambda: in_sync_on(watched), timeout=30, what="the watched controller to see the host InSync")
        generation = daemon.held.generation
        assert host_view(other)["desired_generation"] == generation  # the same fabric on both
        assert host_view(other)["sync"] != "InSync"  # the status went to the watched one only
        applied_before = list(reconciler.applied_generations)

        watched.process.kill()  # kill -9
        wait_until(lambda: daemon.endpoint.url == other.base_url and daemon.controller_connected,
                   timeout=30, what="the agent to watch the other controller")
        # The status reporter followed: the other controller sees the host in sync at the
        # generation the agent holds, which it did not have to apply again.
        wait_until(lambda: in_sync_on(other, generation), timeout=30, what="InSync on the other controller")
        assert daemon.desired_generation == generation
        assert reconciler.applied_generations == applied_before
        assert f"event=controller_switch from={watched.base_url} to={other.base_url}" in caplog.text

        metrics = httpx.get(f"http://127.0.0.1:{daemon.server.port}/metrics", timeout=10).text
        assert f'hnv_agent_controller_info{{url="{other.base_url}"}} 1.0' in metrics
        assert f'hnv_agent_controller_info{{url="{watched.base_url}"}} 0.0' in metrics
        assert "hnv_agent_controller_switches_total 1.0" in metrics
        health = httpx.get(f"http://127.0.0.1:{daemon.server.port}/healthz", timeout=10).json()
        assert (health["controller"], health["controller_connected"]) == (other.base_url, True)

        # A change made through hnvctl, whose first URL is the dead controller, reaches the
        # agent through the live one: no gap.
        out, err = io.StringIO(), io.StringIO()
        environ = {"HNV_CONTROLLER": f"{watched.base_url},{other.base_url}", "HNV_TOKEN": other.admin_token}
        code = hnvctl(["vm", "create", "TenantVM09", "--vm-network", "Fabrikam2", "--host", HOST],
                      stdout=out, stderr=err, environ=environ)
        assert (code, err.getvalue()) == (0, "")
        wait_until(lambda: daemon.held.generation > generation and in_sync_on(other, daemon.held.generation),
                   timeout=30, what="the new VM's generation applied and reported")
        assert "TenantVM09" in {port.name for port in daemon.held.ports}
        assert reconciler.applied_generations[-1] == daemon.held.generation

        # No controller answers: the agent keeps what it holds, applies nothing new and
        # keeps trying, round the controllers.
        held, applied = daemon.held, list(reconciler.applied_generations)
        state_file = daemon.store.path.read_bytes()
        switched = switches(daemon)
        other.process.kill()
        wait_until(lambda: switches(daemon) >= switched + 3, timeout=30,
                   what="the agent to keep trying both controllers")
        assert not daemon.controller_connected
        assert daemon.held is held and reconciler.applied_generations == applied
        assert daemon.store.path.read_bytes() == state_file
        assert set(reconciler.plans[-3:]) == {0}  # periodic reconciles of the held state found nothing to do

        # The first controller comes back on its old copy, a generation behind: the agent
        # connects to it and keeps the newer state it holds (never goes back).
        watched.start()
        wait_until(lambda: daemon.endpoint.url == watched.base_url and daemon.controller_connected,
                   timeout=30, what="the agent to reconnect to the controller that came back")
        wait_until(lambda: "event=state_ignored reason=stale" in caplog.text, timeout=10,
                   what="the older generation to be ignored")
        assert daemon.held is held and reconciler.applied_generations == applied
    finally:
        daemon.stop()


# --- hnvctl and ControllerClient -------------------------------------------------------------


class _Stub(ThreadingHTTPServer):
    """A loopback HTTP server that answers every request 503, or takes it and never answers."""

    daemon_threads = True

    def __init__(self, mode: str):
        self.mode, self.requests, self.release = mode, [], threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                stub.requests.append((self.command, self.path, self.rfile.read(length)))
                if stub.mode == "hang":
                    stub.release.wait(30)
                    return
                body = b'{"error": "the store is unreachable", "field": null, "reason": "database down"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _any

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def stub():
    started = []

    def start(mode: str) -> _Stub:
        started.append(_Stub(mode))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_hnvctl_with_a_dead_first_url_works_against_the_second(live_controller):
    ctl = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(ctl.admin)
    dead = dead_url()
    for argv, environ in (
        (["--controller", dead, "--controller", ctl.base_url, "hosts"], {"HNV_TOKEN": ctl.admin_token}),
        (["hosts"], {"HNV_CONTROLLER": f"{dead}, {ctl.base_url}", "HNV_TOKEN": ctl.admin_token}),
    ):
        out, err = io.StringIO(), io.StringIO()
        assert hnvctl(argv, stdout=out, stderr=err, environ=environ) == 0, err.getvalue()
        assert HOST in out.getvalue() and err.getvalue() == ""


def test_hnvctl_names_every_controller_when_none_answers():
    dead = [dead_url(), dead_url()]
    out, err = io.StringIO(), io.StringIO()
    assert hnvctl(["--controller", ",".join(dead), "hosts"], stdout=out, stderr=err, environ={}) == 1
    line = err.getvalue()
    assert line.count("\n") == 1 and line.startswith("hnvctl: no controller answered: ")
    assert all(f"controller {url}: connection refused" in line for url in dead)


@contextlib.contextmanager
def handshake_never_answered():
    """An https:// URL whose listener accepts TCP and never says a word: the TLS
    handshake waits (a controller too busy to answer, or a black hole behind a NAT)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    held.append(listener.accept()[0])

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield f"https://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            stop.set()
            thread.join()
            for conn in held:
                conn.close()


def test_hnvctl_connect_timeout_bounds_the_handshake_and_moves_on(live_controller):
    """--connect-timeout (or HNV_CONNECT_TIMEOUT) is how long one controller may take to
    accept a connection, TLS included, before the next is tried (default 5 s)."""
    ctl = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(ctl.admin)
    with handshake_never_answered() as mute:
        for flags, environ in ((["--connect-timeout", "0.5"], {}), ([], {"HNV_CONNECT_TIMEOUT": "0.5"})):
            out, err = io.StringIO(), io.StringIO()
            started = time.monotonic()
            code = hnvctl([*flags, "--controller", f"{mute},{ctl.base_url}", "hosts"], stdout=out, stderr=err,
                          environ={"HNV_TOKEN": ctl.admin_token, **environ})
            assert code == 0 and HOST in out.getvalue(), err.getvalue()
            # Well under the 5 s default: the mute controller was given up after 0.5 s.
            assert time.monotonic() - started < 4.0
        out, err = io.StringIO(), io.StringIO()
        assert hnvctl(["--connect-timeout", "0.5", "--controller", mute, "hosts"], stdout=out, stderr=err,
                      environ={"HNV_TOKEN": ctl.admin_token}) == 1
        assert err.getvalue().startswith(f"hnvctl: controller {mute}: ") and err.getvalue().count("\n") == 1


@pytest.mark.parametrize("flags, environ, reason", [
    (["--connect-timeout", "0"], {}, "argument --connect-timeout: 0 is outside (0, 300] seconds"),
    (["--connect-timeout", "nan"], {}, "argument --connect-timeout: nan is outside 0..86400 seconds"),
    ([], {"HNV_CONNECT_TIMEOUT": "301"}, "HNV_CONNECT_TIMEOUT: 301 is outside (0, 300] seconds"),
    ([], {"HNV_CONNECT_TIMEOUT": "\x1b[2J"}, "HNV_CONNECT_TIMEOUT: '\\x1b[2J' is not a number of seconds"),
])
def test_a_bad_connect_timeout_is_refused_in_one_line(flags, environ, reason):
    out, err = io.StringIO(), io.StringIO()
    assert hnvctl([*flags, "hosts"], stdout=out, stderr=err, environ=environ) == 2
    assert err.getvalue() == f"hnvctl: {reason}\n"


def test_a_503_moves_a_write_to_the_next_controller(live_controller, stub):
    ctl = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(ctl.admin)
    unavailable = stub("503")
    with ControllerClient([unavailable.url, ctl.base_url], ctl.admin_token) as client:
        client.create(Kind.host_group, {"name": "Failover", "parent": "All Hosts"})
        assert client.base_url == ctl.base_url
        client.get(Kind.host_group, "Failover")  # goes straight to the one that answered
    assert [(method, path) for method, path, _ in unavailable.requests] == [("POST", "/v1/host-groups")]
    assert ctl.admin.get("/v1/host-groups/Failover").status_code == 200


def test_a_write_that_timed_out_after_it_was_sent_is_reported_not_sent_elsewhere(live_controller, stub):
    ctl = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(ctl.admin)
    silent = stub("hang")
    with ControllerClient([silent.url, ctl.base_url], ctl.admin_token, timeout=1.0) as client:
        with pytest.raises(ControllerUnavailable) as unavailable:
            client.create(Kind.host_group, {"name": "Failover", "parent": "All Hosts"})
    assert str(unavailable.value) == (f"controller {silent.url}: no answer to POST /v1/host-groups in time "
                                      "(not sent to another controller: it may have been applied)")
    assert len(silent.requests) == 1
    assert ctl.admin.get("/v1/host-groups/Failover").status_code == 404  # never sent to the second


def test_hnvctl_help_says_what_is_retried_and_what_is_not():
    parser_help = subprocess.run([sys.executable, "-m", "controller.hnvctl", "--help"], cwd=CHECKOUT,
                                 capture_output=True, text=True, timeout=60, env=_env()).stdout
    flat = " ".join(parser_help.split())
    assert "repeat it (or separate URLs with commas)" in flat
    assert "never sent to another (a write may have been applied)" in flat


def test_the_agent_env_example_lists_several_controllers_the_agent_accepts():
    # hnv-agent.service passes ${HNV_CONTROLLER_URL} as one argument: what the example
    # holds must be what the agent reads.
    settings = dict(line.split("=", 1) for line in (CHECKOUT / "systemd" / "agent.env.example").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert len(controller_urls(settings["HNV_CONTROLLER_URL"])) == 3
    assert "--controller ${HNV_CONTROLLER_URL}" in (CHECKOUT / "systemd" / "hnv-agent.service").read_text()
