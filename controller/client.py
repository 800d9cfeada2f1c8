"""A typed client of the controller's REST API (controller/API.md), over httpx.

Used by hnvctl, the lab and the benchmarks. One `ControllerClient` keeps one HTTP
connection pool per controller URL; every call returns the controller's own models
(`controller.models` stored objects, `Lease`, `agent.state.LookupRecord`, `HostSync`) or
raises:

- `ApiRefused` for a 4xx: the controller's `error`, `field` and `reason`, the status;
- `ControllerUnavailable` for a refused connection, a time-out or a 5xx.

Several URLs (replicas of one fabric): a request goes to the controller that answered
last (the first one at the start) and moves on to the next, in the order given, only
when it could not connect (nothing was sent) or the controller answered 503 (it did not
act). A time-out after the request was sent, a connection that broke mid-request or any
other 5xx is reported and never sent to another controller: a write may have been
applied, and sending it again could apply it twice.

This module owns HTTP mechanics (URLs, tokens, status codes, JSON decoding). It holds no
fabric rules and never prints; it never logs the token.
"""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.state import HostState, LookupRecord
from agent.text import describe_validation_error
from agent.watch import controller_urls
from controller.models import PATH_KEYED, STORED_OF, Kind, Lease, VirtualSwitch, Vm

DEFAULT_CONTROLLER = "https://127.0.0.1:8080"
CONNECT_TIMEOUT = 5.0  # seconds to open a connection to one controller (as the agent's watch)
ModelT = TypeVar("ModelT", bound=BaseModel)


class ControllerError(Exception):
    """Anything that kept a request from being answered with success."""


class ApiRefused(ControllerError):
    """The controller refused the request (4xx): bad input, missing object, in use."""

    def __init__(self, status: int, error: str, field: str | None = None, reason: str = ""):
        self.status, self.error, self.field, self.reason = status, error, field, reason
        super().__init__(error)

    def one_line(self) -> str:
        """'VM X: host H cannot carry VM network N: <reason> (field host)': the refusal
        with its reason and the field, each once."""
        line = self.error
        if self.reason and self.reason not in line:
            line += f": {self.reason}"
        if self.field and self.field not in ("name", "body") and self.field not in line:
            line += f" (field {self.field})"
        return line.replace("\n", " ")


class ControllerUnavailable(ControllerError):
    """No answer, or a server error (5xx): the request may be retried later."""


class HostSync(BaseModel):
    """A host as `GET /v1/hosts` shows it: the host and its sync status."""

    model_config = ConfigDict(extra="allow")

    name: str
    cluster: str | None = None
    host_group: str | None = None
    sync: str = "Pending"
    reason: str = ""
    desired_generation: int | None = None
    applied_generation: int | None = None


