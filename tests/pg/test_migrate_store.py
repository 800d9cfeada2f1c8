"""`hnv-controller migrate-store --from sqlite:///... --to postgresql://...`: a controller
started on the copy serves the very same host states (generation and document), and the
tokens minted before the move still work."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from tests.lib.controller import CHECKOUT, LiveController, _env
from tests.lib.seed_fabric import VIRTUAL_HOSTS, VLAN_HOSTS, add_tenants, build_seed_fabric

HOSTS = [*VLAN_HOSTS, *VIRTUAL_HOSTS]


def _states(controller: LiveController) -> dict[str, tuple[int, str]]:
    states = {}
    for host in HOSTS:
        response = controller.admin.get(f"/v1/hosts/{host}/state")
        assert response.status_code == 200, response.text
        states[host] = (response.json()["generation"], hashlib.sha256(response.content).hexdigest())
    return states


def _migrate_store(source: str, target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", "migrate-store", "--from", source, "--to", target],
                          cwd=CHECKOUT, env=_env(), capture_output=True, text=True, timeout=120)


def test_migrate_store_from_sqlite_serves_identical_host_states(pg_url, tmp_path):
    state = tmp_path / "state"
    embedded = LiveController(state, hosts=list(HOSTS))
    with embedded:
        build_seed_fabric(embedded.admin)
        add_tenants(embedded.admin)
        embedded.admin.delete("/v1/vms/TenantVM04")  # a freed lease and a bumped generation
        before = _states(embedded)
        vms = embedded.admin.get("/v1/vms").json()
        leases = embedded.admin.get("/v1/ip-addresses").json()

    copied = _migrate_store(f"sqlite:///{state / 'controller.db'}", pg_url)
    assert copied.returncode == 0, copied.stderr
    assert "token hashes" in copied.stdout

    shared = LiveController(state, hosts=list(HOSTS), process=True, store=pg_url)
    shared.start(timeout=60)  # no init: the tokens came with the copy
    try:
        assert _states(shared) == before
        assert shared.admin.get("/v1/vms").json() == vms
        assert shared.admin.get("/v1/ip-addresses").json() == leases
        assert shared.client_for(VIRTUAL_HOSTS[0]).get(f"/v1/hosts/{VIRTUAL_HOSTS[0]}/state").status_code == 200
    finally:
        shared.stop()

    # A store that already holds a fabric is never written over.
    again = _migrate_store(f"sqlite:///{state / 'controller.db'}", pg_url)
    assert again.returncode == 2
    assert "--to: the store already holds a fabric" in again.stderr
