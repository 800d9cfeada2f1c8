"""`POST /v1/fabric/apply` over HTTP: one transaction, a dry run equal to the real run,
prune in reverse dependency order, refusals in the JSON error shape, the OpenAPI entry.

A real controller on loopback (tests/lib/controller.py), built with the seed builder
of tests/lib/seed_fabric.py; documents are the examples' YAML sent as JSON, as
`hnvctl apply` sends them.
"""

from __future__ import annotations

import pytest
import yaml

from tests.lib.controller import CHECKOUT, LiveController
from tests.lib.seed_fabric import add_tenants, build_seed_fabric

SEED = yaml.safe_load((CHECKOUT / "examples" / "seed-fabric.yaml").read_text())
TENANTS = yaml.safe_load((CHECKOUT / "examples" / "seed-tenants.yaml").read_text())
APPLY = "/v1/fabric/apply"


@pytest.fixture(scope="module")
def ctl(tmp_path_factory):
    with LiveController(tmp_path_factory.mktemp("apply") / "state", hosts=["CON-HyperV6"]) as live:
        build_seed_fabric(live.admin)
        add_tenants(live.admin)
        yield live


def whole(ctl) -> dict:
    """Every object and lease, for 'nothing changed'."""
    kinds = ("host-groups", "clusters", "hosts", "logical-networks", "network-sites", "ip-pools",
             "uplink-port-profiles", "logical-switches", "vm-networks", "vm-subnets", "vms", "ip-addresses")
    fabric = {kind: ctl.admin.get(f"/v1/{kind}").json() for kind in kinds}
    for host in fabric["hosts"]:
        for name in ("sync", "reason", "applied_generation"):
            host.pop(name, None)
    return fabric


def test_the_route_is_in_the_openapi_with_its_answers(ctl):
    spec = ctl.client().get("/openapi.json").json()
    post = spec["paths"][APPLY]["post"]
    assert {"200", "401", "403", "404", "409", "422", "503"} <= set(post["responses"])
    assert {p["name"] for p in post["parameters"]} >= {"dry_run", "prune"}
    assert "vms" in post["requestBody"]["content"]["application/json"]["schema"]["properties"]


def test_the_token_is_checked_before_the_body_is_read(ctl):
    garbage = b"{" * 1000
    answer = ctl.client().post(APPLY, content=garbage)
    assert answer.status_code == 401 and set(answer.json()) >= {"error", "field", "reason"}
    answer = ctl.client_for("CON-HyperV6").post(APPLY, content=garbage)
    assert answer.status_code == 403


