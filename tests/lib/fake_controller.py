"""A small controller for agent tests: the real HTTP protocol, fixed documents, no fabric.

Serves exactly the agent-facing half of the controller protocol on a real socket:

- ``GET /v1/hosts/{host}/state`` (plain and ``?watch=1[&heartbeat=S]`` NDJSON stream);
- ``PUT /v1/hosts/{host}/status``, recorded and answered with the sync verdict;
- bearer tokens: 401 without or with an unknown token, 403 for another host's token.

Tests publish documents per host (valid or deliberately broken: nothing here validates),
drop every open stream, fall silent (no heartbeats: a half-dead controller), or stop and
start again on the same port (an outage). It knows nothing of fabric objects; the real
controller lives in ``controller/``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class _HostEntry:
    document: Any = None
    version: int = 0  # bumps on every publish, so watchers see each one
    statuses: list[dict[str, Any]] = field(default_factory=list)


class FakeController:
    """``start()``/``stop()`` may be repeated: the port stays the same (an outage)."""

    def __init__(self, tokens: dict[str, str], *, host: str = "127.0.0.1", port: int | None = None):
        self.tokens = dict(tokens)  # token -> host name
        self.address = host
        self.port = port or free_port(host)
        self.hosts: dict[str, _HostEntry] = {}
        self.silent = False  # when True, streams send nothing, not even heartbeats
        self.watch_connects = 0
        self._condition = threading.Condition()
        self._epoch = 0  # bumps on drop_streams()/stop(): open streams end
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    # --- test controls --------------------------------------------------------------

    def publish(self, host: str, document: Any) -> None:
        with self._condition:
            entry = self.hosts.setdefault(host, _HostEntry())
            entry.document = document
            entry.version += 1
            self._condition.notify_all()

    def statuses(self, host: str) -> list[dict[str, Any]]:
        with self._condition:
            return list(self.hosts.setdefault(host, _HostEntry()).statuses)

    def wait_for_status(self, host: str, predicate, timeout: float = 10.0, after: int = 0) -> dict[str, Any]:
        """The first status body (with the reply's sync) matching ``predicate``, among
        those recorded after the first ``after`` ones."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for status in self.hosts.setdefault(host, _HostEntry()).statuses[after:]:
                    if predicate(status):
                        return status
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = self.hosts[host].statuses
                    raise AssertionError(f"no matching status from {host} within {timeout}s; got {seen}")
                self._condition.wait(left)

    def drop_streams(self) -> None:
        with self._condition:
            self._epoch += 1
            self._condition.notify_all()

    def start(self) -> FakeController:
        controller = self

        class Handler(_Handler):
            pass

        Handler.controller = controller
        self._httpd = ThreadingHTTPServer((self.address, self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-controller", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self.drop_streams()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # --- protocol -------------------------------------------------------------------

    def _desired_generation(self, host: str) -> int | None:
        document = self.hosts.get(host, _HostEntry()).document
        if isinstance(document, dict) and isinstance(document.get("generation"), int):
            return document["generation"]
        return None

    def _record_status(self, host: str, body: dict[str, Any]) -> dict[str, Any]:
        desired = self._desired_generation(host)
        generation = body.get("generation")
        errors = body.get("errors") or []
        if errors:
            first = errors[0]
            reply = {"host": host, "sync": "Error", "reason": f"{first.get('object')}: {first.get('message')}"}
        elif desired is not None and isinstance(generation, int) and generation < desired:
            reply = {"host": host, "sync": "Pending", "reason": f"applied {generation}, desired {desired}"}
        else:
            reply = {"host": host, "sync": "InSync", "reason": ""}
        with self._condition:
            self.hosts.setdefault(host, _HostEntry()).statuses.append({**body, "sync": reply["sync"]})
            self._condition.notify_all()
        return reply


class _Handler(BaseHTTPRequestHandler):
    controller: FakeController
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _error(self, status: int, error: str, field: str | None, reason: str) -> None:
        body = json.dumps({"error": error, "field": field, "reason": reason}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised_host(self, host: str) -> bool:
        header = self.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        owner = self.controller.tokens.get(token)
        if owner is None:
            self._error(401, "a valid bearer token is required", None, "missing or unknown token")
            return False
        if owner != host:
            self._error(403, f"this token belongs to host {owner}, not {host}", None, "wrong host")
            return False
        return True

    def _route(self) -> tuple[str, str, dict[str, list[str]]] | None:
        parts = urlsplit(self.path)
        segments = parts.path.strip("/").split("/")
        if len(segments) == 4 and segments[:2] == ["v1", "hosts"] and segments[3] in ("state", "status"):
            return segments[2], segments[3], parse_qs(parts.query)
        self._error(404, f"no such path {parts.path}", None, "not found")
        return None

    def do_GET(self) -> None:  # noqa: N802
        route = self._route()
        if route is None:
            return
        host, what, query = route
        if what != "state" or not self._authorised_host(host):
            return
        controller = self.controller
        with controller._condition:
            entry = controller.hosts.get(host)
            if entry is None or entry.document is None:
                self._error(404, f"host {host} is not in the fabric", "host", "unknown host")
                return
        if query.get("watch") != ["1"]:
            body = json.dumps(entry.document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        heartbeat = float(query.get("heartbeat", ["5"])[0])
        self._stream(host, heartbeat)

    def _stream(self, host: str, heartbeat: float) -> None:
        controller = self.controller
        # A close-delimited body (HTTP/1.0 style): the stream has no length and ends
        # only when the connection does.
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        with controller._condition:
            controller.watch_connects += 1
            epoch = controller._epoch
        sent_version = 0
        last_sent = 0.0
        try:
            while True:
                with controller._condition:
                    entry = controller.hosts[host]
                    controller._condition.wait_for(
                        lambda: controller._epoch != epoch or entry.version != sent_version,
                        timeout=max(0.0, last_sent + heartbeat - time.monotonic()),
                    )
                    if controller._epoch != epoch:
                        return
                    document, version = entry.document, entry.version
                if controller.silent:
                    time.sleep(0.05)
                    continue
                generation = document.get("generation") if isinstance(document, dict) else None
                if version != sent_version:
                    message = {"type": "state", "generation": generation, "state": document}
                    sent_version = version
                elif time.monotonic() - last_sent >= heartbeat:
                    message = {"type": "heartbeat", "generation": generation, "time": time.time()}
                else:
                    continue
                self.wfile.write(json.dumps(message).encode() + b"\n")
                self.wfile.flush()
                last_sent = time.monotonic()
        except (BrokenPipeError, ConnectionResetError):
            return

    def do_PUT(self) -> None:  # noqa: N802
        route = self._route()
        if route is None:
            return
        host, what, _ = route
        if what != "status" or not self._authorised_host(host):
            return
        length = int(self.headers.get("Content-Length", "0"))
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            self._error(400, "the status body is not JSON", None, "malformed")
            return
        reply = json.dumps(self.controller._record_status(host, body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
