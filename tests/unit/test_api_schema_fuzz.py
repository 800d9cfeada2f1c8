"""A bounded schemathesis run against the controller's published OpenAPI.

A real controller (uvicorn on loopback, HTTPS, the seed fabric) and the admin token;
schemathesis generates requests for every operation of /openapi.json (valid and
invalid bodies, parameters, path keys). Each answer must not be a 5xx, and its status
must be one the spec declares for that operation. Bounded: a fixed number of examples
per operation, no deadline, derandomised, so the run is the same few minutes each time.
The operations are dealt into SHARDS tests, so the unit tier's workers share them (one
test took two minutes of one core: the client and the server share a process).
"""

from __future__ import annotations

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, status_code_conformance

from tests.lib.controller import LiveController
from tests.lib.seed_fabric import VIRTUAL_HOSTS, VLAN_HOSTS, add_tenants, build_seed_fabric

EXAMPLES_PER_OPERATION = 10
SHARDS = 4


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    with LiveController(tmp_path_factory.mktemp("fuzz") / "state", hosts=[*VLAN_HOSTS, *VIRTUAL_HOSTS],
                        tls=True) as ctl:
        build_seed_fabric(ctl.admin)
        add_tenants(ctl.admin)
        yield ctl


@pytest.mark.parametrize("shard", range(SHARDS))
def test_no_server_error_and_every_status_is_documented(controller, shard):
    spec = httpx.get(f"{controller.base_url}/openapi.json", verify=controller.verify).json()
    schema = schemathesis.openapi.from_dict(spec)
    # One session: one TLS handshake, not one per request.
    session = requests.Session()
    session.verify = str(controller.ca_file)
    session.headers["Authorization"] = f"Bearer {controller.admin_token}"
    failures: list[str] = []
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda op: op.label)
    assert len(operations) > 40

    for operation in operations[shard::SHARDS]:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def call(case):
                if case.query and "watch" in case.query:
                    case.query["watch"] = False  # a watch stream never ends: fuzz the plain read
                response = case.call(base_url=controller.base_url, session=session, timeout=30,
                                     verify=str(controller.ca_file))
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

            try:
                call()
            except Unsatisfiable:
                pass  # no invalid input exists for this operation (no parameters, no body)
            except (AssertionError, BaseExceptionGroup, Exception) as exc:  # noqa: BLE001
                # Every operation is tried and every failure listed, not only the first.
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:600]}")
    session.close()
    assert not failures, "\n\n".join(failures)
