"""The agent daemon against the real controller (controller/, on loopback), fake Reconciler.

Protocol conformance end to end: the controller's compiled HostState passes intake, the
watch stream and heartbeats are understood, and the controller's own sync view turns
InSync from the agent's status reports, across a fabric change and a controller restart.
"""

from __future__ import annotations

from agent.daemon import AgentDaemon, DaemonConfig
from tests.lib.seed_fabric import VIRTUAL_HOSTS, add_tenants, build_seed_fabric, post
from tests.unit.test_daemon import FakeReconciler, wait_until

HOST = "CON-HyperV6"


def host_view(ctl) -> dict:
    return ctl.admin.get(f"/v1/hosts/{HOST}").json()


def test_agent_follows_the_real_controller_and_drives_its_sync_view(live_controller, tmp_path):
    ctl = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(ctl.admin)
    add_tenants(ctl.admin)
    host_token = ctl.host_token(HOST)
    reconciler = FakeReconciler()
    daemon = AgentDaemon(DaemonConfig(
        host=HOST, state_dir=tmp_path / "agent", controller_url=ctl.base_url, token=host_token,
        metrics_address=None, resync_interval=0.2, heartbeat=0.5, reconnect_max_delay=0.5,
        watch_kernel_events=False,
    ), reconciler)
    daemon.start()
    try:
        wait_until(lambda: host_view(ctl)["sync"] == "InSync", what="the controller to see the host in sync")
        first = host_view(ctl)["applied_generation"]
        assert daemon.applied_generation == first
        assert {r.vm_name for r in daemon.held.records} >= {"TenantVM01", "TenantVM02"}

        # A new VM on this host: a new generation, pushed, applied, reported.
        post(ctl.admin, "vms", {"name": "TenantVM05", "vm_network": "Fabrikam2", "host": HOST})
        wait_until(lambda: (host_view(ctl)["sync"] == "InSync"
                            and host_view(ctl)["applied_generation"] > first),
                   what="the new generation to be applied and reported")
        assert "TenantVM05" in {p.name for p in daemon.held.ports}
        assert reconciler.applied_generations[-1] == daemon.held.generation

        # The controller restarts: the agent reconnects and holds what it has.
        ctl.restart()
        connects = daemon.watch.connects
        wait_until(lambda: daemon.watch.connects > connects and daemon.controller_connected,
                   what="the agent to reconnect")
        wait_until(lambda: host_view(ctl)["sync"] == "InSync", what="in sync after the restart")
        assert daemon.held.generation == host_view(ctl)["applied_generation"]
    finally:
        daemon.stop()


def test_an_agent_takes_the_state_of_a_controller_rebuilt_on_a_new_store(live_controller, tmp_path, caplog):
    """A controller rebuilt on an empty store starts again at generation 1. An agent that
    holds a higher generation of the old fabric must take the new fabric's state (their
    fabric ids differ), not ignore it as stale for ever."""
    old = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(old.admin)
    add_tenants(old.admin)
    for name in ("TenantVM05", "TenantVM06"):  # a few more generations on this host
        post(old.admin, "vms", {"name": name, "vm_network": "Fabrikam2", "host": HOST})

    def agent(ctl) -> AgentDaemon:
        return AgentDaemon(DaemonConfig(
            host=HOST, state_dir=tmp_path / "agent", controller_url=ctl.base_url, token=ctl.host_token(HOST),
            metrics_address=None, resync_interval=0.2, heartbeat=0.5, reconnect_max_delay=0.5,
            watch_kernel_events=False,
        ), FakeReconciler())

    daemon = agent(old)
    daemon.start()
    try:
        wait_until(lambda: host_view(old)["sync"] == "InSync", what="in sync with the old controller")
        held = daemon.held
    finally:
        daemon.stop()
    assert held.fabric and held.generation > 1
    assert {"TenantVM05", "TenantVM06"} <= {p.name for p in held.ports}

    new = live_controller(hosts=VIRTUAL_HOSTS)
    build_seed_fabric(new.admin)
    add_tenants(new.admin)
    offered = new.admin.get(f"/v1/hosts/{HOST}/state").json()
    assert offered["generation"] < held.generation
    assert offered["fabric"] != held.fabric

    daemon = agent(new)  # the same state directory: it starts holding the old fabric's state
    daemon.start()
    try:
        wait_until(lambda: host_view(new)["sync"] == "InSync", what="in sync with the rebuilt controller")
        assert daemon.held.fabric == offered["fabric"]
        assert daemon.held.generation == offered["generation"]
        assert not {"TenantVM05", "TenantVM06"} & {p.name for p in daemon.held.ports}
        assert daemon.reconciler.applied_generations[-1] == offered["generation"]
    finally:
        daemon.stop()
    assert any("event=fabric_changed" in r.getMessage() for r in caplog.records)
