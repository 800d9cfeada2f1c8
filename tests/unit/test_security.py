"""The controller as an attacker and a careful operator meet it: a real controller
(uvicorn on loopback, HTTPS with the certificate `hnv-controller init` made), real
tokens minted and revoked with the `hnv-controller` CLI, real sockets.

- the authorization matrix: every route of the published OpenAPI (a route added later
  is in it without editing this file) x {no token, wrong token, revoked token, another
  host's token, own host token, admin token};
- revocation, expiry, `init --force`, a deleted host's tokens, token file names;
- the gate: 401/403 before the body is read or parsed, 413 above the body limit;
- bounded status reports and heartbeat, a non-ASCII host name, file modes, TLS.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import ssl
import stat
import time
from pathlib import Path

import httpx
import pytest

from controller.cli import host_token_path, main as controller_cli
from tests.lib.cli import run_main
from tests.lib.controller import LiveController

OWN, OTHER = "CON-HyperV6", "CON-HyperV7"
PUBLIC_ROUTES = {("GET", "/healthz"), ("GET", "/metrics")}
OWN_HOST_ROUTES = {("GET", "/v1/hosts/{host}/state"), ("PUT", "/v1/hosts/{host}/status")}


def cli(*args: str) -> tuple[int, str, str]:
    result = run_main(controller_cli, args)
    return result.returncode, result.stdout, result.stderr


def token_ids(state_dir: Path) -> dict[tuple[str, str], list[int]]:
    """(role, host) -> ids of live tokens, read from `token list`."""
    code, out, _ = cli("token", "list", "--state-dir", str(state_dir))
    assert code == 0
    ids: dict[tuple[str, str], list[int]] = {}
    for line in out.splitlines()[1:]:
        token_id, role, host, _created, _expires, revoked = line.split()
        if revoked == "-":
            ids.setdefault((role, host), []).append(int(token_id))
    return ids


@pytest.fixture
def ctl(tmp_path):
    controller = LiveController(tmp_path / "state", hosts=[OWN, OTHER], tls=True)
    with controller:
        for host in (OWN, OTHER):
            assert controller.admin.post("/v1/hosts", json={"name": host, "nics": ["eth0"]}).status_code == 201
        yield controller


def assert_refused(response: httpx.Response, status: int, field: str | None, reason_part: str) -> None:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error", "field", "reason"}, body
    assert body["field"] == field and reason_part in body["error"] + body["reason"], body


# --- the matrix -------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    """A route's path with its parameters filled: the own host for {host}, else a name
    that exists nowhere (an admin then gets 404, which still proves it got through)."""
    return path.replace("{host}", OWN).replace("{key}", "no-such-object").replace("{vm}", "no-such-vm")


def _expected(role: str, method: str, path: str) -> set[int] | str:
    if (method, path) in PUBLIC_ROUTES:
        return "served"
    if role in ("none", "wrong", "revoked"):
        return {401}
    if role == "other-host":
        return {403}
    if role == "own-host" and (method, path) not in OWN_HOST_ROUTES:
        return {403}
    return "served"  # admin, or the own host on its own routes


def test_authorization_matrix_covers_every_route_of_the_openapi(ctl):
    revoked = ctl.client_for(OWN).headers["Authorization"]
    # A second token of the own host, so revoking the first leaves the host a live one.
    assert cli("token", "create", "--state-dir", str(ctl.state_dir), "--host", OWN)[0] == 0
    code, _, _ = cli("token", "revoke", "--state-dir", str(ctl.state_dir), str(token_ids(ctl.state_dir)[("host", OWN)][0]))
    assert code == 0
    headers_of = {
        "none": {},
        "wrong": {"Authorization": "Bearer " + "x" * 43},
        "revoked": {"Authorization": revoked},
        "other-host": {"Authorization": f"Bearer {ctl.host_token(OTHER)}"},
        "own-host": {"Authorization": f"Bearer {ctl.host_token(OWN)}"},
        "admin": {"Authorization": f"Bearer {ctl.admin_token}"},
    }
    spec = ctl.admin.get("/openapi.json").json()
    routes = [(method.upper(), path, operation) for path, item in spec["paths"].items()
              for method, operation in item.items()]
    assert len(routes) > 40 and ("PUT", "/v1/hosts/{host}/status") in {(m, p) for m, p, _ in routes}
    client = ctl.client()
    failures = []
    for method, path, operation in routes:
        declared = {"public": "public", "host": "host"}.get(operation.get("x-access"), "admin")
        wanted = "public" if (method, path) in PUBLIC_ROUTES else "host" if (method, path) in OWN_HOST_ROUTES else "admin"
        if declared != wanted:
            failures.append(f"{method} {path}: x-access {declared}, expected {wanted}")
        body = {} if "requestBody" in operation else None
        for role, headers in headers_of.items():
            response = client.request(method, _concrete(path), json=body, headers=headers)
            expected = _expected(role, method, path)
            status = response.status_code
            if expected == "served":
                ok = status < 500 and status not in (401, 403)
            else:
                ok = status in expected and set(response.json()) == {"error", "field", "reason"}
            if not ok:
                failures.append(f"{method} {path} as {role}: {status} {response.text[:120]}")
    assert not failures, "\n".join(failures)


# --- revocation, expiry, init --force, deleted hosts -------------------------------------------


def test_revoked_admin_and_host_tokens_are_refused_on_the_next_request(ctl):
    admin, own = ctl.client(ctl.admin_token), ctl.client_for(OWN)
    assert admin.get("/v1/hosts").status_code == 200
    assert own.get(f"/v1/hosts/{OWN}/state").status_code == 200
    ids = token_ids(ctl.state_dir)
    code, out, _ = cli("token", "revoke", "--state-dir", str(ctl.state_dir), str(ids[("host", OWN)][0]))
    assert code == 0 and "revoked" in out
    assert_refused(own.get(f"/v1/hosts/{OWN}/state"), 401, "Authorization", "revoked")
    # init --force: the old admin token dies, the new one works, at once.
    code, out, _ = cli("init", "--state-dir", str(ctl.state_dir), "--force")
    assert code == 0 and "revoked admin token" in out
    assert_refused(admin.get("/v1/hosts"), 401, "Authorization", "revoked")
    assert ctl.client(ctl.admin_token).get("/v1/hosts").status_code == 200
    # token list shows the two revoked, and never a token
    code, out, _ = cli("token", "list", "--state-dir", str(ctl.state_dir))
    assert ctl.admin_token not in out and ctl.host_token(OTHER) not in out
    assert sum(1 for line in out.splitlines()[1:] if not line.rstrip().endswith(" -")) == 2
    assert cli("token", "revoke", "--state-dir", str(ctl.state_dir), "999")[0] == 2


def test_a_token_expires_after_its_ttl(ctl):
    code, out, _ = cli("token", "create", "--state-dir", str(ctl.state_dir), "--role", "admin", "--ttl", "2s")
    assert code == 0 and "expires" in out
    path = Path(out.strip().rsplit(": ", 1)[1])
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent == ctl.state_dir
    client = ctl.client(path.read_text().strip())
    assert client.get("/v1/hosts").status_code == 200
    deadline = time.monotonic() + 10
    while client.get("/v1/hosts").status_code == 200:
        assert time.monotonic() < deadline, "the token did not expire"
        time.sleep(0.2)
    assert_refused(client.get("/v1/hosts"), 401, "Authorization", "expired")
    assert cli("token", "create", "--state-dir", str(ctl.state_dir), "--ttl", "soon", "--host", OWN)[0] == 2
    assert cli("token", "create", "--state-dir", str(ctl.state_dir), "--role", "host")[0] == 2


def test_a_deleted_hosts_tokens_do_not_pass_to_a_new_host_of_the_same_name(ctl):
    old = ctl.client_for(OTHER)
    assert old.get(f"/v1/hosts/{OTHER}/state").status_code == 200
    assert ctl.admin.delete(f"/v1/hosts/{OTHER}").status_code == 204
    assert ctl.admin.post("/v1/hosts", json={"name": OTHER, "nics": ["eth0"]}).status_code == 201
    assert_refused(old.get(f"/v1/hosts/{OTHER}/state"), 401, "Authorization", "revoked")
    assert cli("token", "create", "--state-dir", str(ctl.state_dir), "--host", OTHER)[0] == 0
    assert ctl.client_for(OTHER).get(f"/v1/hosts/{OTHER}/state").status_code == 200
    # the other host's token was not touched
    assert ctl.client_for(OWN).get(f"/v1/hosts/{OWN}/state").status_code == 200


def test_token_file_names_stay_in_the_state_directory(ctl):
    hosts_dir = ctl.state_dir / "hosts"
    before = {p for p in ctl.state_dir.parent.rglob("*")}
    for name in ("../../x", "..", ".hidden", "a/b", "é" * 256, "x" * 256):
        code, out, err = cli("token", "create", "--state-dir", str(ctl.state_dir), "--host", name)
        assert code == 0, err
        path = host_token_path(ctl.state_dir, name)
        assert path.parent == hosts_dir and path.exists() and path.stat().st_mode & 0o777 == 0o600
    created = {p for p in ctl.state_dir.parent.rglob("*")} - before
    assert created and all(p.parent == hosts_dir for p in created), created
    # a long name's token works once its host exists
    assert ctl.admin.post("/v1/hosts", json={"name": "x" * 256, "nics": ["eth0"]}).status_code == 201
    assert ctl.client_for("x" * 256).get(f"/v1/hosts/{'x' * 256}/state").status_code == 200


def test_a_host_with_a_non_ascii_name_reads_its_own_state(tmp_path):
    name = "CON-HyperVé"
    with LiveController(tmp_path / "state", hosts=[name, OWN], tls=True) as ctl:
        assert ctl.admin.post("/v1/hosts", json={"name": name, "nics": ["eth0"]}).status_code == 201
        own = ctl.client_for(name)
        response = own.get(f"/v1/hosts/{name}/state")
        assert response.status_code == 200 and response.json()["host"] == name
        # any host token against another (non-ASCII) host: 403, never a 500
        assert_refused(ctl.client_for(OWN).get(f"/v1/hosts/{name}/state"), 403, "Authorization", "another host")
        assert_refused(own.get("/v1/hosts/CON-Hyper\u00dfV/state"), 403, "Authorization", "another host")


# --- the gate: before the body -------------------------------------------------------------


def test_no_token_is_401_before_the_body_is_parsed_and_a_host_token_403(ctl):
    assert_refused(ctl.client().post("/v1/vms", json={}), 401, "Authorization", "no bearer token")
    assert ctl.client().post("/v1/vms", json={}).headers["www-authenticate"] == "Bearer"
    assert_refused(ctl.client().post("/v1/vms", content=b"{not json"), 401, "Authorization", "no bearer token")
    assert_refused(ctl.client_for(OWN).post("/v1/vms", json={}), 403, "Authorization", "admin token")
    assert_refused(ctl.client_for(OWN).put(f"/v1/hosts/{OTHER}/status", content=b"]"), 403, "Authorization",
                   "another host")
    assert_refused(ctl.admin.post("/v1/vms", json={}), 422, "name", "is required")


def _raw_request(ctl: LiveController, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, dict]:
    """Send a request's head (and maybe part of a body) over TLS and read the answer
    without sending the rest: an answer proves the server did not wait for the body."""
    context = ssl.create_default_context(cafile=str(ctl.ca_file))
    with socket.create_connection(("127.0.0.1", ctl.port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(head.encode() + body)
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_an_unauthenticated_13_mb_body_is_refused_before_it_is_sent(ctl):
    head = ("POST /v1/vms/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {13 * 1024 * 1024}\r\n\r\n")
    status, body = _raw_request(ctl, head, b'{"items": [')
    assert status == 401 and body["field"] == "Authorization"


def test_an_oversized_body_is_413_with_the_json_shape(ctl):
    big = {"name": "vm", "description": "x" * (70 * 1024)}
    assert_refused(ctl.admin.post("/v1/vms", json=big), 413, "body", "65536 bytes")
    # declared length above the limit: answered before the body is sent
    head = (f"POST /v1/vms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ctl.admin_token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
    status, body = _raw_request(ctl, head)
    assert status == 413 and body["field"] == "body"

    # chunked (no Content-Length): counted as it streams, refused once past the limit
    def chunks():
        yield b'{"name": "vm", "description": "'
        for _ in range(100):
            yield b"x" * 1024

    assert_refused(ctl.admin.post("/v1/vms", content=chunks(), headers={"Content-Type": "application/json"}),
                   413, "body", "65536 bytes")
    # a host token's status PUT has the same limit
    status_body = {"generation": 0, "errors": [], "agent": "a" * (100 * 1024)}
    assert_refused(ctl.client_for(OWN).put(f"/v1/hosts/{OWN}/status", json=status_body), 413, "body", "limit")
    # /batch has the larger limit: 200 KiB of batch gets through the gate to validation
    batch = {"items": [{"name": f"group{i}", "description": "y" * 1000} for i in range(200)]}
    response = ctl.admin.post("/v1/host-groups/batch", json=batch)
    assert response.status_code != 413, response.text


def test_the_batch_limit_is_configurable(tmp_path):
    with LiveController(tmp_path / "state", process=True, tls=True,
                        run_args=("--max-batch-bytes", "20000")) as ctl:
        batch = {"items": [{"name": f"group{i}"} for i in range(2000)]}  # 40 kB
        assert_refused(ctl.admin.post("/v1/host-groups/batch", json=batch), 413, "body", "20000 bytes")
        assert ctl.admin.post("/v1/host-groups/batch", json={"items": [{"name": "g"}]}).status_code == 201


# --- bounded input ------------------------------------------------------------------------------


def test_status_reports_are_bounded(ctl):
    own = ctl.client_for(OWN)
    error = {"kind": "tunnel", "object": "10.0.0.1", "errno": 17, "message": "exists"}
    assert own.put(f"/v1/hosts/{OWN}/status", json={"generation": 0, "errors": [error] * 100}).status_code == 200
    assert_refused(own.put(f"/v1/hosts/{OWN}/status", json={"generation": 0, "errors": [error] * 101}), 422,
                   "errors", "at most 100")
    long = {**error, "message": "\x1b]0;pwned\x07" + "m" * 1024}
    assert_refused(own.put(f"/v1/hosts/{OWN}/status", json={"generation": 0, "errors": [long]}), 422,
                   "errors[0].message", "at most 1024")


def test_the_agent_cuts_its_status_to_what_the_controller_accepts():
    from agent.watch import STATUS_MAX_ERRORS, STATUS_MAX_TEXT, StatusReport

    errors = tuple({"kind": "route", "object": f"o{i}", "errno": 1, "message": "m" * 5000} for i in range(250))
    body = StatusReport(3, errors).body()
    assert len(body["errors"]) == STATUS_MAX_ERRORS
    assert all(len(error["message"]) <= STATUS_MAX_TEXT for error in body["errors"])
    assert body["errors"][-1]["message"] == "151 more errors not listed"


def test_heartbeat_is_bounded_below(ctl):
    own = ctl.client_for(OWN)
    for too_fast in ("0.0001", "0.49", "0"):
        assert_refused(own.get(f"/v1/hosts/{OWN}/state", params={"watch": 1, "heartbeat": too_fast}), 422,
                       "heartbeat", "greater than or equal to 0.5")
    with own.stream("GET", f"/v1/hosts/{OWN}/state", params={"watch": 1, "heartbeat": 0.5}) as stream:
        lines = stream.iter_lines()
        assert json.loads(next(lines))["type"] == "state"
        assert json.loads(next(lines))["type"] == "heartbeat"


# --- files ----------------------------------------------------------------------------------------


def test_state_files_are_owner_only_also_in_an_existing_directory(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)
    old_umask = os.umask(0o022)
    try:
        with LiveController(state_dir, hosts=[OWN], tls=True) as ctl:
            assert ctl.admin.post("/v1/hosts", json={"name": OWN, "nics": ["eth0"]}).status_code == 201
            modes = {p.relative_to(state_dir).as_posix(): stat.S_IMODE(p.stat().st_mode)
                     for p in [state_dir, *state_dir.rglob("*")]}
    finally:
        os.umask(old_umask)
    assert modes["."] == 0o700
    for name in ("controller.db", "controller.db-wal", "controller.db-shm", "admin.token",
                 f"hosts/{OWN}.token", "tls/ca.key", "tls/server.key"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    assert modes["tls"] == 0o700 and modes["hosts"] == 0o700
    # an old database left 0644 is made 0600 when opened
    os.chmod(state_dir / "controller.db", 0o644)
    assert cli("token", "list", "--state-dir", str(state_dir))[0] == 0
    assert stat.S_IMODE((state_dir / "controller.db").stat().st_mode) == 0o600


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_a_client_with_the_wrong_ca_is_refused(ctl, tmp_path):
    assert cli("init", "--state-dir", str(tmp_path / "other"))[0] == 0
    wrong_ca = tmp_path / "other" / "tls" / "ca.crt"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{ctl.base_url}/healthz", verify=ssl.create_default_context(cafile=str(wrong_ca)))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{ctl.base_url}/healthz")  # the system's CAs do not know the private CA
    assert httpx.get(f"{ctl.base_url}/healthz", verify=ctl.verify).status_code == 200

    from controller.hnvctl import main as hnvctl

    def run(ca_file: Path) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        environ = {"HNV_CONTROLLER": ctl.base_url, "HNV_TOKEN": ctl.admin_token, "HNV_CA_FILE": str(ca_file)}
        return hnvctl(["hosts"], stdout=out, stderr=err, environ=environ), out.getvalue(), err.getvalue()

    code, _, err = run(wrong_ca)
    assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in err
    code, out, _ = run(ctl.ca_file)
    assert code == 0 and OWN in out

    from agent.watch import ControllerEndpoint

    endpoint = ControllerEndpoint(ctl.base_url, OWN, ctl.host_token(OWN), str(wrong_ca))
    with endpoint.client(httpx.Timeout(5)) as client, pytest.raises(httpx.ConnectError):
        client.get(endpoint.state_path())
    endpoint = ControllerEndpoint(ctl.base_url, OWN, ctl.host_token(OWN), str(ctl.ca_file))
    with endpoint.client(httpx.Timeout(5)) as client:
        assert client.get(endpoint.state_path()).status_code == 200


def test_the_certificate_names_what_init_was_given(tmp_path):
    from cryptography import x509

    code, out, _ = cli("init", "--state-dir", str(tmp_path / "s"), "--tls-name", "ctl.example",
                       "--tls-address", "10.0.0.11", "--tls-address", "127.0.0.1")
    assert code == 0 and "ca.crt" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "s" / "tls" / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["ctl.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.11", "127.0.0.1"]
    code, _, err = cli("init", "--state-dir", str(tmp_path / "t"), "--tls-address", "ten.zero")
    assert code == 2 and "--tls-address" in err


def test_run_refuses_plain_http_unless_asked(tmp_path):
    state_dir = tmp_path / "s"
    assert cli("init", "--state-dir", str(state_dir))[0] == 0
    for name in ("server.crt", "server.key"):
        (state_dir / "tls" / name).unlink()
    code, _, err = cli("run", "--state-dir", str(state_dir), "--listen", "127.0.0.1:1")
    assert code == 2 and "--insecure-http" in err
    with LiveController(tmp_path / "plain", process=True) as ctl:  # --insecure-http
        assert ctl.admin.get("/v1/hosts").status_code == 200
        assert "insecure_http" in ctl.log_path.read_text() and "in clear" in ctl.log_path.read_text()


def test_a_route_added_later_is_admin_only_and_the_apply_route_has_the_batch_limit(tmp_path):
    """The gate reads the app's routes on each request and fails closed: a route that
    declares no x-access needs the admin token (here one added after create_app), and the
    whole-fabric apply gets the batch limit."""
    from fastapi.testclient import TestClient

    from controller.api import create_app
    from controller.fabric import Fabric

    assert cli("init", "--state-dir", str(tmp_path / "s"))[0] == 0
    fabric = Fabric.open(tmp_path / "s")
    try:
        app = create_app(fabric, max_body_bytes=1024, max_batch_bytes=200_000)

        @app.post("/v1/added-later")
        def added_later(body: dict) -> dict:
            return {"keys": len(body)}

        admin = {"Authorization": f"Bearer {(tmp_path / 's' / 'admin.token').read_text().strip()}"}
        with TestClient(app) as client:
            assert client.post("/v1/added-later", json={}).status_code == 401
            assert client.post("/v1/added-later", json={"a": 1}, headers=admin).json() == {"keys": 1}
            assert client.post("/v1/added-later", json={"a": "v" * 2000}, headers=admin).status_code == 413
            assert client.post("/v1/fabric/apply", json={}).status_code == 401
            document = {f"k{i}": "v" * 100 for i in range(1000)}  # ~110 kB: above one object's limit
            # past the gate (batch limit), refused by the document check itself
            answer = client.post("/v1/fabric/apply", json=document, headers=admin)
            assert answer.status_code == 422 and "unknown section" in answer.json()["error"]
            too_big = {f"k{i}": "v" * 100 for i in range(2000)}
            assert client.post("/v1/fabric/apply", json=too_big, headers=admin).status_code == 413
            assert client.post("/v1/vms", json={"name": "x" * 2000}, headers=admin).status_code == 413
    finally:
        fabric.store.close()


def test_the_agent_asks_for_no_heartbeat_the_controller_refuses():
    from agent.cli import build_parser

    base = ["run", "--controller", "https://c:8080", "--host", "h", "--token-file", "t"]
    assert build_parser().parse_args([*base, "--heartbeat", "0.5"]).heartbeat == 0.5
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--heartbeat", "0.1"])
    assert "below 0.5 seconds" in err.getvalue()
