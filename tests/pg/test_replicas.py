"""Active-active controller replicas on one PostgreSQL database: real `hnv-controller run
--store postgresql://...` processes, three of them, sharing one state directory (TLS
and token files; the fabric and the tokens' hashes are in the database).

What a user checks: concurrent creations spread over the replicas allocate every value
once (no 5xx, distinct CAs, MACs and PA leases); a change made through one replica
reaches a watcher of another with the same generation and the same document; a token
revoked on one replica is refused by another on its next request.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.lib.controller import CHECKOUT, LiveController, _env, start_replicas
from tests.lib.seed_fabric import VIRTUAL_HOSTS, add_tenant_network, build_seed_fabric

NETWORKS = {"Blue": "192.168.10.0/24", "Green": "192.168.20.0/24", "Red": "192.168.30.0/24"}
VMS_PER_REPLICA = 50


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def replicas(pg_url, tmp_path):
    group = start_replicas(tmp_path / "state", pg_url, 3, hosts=VIRTUAL_HOSTS)
    first = group[0]
    try:
        build_seed_fabric(first.admin)
        for name, prefix in NETWORKS.items():
            add_tenant_network(first.admin, name, prefix)
        yield group
    finally:
        for replica in group:
            replica.__exit__(None, None, None)


def test_150_concurrent_creations_over_3_replicas_allocate_each_value_once(replicas):
    names = list(NETWORKS)

    def create(i: int) -> tuple[int, str]:
        replica = replicas[i % 3]
        body = {"name": f"vm{i:03d}", "vm_network": names[(i // 3) % 3], "host": VIRTUAL_HOSTS[i % 2]}
        response = replica.admin.post("/v1/vms", json=body)
        return response.status_code, response.text

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(create, range(3 * VMS_PER_REPLICA)))
    seconds = time.monotonic() - started
    print(f"150 creations over 3 replicas: {seconds:.2f} s, {150 / seconds:.1f} creates/s")
    assert [a for a in answers if a[0] >= 500] == []
    assert [a for a in answers if a[0] != 201] == []

    for replica in replicas:  # every replica serves the whole fabric (after following the log)
        vms = wait_for(lambda r=replica: (lambda v: v if len(v) == 150 else None)(r.admin.get("/v1/vms").json()),
                       10, f"replica {replica.port} lists 150 VMs")
        cas = [vm["ca"] for vm in vms]
        macs = [vm["mac"] for vm in vms]
        assert len(set(cas)) == 150 and len(set(macs)) == 150
    leases = replicas[2].admin.get("/v1/ip-addresses", params={"kind": "PA"}).json()
    addresses = [lease["address"] for lease in leases]
    assert len(addresses) == len(set(addresses))  # no PA handed out twice
    # One PA per host per VM network, each a distinct address.
    assert len({(lease["host"], lease["vm_network"]) for lease in leases}) == len(leases) >= 6


def _watch_lines(replica: LiveController, host: str):
    client = httpx.Client(base_url=replica.base_url, timeout=httpx.Timeout(30, read=30),
                          headers={"Authorization": f"Bearer {replica.host_token(host)}"})
    with client.stream("GET", f"/v1/hosts/{host}/state", params={"watch": 1, "heartbeat": 1}) as stream:
        for line in stream.iter_lines():
            yield json.loads(line)
    client.close()


def _digest(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def test_a_change_through_replica_1_reaches_a_watcher_of_replica_3_identically(replicas):
    first, _, third = replicas
    host = VIRTUAL_HOSTS[0]
    lines = _watch_lines(third, host)
    before = next(lines)
    assert before["type"] == "state"
    created = time.monotonic()
    assert first.admin.post("/v1/vms", json={"name": "across", "vm_network": "Blue", "host": host}).status_code == 201
    for line in lines:
        if line["type"] == "state" and line["generation"] > before["generation"]:
            break
    seconds = time.monotonic() - created
    print(f"replica 1 -> watcher of replica 3: {seconds * 1000:.0f} ms")
    served = first.admin.get(f"/v1/hosts/{host}/state").json()
    assert line["generation"] == served["generation"]
    assert _digest(line["state"]) == _digest(served)
    assert any(port["name"] == "across" for port in line["state"].get("vm_ports", [])) or "across" in json.dumps(
        line["state"])
    lines.close()


def test_a_token_revoked_through_one_replica_is_refused_by_another(replicas, pg_url):
    first, second, _ = replicas
    minted = subprocess.run([sys.executable, "-m", "controller.cli", "token", "create", "--role", "admin",
                             "--state-dir", str(first.state_dir), "--store", pg_url],
                            cwd=CHECKOUT, env=_env(), capture_output=True, text=True, check=True, timeout=60)
    token_id = minted.stdout.split()[1]
    token = (first.state_dir / f"admin-{token_id}.token").read_text().strip()
    assert second.client(token).get("/v1/hosts").status_code == 200
    subprocess.run([sys.executable, "-m", "controller.cli", "token", "revoke", token_id,
                    "--state-dir", str(first.state_dir), "--store", pg_url],
                   cwd=CHECKOUT, env=_env(), capture_output=True, text=True, check=True, timeout=60)
    refused = second.client(token).get("/v1/hosts")
    assert refused.status_code == 401, refused.text
    assert refused.json()["field"] == "Authorization"
