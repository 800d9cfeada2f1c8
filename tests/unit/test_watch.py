"""agent.watch pieces that need no controller: backoff, error lines, endpoint checks."""

from __future__ import annotations

import ssl

import httpx
import pytest

from agent.watch import AGENT_NAME, Backoff, ControllerEndpoint, StatusReport, describe_error_response
from controller.tls import ensure_tls


@pytest.mark.parametrize("attempt", range(0, 40))
def test_backoff_stays_between_half_and_full_capped_delay(attempt):
    backoff = Backoff(initial=0.5, cap=30.0)
    ceiling = min(30.0, 0.5 * 2**attempt)
    assert backoff.delay(attempt, rng=lambda: 0.0) == pytest.approx(ceiling / 2)
    assert backoff.delay(attempt, rng=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)


def test_backoff_jitter_spreads_agents_apart():
    delays = {round(Backoff().delay(6), 3) for _ in range(50)}
    assert len(delays) > 10


def test_error_line_names_object_and_field():
    reply = httpx.Response(403, json={"error": "token of host A may not read host B", "field": "host", "reason": "wrong host"})
    assert describe_error_response(reply) == "token of host A may not read host B (field host)"


def test_error_line_without_json_body_gives_the_status():
    assert describe_error_response(httpx.Response(502, text="<html>bad gateway</html>")) == "HTTP 502 Bad Gateway"


def test_endpoint_refuses_a_url_without_scheme_and_an_empty_token():
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        ControllerEndpoint("10.0.0.2:8700", "h1", "t")
    with pytest.raises(ValueError, match="token is empty"):
        ControllerEndpoint("http://10.0.0.2:8700", "h1", "")


def test_endpoint_paths_and_repr_without_token():
    endpoint = ControllerEndpoint("http://10.0.0.2:8700/", "CON-HyperV6", "s3cret-token")
    assert endpoint.state_path() == "/v1/hosts/CON-HyperV6/state"
    assert endpoint.status_path() == "/v1/hosts/CON-HyperV6/status"
    assert "s3cret" not in repr(endpoint)


def test_every_client_of_every_endpoint_without_a_ca_file_shares_one_trust_store(tmp_path):
    """A retrying agent makes a client per try; each used to load the CA bundle again
    (56 ms of CPU, seconds under emulation). A CA file is still loaded per endpoint."""
    timeout = httpx.Timeout(1.0)

    def trust(client: httpx.Client):
        return client._transport._pool._ssl_context  # httpx's connection pool's TLS context

    first, second = (ControllerEndpoint("https://10.0.0.2:8700", f"h{n}", "t") for n in (1, 2))
    with first.client(timeout) as a, first.client(timeout) as b, second.client(timeout) as c:
        assert trust(a) is trust(b) is trust(c)
        assert trust(a).verify_mode == ssl.CERT_REQUIRED and trust(a).check_hostname
    files, _ = ensure_tls(tmp_path, ["controller"], ["10.0.0.2"])  # the controller's own CA
    pinned = ControllerEndpoint("https://10.0.0.2:8700", "h3", "t", ca_file=str(files.ca_cert))
    with pinned.client(timeout) as d:
        assert trust(d) is not trust(a)
        assert len(trust(d).get_ca_certs()) == 1


def test_status_body_matches_the_protocol():
    error = {"kind": "tunnel", "object": "hnvt1a2b3c", "errno": 17, "message": "File exists"}
    assert StatusReport(4, (error,)).body() == {"generation": 4, "errors": [error], "agent": AGENT_NAME}
    assert AGENT_NAME.startswith("openhnv-agent/")