@pytest.mark.parametrize(
    "body, status, field, reason",
    [
        (b"[1", 422, None, "the body is not JSON: line 1, column 3"),
        (b'{"vms": [], "vms": []}', 422, None, "key 'vms' is given twice"),
        (b'["hostGroups"]', 422, None, "the document must be a mapping of sections"),
        (b'{"tenants": []}', 422, "tenants", "unknown section"),
        (b'{"vmNetworks": [{"name": "F", "logicalNetwork": "Virtualization", '
         b'"subnets": [{"name": "Default", "prefix": "192.168.0.5/24"}]}]}',
         422, "vmNetworks[0].subnets[0].prefix", "192.168.0.5/24 has host bits set (the prefix is 192.168.0.0/24)"),
        (b'{"vms": [{"name": "V", "vmNetwork": "Fabrikam2", "colour": "red"}]}', 422, "vms[0].colour", "unknown field"),
    ],
)
def test_bad_documents_are_refused_with_field_and_reason(ctl, body, status, field, reason):
    before = whole(ctl)
    answer = ctl.admin.post(APPLY, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["field"] == field and error["reason"].startswith(reason), error
    assert error["problems"][0] == {"field": field, "reason": error["reason"]}
    assert whole(ctl) == before


def test_every_problem_of_a_document_is_listed(ctl):
    answer = ctl.admin.post(APPLY, json={"hostGroups": [{"name": "A", "x": 1}, {"name": "B", "y": 2}]})
    assert answer.status_code == 422
    assert answer.json()["problems"] == [{"field": "hostGroups[0].x", "reason": "unknown field"},
                                         {"field": "hostGroups[1].y", "reason": "unknown field"}]
    assert answer.json()["error"] == "hostGroups[0].x: unknown field (and 1 more)"


def test_a_refusal_names_the_document_object_and_a_dry_run_refuses_alike(ctl):
    document = {"hostGroups": [{"name": "Never"}],
                "vms": [{"name": "Fine", "vmNetwork": "Fabrikam2", "host": "CON-HyperV7"},
                        {"name": "Stray", "vmNetwork": "Fabrikam2", "host": "CON-HyperV3"}]}
    before = whole(ctl)
    real = ctl.admin.post(APPLY, json=document)
    dry = ctl.admin.post(APPLY, params={"dry_run": "true"}, json=document)
    assert real.status_code == dry.status_code == 409, real.text
    assert real.json() == dry.json()
    assert real.json()["error"].startswith("vms[1] (Stray): ")
    assert real.json()["field"] == "vms[1].host"
    assert whole(ctl) == before


def test_dry_run_answers_the_real_run_and_a_second_apply_has_no_changes(ctl):
    document = {"hostGroups": [{"name": "Rehearsal", "parent": "Virtualization"}],
                "vms": [{"name": "Extra", "vmNetwork": "Fabrikam3", "host": "CON-HyperV7"}]}
    before = whole(ctl)
    dry = ctl.admin.post(APPLY, params={"dry_run": "true"}, json=document)
    assert dry.status_code == 200 and whole(ctl) == before
    real = ctl.admin.post(APPLY, json=document)
    assert real.status_code == 200
    assert dry.json() == {**real.json(), "dry_run": True, "applied": False}
    assert [(c["op"], c["kind"], c["key"], c["path"]) for c in real.json()["changes"]] == [
        ("create", "host-groups", "Rehearsal", "hostGroups[0]"), ("create", "vms", "Extra", "vms[0]")]
    assert ctl.admin.get("/v1/vms/Extra").json()["host"] == "CON-HyperV7"
    again = ctl.admin.post(APPLY, json=document)
    assert again.json() == {"dry_run": False, "prune": False, "applied": True, "changes": []}
    ctl.admin.delete("/v1/vms/Extra")
    ctl.admin.delete("/v1/host-groups/Rehearsal")


def test_prune_deletes_what_the_document_omits_dependants_first(ctl):
    """The seed without its tenants, pruned: the tenants' VMs, pools, VM subnets and VM
    networks go, in that order, in one transaction; the seed stays whole. (The seed
    builder leaves out what the YAML adds - the MANAGEMENT cluster, three hosts - so
    the same transaction creates those first.)"""
    before = whole(ctl)
    dry = ctl.admin.post(APPLY, params={"dry_run": "true", "prune": "true"}, json=SEED)
    assert dry.status_code == 200, dry.text
    assert whole(ctl) == before
    order = [(c["op"], c["kind"], c["key"]) for c in dry.json()["changes"]]
    ops = [op for op, _, _ in order]
    assert set(ops) == {"create", "delete"} and ops == sorted(ops)  # creates, then deletes
    position = {key: i for i, (op, _, key) in enumerate(order) if op == "delete"}
    assert position["TenantVM01"] < position["Fabrikam2/Default/Default"] < position["Fabrikam2/Default"]
    assert position["Fabrikam2/Default"] < position["Fabrikam2"]
    real = ctl.admin.post(APPLY, params={"prune": "true"}, json=SEED)
    assert real.status_code == 200 and real.json()["changes"] == dry.json()["changes"]
    assert {vm["name"] for vm in ctl.admin.get("/v1/vms").json()} == set()
    assert "Fabrikam2" not in {n["name"] for n in ctl.admin.get("/v1/vm-networks").json()}
    assert ctl.admin.post(APPLY, params={"prune": "true"}, json=SEED).json()["changes"] == []
    # The tenants come back from their document (onto the hosts it names).
    back = ctl.admin.post(APPLY, json=TENANTS)
    assert back.status_code == 200, back.text
    assert {vm["name"] for vm in ctl.admin.get("/v1/vms").json()} >= {"TenantVM01", "TenantVM04"}


def test_a_refused_prune_names_what_it_would_delete(ctl):
    """The document keeps a cluster but omits its host group: pruning the group is
    refused (in use), the error says it was the prune, and nothing changes."""
    created = ctl.admin.post(APPLY, json={"hostGroups": [{"name": "Orphaned"}],
                                          "clusters": [{"name": "KEPT", "hostGroup": "Orphaned"}]})
    assert created.status_code == 200, created.text
    live = {section: SEED.get(section, []) + TENANTS.get(section, []) for section in {**SEED, **TENANTS}
            if not section.startswith("x-")}
    everything_but_the_group = {**live, "clusters": live["clusters"] + [{"name": "KEPT", "hostGroup": "Orphaned"}]}
    before = whole(ctl)
    answer = ctl.admin.post(APPLY, params={"prune": "true"}, json=everything_but_the_group)
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"].startswith("prune (delete host-groups Orphaned): host group Orphaned is in use")
    assert "cluster KEPT" in answer.json()["reason"]
    assert whole(ctl) == before
    ctl.admin.delete("/v1/clusters/KEPT")
    ctl.admin.delete("/v1/host-groups/Orphaned")
