"""The controller over real HTTP: a `hnv-controller run` process on loopback, httpx clients,
a real SQLite file under tmp_path. The seed's fabric is built through the API once per
module (tests that change it build their own controller)."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agent.state import VSID_MAX, VSID_MIN, parse_host_state
from tests.lib.controller import LiveController
from tests.lib.seed_fabric import (
    TENANT_VMS,
    VIRTUAL_HOSTS,
    VLAN_HOSTS,
    add_tenant_network,
    add_tenants,
    build_seed_fabric,
    post,
)

HOSTS = (*VLAN_HOSTS, *VIRTUAL_HOSTS)


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    with LiveController(tmp_path_factory.mktemp("seed") / "state", hosts=HOSTS) as ctl:
        build_seed_fabric(ctl.admin)
        add_tenants(ctl.admin)
        yield ctl


@pytest.fixture
def fresh(live_controller):
    """A controller of its own, with the seed fabric and tenants, for tests that change it."""
    ctl = live_controller(hosts=[*HOSTS, "CON-HyperV8"])
    build_seed_fabric(ctl.admin)
    add_tenants(ctl.admin)
    return ctl


def leases(client, **filters):
    return client.get("/v1/ip-addresses", params=filters).json()


def state_of(client, host):
    response = client.get(f"/v1/hosts/{host}/state")
    assert response.status_code == 200, response.text
    return parse_host_state(response.content)


def everything(client) -> dict:
    """Every object, lease and generation: what 'nothing changed' compares."""
    kinds = ("host-groups", "clusters", "hosts", "logical-networks", "network-sites", "ip-pools",
             "uplink-port-profiles", "logical-switches", "vm-networks", "vm-subnets", "vms")
    snapshot = {kind: client.get(f"/v1/{kind}").json() for kind in kinds}
    snapshot["leases"] = leases(client)
    return snapshot


def assert_refused(response, status, field, reason_part):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "field", "reason"}, body
    assert body["field"] == field, body
    assert reason_part in body["reason"] or reason_part in body["error"], body
    return body


# --- the seed's fabric ----------------------------------------------------------------------


def test_every_compiled_host_state_validates_and_matches_the_seed(seed):
    states = {host: state_of(seed.admin, host) for host in HOSTS}
    for host, state in states.items():
        assert state.host == host and state.generation >= 1
        assert state.team.members == ("eth0", "eth1")
        assert state.management is not None and str(state.management.address).startswith("10.0.0.")
    for host in VIRTUAL_HOSTS:
        state = states[host]
        assert state.provider.vlan == 802 and str(state.provider.subnet) == "10.80.2.0/24"
        assert state.provider.encapsulation == "nvgre" and state.switch.logical_switch == "Virtualization"
        assert [rd.name for rd in state.routing_domains] == ["Fabrikam2", "Fabrikam3"]
        # one PA per routing domain on this host, from the transport pool
        pas = [pa.address for pa in state.provider.addresses]
        assert len(pas) == 2 and all(ipaddress.ip_address("10.80.2.20") <= pa <= ipaddress.ip_address("10.80.2.250")
                                     for pa in pas)
        # every VM of both networks (4) plus one gateway record per VM subnet (2)
        assert sorted(r.vm_name for r in state.records if r.type == "Static") == sorted(TENANT_VMS)
        assert [str(r.ca) for r in state.records if r.type == "Gateway"] == ["192.168.0.1", "192.168.0.1"]
    for host in VLAN_HOSTS:
        assert states[host].provider is None and states[host].routing_domains == ()
    assert [n.vlan for n in states["CON-HyperV3"].vlan_networks] == [100]
    assert [p.vlan for p in states["CON-HyperV4"].ports] == [101]


def test_two_vm_networks_share_a_ca_range_with_distinct_vsids(seed):
    subnets = {s["key"]: s for s in seed.admin.get("/v1/vm-subnets").json()}
    vsids = [subnets["Fabrikam2/Default"]["vsid"], subnets["Fabrikam3/Default"]["vsid"]]
    assert len(set(vsids)) == 2 and all(VSID_MIN <= v <= VSID_MAX for v in vsids)
    cas = {vm["name"]: vm["ca"] for vm in seed.admin.get("/v1/vms").json()}
    assert cas["TenantVM01"] == cas["TenantVM03"] == "192.168.0.10"  # same CA, two routing domains
    # The two gateway MACs differ: one distributed router per VM subnet, same on every host.
    assert subnets["Fabrikam2/Default"]["gateway_mac"] != subnets["Fabrikam3/Default"]["gateway_mac"]
    v6, v7 = (state_of(seed.admin, host) for host in VIRTUAL_HOSTS)
    gateway_macs = lambda state: sorted(str(r.mac) for r in state.records if r.type == "Gateway")  # noqa: E731
    assert gateway_macs(v6) == gateway_macs(v7)


def test_ip_addresses_list_every_lease_with_its_holder(seed):
    pas = leases(seed.admin, kind="PA")
    assert sorted(lease["description"] for lease in pas) == sorted(
        f"PA of {host} for {network}" for host in VIRTUAL_HOSTS for network in ("Fabrikam2", "Fabrikam3")
    )
    cas = leases(seed.admin, pool="Fabrikam2/Default/Default")
    assert {lease["holder"]: lease["host"] for lease in cas} == {"TenantVM01": "CON-HyperV6",
                                                                 "TenantVM02": "CON-HyperV7"}
    assert leases(seed.admin, host="CON-HyperV3", kind="CA")[0]["holder"] == "TenantVMA1"


def test_lookup_records_route_shows_ca_to_pa(seed):
    records = seed.admin.get("/v1/hosts/CON-HyperV6/lookup-records").json()
    vm02 = [r for r in records if r["vm_name"] == "TenantVM02"][0]
    pa_of_v7 = leases(seed.admin, kind="PA", host="CON-HyperV7", vm_network="Fabrikam2")[0]["address"]
    assert vm02["ca"] == "192.168.0.11" and vm02["pa"] == pa_of_v7


# --- PAs -------------------------------------------------------------------------------------


def test_pa_is_per_host_and_vm_network_and_released_with_the_last_vm(fresh):
    admin = fresh.admin
    before = leases(admin, kind="PA", host="CON-HyperV6", vm_network="Fabrikam2")
    assert len(before) == 1
    for name in ("TenantVM05", "TenantVM06", "TenantVM07"):
        post(admin, "vms", {"name": name, "vm_network": "Fabrikam2", "host": "CON-HyperV6"})
    assert leases(admin, kind="PA", host="CON-HyperV6", vm_network="Fabrikam2") == before
    assert len(leases(admin, kind="PA")) <= len(VIRTUAL_HOSTS) * 2
    for name in ("TenantVM05", "TenantVM06", "TenantVM07", "TenantVM01"):
        assert admin.delete(f"/v1/vms/{name}").status_code == 204
    assert leases(admin, kind="PA", host="CON-HyperV6", vm_network="Fabrikam2") == []
    state = state_of(admin, "CON-HyperV6")
    assert [rd.name for rd in state.routing_domains] == ["Fabrikam3"]
    assert [pa.routing_domain for pa in state.provider.addresses] == ["Fabrikam3"]


# --- placement --------------------------------------------------------------------------------


def test_placement_only_on_hosts_reaching_network_virtualisation(fresh):
    admin = fresh.admin
    placed = [post(admin, "vms", {"name": f"Placed{i}", "vm_network": "Fabrikam2"})["host"] for i in range(4)]
    assert set(placed) == set(VIRTUAL_HOSTS)  # fewest VMs first: alternates between the two
    refused = admin.post("/v1/vms", json={"name": "Wrong", "vm_network": "Fabrikam2", "host": "CON-HyperV3"})
    assert_refused(refused, 409, "host", "reaches no network-virtualisation logical network")
    refused = admin.post("/v1/vms", json={"name": "Nowhere", "vm_network": "Fabrikam2",
                                          "host_group": "HostCluster"})
    body = assert_refused(refused, 409, "host", "no placement candidate")
    assert "CON-HyperV3" in body["reason"]
    assert admin.get("/v1/vms/Nowhere").status_code == 404
    # VLAN VM networks: only hosts whose switch reaches a site with that subnet and VLAN
    vlan_hosts = {post(admin, "vms", {"name": f"Vlan{i}", "vm_network": "TenantA"})["host"] for i in range(3)}
    assert vlan_hosts == set(VLAN_HOSTS)
    refused = admin.post("/v1/vms", json={"name": "VlanWrong", "vm_network": "TenantA", "host": "CON-HyperV6"})
    assert_refused(refused, 409, "host", "172.16.100.0/24 on VLAN 100")
    assert [n.vlan for n in state_of(admin, "CON-HyperV4").vlan_networks] == [100, 101]


# --- migration and the watch stream ---------------------------------------------------------------


class Watcher(threading.Thread):
    """A real streaming client of /state?watch=1; records every line it reads."""

    def __init__(self, ctl: LiveController, host: str, heartbeat: float = 30):
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=ctl.base_url, timeout=None,
                                   headers={"Authorization": f"Bearer {ctl.host_token(host)}"})
        self.url = f"/v1/hosts/{host}/state?watch=1&heartbeat={heartbeat}"
        self.lines: list[dict] = []
        self.arrived = threading.Condition()
        self.start()

    def run(self) -> None:
        try:
            with self.client.stream("GET", self.url) as response:
                for line in response.iter_lines():
                    with self.arrived:
                        self.lines.append(json.loads(line))
                        self.arrived.notify_all()
        except httpx.HTTPError:
            pass

    def wait_for(self, predicate, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no matching line in {self.lines}"
                self.arrived.wait(remaining)

    def close(self) -> None:
        self.client.close()


def report_in_sync(ctl: LiveController, host: str) -> None:
    """What the host's agent says once it applied its desired generation. A generation
    published between reading the state and reporting (a gateway failover that the
    host's first report set off, say) is applied and reported too, as an agent would."""
    for _ in range(5):
        generation = state_of(ctl.admin, host).generation
        answer = ctl.client_for(host).put(f"/v1/hosts/{host}/status",
                                          json={"generation": generation, "errors": [], "agent": "test"})
        assert answer.status_code == 200, answer.text
        if answer.json()["sync"] == "InSync":
            return
        assert answer.json()["desired_generation"] > generation, answer.text
    raise AssertionError(f"{host} never in sync: {answer.text}")


def generations_of(client) -> dict[str, int]:
    return {h["name"]: h["desired_generation"] for h in client.get("/v1/hosts").json()}


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_migration_is_staged_destination_then_peers_then_the_source(fresh):
    """Make-before-break: the destination first (the source keeps the VM's port, every host
    of the VM network receives from both ends); the peers and the forwarding source once
    every host reports InSync; the source lets the VM network go last. Each stage is
    visible in the generations served, and only the VM network's hosts move."""
    admin = fresh.admin
    post(admin, "hosts", {"name": "CON-HyperV8", "cluster": "VIRTUALCLUSTER", "management_address": "10.0.0.18/24",
                          "nics": ["eth0", "eth1"]})
    admin.put("/v1/hosts/CON-HyperV8/virtual-switch", json={"logical_switch": "Virtualization"}).raise_for_status()
    post(admin, "vms", {"name": "TenantVM05", "vm_network": "Fabrikam2", "host": "CON-HyperV8"})
    generations = generations_of(admin)
    pa_v7 = leases(admin, kind="PA", host="CON-HyperV7", vm_network="Fabrikam2")[0]["address"]
    red = {"CON-HyperV6", "CON-HyperV7", "CON-HyperV8"}  # Fabrikam2's hosts once the VM moved
    watchers = {host: Watcher(fresh, host) for host in ("CON-HyperV6", "CON-HyperV8")}
    try:
        for host, watcher in watchers.items():
            first = watcher.wait_for(lambda line: line["type"] == "state")
            assert first["generation"] == generations[host]
        moved = admin.post("/v1/vms/TenantVM02/migrate", json={"host": "CON-HyperV6"})
        assert moved.status_code == 200 and moved.json()["host"] == "CON-HyperV6"
        assert moved.json()["migration"]["stage"] == "destination"
        assert moved.json()["migration"]["source"] == "CON-HyperV7"
        pa_v6 = leases(admin, kind="PA", host="CON-HyperV6", vm_network="Fabrikam2")[0]["address"]

        def record_pa(host: str) -> str:
            return str(next(r.pa for r in state_of(admin, host).records if r.vm_name == "TenantVM02"))

        def transit(host: str) -> list[str]:
            return [str(pa) for rd in state_of(admin, host).routing_domains if rd.name == "Fabrikam2"
                    for pa in rd.transit]

        # Stage 1: the destination V6 gets the port; the source V7 keeps it, and the peer
        # V8 still sends to V7; all three receive from both ends.
        stage1 = generations_of(admin)
        assert {host for host in stage1 if stage1[host] != generations[host]} == red
        assert "TenantVM02" in [port.name for port in state_of(admin, "CON-HyperV6").ports]
        assert "TenantVM02" in [port.name for port in state_of(admin, "CON-HyperV7").ports]
        assert record_pa("CON-HyperV6") == pa_v6
        assert record_pa("CON-HyperV7") == record_pa("CON-HyperV8") == pa_v7
        assert all(sorted(transit(host)) == sorted([pa_v6, pa_v7]) for host in red)

        # Stage 2, once every host of Fabrikam2 reports InSync: the peer V8 follows, the
        # source V7 lets the port go and forwards to V6.
        for host in sorted(red):
            report_in_sync(fresh, host)
        stage2 = wait_until(lambda: (g := generations_of(admin))["CON-HyperV8"] != stage1["CON-HyperV8"] and g,
                            what="the peer's generation to move")
        assert {host for host in stage2 if stage2[host] != stage1[host]} == {"CON-HyperV7", "CON-HyperV8"}
        assert record_pa("CON-HyperV8") == record_pa("CON-HyperV7") == pa_v6
        assert "TenantVM02" not in [port.name for port in state_of(admin, "CON-HyperV7").ports]
        line = watchers["CON-HyperV8"].wait_for(lambda l: l["type"] == "state" and l["generation"] == stage2["CON-HyperV8"])
        assert [str(r.pa) for r in parse_host_state(line["state"]).records if r.vm_name == "TenantVM02"] == [pa_v6]
        assert admin.get("/v1/vms/TenantVM02").json()["migration"]["stage"] == "peers"
        assert leases(admin, kind="PA", host="CON-HyperV7", vm_network="Fabrikam2") != []

        # Stage 3, once every host of Fabrikam2 reports InSync again: the source lets it go.
        for host in ("CON-HyperV7", "CON-HyperV8"):
            report_in_sync(fresh, host)
        stage3 = wait_until(lambda: (g := generations_of(admin))["CON-HyperV7"] != stage2["CON-HyperV7"] and g,
                            what="the source's generation to move")
        assert {host for host in stage3 if stage3[host] != stage2[host]} == red
        assert admin.get("/v1/vms/TenantVM02").json()["migration"] is None
        assert leases(admin, kind="PA", host="CON-HyperV7", vm_network="Fabrikam2") == []
        assert "Fabrikam2" not in [rd.name for rd in state_of(admin, "CON-HyperV7").routing_domains]
        assert transit("CON-HyperV6") == transit("CON-HyperV8") == []
        assert stage3["CON-HyperV6"] == generations["CON-HyperV6"] + 2
        assert all(stage3[host] == generations[host] + 3 for host in ("CON-HyperV7", "CON-HyperV8"))

        metrics = fresh.client().get("/metrics").text
        pushed = [line for line in metrics.splitlines() if line.startswith("hnv_controller_generations_pushed_total")]
        assert pushed and float(pushed[0].split()[-1]) >= 4  # two on connect, two after the migration
        latency = [line for line in metrics.splitlines() if line.startswith("hnv_controller_push_latency_seconds_count")]
        assert latency and float(latency[0].split()[-1]) >= 2
        assert "hnv_controller_watchers 2.0" in metrics
        refused = admin.post("/v1/vms/TenantVM02/migrate", json={"host": "CON-HyperV4"})
        assert_refused(refused, 409, "host", "reaches no network-virtualisation")
    finally:
        for watcher in watchers.values():
            watcher.close()


def test_watch_sends_heartbeats_when_nothing_changes(seed):
    watcher = Watcher(seed, "CON-HyperV3", heartbeat=0.5)
    try:
        state = watcher.wait_for(lambda line: line["type"] == "state")
        beat = watcher.wait_for(lambda line: line["type"] == "heartbeat", timeout=3)
        assert beat["generation"] == state["generation"] and abs(beat["time"] - time.time()) < 5
    finally:
        watcher.close()


# --- concurrency ------------------------------------------------------------------------------------


def test_batch_route_is_one_transaction(fresh):
    admin = fresh.admin
    before = everything(admin)
    refused = admin.post("/v1/vms/batch", json={"items": [
        {"name": "Batch1", "vm_network": "Fabrikam2"},
        {"name": "Batch2", "vm_network": "Fabrikam2", "host": "CON-HyperV3"},
    ]})
    assert_refused(refused, 409, "items[1].host", "reaches no network-virtualisation")
    assert everything(admin) == before
    created = admin.post("/v1/vms/batch", json={"items": [{"name": f"Batch{i}", "vm_network": "Fabrikam3"}
                                                          for i in range(6)]})
    assert created.status_code == 201
    assert sorted(vm["host"] for vm in created.json()) == sorted([*VIRTUAL_HOSTS] * 3)
    assert len(leases(admin, kind="PA", vm_network="Fabrikam3")) == 2


def test_fifty_concurrent_vm_creations_get_distinct_cas_and_macs(fresh):
    admin = fresh.admin
    add_tenant_network(admin, "Contoso", "10.10.0.0/24")

    def create(i: int) -> dict:
        with httpx.Client(base_url=fresh.base_url, timeout=60,
                          headers={"Authorization": f"Bearer {fresh.admin_token}"}) as client:
            response = client.post("/v1/vms", json={"name": f"Burst{i:02d}", "vm_network": "Contoso"})
            assert response.status_code == 201, response.text
            return response.json()

    with ThreadPoolExecutor(max_workers=50) as pool:
        vms = list(pool.map(create, range(50)))
    assert len({vm["ca"] for vm in vms}) == 50
    assert len({vm["mac"] for vm in vms}) == 50
    assert len(leases(admin, vm_network="Contoso", kind="CA")) == 50
    assert len(leases(admin, vm_network="Contoso", kind="PA")) == 2  # one per host, not per VM


# --- tokens --------------------------------------------------------------------------------------------


def test_tokens_scope(seed):
    own = seed.client_for("CON-HyperV6")
    assert own.get("/v1/hosts/CON-HyperV6/state").status_code == 200
    assert_refused(own.get("/v1/hosts/CON-HyperV7/state"), 403, "Authorization", "another host")
    assert_refused(own.get("/v1/hosts"), 403, "Authorization", "admin token")
    assert_refused(own.post("/v1/vms", json={"name": "x", "vm_network": "Fabrikam2"}), 403, "Authorization",
                   "admin token")
    assert_refused(own.put("/v1/hosts/CON-HyperV7/status", json={"generation": 0}), 403, "Authorization",
                   "another host")
    assert_refused(seed.client().get("/v1/hosts/CON-HyperV6/state"), 401, "Authorization", "no bearer token")
    assert_refused(seed.client("not-a-token").get("/v1/hosts"), 401, "Authorization", "not known")
    assert seed.client().get("/metrics").status_code == 200  # Prometheus scrapes without a token


def test_status_report_drives_sync(seed):
    own = seed.client_for("CON-HyperV7")
    desired = state_of(seed.admin, "CON-HyperV7").generation
    answer = own.put("/v1/hosts/CON-HyperV7/status", json={"generation": desired - 1, "errors": [],
                                                          "agent": "openhnv-agent/0.1"}).json()
    assert answer["sync"] == "Pending" and str(desired) in answer["reason"]
    error = {"kind": "tunnel", "object": "hnvt1a2b3c", "errno": 17, "message": "File exists"}
    answer = own.put("/v1/hosts/CON-HyperV7/status", json={"generation": desired, "errors": [error]}).json()
    assert answer["sync"] == "Error" and answer["reason"] == "hnvt1a2b3c: File exists"
    answer = own.put("/v1/hosts/CON-HyperV7/status", json={"generation": desired, "errors": []}).json()
    assert answer == {"host": "CON-HyperV7", "sync": "InSync", "reason": f"applied generation {desired}",
                      "desired_generation": desired, "applied_generation": desired}
    host = seed.admin.get("/v1/hosts/CON-HyperV7").json()
    assert host["sync"] == "InSync" and host["applied_generation"] == desired
    assert_refused(own.put("/v1/hosts/CON-HyperV7/status", json={"generation": desired + 5}), 422, "generation",
                   "never published")
    metrics = seed.client().get("/metrics").text
    assert 'hnv_controller_hosts{sync="InSync"} 1.0' in metrics
    assert 'hnv_controller_pool_addresses{pool="Virtualization/Default",state="used"} 4.0' in metrics
    assert "hnv_controller_vms 6.0" in metrics and "hnv_controller_vsids_in_use 2.0" in metrics


# --- restart -------------------------------------------------------------------------------------------


def test_restart_keeps_objects_leases_and_generations(live_controller):
    """The real CLI process: stopped with SIGTERM, started again on the same state dir."""
    fresh = live_controller(hosts=HOSTS, process=True)
    build_seed_fabric(fresh.admin)
    add_tenants(fresh.admin)
    watcher = Watcher(fresh, "CON-HyperV6")  # an open stream must not hold up the stop
    watcher.wait_for(lambda line: line["type"] == "state")
    _restart_keeps_everything(fresh)
    watcher.close()


def _restart_keeps_everything(fresh):
    before = everything(fresh.admin)
    states = {host: fresh.admin.get(f"/v1/hosts/{host}/state").json() for host in HOSTS}
    fresh.restart()
    admin = fresh.client(fresh.admin_token)
    assert everything(admin) == before
    assert {host: admin.get(f"/v1/hosts/{host}/state").json() for host in HOSTS} == states
    # allocation continues after the restart without reusing anything
    vm = post(admin, "vms", {"name": "AfterRestart", "vm_network": "Fabrikam2", "host": "CON-HyperV6"})
    assert vm["ca"] not in {v["ca"] for v in before["vms"] if v["vm_network"] == "Fabrikam2"}
    assert vm["mac"] not in {v["mac"] for v in before["vms"]}


# --- refusals --------------------------------------------------------------------------------------------


def test_deleting_objects_in_use_is_refused_with_the_reason(seed):
    before = everything(seed.admin)
    cases = [
        ("/v1/ip-pools/Virtualization/Default", "leases"),
        ("/v1/vm-networks/Fabrikam2", "VM TenantVM01"),
        ("/v1/logical-networks/Virtualization", "VM network Fabrikam2"),
        ("/v1/hosts/CON-HyperV6", "VM TenantVM01"),
        ("/v1/logical-switches/Virtualization", "host CON-HyperV6"),
        ("/v1/vm-subnets/Fabrikam3/Default", "VM TenantVM03"),
        ("/v1/network-sites/Virtualization", "IP pool Virtualization/Default"),
        ("/v1/host-groups/All%20Hosts", "root"),
        ("/v1/hosts/CON-HyperV6/virtual-switch", "TenantVM01"),
    ]
    for path, reason in cases:
        response = seed.admin.delete(path)
        assert response.status_code == 409, (path, response.text)
        assert reason in response.json()["reason"], (path, response.json())
    assert everything(seed.admin) == before


def test_bad_input_is_refused_with_field_and_reason_and_changes_nothing(seed):
    admin = seed.admin
    before = everything(admin)
    generations = {h["name"]: h["desired_generation"] for h in before["hosts"]}
    cases = [
        (admin.post("/v1/vm-subnets", json={"vm_network": "Fabrikam2", "name": "V6", "prefix": "fd00::/64"}),
         422, "prefix", "IPv4"),
        (admin.post("/v1/vm-subnets", json={"vm_network": "Fabrikam2", "name": "Over", "prefix": "192.168.0.0/25"}),
         409, "prefix", "overlaps"),
        (admin.post("/v1/vm-subnets", json={"vm_network": "TenantA", "name": "X", "prefix": "172.16.100.0/24",
                                            "vlan": 300}), 422, "vlan", "offer"),
        (admin.post("/v1/ip-pools", json={"name": "P", "vm_network": "Fabrikam2", "vm_subnet": "Default",
                                          "range_start": "192.168.0.150", "range_end": "192.168.1.5"}),
         422, "range_end", "outside"),
        (admin.post("/v1/ip-pools", json={"name": "P2", "vm_network": "Fabrikam2", "vm_subnet": "Default",
                                          "range_start": "192.168.0.50", "range_end": "192.168.0.60"}),
         409, "range_start", "overlaps"),
        (admin.post("/v1/vms", json={"name": "BadMac", "vm_network": "Fabrikam2", "mac": "01:00:5e:00:00:01"}),
         422, "mac", "multicast"),
        (admin.post("/v1/vms", json={"name": "TakenCa", "vm_network": "Fabrikam2", "ca": "192.168.0.10"}),
         409, "ca", "TenantVM01"),
        (admin.post("/v1/vms", json={"name": "TenantVM01", "vm_network": "Fabrikam2"}), 409, "name", "exists"),
        (admin.post("/v1/vms", json={"name": "NoNet", "vm_network": "Nope"}), 404, "vm_network", "Nope"),
        (admin.post("/v1/vms", json={"name": "a/b", "vm_network": "Fabrikam2"}), 422, "name", "'/'"),
        (admin.post("/v1/vm-networks", json={"name": "NV", "logical_network": "Tenants"}), 422, "isolation",
         "network_virtualization"),
        (admin.post("/v1/logical-networks", json={"name": "Big", "mtu": 20000}), 422, "mtu", "9216"),
        (admin.post("/v1/hosts", json={"name": "H", "nics": ["eth0", "eth0"]}), 422, "nics", "twice"),
        (admin.post("/v1/hosts", json={"name": "H", "nics": ["a-very-long-nic-name"]}), 422, "nics[0]", "15"),
        (admin.put("/v1/hosts/CON-HyperV3/virtual-switch", json={"logical_switch": "HostCluster",
                                                                 "nics": ["eth0", "eth9"]}), 422, "nics[1]", "eth9"),
        (admin.put("/v1/hosts/CON-HyperV3/virtual-switch", json={"logical_switch": "Virtualization"}), 409,
         "logical_switch", "TenantVMA1"),
        (admin.patch("/v1/vm-networks/Fabrikam2", json={"logical_network": "Tenants"}), 422, "logical_network",
         "cannot be changed"),
        (admin.patch("/v1/network-sites/Virtualization", json={"host_groups": ["HostCluster"]}), 409, None,
         "CON-HyperV6"),
        (admin.get("/v1/vms", params={"colour": "red"}), 422, "colour", "no field"),
        (admin.get("/v1/routers"), 404, None, "Not Found"),
        (admin.get("/v1/hosts/CON-HyperV6/state", params={"watch": 1, "heartbeat": 0}), 422, "heartbeat",
         "greater than or equal to 0.5"),
    ]
    for response, status, field, reason in cases:
        assert_refused(response, status, field, reason)
    after = everything(admin)
    assert after == before
    assert {h["name"]: h["desired_generation"] for h in after["hosts"]} == generations


def test_patch_changes_allowed_fields(fresh):
    admin = fresh.admin
    generation = state_of(admin, "CON-HyperV6").generation
    changed = admin.patch("/v1/logical-networks/Virtualization", json={"mtu": 9000})
    assert changed.status_code == 200 and changed.json()["mtu"] == 9000
    state = state_of(admin, "CON-HyperV6")
    assert state.provider.mtu == 9000 and state.generation == generation + 1
    assert state_of(admin, "CON-HyperV3").provider is None


def test_openapi_lists_every_route(seed):
    paths = seed.client().get("/openapi.json").json()["paths"]
    for path in ("/v1/hosts", "/v1/vms/{vm}/migrate", "/v1/ip-addresses", "/v1/hosts/{host}/state",
                 "/v1/hosts/{host}/status", "/v1/hosts/{host}/virtual-switch", "/v1/vm-subnets/{key}",
                 "/v1/hosts/{host}/lookup-records", "/v1/uplink-port-profiles"):
        assert path in paths, path


def test_token_command_mints_a_working_host_token_with_owner_only_mode(live_controller):
    from controller.cli import main

    ctl = live_controller(hosts=["CON-HyperV6"])
    assert (ctl.state_dir / "admin.token").stat().st_mode & 0o777 == 0o600
    post(ctl.admin, "hosts", {"name": "CON-HyperV8", "nics": ["eth0"]})
    assert main(["token", "create", "--state-dir", str(ctl.state_dir), "--host", "CON-HyperV8"]) == 0
    path = ctl.state_dir / "hosts" / "CON-HyperV8.token"
    assert path.stat().st_mode & 0o777 == 0o600
    own = ctl.client_for("CON-HyperV8")  # minted while the controller runs: no restart needed
    assert own.get("/v1/hosts/CON-HyperV8/state").json()["host"] == "CON-HyperV8"
    assert own.get("/v1/hosts/CON-HyperV6/state").status_code == 403
    # the database holds hashes only: the token text is nowhere in it
    stored = b"".join(p.read_bytes() for p in ctl.state_dir.glob("controller.db*"))  # with the WAL
    assert b"CON-HyperV8" in stored and path.read_text().strip().encode() not in stored


def test_a_host_in_flow_mode_gets_it_in_its_state_and_no_other_host_changes(fresh):
    admin = fresh.admin
    before = generations_of(admin)
    changed = admin.patch("/v1/hosts/CON-HyperV6", json={"tunnel_mode": "flow"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["tunnel_mode"] == "flow"
    state = state_of(admin, "CON-HyperV6")
    assert state.provider.tunnel_mode == "flow" and state.generation == before["CON-HyperV6"] + 1
    assert state_of(admin, "CON-HyperV7").provider.tunnel_mode == "device"
    after = generations_of(admin)
    assert {host for host in after if after[host] != before[host]} == {"CON-HyperV6"}
    assert_refused(admin.patch("/v1/hosts/CON-HyperV6", json={"tunnel_mode": "tc"}), 422, "tunnel_mode",
                   "'device' or 'flow'")
    assert state_of(admin, "CON-HyperV6").provider.tunnel_mode == "flow"