def read_token(token_file: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token: --token-file, else $HNV_TOKEN_FILE, else $HNV_TOKEN."""
    environ = os.environ if environ is None else environ
    path = token_file or environ.get("HNV_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ControllerError(f"token file {path}: {exc.strerror or exc}") from None
    return environ.get("HNV_TOKEN") or None


def read_ca_file(ca_file: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The CA file that signed the controller's certificate: --ca-file, else $HNV_CA_FILE
    (None: the system's CAs)."""
    environ = os.environ if environ is None else environ
    path = ca_file or environ.get("HNV_CA_FILE")
    return str(path) if path else None


def _item_path(kind: Kind, key: str) -> str:
    # VM subnets, IP pools and customer routes have path keys (Fabrikam2/Default): keep their slashes.
    safe = "/" if kind in PATH_KEYED else ""
    return f"/v1/{kind.value}/{quote(key, safe=safe)}"


class ControllerClient:
    """One controller or several replicas of one fabric, one token, a connection pool per
    controller. Use as a context manager."""

    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_CONTROLLER,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ):
        """`base_url`: one URL, or several (a list, or one string with commas or spaces),
        checked by `agent.watch.controller_urls` (a bad one is a ControllerError).
        `ca_file`: the CA that signed the controllers' certificates (their tls/ca.crt), for
        https:// URLs; None trusts the system's CAs. An unreadable file is a ControllerError.
        `connect_timeout`: seconds to open a connection (TCP and TLS handshake) to one
        controller before trying the next."""
        try:
            self.urls = controller_urls(base_url)
        except ValueError as exc:
            raise ControllerError(str(exc)) from None
        self._current = 0  # index of the controller that answered last
        headers = {"User-Agent": "hnvctl/0.1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        verify: ssl.SSLContext | bool = True
        if ca_file:
            try:
                verify = ssl.create_default_context(cafile=os.fspath(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ControllerError(f"CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
        # A controller whose machine is gone answers nothing, not even a refusal: give up
        # connecting after `connect_timeout` and try the next one, not after the whole `timeout`.
        timeouts = httpx.Timeout(timeout, connect=min(timeout, connect_timeout))
        self._client_options = {"headers": headers, "timeout": timeouts, "transport": transport, "verify": verify}
        self._http: dict[str, httpx.Client] = {}  # one pool per controller, opened when first used

    @property
    def base_url(self) -> str:
        """The controller in use: the one that answered last."""
        return self.urls[self._current]

    def _http_for(self, url: str) -> httpx.Client:
        if url not in self._http:
            self._http[url] = httpx.Client(base_url=url, **self._client_options)
        return self._http[url]

    def close(self) -> None:
        for http in self._http.values():
            http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport --------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; the decoded JSON body (None for 204) or an exception.

        Tried on the controller that answered last, then on each other one in order, but
        only past a failure that proves the request was not acted on (see the module)."""
        failures: list[str] = []
        for offset in range(len(self.urls)):
            index = (self._current + offset) % len(self.urls)
            url = self.urls[index]
            try:
                response = self._http_for(url).request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Why these two only: the connection never opened, nothing was sent.
                failures.append(f"controller {url}: {_transport_reason(exc)}")
                continue
            except httpx.TimeoutException:
                raise ControllerUnavailable(
                    f"controller {url}: no answer to {method} {path} in time" + self._not_retried(method)
                ) from None
            except httpx.TransportError as exc:
                raise ControllerUnavailable(f"controller {url}: {_transport_reason(exc)}"
                                            + self._not_retried(method)) from None
            if response.status_code == 503:
                # The controller says it did not act (e.g. its database is unreachable).
                failures.append(f"controller {url}: {method} {path} failed with HTTP 503{_body_excerpt(response)}")
                continue
            self._current = index
            return self._answer(url, method, path, response)
        if len(failures) == 1:
            raise ControllerUnavailable(failures[0])
        raise ControllerUnavailable("no controller answered: " + "; ".join(failures))

    def _not_retried(self, method: str) -> str:
        if len(self.urls) == 1 or method in ("GET", "HEAD"):
            return ""
        return " (not sent to another controller: it may have been applied)"

    def _answer(self, url: str, method: str, path: str, response: httpx.Response) -> Any:
        """A controller's response: the decoded JSON body, or the exception it means."""
        if response.status_code >= 500:
            raise ControllerUnavailable(
                f"controller {url}: {method} {path} failed with HTTP {response.status_code}"
                + _body_excerpt(response) + self._not_retried(method)
            )
        if response.status_code >= 400:
            raise _refusal(method, path, response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ControllerUnavailable(
                f"controller {url}: {method} {path} answered HTTP {response.status_code} "
                "with a body that is not JSON"
            ) from None

    # --- fabric objects -----------------------------------------------------------------

    def list(self, kind: Kind, **filters: str) -> list[BaseModel]:
        params = {name: value for name, value in filters.items() if value is not None}
        if kind is Kind.host:
            return [parse_answer(HostSync, obj) for obj in self.request("GET", "/v1/hosts", params=params)]
        return [parse_answer(STORED_OF[kind], obj) for obj in self.request("GET", f"/v1/{kind.value}", params=params)]

    def list_json(self, kind: Kind, **filters: str) -> list[dict[str, Any]]:
        """The objects as the controller sent them (for `-o json` and for diffing)."""
        params = {name: value for name, value in filters.items() if value is not None}
        return self.request("GET", f"/v1/{kind.value}", params=params)

    def get_json(self, kind: Kind, key: str) -> dict[str, Any]:
        return self.request("GET", _item_path(kind, key))

    def get(self, kind: Kind, key: str) -> BaseModel:
        body = self.get_json(kind, key)
        return parse_answer(HostSync, body) if kind is Kind.host else parse_answer(STORED_OF[kind], body)

    def create(self, kind: Kind, body: dict[str, Any] | BaseModel) -> dict[str, Any]:
        return self.request("POST", f"/v1/{kind.value}", json=_json_body(body))

    def update(self, kind: Kind, key: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", _item_path(kind, key), json=changes)

    def delete(self, kind: Kind, key: str) -> None:
        self.request("DELETE", _item_path(kind, key))

    # --- hosts ----------------------------------------------------------------------------

    def hosts(self) -> list[HostSync]:
        return [parse_answer(HostSync, obj) for obj in self.request("GET", "/v1/hosts")]

    def wait_in_sync(
        self, hosts: Iterable[str] | None = None, timeout: float = 60.0, interval: float = 0.25
    ) -> tuple[bool, list[HostSync]]:
        """Poll until every named host (default: all) is InSync, or the time is up.

        Returns (all in sync, the last rows of those hosts). An unknown host name is a
        refusal, not a wait: it would never become InSync.
        """
        wanted = set(hosts) if hosts is not None else None
        deadline = time.monotonic() + timeout
        while True:
            rows = self.hosts()
            if wanted is not None:
                missing = sorted(wanted - {row.name for row in rows})
                if missing:
                    raise ApiRefused(404, f"host {missing[0]} does not exist", "host", "no such host to wait for")
                rows = [row for row in rows if row.name in wanted]
            if all(row.sync == "InSync" for row in rows):
                return True, rows
            if time.monotonic() >= deadline:
                return False, rows
            time.sleep(interval)

    def set_virtual_switch(self, host: str, body: dict[str, Any] | BaseModel) -> VirtualSwitch:
        answer = self.request("PUT", f"{_item_path(Kind.host, host)}/virtual-switch", json=_json_body(body))
        return parse_answer(VirtualSwitch, answer)

    def virtual_switch(self, host: str) -> VirtualSwitch | None:
        """The host's virtual switch, or None when it has none."""
        try:
            answer = self.request("GET", f"{_item_path(Kind.host, host)}/virtual-switch")
        except ApiRefused as exc:
            if exc.status == 404:
                return None
            raise
        return parse_answer(VirtualSwitch, answer)

    def delete_virtual_switch(self, host: str) -> None:
        self.request("DELETE", f"{_item_path(Kind.host, host)}/virtual-switch")

    def lookup_records(self, host: str) -> list[LookupRecord]:
        answer = self.request("GET", f"{_item_path(Kind.host, host)}/lookup-records")
        return [parse_answer(LookupRecord, record) for record in answer]

    def host_state(self, host: str) -> HostState:
        return HostState.model_validate(self.request("GET", f"{_item_path(Kind.host, host)}/state"))

    # --- VMs and leases ---------------------------------------------------------------------

    def migrate_vm(self, vm: str, host: str) -> Vm:
        answer = self.request("POST", f"{_item_path(Kind.vm, vm)}/migrate", json={"host": host})
        return parse_answer(Vm, answer)

    def ip_addresses(
        self,
        pool: str | None = None,
        kind: str | None = None,
        host: str | None = None,
        vm_network: str | None = None,
    ) -> list[Lease]:
        """Get-SCIPAddress: every lease and what holds it, optionally filtered."""
        params = {"pool": pool, "kind": kind, "host": host, "vm_network": vm_network}
        answer = self.request("GET", "/v1/ip-addresses", params={k: v for k, v in params.items() if v is not None})
        return [parse_answer(Lease, lease) for lease in answer]

    # --- the whole fabric ------------------------------------------------------------------

    def apply_fabric(self, document: dict[str, Any], dry_run: bool = False, prune: bool = False) -> dict[str, Any]:
        """POST /v1/fabric/apply: the controller makes the fabric hold the document, as
        one transaction; its answer lists the changes (`{dry_run, prune, applied, changes}`)."""
        params = {"dry_run": "true" if dry_run else "false", "prune": "true" if prune else "false"}
        return self.request("POST", "/v1/fabric/apply", json=document, params=params)

    def live_fabric(self) -> Iterator[tuple[Kind, list[dict[str, Any]]]]:
        """Every object of every kind, as JSON."""
        for kind in Kind:
            yield kind, self.list_json(kind)


def parse_answer(model: type[ModelT], obj: dict[str, Any]) -> ModelT:
    """Read an answer into a model, ignoring fields the model does not know (the
    controller may add some, like `key`): an older client keeps working."""
    known = {name: value for name, value in obj.items() if name in model.model_fields}
    try:
        return model.model_validate(known)
    except ValidationError as exc:
        raise ControllerUnavailable(
            f"controller answered a {model.__name__} this client cannot read: {describe_validation_error(exc)[0]}"
        ) from None


def _json_body(body: dict[str, Any] | BaseModel) -> dict[str, Any]:
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json", exclude_unset=True)
    return body


def _transport_reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "refused" in text.lower():
        return "connection refused (is hnv-controller running there?)"
    return text


def _body_excerpt(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return f": {text[:200]}" if text else ""


def _refusal(method: str, path: str, response: httpx.Response) -> ApiRefused:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        return ApiRefused(response.status_code, str(body["error"]), body.get("field"), str(body.get("reason", "")))
    if isinstance(body, dict) and "detail" in body:  # FastAPI's own 404/405 for unknown routes
        detail = body["detail"] if isinstance(body["detail"], str) else str(body["detail"])
        return ApiRefused(response.status_code, f"{method} {path}: {detail}", None, detail)
    return ApiRefused(response.status_code, f"{method} {path}: HTTP {response.status_code}", None, "")
