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
